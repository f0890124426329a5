"""The ``up`` plugin's hook implementation: the ``up`` role.

Registered through the ``inferno`` entry-point group like any third-party
plugin (``up = "inferno_up.plugin"``).  Imported to build the command line, so
it stays light: the role's code is imported only when it runs.
"""

from __future__ import annotations

from typing import Final

from inferno.plugins import hookimpl
from inferno.roles import Role
from inferno_up.settings import UP_SECTION

__all__ = ["UP_ROLE", "inferno_roles"]

UP_ROLE: Final = Role(
    name="up",
    help="start a local cluster: a proxy and sim backends on loopback, stopped with Ctrl-C",
    entry="inferno_up.role:run",
    sections=(UP_SECTION,),
    description=(
        "Start a proxy and --backends sim backends as child processes on a loopback address, "
        "wait until every backend has registered with the proxy, print the OpenAI base URL "
        "and examples, and stop every node on Ctrl-C or SIGTERM.  Children's logs go to "
        "stderr, prefixed with their names."
    ),
    # The children run these roles from the same installation (a per-role pex too).
    packages=("inferno_proxy", "inferno_backend", "inferno_health"),
)


@hookimpl
def inferno_roles() -> list[Role]:
    """The ``up`` role."""
    return [UP_ROLE]
