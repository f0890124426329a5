"""What a role is, as the core sees it: a name, its settings, and where its code lives.

A plugin returns :class:`Role` objects from ``inferno_roles()``.  The role's
code is named by an import string and imported only when that role runs, so
``inferno --help`` and ``inferno plugins`` never import role code.
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from inferno.config import Section

__all__ = ["Role", "RoleRunner"]

#: ``async def run(ctx) -> None`` where ``ctx`` is an :class:`inferno.lifecycle.RoleContext`.
RoleRunner = Callable[[Any], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Role:
    """A subcommand of ``inferno``: ``inferno <name> [options]``.

    :param name: the subcommand, also the name of the role's own config section.
    :param help: one line for ``inferno --help``.
    :param sections: configuration sections the role reads.  The section named
        like the role gets plain ``--key`` flags; others get ``--section-key``.
    :param entry: ``"package.module:function"`` of ``async def run(ctx)``,
        imported only when the role runs.
    :param packages: import packages the role needs besides the one that
        declared it (used by ``build_pex.py --roles``).
    """

    name: str
    help: str
    entry: str
    sections: tuple[Section, ...] = ()
    description: str = ""
    packages: tuple[str, ...] = field(default=())

    def load(self) -> RoleRunner:
        """Import and return the role's ``run`` coroutine function."""
        module_name, _, attr = self.entry.partition(":")
        if not attr:
            raise ValueError(f"role {self.name!r}: entry {self.entry!r} is not 'module:function'")
        module = importlib.import_module(module_name)
        runner: RoleRunner = getattr(module, attr)
        return runner
