"""Layered configuration: each setting declared once, read from four layers.

A role declares :class:`Section` objects made of :class:`Setting` objects.
From one declaration derive:

* the TOML key ``[section] key = ...`` of the ``--config`` file;
* the environment variable ``INFERNO_<SECTION>_<KEY>`` (upper-cased);
* the command-line flag: ``--key-with-dashes`` in the role's own section
  (``section.name == role``), ``--<section>-<key>`` in other sections, or
  :attr:`Setting.flag` where set.  A :class:`Bool` setting also gets
  ``--no-<flag>``, and accepts ``--flag=false``.

Precedence, lowest first: the declared default < the TOML file < the
environment < the command line.  :func:`load_config` checks every layer and
raises one :class:`~inferno.errors.ConfigError` listing *all* problems
(unknown keys, bad values, an unreadable file), each naming the dotted key,
its source (``inferno.toml:12``, ``env INFERNO_PROXY_PORT``, ``flag --port``),
what is wrong and what is allowed.  The CLI prints them and exits with 2.

How the CLI wires flags (argparse)::

    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--config")
    add_flags(parser, role.sections, role.name)  # one flag per setting, all optional
    namespace = parser.parse_args(argv)
    try:
        config = load_config(
            role.sections, role=role.name, toml_path=namespace.config,
            environ=os.environ, flags=flags_from_namespace(namespace),
            other_sections=names_of_every_other_roles_sections,  # a shared file is fine
        )
    except ConfigError as exc:
        print(exc, file=sys.stderr)  # one line per problem
        return 2
    print(render_toml(config))  # `inferno config <role>`

Flags registered by :func:`add_flags` take raw strings (no argparse ``type``)
and default to ``argparse.SUPPRESS``, so only flags actually given reach
the namespace, and values are validated by :func:`load_config` together with
the other layers: one bad flag does not hide a bad file line.

A :class:`Config` is read-only: a mapping from ``"section.key"`` to values
(lists are tuples), plus :meth:`Config.source` for each value's origin.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import Any

from inferno._configflags import add_flags, flags_from_namespace
from inferno._configschema import (
    ENV_PREFIX,
    FLAG_DEST_PREFIX,
    REDACTED,
    RESERVED_ENV_VARS,
    SOURCE_DEFAULT,
    Entry,
    FlagValue,
    Section,
    Setting,
    env_name,
    flag_name,
    index_settings,
)
from inferno._configtoml import (
    FILE_KEY,
    TomlFile,
    format_comment,
    format_key,
    format_value,
    read_toml_file,
)
from inferno._configtypes import (
    Bool,
    Enum,
    Float,
    Int,
    ListOf,
    Path,
    Str,
    TomlValue,
    ValueType,
    kind_of,
)
from inferno._configunits import Address, Duration, HostPort, Size
from inferno.errors import ConfigError, ConfigProblem

__all__ = [
    "ENV_PREFIX",
    "FILE_KEY",
    "FLAG_DEST_PREFIX",
    "REDACTED",
    "RESERVED_ENV_VARS",
    "SOURCE_DEFAULT",
    "Address",
    "Bool",
    "Config",
    "ConfigError",
    "ConfigProblem",
    "Duration",
    "Enum",
    "FlagValue",
    "Float",
    "HostPort",
    "Int",
    "ListOf",
    "Path",
    "Section",
    "Setting",
    "Size",
    "Str",
    "TomlValue",
    "ValueType",
    "add_flags",
    "env_name",
    "flag_name",
    "flags_from_namespace",
    "load_config",
    "render_toml",
]


class Config(Mapping[str, Any]):
    """The effective configuration: a read-only mapping ``"section.key"`` → value.

    Built by :func:`load_config`.  Each value remembers where it came from
    (:meth:`source`).  ``repr`` hides secrets; ``config["proxy.secret"]``
    returns the real value, for the code that needs it.
    """

    __slots__ = ("_entries", "_role", "_sections", "_sources", "_values", "_views")

    def __init__(
        self,
        sections: Sequence[Section],
        values: Mapping[str, Any],
        sources: Mapping[str, str],
        role: str | None = None,
    ) -> None:
        self._entries = index_settings(sections, role)
        self._role = role
        self._sections = tuple({s.name: s for s in sections}.values())
        self._values = {d: values.get(d, e.setting.default) for d, e in self._entries.items()}
        self._sources = {d: sources.get(d, SOURCE_DEFAULT) for d in self._entries}
        self._views: dict[str, Mapping[str, Any]] = {
            section.name: MappingProxyType(
                {s.key: self._values[f"{section.name}.{s.key}"] for s in section.settings}
            )
            for section in self._sections
        }

    @property
    def role(self) -> str | None:
        """The role whose flags named the command-line sources."""
        return self._role

    @property
    def sections(self) -> tuple[Section, ...]:
        """The declared sections, in declaration order."""
        return self._sections

    def __getitem__(self, dotted: str) -> Any:
        """The value of ``"section.key"``; KeyError for an undeclared key."""
        return self._values[dotted]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def section(self, name: str) -> Mapping[str, Any]:
        """A read-only view ``key`` → value of one section; KeyError if undeclared."""
        return self._views[name]

    def source(self, dotted: str) -> str:
        """Where a value came from: ``"default"``, ``"file.toml:12"``,
        ``"env INFERNO_PROXY_PORT"`` or ``"flag --port"``."""
        return self._sources[dotted]

    def setting(self, dotted: str) -> Setting:
        """The declaration behind ``"section.key"``."""
        return self._entries[dotted].setting

    def __repr__(self) -> str:
        shown = {
            dotted: REDACTED if entry.setting.secret else self._values[dotted]
            for dotted, entry in self._entries.items()
        }
        return f"Config(role={self._role!r}, {shown!r})"


# --- loading -----------------------------------------------------------------


def load_config(
    sections: Sequence[Section],
    *,
    environ: Mapping[str, str],
    role: str | None = None,
    toml_path: str | os.PathLike[str] | None = None,
    flags: Mapping[str, str | FlagValue] | None = None,
    other_sections: Collection[str] = (),
) -> Config:
    """Merge defaults < TOML file < environment < flags into a :class:`Config`.

    :param sections: the sections the role reads.
    :param environ: the environment to read (pass ``os.environ``; tests pass a dict).
    :param role: the running role; names command-line sources (``--port`` vs
        ``--proxy-port``).
    :param toml_path: the ``--config`` file, or ``None`` for none.
    :param flags: ``"section.key"`` → raw string or :class:`FlagValue`, as
        returned by :func:`flags_from_namespace`.
    :param other_sections: names of sections that belong to other roles: a
        shared file may hold ``[backend]`` while the proxy runs, and such
        tables and ``INFERNO_BACKEND_*`` variables are ignored, not errors.
    :raises ConfigError: listing every problem found in every layer.
    """
    entries = index_settings(sections, role)
    found: dict[str, tuple[Any, str]] = {}
    problems: list[ConfigProblem] = []
    if toml_path is not None:
        try:
            toml_file = read_toml_file(os.fspath(toml_path))
        except ConfigError as exc:
            problems.extend(exc.problems)
        else:
            _read_file(toml_file, entries, other_sections, found, problems)
    _read_environ(environ, entries, other_sections, found, problems)
    for dotted, given in (flags or {}).items():
        entry = entries.get(dotted)
        raw, flag = (given.raw, given.flag) if isinstance(given, FlagValue) else (given, None)
        if entry is None:
            problems.append(ConfigProblem(dotted, f"flag {flag or dotted}", "unknown setting"))
            continue
        _parse_into(entry, raw, f"flag {flag or entry.flag}", found, problems)
    if problems:
        raise ConfigError(problems)
    values = {dotted: value for dotted, (value, _) in found.items()}
    sources = {dotted: source for dotted, (_, source) in found.items()}
    return Config(sections, values, sources, role)


def _parse_into(
    entry: Entry,
    raw: object,
    source: str,
    found: dict[str, tuple[Any, str]],
    problems: list[ConfigProblem],
) -> None:
    """Parse one raw value; a later layer's call overrides an earlier one."""
    setting = entry.setting
    try:
        value = setting.type.parse(raw)
    except ValueError as exc:
        # The reason may quote the value, and a secret must never be echoed.
        what = "invalid value (not shown: the setting is secret)" if setting.secret else str(exc)
        problems.append(ConfigProblem(entry.dotted, source, what, setting.type.describe()))
    else:
        found[entry.dotted] = (value, source)


