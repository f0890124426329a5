"""Inferno: a self-healing cloud for AI inference.

The package is the minimal core: HTTP on anyio + h11, layered configuration,
plugins, metrics, wire types and the lifecycle of a role.  It knows no role;
roles, engines, providers, health checkers and routing policies arrive as
plugins through the ``inferno`` entry-point group.
"""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
