"""Value types of configuration settings: how a raw value becomes a typed one.

A raw value arrives either as a string (environment variable, command-line
flag) or as a TOML value (string, integer, float, boolean, array).  Each type
accepts both shapes where that makes sense, so ``INFERNO_PROXY_TIMEOUT=5s`` and
``timeout = 5`` in a file mean the same thing.

Every type offers three methods (the :class:`ValueType` protocol):

* ``parse(raw)`` returns the typed value or raises :class:`ValueError` whose
  message says *what is wrong* (the loader adds key and source);
* ``describe()`` says *what is allowed*, for error messages and ``--help``;
* ``render(value)`` turns a typed value back into a TOML value that ``parse``
  accepts, for ``inferno config <role>``.

Parsed values are immutable (lists become tuples) because a
:class:`inferno.config.Config` is read-only.
"""

from __future__ import annotations

import math
import os
import pathlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple, Protocol, TypeAlias

__all__ = [
    "Address",
    "Bool",
    "Duration",
    "Enum",
    "Float",
    "HostPort",
    "Int",
    "ListOf",
    "Path",
    "Size",
    "Str",
    "TomlValue",
    "ValueType",
]

#: What ``render`` returns: a value the TOML writer knows how to spell.
TomlValue: TypeAlias = "str | int | float | bool | list[TomlValue]"

#: Raw values longer than this are shortened in error messages, so that one
#: pasted blob does not bury the other problems.
MAX_SHOWN_CHARS = 60


class ValueType(Protocol):
    """What a setting's type must offer; plugins may write their own."""

    #: Placeholder shown in ``--help`` (``--timeout DURATION``).
    @property
    def metavar(self) -> str: ...

    def parse(self, raw: object) -> Any:
        """Return the typed value of ``raw``; raise ValueError saying what is wrong."""
        ...

    def describe(self) -> str:
        """Say what is allowed, as a phrase: ``"an integer from 1 to 65535"``."""
        ...

    def render(self, value: Any) -> TomlValue:
        """Return ``value`` as a TOML value that :meth:`parse` reads back."""
        ...


def show(raw: object) -> str:
    """Quote a raw value for an error message, shortened when long."""
    text = repr(raw)
    if len(text) > MAX_SHOWN_CHARS:
        text = text[: MAX_SHOWN_CHARS - 3] + "..."
    return text


def kind_of(raw: object) -> str:
    """Name the TOML kind of a raw value: ``"a boolean"``, ``"an array"``..."""
    if isinstance(raw, bool):
        return "a boolean"
    if isinstance(raw, int):
        return "an integer"
    if isinstance(raw, float):
        return "a float"
    if isinstance(raw, str):
        return "a string"
    if isinstance(raw, (list, tuple)):
        return "an array"
    if isinstance(raw, dict):
        return "a table"
    return "a date or time" if hasattr(raw, "isoformat") else type(raw).__name__


def _wrong_kind(expected: str, raw: object) -> ValueError:
    return ValueError(f"expected {expected}, got {kind_of(raw)} {show(raw)}")


def _bounds(
    what: str, low: float | None, high: float | None, fmt: Callable[[Any], str] = str
) -> str:
    if low is not None and high is not None:
        return f"{what} from {fmt(low)} to {fmt(high)}"
    if low is not None:
        return f"{what} of at least {fmt(low)}"
    if high is not None:
        return f"{what} of at most {fmt(high)}"
    return what


def _check_bounds(
    value: float,
    low: float | None,
    high: float | None,
    raw: object,
    fmt: Callable[[Any], str] = str,
) -> None:
    if low is not None and value < low:
        raise ValueError(f"{show(raw)} is below the minimum {fmt(low)}")
    if high is not None and value > high:
        raise ValueError(f"{show(raw)} is above the maximum {fmt(high)}")


# --- durations ---------------------------------------------------------------

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
# One or more "<number><unit>" parts, as in 250ms, 5s, 1h30m, 1.5s.
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?|\.\d+)(ms|s|m|h)")
_DURATION_WHOLE = re.compile(r"(?:(?:\d+(?:\.\d+)?|\.\d+)(?:ms|s|m|h))+")
_NUMBER = re.compile(r"\d+(?:\.\d+)?|\.\d+")


