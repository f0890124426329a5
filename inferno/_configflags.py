"""Command-line flags for settings, on argparse: registration and collection.

See :func:`add_flags` and :func:`flags_from_namespace`; users import them
from :mod:`inferno.config`.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from typing import Any

from inferno._configschema import FLAG_DEST_PREFIX, Entry, FlagValue, Section, index_settings
from inferno._configtypes import Bool, TomlValue

__all__ = ["add_flags", "flags_from_namespace"]


class _SettingAction(argparse.Action):
    """Store a :class:`FlagValue` (raw text + the flag used) under the setting's dest."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        raw = values if isinstance(values, str) else str(self.const)
        setattr(namespace, self.dest, FlagValue(raw, option_string or self.option_strings[0]))


def add_flags(
    parser: argparse.ArgumentParser, sections: Sequence[Section], role: str | None
) -> None:
    """Register one optional flag per setting, in an argument group per section.

    Each flag stores a :class:`FlagValue` under ``dest=FLAG_DEST_PREFIX +
    "section.key"`` and is absent from the namespace unless given; collect
    them with :func:`flags_from_namespace`.  A :class:`Bool` setting gets
    ``--flag`` (true), ``--flag=VALUE`` and ``--no-flag`` (false); note that
    ``--flag word`` also takes ``word`` as its value.  Giving a flag twice
    keeps the last value (for lists too: ``--backends a,b``).

    :raises ValueError: when two settings derive the same flag or variable.
    """
    entries = index_settings(sections, role)
    groups: dict[str, Any] = {}
    for entry in entries.values():
        section, setting = entry.section, entry.setting
        if section.name not in groups:
            groups[section.name] = parser.add_argument_group(
                f"[{section.name}] settings", section.help or None
            )
        group = groups[section.name]
        dest = FLAG_DEST_PREFIX + entry.dotted
        common: dict[str, Any] = {
            "dest": dest,
            "action": _SettingAction,
            "default": argparse.SUPPRESS,
        }
        if isinstance(setting.type, Bool):
            group.add_argument(
                entry.flag, nargs="?", const="true", metavar="BOOL", help=_help(entry), **common
            )
            group.add_argument(
                f"--no-{entry.flag[2:]}",
                nargs=0,
                const="false",
                help=f"same as {entry.flag}=false",
                **common,
            )
        else:
            group.add_argument(
                entry.flag, metavar=setting.type.metavar, help=_help(entry), **common
            )


def _help(entry: Entry) -> str:
    setting = entry.setting
    if setting.secret:
        default = "hidden"
    elif setting.default is None:
        default = "unset"
    else:
        default = _display(setting.type.render(setting.default))
    text = f"{setting.help} [default: {default}; env {entry.env}]"
    if setting.secret:
        text += " (a command line is visible to other users: prefer the variable)"
    return text.replace("%", "%%")  # argparse %-formats help strings


def _display(value: TomlValue) -> str:
    """A value as typed on a command line: ``30s``, ``a:1,b:2``, ``true``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(_display(item) for item in value) or "empty"
    return str(value)


def flags_from_namespace(
    namespace: argparse.Namespace | Mapping[str, Any],
) -> dict[str, FlagValue]:
    """The setting flags given on the command line, as ``load_config(flags=...)`` wants them."""
    items = vars(namespace) if isinstance(namespace, argparse.Namespace) else namespace
    return {
        name[len(FLAG_DEST_PREFIX) :]: value
        for name, value in items.items()
        if name.startswith(FLAG_DEST_PREFIX) and isinstance(value, FlagValue)
    }
