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
:class:`inferno.config.Config` is read-only.  This module holds the protocol,
the scalars and lists; durations, sizes and addresses are in
:mod:`inferno._configunits`.
"""

from __future__ import annotations

import math
import os
import pathlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, TypeAlias

__all__ = [
    "Bool",
    "Enum",
    "Float",
    "Int",
    "ListOf",
    "Path",
    "Str",
    "TomlValue",
    "ValueType",
    "bounds",
    "check_bounds",
    "kind_of",
    "show",
    "wrong_kind",
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


def wrong_kind(expected: str, raw: object) -> ValueError:
    return ValueError(f"expected {expected}, got {kind_of(raw)} {show(raw)}")


def bounds(
    what: str, low: float | None, high: float | None, fmt: Callable[[Any], str] = str
) -> str:
    if low is not None and high is not None:
        return f"{what} from {fmt(low)} to {fmt(high)}"
    if low is not None:
        return f"{what} of at least {fmt(low)}"
    if high is not None:
        return f"{what} of at most {fmt(high)}"
    return what


def check_bounds(
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
        raise wrong_kind("a boolean", raw)

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
            raise wrong_kind("a string", raw)
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
            raise wrong_kind("an integer", raw)
        if isinstance(raw, int):
            value = raw
        elif isinstance(raw, str):
            try:
                value = int(raw.strip(), 10)
            except ValueError:
                raise ValueError(f"{show(raw)} is not an integer") from None
        else:
            raise wrong_kind("an integer", raw)
        check_bounds(value, self.min, self.max, raw)
        return value

    def describe(self) -> str:
        return bounds("an integer", self.min, self.max)

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
            raise wrong_kind("a number", raw)
        if isinstance(raw, (int, float)):
            value = float(raw) if abs(raw) < 10**300 else math.inf  # huge ints overflow float()
        elif isinstance(raw, str):
            try:
                value = float(raw.strip())
            except ValueError:
                raise ValueError(f"{show(raw)} is not a number") from None
        else:
            raise wrong_kind("a number", raw)
        if not math.isfinite(value):
            raise ValueError(f"{show(raw)} is not a finite number")
        check_bounds(value, self.min, self.max, raw)
        return value

    def describe(self) -> str:
        return bounds("a number", self.min, self.max)

    def render(self, value: Any) -> TomlValue:
        return float(value)


@dataclass(frozen=True, slots=True)
class Str:
    """Any text.  TOML values must be strings: ``name = 123`` is an error, not ``"123"``."""

    metavar: ClassVar[str] = "TEXT"

    def parse(self, raw: object) -> str:
        if not isinstance(raw, str):
            raise wrong_kind("a string", raw)
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
            raise wrong_kind("a path string", raw)
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
        return f"{self.inner.metavar},..."  # no brackets: argparse usage wrapping chokes on them

    def parse(self, raw: object) -> tuple[Any, ...]:
        items: list[object]
        if isinstance(raw, str):
            items = [item.strip() for item in raw.split(",")] if raw.strip() else []
        elif isinstance(raw, (list, tuple)):
            items = list(raw)
        else:
            raise wrong_kind("a list", raw)
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
