"""Roles and a plugin for in-process lifecycle tests (imported by name, like real role code)."""

from __future__ import annotations

from typing import Any

import anyio

from inferno.errors import ConfigError, ConfigProblem, InfernoError
from inferno.plugins import hookimpl
from inferno.roles import Role

#: What happened, in order; tests clear it first.
EVENTS: list[str] = []


class Recorder:
    """A plugin recording each lifecycle hook it sees."""

    def __init__(self, name: str, *, fail_startup: bool = False) -> None:
        self.name = name
        self.fail_startup = fail_startup

    @hookimpl
    def inferno_startup(self, role: Role, app: Any) -> None:
        EVENTS.append(f"{self.name} startup {role.name}")
        if self.fail_startup:
            raise OSError("no database")

    @hookimpl
    async def inferno_shutdown(self, role: Role, app: Any) -> None:
        await anyio.lowlevel.checkpoint()
        EVENTS.append(f"{self.name} shutdown {role.name} stopping={app.stopping.is_set()}")

    @hookimpl
    def inferno_reload(self, role: Role, app: Any) -> None:
        EVENTS.append(f"{self.name} reload")


def role(name: str) -> Role:
    return Role(name=name, help=f"test role {name}", entry=f"inferno_test_roles:{name}")


async def returns(ctx: Any) -> None:
    EVENTS.append(f"run {ctx.role.name} timeout={ctx.shutdown_timeout}")
    ctx.metrics.counter("test_runs_total", "runs of the test role").inc()


async def fails(ctx: Any) -> None:
    raise RuntimeError("role blew up")


async def fails_expected(ctx: Any) -> None:
    raise InfernoError("backend 10.0.0.7:8000 unreachable")


async def bad_config(ctx: Any) -> None:
    raise ConfigError([ConfigProblem("tls.cert", "default", "file missing", "a PEM file")])


async def reloads(ctx: Any) -> None:
    def broken() -> None:
        raise ValueError("cannot reread")

    async def later() -> None:
        await anyio.lowlevel.checkpoint()
        EVENTS.append("callback later")

    ctx.on_reload(broken)
    ctx.on_reload(later)
    await ctx.reload()
    EVENTS.append("run done")


@hookimpl
def inferno_roles() -> list[Role]:
    """Every role above, for tests going through ``main(argv)``."""
    names = ("returns", "fails", "fails_expected", "bad_config", "reloads")
    return [role(n) for n in names] + [
        Role(name="ghost", help="its code is missing", entry="inferno_no_such_module:run")
    ]
