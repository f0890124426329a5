"""The backend plugin's hook implementations: the ``backend`` and ``doctor`` roles, two engines.

Registered through the ``inferno`` entry-point group like any third-party
plugin (``backend = "inferno_backend.plugin"``).  Imported to build the command
line, so it stays light: role code and engines are imported only when used.

Engines (``inferno_engines``): each factory takes the role context and returns
an object implementing :class:`inferno_backend.engines.base.Engine`:

``sim``
    the simulator (:mod:`inferno_backend.engines.sim`), configured by
    ``sim_profile``, ``sim_speed``, ``sim_faults`` and ``model``;
``openai``
    a front for any OpenAI-compatible server
    (:mod:`inferno_backend.engines.openai`), configured by ``engine_url``,
    ``engine_metrics_url``, ``engine_api_key`` and ``model``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from inferno.plugins import hookimpl
from inferno.roles import Role
from inferno_backend.settings import BACKEND_SECTION, DOCTOR_SECTION

if TYPE_CHECKING:
    from inferno.hookspecs import NamedFactories
    from inferno.lifecycle import RoleContext

__all__ = ["inferno_engines", "inferno_roles"]

BACKEND_ROLE = Role(
    name="backend",
    help="run an inference node: an OpenAI-compatible API over an engine (sim, openai)",
    entry="inferno_backend.role:run",
    sections=(BACKEND_SECTION,),
    description=(
        "Serve the OpenAI API (/v1/models, /v1/completions, /v1/chat/completions, /v1/ws) "
        "over an inference engine, report vitals on the ops port (/metrics, /telemetry, "
        "/health), register with the load balancers in --discovery-lb and drain on SIGTERM."
    ),
    packages=("inferno_backend",),
)

DOCTOR_ROLE = Role(
    name="doctor",
    help="print this machine's GPUs, NVML samples and matmul throughput, then exit",
    entry="inferno_backend.role:run_doctor",
    sections=(DOCTOR_SECTION,),
    packages=("inferno_backend",),
)


@hookimpl
def inferno_roles() -> list[Role]:
    """The ``backend`` role and the ``doctor`` GPU report."""
    return [BACKEND_ROLE, DOCTOR_ROLE]


def _sim_engine(ctx: RoleContext) -> Any:
    from inferno_backend.role import make_sim_engine

    return make_sim_engine(ctx)


def _openai_engine(ctx: RoleContext) -> Any:
    from inferno_backend.role import make_openai_engine

    return make_openai_engine(ctx)


@hookimpl
def inferno_engines() -> NamedFactories:
    """``sim`` and ``openai``; each factory imports its engine when called."""
    return {"sim": _sim_engine, "openai": _openai_engine}
