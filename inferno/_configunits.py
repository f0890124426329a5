"""Value types written with units or parts: durations, sizes, ``host:port`` addresses.

They follow the :class:`~inferno._configtypes.ValueType` protocol; see that
module for how raw values from files, variables and flags are handled.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

from inferno._configtypes import TomlValue, bounds, check_bounds, show, wrong_kind

__all__ = ["Address", "Duration", "HostPort", "Size", "format_duration", "format_size"]


# --- durations ---------------------------------------------------------------

#: Larger integers would overflow float(); far beyond any sensible timeout anyway.
MAX_SECONDS = 10**300

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
            raise wrong_kind("a duration", raw)
        if isinstance(raw, (int, float)):
            seconds = float(raw) if abs(raw) < MAX_SECONDS else math.inf  # no OverflowError
        elif isinstance(raw, str):
            seconds = self._parse_text(raw)
        else:
            raise wrong_kind("a duration", raw)
        if not math.isfinite(seconds):
            raise ValueError(f"{show(raw)} is not a finite duration")
        if seconds < 0:
            raise ValueError(f"{show(raw)} is negative")
        check_bounds(seconds, self.min, self.max, raw, format_duration)
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
        what = bounds("a duration", self.min, self.max, format_duration)
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
            raise wrong_kind("a size", raw)
        if isinstance(raw, int):
            count = raw
        elif isinstance(raw, float) and raw.is_integer():
            count = int(raw)
        elif isinstance(raw, str):
            count = self._parse_text(raw)
        elif isinstance(raw, float):
            raise ValueError(f"{show(raw)} is not a whole number of bytes")
        else:
            raise wrong_kind("a size", raw)
        if count < 0:
            raise ValueError(f"{show(raw)} is negative")
        check_bounds(count, self.min, self.max, raw)
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
        what = bounds("a size", self.min, self.max)
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
            raise wrong_kind("an address string", raw)
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