def format_duration(seconds: float) -> str:
    """Spell a duration the way people write it: ``250ms``, ``5s``, ``2m``, ``1h``.

    A duration no unit spells as a whole number (``1.0001s``) falls back to
    seconds with a decimal point, which :class:`Duration` reads back.
    """
    for unit, scale in (("h", 3600.0), ("m", 60.0), ("s", 1.0), ("ms", 0.001)):
        count = seconds / scale
        if count >= 1 and math.isclose(count, round(count), rel_tol=0, abs_tol=1e-9):
            return f"{round(count)}{unit}"
    if seconds == 0:
        return "0s"
    return f"{seconds:.9f}".rstrip("0") + "s"


@dataclass(frozen=True, slots=True)
class Duration:
    """A length of time, parsed to float seconds: ``250ms``, ``5s``, ``2m``, ``1h30m``.

    A bare number (TOML number or numeric string) is seconds.  Negative,
    infinite and NaN durations are errors: no timeout means "never" here.
    """

    min: float | None = None
    max: float | None = None
    metavar: ClassVar[str] = "DURATION"

    def parse(self, raw: object) -> float:
        if isinstance(raw, bool):
            raise _wrong_kind("a duration", raw)
        if isinstance(raw, (int, float)):
            seconds = float(raw)
        elif isinstance(raw, str):
            seconds = self._parse_text(raw)
        else:
            raise _wrong_kind("a duration", raw)
        if not math.isfinite(seconds):
            raise ValueError(f"{show(raw)} is not a finite duration")
        if seconds < 0:
            raise ValueError(f"{show(raw)} is negative")
        _check_bounds(seconds, self.min, self.max, raw, format_duration)
        return seconds

    @staticmethod
    def _parse_text(raw: str) -> float:
        text = raw.strip()
        if text.startswith("-") and len(text) > 1:
            raise ValueError(f"{show(raw)} is negative")
        if _NUMBER.fullmatch(text):
            return float(text)
        if not _DURATION_WHOLE.fullmatch(text):
            raise ValueError(f"{show(raw)} is not a duration")
        return sum(float(n) * _DURATION_UNITS[u] for n, u in _DURATION_PART.findall(text))

    def describe(self) -> str:
        what = _bounds("a duration", self.min, self.max, format_duration)
        return f"{what} such as 250ms, 5s, 2m, 1h or 1h30m (a bare number is seconds)"

    def render(self, value: Any) -> TomlValue:
        return format_duration(float(value))


# --- sizes -------------------------------------------------------------------

_SIZE_UNITS = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE_TEXT = re.compile(r"(\d+)(?:\.(\d+))?\s*([A-Za-z]*)")


def format_size(count: int) -> TomlValue:
    """Spell a byte count with the largest binary unit that divides it, else as an integer."""
    for unit in ("TiB", "GiB", "MiB", "KiB"):
        scale = _SIZE_UNITS[unit.lower()]
        if count and count % scale == 0:
            return f"{count // scale}{unit}"
    return count


@dataclass(frozen=True, slots=True)
class Size:
    """A number of bytes, parsed to int: ``512B``, ``64KiB``, ``1MiB``, ``10KB``.

    ``KiB``/``MiB``/``GiB``/``TiB`` are powers of 1024, ``KB``/``MB``/``GB``/``TB``
    powers of 1000 (units are case-insensitive).  A bare integer is bytes.
    A fraction is allowed when it comes to whole bytes (``1.5KiB``).
    """

    min: int | None = None
    max: int | None = None
    metavar: ClassVar[str] = "SIZE"

    def parse(self, raw: object) -> int:
        if isinstance(raw, bool):
            raise _wrong_kind("a size", raw)
        if isinstance(raw, int):
            count = raw
        elif isinstance(raw, float) and raw.is_integer():
            count = int(raw)
        elif isinstance(raw, str):
            count = self._parse_text(raw)
        elif isinstance(raw, float):
            raise ValueError(f"{show(raw)} is not a whole number of bytes")
        else:
            raise _wrong_kind("a size", raw)
        if count < 0:
            raise ValueError(f"{show(raw)} is negative")
        _check_bounds(count, self.min, self.max, raw)
        return count

    @staticmethod
    def _parse_text(raw: str) -> int:
        text = raw.strip()
        if text.startswith("-") and len(text) > 1:
            raise ValueError(f"{show(raw)} is negative")
        match = _SIZE_TEXT.fullmatch(text)
        if not match:
            raise ValueError(f"{show(raw)} is not a size")
        whole, fraction, unit = match.groups()
        scale = _SIZE_UNITS.get(unit.lower() or "b")
        if scale is None:
            raise ValueError(f"{show(raw)} has an unknown unit {unit!r}")
        count = int(whole) * scale
        if fraction:
            # Exact integer arithmetic: 1.5KiB is 1536 bytes, 1.0001KiB is an error.
            numerator = int(fraction) * scale
            denominator = 10 ** len(fraction)
            if numerator % denominator:
                raise ValueError(f"{show(raw)} is not a whole number of bytes")
            count += numerator // denominator
        return count

    def describe(self) -> str:
        what = _bounds("a size", self.min, self.max)
        return (
            f"{what} in bytes, with an optional unit B, KB, MB, GB, TB (powers of 1000) "
            "or KiB, MiB, GiB, TiB (powers of 1024), such as 64KiB or 1MiB"
        )

    def render(self, value: Any) -> TomlValue:
        return format_size(int(value))


