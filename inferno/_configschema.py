"""Declarations of configuration settings, and the names derived from them.

One :class:`Setting` per value, grouped in a :class:`Section`; from each
derive a TOML key, an ``INFERNO_<SECTION>_<KEY>`` variable and a flag.
:func:`index_settings` derives them all for one role and refuses
collisions.  Users import these names from :mod:`inferno.config`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from inferno._configtypes import Bool, ValueType

__all__ = [
    "ENV_PREFIX",
    "FLAG_DEST_PREFIX",
    "REDACTED",
    "RESERVED_ENV_VARS",
    "SOURCE_DEFAULT",
    "Entry",
    "FlagValue",
    "Section",
    "Setting",
    "env_name",
    "flag_name",
    "index_settings",
]

ENV_PREFIX = "INFERNO_"

#: ``INFERNO_*`` variables that are not settings.  They are never reported as
#: unknown, and no setting may derive one of these names.
RESERVED_ENV_VARS: frozenset[str] = frozenset(
    {
        "INFERNO_PLUGINS",  # extra plugin modules (inferno.plugins)
        "INFERNO_PLUGIN_PATH",  # where installed plugins outside the pex live
        "INFERNO_CONFIG",  # a default for --config
        "INFERNO_LOG_LEVEL",  # logging, set up before any configuration is read
        "INFERNO_LOG_FORMAT",
    }
)

#: Prefix of the argparse ``dest`` of every setting flag (``inferno.config:proxy.port``),
#: chosen so that it cannot collide with the CLI's own destinations.
FLAG_DEST_PREFIX = "inferno.config:"

#: Shown instead of a secret value, anywhere a value is displayed.
REDACTED = "<redacted>"

SOURCE_DEFAULT = "default"

_NAME = re.compile(r"[a-z][a-z0-9_]*")
_FLAG = re.compile(r"--[a-z0-9][a-z0-9-]*")


@dataclass(frozen=True, slots=True)
class Setting:
    """One configuration value, declared once.

    :param key: snake_case within its section (``max_header_bytes``).
    :param type: a value type (:class:`Duration`, :class:`Int`, ...).
    :param default: the value when no layer sets it, already parsed
        (``30.0`` for a Duration); ``None`` makes the setting optional.
    :param help: one sentence for ``--help`` and the rendered TOML.
    :param secret: never displayed: rendered as ``<redacted>``, and a bad
        value is reported without echoing it.
    :param flag: overrides the derived flag (``"--listen"``).
    """

    key: str
    type: ValueType
    default: Any
    help: str
    secret: bool = False
    flag: str | None = None

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.key):
            raise ValueError(f"setting key {self.key!r} must be snake_case ([a-z][a-z0-9_]*)")
        if self.flag is not None:
            flag = self.flag if self.flag.startswith("--") else f"--{self.flag}"
            if not _FLAG.fullmatch(flag):
                raise ValueError(f"setting {self.key!r}: flag {self.flag!r} is not a long option")
            object.__setattr__(self, "flag", flag)
        if isinstance(self.default, list):
            object.__setattr__(self, "default", tuple(self.default))


@dataclass(frozen=True, slots=True)
class Section:
    """A named group of settings: a ``[name]`` table, ``INFERNO_NAME_*`` variables."""

    name: str
    settings: tuple[Setting, ...]
    help: str = ""

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise ValueError(f"section name {self.name!r} must be snake_case ([a-z][a-z0-9_]*)")
        object.__setattr__(self, "settings", tuple(self.settings))
        seen: set[str] = set()
        for setting in self.settings:
            if setting.key in seen:
                raise ValueError(f"section {self.name!r} declares {setting.key!r} twice")
            seen.add(setting.key)


@dataclass(frozen=True, slots=True)
class FlagValue:
    """A raw value given on the command line, and the flag that gave it (``--no-tls``)."""

    raw: str
    flag: str


def env_name(section: str, key: str) -> str:
    """The environment variable of a setting: ``INFERNO_PROXY_PORT``."""
    return f"{ENV_PREFIX}{section.upper()}_{key.upper()}"


def flag_name(section: Section, setting: Setting, role: str | None) -> str:
    """The command-line flag of a setting, as seen when running ``role``."""
    if setting.flag is not None:
        return setting.flag
    key = setting.key.replace("_", "-")
    if section.name == role:
        return f"--{key}"
    return f"--{section.name.replace('_', '-')}-{key}"


@dataclass(frozen=True, slots=True)
class Entry:
    """A setting with every name derived from it, for one role."""

    dotted: str
    section: Section
    setting: Setting
    env: str
    flag: str


def index_settings(sections: Sequence[Section], role: str | None) -> dict[str, Entry]:
    """Derive names for every setting; raise ValueError when two settings collide.

    Collisions are declaration bugs (``proxy.health_interval`` and
    ``health.interval`` both want ``--health-interval``), so they fail loudly
    at start-up rather than letting one setting shadow another.
    """
    entries: dict[str, Entry] = {}
    by_section: dict[str, Section] = {}
    owners: dict[str, str] = {}  # env variable or flag -> dotted key

    def claim(name: str, dotted: str) -> None:
        if name in owners:
            raise ValueError(f"{owners[name]} and {dotted} both derive {name}; set Setting.flag")
        owners[name] = dotted

    for section in sections:
        if section.name in by_section:
            if by_section[section.name] == section:
                continue
            raise ValueError(f"two different sections are named {section.name!r}")
        by_section[section.name] = section
        for setting in section.settings:
            dotted = f"{section.name}.{setting.key}"
            env = env_name(section.name, setting.key)
            if env in RESERVED_ENV_VARS:
                raise ValueError(f"{dotted} derives the reserved variable {env}")
            flag = flag_name(section, setting, role)
            claim(env, dotted)
            claim(flag, dotted)
            if isinstance(setting.type, Bool):
                claim(f"--no-{flag[2:]}", dotted)
            entries[dotted] = Entry(dotted, section, setting, env, flag)
    return entries