def _read_file(
    toml_file: TomlFile,
    entries: Mapping[str, Entry],
    other_sections: Collection[str],
    found: dict[str, tuple[Any, str]],
    problems: list[ConfigProblem],
) -> None:
    sections = {entry.section.name: entry.section for entry in entries.values()}
    known = ", ".join(f"[{name}]" for name in sections) or "none"
    for name, table in toml_file.data.items():
        where = toml_file.source(name)
        if name not in sections:
            if name in other_sections:
                continue
            if isinstance(table, dict):
                what = "unknown section" + _suggest(name, sections)
            else:
                what = "a key outside any [section]"
            problems.append(ConfigProblem(name, where, what, f"sections {known}"))
            continue
        if not isinstance(table, dict):
            what = f"expected a table [{name}], got {kind_of(table)}"
            problems.append(ConfigProblem(name, where, what, f"a [{name}] table"))
            continue
        section = sections[name]
        for key, raw in table.items():
            dotted = f"{name}.{key}"
            source = toml_file.source(name, key)
            entry = entries.get(dotted)
            if entry is None:
                keys = [s.key for s in section.settings]
                what = "unknown key" + _suggest(key, keys)
                problems.append(
                    ConfigProblem(dotted, source, what, _listing(f"keys of [{name}]", keys))
                )
                continue
            _parse_into(entry, raw, source, found, problems)


