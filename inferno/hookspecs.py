"""Every hook Inferno calls: the plugin contract, and its reference documentation.

A plugin is a module (or any object) with functions named like the hooks below
and decorated with :data:`inferno.plugins.hookimpl`.  It reaches Inferno through
the ``inferno`` entry-point group of its distribution::

    [project.entry-points.inferno]
    hello = "inferno_hello.plugin"

or, unpackaged, through ``INFERNO_PLUGINS=module,module``.  First-party plugins
(proxy, backend, governator, ...) take exactly the same path.

Conventions every hook follows:

* Hooks are called with keyword arguments; an implementation may accept only
  the arguments it needs (pluggy passes those it asks for).
* *Collection hooks* (roles, engines, checkers, policies, providers, telemetry
  sources) are called once per process, when the command line is built or a
  role starts.  They must be cheap and must not import heavy code: a plugin
  returns descriptions and *factories*, and the factory imports what it needs
  when it is called.
* *Named collection hooks* return a mapping of name to factory
  (:data:`NamedFactories`).  The core merges the mappings of every plugin
  into one table (:func:`inferno.plugins.collect_named`); two plugins offering
  the same name is an error that names both plugins, never a silent override.
  Returning ``None`` or an empty mapping means "nothing to offer".
* *Lifecycle hooks* receive the :class:`~inferno.roles.Role` being run and its
  :class:`~inferno.lifecycle.RoleContext`.  They may be plain functions or may
  return an awaitable, which the core awaits (inside the role's event loop)
  before going on.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeAlias

import pluggy

if TYPE_CHECKING:
    from inferno.lifecycle import RoleContext
    from inferno.roles import Role

__all__ = [
    "PROJECT_NAME",
    "Factory",
    "LifecycleResult",
    "NamedFactories",
    "hookspec",
    "inferno_engines",
    "inferno_health_checkers",
    "inferno_providers",
    "inferno_reload",
    "inferno_roles",
    "inferno_routing_policies",
    "inferno_shutdown",
    "inferno_startup",
    "inferno_telemetry_sources",
]

#: The pluggy project name: markers of another project name are ignored.
PROJECT_NAME = "inferno"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)

#: Builds one named thing (an engine, a checker, ...).  Its arguments are set by
#: the role that uses it and documented with the hook that returns it.
Factory: TypeAlias = Callable[..., Any]

#: What a named collection hook returns: ``{name: factory}``.
NamedFactories: TypeAlias = Mapping[str, Factory]

#: What a lifecycle hook returns: nothing, or something for the core to await.
LifecycleResult: TypeAlias = Awaitable[None] | None


# --------------------------------------------------------------------------
# Core: roles (subcommands) and their lifecycle
# --------------------------------------------------------------------------


@hookspec
def inferno_roles() -> list[Role]:
    """Offer roles: subcommands ``inferno <role>``.

    Called to build the command line, so it runs for ``inferno --help`` too:
    return :class:`~inferno.roles.Role` specs only.  The role's code is named by
    ``Role.entry`` (``"package.module:function"``) and imported only when that
    role runs.  Two plugins offering the same role name, or a role named like a
    built-in command (``plugins``, ``config``, ``version``), is an error.

    :returns: a list of :class:`~inferno.roles.Role`; an empty list (or
        ``None``) when the plugin offers no role.
    """
    raise NotImplementedError


@hookspec
def inferno_startup(role: Role, app: RoleContext) -> LifecycleResult:
    """Act when a role starts, before its ``run`` coroutine is called.

    Signal handling is already in place and the event loop is running.  An
    exception here stops the start: the role does not run and the process
    exits with an error.

    :param role: the role being started.
    :param app: the role's context: configuration, plugin manager, metrics
        registry, the ``stopping`` event and ``on_reload``.
    :returns: ``None``, or an awaitable that the core awaits before the role runs.
    """
    raise NotImplementedError


@hookspec
def inferno_shutdown(role: Role, app: RoleContext) -> LifecycleResult:
    """Act after a role's ``run`` coroutine has returned (or was cancelled).

    Called however the role ended, including after a failed start, in the
    reverse order of ``inferno_startup`` (the first plugin started is the last
    stopped).  The core bounds the whole shutdown phase by
    ``runtime.shutdown_timeout``; exceptions are logged and do not prevent
    other plugins' shutdown hooks from running.

    :param role: the role that is stopping.
    :param app: the role's context (``app.stopping`` is set by then).
    :returns: ``None``, or an awaitable that the core awaits before exiting.
    """
    raise NotImplementedError


@hookspec
def inferno_reload(role: Role, app: RoleContext) -> LifecycleResult:
    """Act on a reload request (``SIGHUP``) while a role runs.

    Called before the callbacks the role registered with ``app.on_reload``.
    Exceptions are logged; the role keeps running.

    :param role: the running role.
    :param app: the role's context.
    :returns: ``None``, or an awaitable that the core awaits before calling the
        next reload hook.
    """
    raise NotImplementedError


# --------------------------------------------------------------------------
# Backend: inference engines
# --------------------------------------------------------------------------


@hookspec
def inferno_engines() -> NamedFactories | None:
    """Offer inference engines for the ``backend`` role (``sim``, ``openai``, ...).

    :returns: a mapping of engine name to factory.  The backend calls the
        factory of the configured engine with the role context
        (``factory(ctx)``) and receives the engine object; the engine interface
        is documented by the backend plugin.  ``None`` when the plugin offers
        no engine.
    """
    raise NotImplementedError


# --------------------------------------------------------------------------
# Proxy: health checkers and routing policies
# --------------------------------------------------------------------------


@hookspec
def inferno_health_checkers() -> NamedFactories | None:
    """Offer active health checkers for the ``proxy`` role (``vitals``, ``http``, ``tcp``).

    :returns: a mapping of checker name to factory.  The proxy calls the
        factory of the configured checker with the role context
        (``factory(ctx)``) and receives the checker; ``None`` when the plugin
        offers no checker.
    """
    raise NotImplementedError


@hookspec
def inferno_routing_policies() -> NamedFactories | None:
    """Offer load-balancing policies for the ``proxy`` role.

    :returns: a mapping of policy name to factory.  The proxy calls the
        factory of the configured policy with the role context
        (``factory(ctx)``) and receives the policy; ``None`` when the plugin
        offers no policy.
    """
    raise NotImplementedError


# --------------------------------------------------------------------------
# Governator: cloud providers and telemetry sources
# --------------------------------------------------------------------------


@hookspec
def inferno_providers() -> NamedFactories | None:
    """Offer cloud providers for the ``governator`` role (``local``, ``static``, ``aws``, ...).

    :returns: a mapping of provider name to factory.  The governator calls the
        factory of each configured provider with the role context
        (``factory(ctx)``) and receives the provider, through which it starts
        and stops nodes; ``None`` when the plugin offers no provider.
    """
    raise NotImplementedError


@hookspec
def inferno_telemetry_sources() -> NamedFactories | None:
    """Offer telemetry sources: where the ``governator`` reads demand and utilisation.

    :returns: a mapping of source name to factory.  The governator calls the
        factory of each configured source with the role context
        (``factory(ctx)``) and receives the source; ``None`` when the plugin
        offers no source.
    """
    raise NotImplementedError
