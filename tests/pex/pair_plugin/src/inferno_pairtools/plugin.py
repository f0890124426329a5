"""Offers an engine and no role, as an engine plugin baked in with ``--with`` would."""

from __future__ import annotations

from typing import Any

from inferno.plugins import hookimpl


def _echo(ctx: Any = None) -> str:
    return "pair echo"


@hookimpl
def inferno_engines() -> dict[str, Any]:
    return {"pair-echo": _echo}
