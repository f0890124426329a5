"""Inferno: a self-healing cloud for AI inference.

The package is the minimal core: HTTP on anyio + h11, layered configuration,
plugins, metrics, wire types and the lifecycle of a role.  It knows no role;
roles, engines, providers, health checkers and routing policies arrive as
plugins through the ``inferno`` entry-point group.

``inferno.hookimpl`` is the marker a plugin decorates its hooks with.  It is
resolved lazily so that ``import inferno`` stays free of pluggy (the CLI's
start-up time is measured).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["__version__", "hookimpl"]

__version__ = "0.1.0"

if TYPE_CHECKING:
    from inferno.plugins import hookimpl


def __getattr__(name: str) -> Any:
    if name == "hookimpl":
        from inferno.plugins import hookimpl

        return hookimpl
    raise AttributeError(f"module 'inferno' has no attribute {name!r}")
