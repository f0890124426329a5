"""Offers the ``left`` role; it needs :mod:`inferno_pairlib` too."""

from __future__ import annotations

from inferno.plugins import hookimpl
from inferno.roles import Role


@hookimpl
def inferno_roles() -> list[Role]:
    return [
        Role(
            name="left",
            help="the left role of the pair fixture",
            entry="inferno_left.plugin:run",
            packages=("inferno_pairlib",),
        )
    ]


async def run(ctx: object) -> None:
    from inferno_pairlib import GREETING

    print(GREETING, flush=True)
