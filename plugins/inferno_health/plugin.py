"""The health plugin's hook implementation: ``inferno_health_checkers()``.

Imported whenever the plugin manager is built (``inferno --help`` included),
so it imports neither the HTTP client nor anyio: each factory imports
:mod:`inferno_health.checkers` when the proxy calls it.

Every factory is called as ``factory(ctx)`` with the proxy's
:class:`~inferno.lifecycle.RoleContext` and returns a
:class:`~inferno_health.checkers.HealthChecker`:

``vitals``
    :class:`~inferno_health.checkers.VitalsChecker`: ``GET /metrics`` on the
    node's operations port, strict :class:`~inferno.protocol.NodeVitals`.
``http``
    :class:`~inferno_health.checkers.HTTPChecker`: ``GET`` a path expecting
    2xx.  Reads two optional settings from ``ctx.config`` when the proxy
    declares them: ``proxy.health_path`` (default ``/health``) and
    ``proxy.health_port`` (``service``, the default, or ``metrics``).  An
    invalid value raises :class:`~inferno.errors.ConfigError` naming the key
    and its source.
``tcp``
    :class:`~inferno_health.checkers.TCPChecker`: connect and close.

Settings are read defensively (a context without ``config``, or a config
without the key, gives the default) so the checkers do not depend on which
settings the proxy declares.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from inferno.errors import ConfigError, ConfigProblem
from inferno.plugins import hookimpl

if TYPE_CHECKING:
    from inferno.hookspecs import NamedFactories
    from inferno_health.checkers import HealthChecker

__all__ = ["HEALTH_PATH_KEY", "HEALTH_PORT_KEY", "inferno_health_checkers"]

HEALTH_PATH_KEY: Final = "proxy.health_path"  # the path the http checker GETs
HEALTH_PORT_KEY: Final = "proxy.health_port"  # "service" or "metrics": where that path is


def _setting(ctx: object, key: str, default: Any) -> tuple[Any, str]:
    """``(value, source)`` of ``key`` in ``ctx.config``; the default when it is not there."""
    config = getattr(ctx, "config", None)
    if not isinstance(config, Mapping):
        return default, "default"
    try:
        value = config[key]
    except KeyError:
        return default, "default"
    if value is None:
        return default, "default"
    source = getattr(config, "source", None)
    return value, (source(key) if callable(source) else "config")


def _vitals_checker(ctx: object) -> HealthChecker:
    from inferno_health.checkers import VitalsChecker

    return VitalsChecker()


def _http_checker(ctx: object) -> HealthChecker:
    from inferno_health.checkers import DEFAULT_HEALTH_PATH, HTTPChecker, validate_path

    problems: list[ConfigProblem] = []
    path, path_source = _setting(ctx, HEALTH_PATH_KEY, DEFAULT_HEALTH_PATH)
    try:
        path = validate_path(path)
    except ValueError as exc:
        problems.append(ConfigProblem(HEALTH_PATH_KEY, path_source, str(exc)))
    port, port_source = _setting(ctx, HEALTH_PORT_KEY, "service")
    if port not in ("service", "metrics"):
        problems.append(
            ConfigProblem(
                HEALTH_PORT_KEY, port_source, f"{port!r} is not a port choice", "service, metrics"
            )
        )
    if problems:
        raise ConfigError(problems)
    return HTTPChecker(path=path, port=port)


def _tcp_checker(ctx: object) -> HealthChecker:
    from inferno_health.checkers import TCPChecker

    return TCPChecker()


@hookimpl
def inferno_health_checkers() -> NamedFactories:
    """``vitals``, ``http`` and ``tcp``; each factory imports its checker when called."""
    return {"vitals": _vitals_checker, "http": _http_checker, "tcp": _tcp_checker}
