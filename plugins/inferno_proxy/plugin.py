"""The proxy plugin's hook implementations: the ``proxy`` role and the routing policies.

Registered through the ``inferno`` entry-point group like any third-party
plugin (``proxy = "inferno_proxy.plugin"``).  Imported to build the command
line, so it stays light: the role's code is imported only when it runs, and
the policies module (pure Python, no I/O) only when a policy is asked for.

Routing policies (``inferno_routing_policies``): each factory takes the role
context and returns a :class:`inferno_proxy.policies.RoutingPolicy`:
``least_requests`` (the default), ``round_robin``, ``weighted`` and
``affinity``; see :mod:`inferno_proxy.policies`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from inferno.plugins import hookimpl
from inferno.roles import Role
from inferno_proxy.settings import PROXY_SECTION

if TYPE_CHECKING:
    from inferno.hookspecs import NamedFactories

__all__ = ["POLICY_NAMES", "PROXY_ROLE", "inferno_roles", "inferno_routing_policies"]

#: The built-in policies, named here so that listing them imports nothing.
POLICY_NAMES: Final = ("affinity", "least_requests", "round_robin", "weighted")

PROXY_ROLE: Final = Role(
    name="proxy",
    help="run the load balancer: route inference requests to healthy nodes",
    entry="inferno_proxy.role:run",
    sections=(PROXY_SECTION,),
    description=(
        "Route OpenAI-compatible requests to the backends that registered on the operations "
        "port (--ops-port) or were given with --backends; check their health, retry before "
        "the first byte, and explain each node's state on GET /backends."
    ),
    packages=("inferno_proxy", "inferno_health"),
)


@hookimpl
def inferno_roles() -> list[Role]:
    """The ``proxy`` role."""
    return [PROXY_ROLE]


def _policy(name: str) -> Any:
    def factory(ctx: object = None) -> Any:
        from inferno_proxy.policies import routing_policy_factories

        return routing_policy_factories()[name](ctx)

    factory.__name__ = f"{name}_policy"
    return factory


@hookimpl
def inferno_routing_policies() -> NamedFactories:
    """The built-in policies; each factory imports :mod:`inferno_proxy.policies` when called."""
    return {name: _policy(name) for name in POLICY_NAMES}