# --- addresses ---------------------------------------------------------------

MAX_PORT = 65535  # TCP/UDP ports are 16-bit; 0 asks the OS for a free one.


class HostPort(NamedTuple):
    """A parsed ``host:port``; a tuple, so it unpacks as ``host, port = address``."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Address:
    """A ``host:port`` (``127.0.0.1:8080``, ``[::1]:8080``), parsed to :class:`HostPort`.

    The host is required: ``:8080`` is refused rather than guessed, because
    guessing "every interface" would expose a port the operator meant to keep
    private.
    """

    metavar: ClassVar[str] = "HOST:PORT"

    def parse(self, raw: object) -> HostPort:
        if not isinstance(raw, str):
            raise _wrong_kind("an address string", raw)
        text = raw.strip()
        if text.startswith("["):
            host, bracket, rest = text[1:].partition("]")
            if not bracket:
                raise ValueError(f"{show(raw)} has no closing ']' after the IPv6 address")
            if not rest:
                raise ValueError(f"{show(raw)} has no port")
            if not rest.startswith(":"):
                raise ValueError(f"{show(raw)} needs ':' between ']' and the port")
            port_text = rest[1:]
        else:
            if ":" not in text:
                raise ValueError(f"{show(raw)} has no port")
            if text.count(":") > 1:
                raise ValueError(f"{show(raw)} looks like an IPv6 address without [brackets]")
            host, _, port_text = text.partition(":")
        if not host:
            raise ValueError(f"{show(raw)} has no host")
        if any(c.isspace() or c in "/[]@" for c in host):
            raise ValueError(f"{show(raw)} has an invalid host {host!r}")
        if not port_text:
            raise ValueError(f"{show(raw)} has no port")
        if not (port_text.isascii() and port_text.isdigit()):
            raise ValueError(f"{show(raw)} has a port {port_text!r} that is not a number")
        port = int(port_text)
        if port > MAX_PORT:
            raise ValueError(f"{show(raw)} has a port out of range")
        return HostPort(host, port)

    def describe(self) -> str:
        return f"host:port or [IPv6]:port with a port from 0 to {MAX_PORT}"

    def render(self, value: Any) -> TomlValue:
        return str(HostPort(*value))


# --- scalars -----------------------------------------------------------------

_TRUE_WORDS = frozenset({"true", "yes", "on", "1"})
_FALSE_WORDS = frozenset({"false", "no", "off", "0"})


@dataclass(frozen=True, slots=True)
class Bool:
    """A boolean: TOML ``true``/``false``, or the words true/false, yes/no, on/off, 1/0."""

    metavar: ClassVar[str] = "BOOL"

    def parse(self, raw: object) -> bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str):
            word = raw.strip().lower()
            if word in _TRUE_WORDS:
                return True
            if word in _FALSE_WORDS:
                return False
            raise ValueError(f"{show(raw)} is not a boolean")
        raise _wrong_kind("a boolean", raw)

    def describe(self) -> str:
        return "true/false, yes/no, on/off or 1/0"

    def render(self, value: Any) -> TomlValue:
        return bool(value)


@dataclass(frozen=True, slots=True, init=False)
class Enum:
    """One of a fixed set of words (``Enum("json", "pretty")``); matched case-insensitively."""

    choices: tuple[str, ...]
    metavar: str

    def __init__(self, *choices: str) -> None:
        if not choices:
            raise ValueError("Enum needs at least one choice")
        object.__setattr__(self, "choices", tuple(choices))
        object.__setattr__(self, "metavar", "{" + ",".join(choices) + "}")

    def parse(self, raw: object) -> str:
        if not isinstance(raw, str):
            raise _wrong_kind("a string", raw)
        word = raw.strip().lower()
        for choice in self.choices:
            if choice.lower() == word:
                return choice
        raise ValueError(f"{show(raw)} is not a known choice")

    def describe(self) -> str:
        return "one of " + ", ".join(self.choices)

    def render(self, value: Any) -> TomlValue:
        return str(value)


@dataclass(frozen=True, slots=True)
class Int:
    """An integer, optionally bounded (``Int(min=1, max=65535)``)."""

    min: int | None = None
    max: int | None = None
    metavar: ClassVar[str] = "INT"

    def parse(self, raw: object) -> int:
        if isinstance(raw, bool):
            raise _wrong_kind("an integer", raw)
        if isinstance(raw, int):
            value = raw
        elif isinstance(raw, str):
            try:
                value = int(raw.strip(), 10)
            except ValueError:
                raise ValueError(f"{show(raw)} is not an integer") from None
        else:
            raise _wrong_kind("an integer", raw)
        _check_bounds(value, self.min, self.max, raw)
        return value

    def describe(self) -> str:
        return _bounds("an integer", self.min, self.max)

    def render(self, value: Any) -> TomlValue:
        return int(value)


@dataclass(frozen=True, slots=True)
class Float:
    """A finite number, optionally bounded (``Float(min=0.0, max=1.0)``)."""

    min: float | None = None
    max: float | None = None
    metavar: ClassVar[str] = "NUMBER"

    def parse(self, raw: object) -> float:
        if isinstance(raw, bool):
            raise _wrong_kind("a number", raw)
        if isinstance(raw, (int, float)):
            value = float(raw)
        elif isinstance(raw, str):
            try:
                value = float(raw.strip())
            except ValueError:
                raise ValueError(f"{show(raw)} is not a number") from None
        else:
            raise _wrong_kind("a number", raw)
        if not math.isfinite(value):
            raise ValueError(f"{show(raw)} is not a finite number")
        _check_bounds(value, self.min, self.max, raw)
        return value

    def describe(self) -> str:
        return _bounds("a number", self.min, self.max)

    def render(self, value: Any) -> TomlValue:
        return float(value)


@dataclass(frozen=True, slots=True)
class Str:
    """Any text.  TOML values must be strings: ``name = 123`` is an error, not ``"123"``."""

    metavar: ClassVar[str] = "TEXT"

    def parse(self, raw: object) -> str:
        if not isinstance(raw, str):
            raise _wrong_kind("a string", raw)
        return raw

    def describe(self) -> str:
        return "a string"

    def render(self, value: Any) -> TomlValue:
        return str(value)


@dataclass(frozen=True, slots=True)
class Path:
    """A filesystem path, parsed to :class:`pathlib.Path` with ``~`` expanded.

    Relative paths stay relative (to the working directory of the process).
    """

    metavar: ClassVar[str] = "PATH"

    def parse(self, raw: object) -> pathlib.Path:
        if not isinstance(raw, str):
            raise _wrong_kind("a path string", raw)
        if not raw.strip():
            raise ValueError("the path is empty")
        if "\0" in raw:
            raise ValueError(f"{show(raw)} contains a NUL character")
        return pathlib.Path(os.path.expanduser(raw))

    def describe(self) -> str:
        return "a filesystem path"

    def render(self, value: Any) -> TomlValue:
        return str(value)


# --- lists -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ListOf:
    """A list of ``inner`` values, parsed to a tuple.

    From the environment or a flag it is one string split on commas
    (``a, b`` → ``("a", "b")``; an empty string is the empty list); in TOML it
    is an array.  Each item is parsed by ``inner``, and a bad item is named
    by its position.
    """

    inner: ValueType

    @property
    def metavar(self) -> str:
        return f"{self.inner.metavar}[,...]"

    def parse(self, raw: object) -> tuple[Any, ...]:
        items: list[object]
        if isinstance(raw, str):
            items = [item.strip() for item in raw.split(",")] if raw.strip() else []
        elif isinstance(raw, (list, tuple)):
            items = list(raw)
        else:
            raise _wrong_kind("a list", raw)
        values = []
        for position, item in enumerate(items, start=1):
            try:
                values.append(self.inner.parse(item))
            except ValueError as exc:
                raise ValueError(f"item {position}: {exc}") from None
        return tuple(values)

    def describe(self) -> str:
        return f"a comma-separated list (a TOML array in a file) of: {self.inner.describe()}"

    def render(self, value: Any) -> TomlValue:
        return [self.inner.render(item) for item in value]
