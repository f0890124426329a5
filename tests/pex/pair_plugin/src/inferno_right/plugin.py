"""Offers the ``right`` role."""

from __future__ import annotations

from inferno.plugins import hookimpl
from inferno.roles import Role


@hookimpl
def inferno_roles() -> list[Role]:
    return [
        Role(
            name="right",
            help="the right role of the pair fixture",
            entry="inferno_right.plugin:run",
        )
    ]


async def run(ctx: object) -> None:
    print("right says hello", flush=True)