def _read_environ(
    environ: Mapping[str, str],
    entries: Mapping[str, Entry],
    other_sections: Collection[str],
    found: dict[str, tuple[Any, str]],
    problems: list[ConfigProblem],
) -> None:
    by_env = {entry.env: entry for entry in entries.values()}
    ours = {entry.section.name for entry in entries.values()}
    # Longest prefix first: INFERNO_HEALTH_CHECK_X belongs to [health_check], not [health].
    prefixes = sorted(
        ((env_name(name, ""), name) for name in ours | set(other_sections)),
        key=lambda item: -len(item[0]),
    )
    for variable in sorted(environ):
        if not variable.startswith(ENV_PREFIX) or variable in RESERVED_ENV_VARS:
            continue
        entry = by_env.get(variable)
        if entry is not None:
            _parse_into(entry, environ[variable], f"env {variable}", found, problems)
            continue
        for prefix, name in prefixes:
            if variable.startswith(prefix):
                if name in ours:
                    known = [e.env for e in entries.values() if e.section.name == name]
                    what = "unknown setting" + _suggest(variable, known)
                    problems.append(
                        ConfigProblem(
                            f"{name}.{variable[len(prefix) :].lower()}",
                            f"env {variable}",
                            what,
                            _listing(f"variables of [{name}]", known),
                        )
                    )
                break


def _suggest(word: str, candidates: Collection[str]) -> str:
    import difflib  # Deferred: only needed when there is a mistake to explain.

    close = difflib.get_close_matches(word, list(candidates), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _listing(what: str, names: Sequence[str]) -> str:
    return f"{what}: {', '.join(names)}" if names else f"{what}: none"


# --- rendering ---------------------------------------------------------------


def render_toml(config: Config) -> str:
    """The effective configuration as TOML, every value followed by ``# from <source>``.

    Help texts become comments.  Unset optional settings and secrets are
    written as comments (a secret as ``<redacted>``), so the output can be
    saved and used as a file without setting a secret to ``"<redacted>"``.
    """
    who = f"role {config.role!r}" if config.role else "Inferno"
    lines = [
        format_comment(f"Effective configuration of {who}."),
        format_comment("Precedence: default < file (--config) < environment < command line."),
    ]
    for section in config.sections:
        lines += ["", f"[{format_key(section.name)}]"]
        if section.help:
            lines += [format_comment(line) for line in section.help.splitlines()]
        for setting in section.settings:
            dotted = f"{section.name}.{setting.key}"
            value = config[dotted]
            origin = f"from {config.source(dotted)}"
            lines += ["", *(format_comment(line) for line in setting.help.splitlines())]
            key = format_key(setting.key)
            if setting.secret and value is not None:
                lines.append(format_comment(f"{key} = {format_value(REDACTED)}  # {origin}"))
            elif value is None:
                lines.append(format_comment(f"{key} is unset  # {origin}"))
            else:
                text = format_value(setting.type.render(value))
                lines.append(f"{key} = {text}  {format_comment(origin)}")
    return "\n".join(lines) + "\n"
