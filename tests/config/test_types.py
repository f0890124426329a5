"""Value types: every type's accepted inputs, rejected inputs and their messages."""

from __future__ import annotations

import datetime
import os
import pathlib
import re
from typing import Any

import pytest

from inferno.config import (
    Address,
    Bool,
    Duration,
    Enum,
    Float,
    HostPort,
    Int,
    ListOf,
    Path,
    Size,
    Str,
    ValueType,
)

VALID: list[tuple[ValueType, object, Any]] = [
    # durations: units, compounds, bare numbers (seconds), numeric strings
    (Duration(), "250ms", 0.25),
    (Duration(), "5s", 5.0),
    (Duration(), "2m", 120.0),
    (Duration(), "1h", 3600.0),
    (Duration(), "1.5s", 1.5),
    (Duration(), "1h30m", 5400.0),
    (Duration(), " 10s ", 10.0),
    (Duration(), 5, 5.0),
    (Duration(), 0.5, 0.5),
    (Duration(), "7", 7.0),
    (Duration(), 0, 0.0),
    (Duration(min=1.0), "1s", 1.0),
    # sizes: binary and decimal units, bare integers, whole fractions
    (Size(), "64KiB", 64 * 1024),
    (Size(), "1MiB", 1024 * 1024),
    (Size(), "1GiB", 1024**3),
    (Size(), "10KB", 10_000),
    (Size(), "512B", 512),
    (Size(), "1.5KiB", 1536),
    (Size(), "2 mib", 2 * 1024 * 1024),
    (Size(), 4096, 4096),
    (Size(), "4096", 4096),
    (Size(), 2048.0, 2048),
    # addresses
    (Address(), "127.0.0.1:8080", ("127.0.0.1", 8080)),
    (Address(), "example.com:443", ("example.com", 443)),
    (Address(), "[::1]:9000", ("::1", 9000)),
    (Address(), "0.0.0.0:0", ("0.0.0.0", 0)),
    (Address(), "localhost:65535", ("localhost", 65535)),
    # lists
    (ListOf(Str()), "a,b", ("a", "b")),
    (ListOf(Str()), " a , b ", ("a", "b")),
    (ListOf(Str()), "", ()),
    (ListOf(Str()), ["x", "y"], ("x", "y")),
    (ListOf(Int()), "1,2,3", (1, 2, 3)),
    (ListOf(Address()), ["a:1", "[::1]:2"], (("a", 1), ("::1", 2))),
    # booleans
    *[(Bool(), word, True) for word in ("true", "yes", "on", "1", "TRUE", "Yes")],
    *[(Bool(), word, False) for word in ("false", "no", "off", "0", "Off")],
    (Bool(), True, True),
    (Bool(), False, False),
    # enums: case-insensitive, canonical spelling returned
    (Enum("json", "pretty"), "json", "json"),
    (Enum("json", "pretty"), "PRETTY", "pretty"),
    # integers and floats with bounds
    (Int(), "42", 42),
    (Int(), 42, 42),
    (Int(), "-3", -3),
    (Int(min=1, max=10), 10, 10),
    (Float(), "0.5", 0.5),
    (Float(), 2, 2.0),
    (Float(min=0.0, max=1.0), 1.0, 1.0),
    # strings and paths
    (Str(), "hello", "hello"),
    (Str(), "", ""),
    (Path(), "/etc/inferno.toml", pathlib.Path("/etc/inferno.toml")),
    (Path(), "relative/file", pathlib.Path("relative/file")),
]


@pytest.mark.parametrize(("type_", "raw", "expected"), VALID)
def test_valid_values_parse(type_: ValueType, raw: object, expected: Any) -> None:
    assert type_.parse(raw) == expected


INVALID: list[tuple[ValueType, object, str]] = [
    (Duration(), "-5s", "'-5s' is negative"),
    (Duration(), -1, "-1 is negative"),
    (Duration(), "5 parsecs", "'5 parsecs' is not a duration"),
    (Duration(), "5x", "'5x' is not a duration"),
    (Duration(), "", "'' is not a duration"),
    (Duration(), "s", "'s' is not a duration"),
    (Duration(), True, "expected a duration, got a boolean True"),
    (Duration(), [1], "expected a duration, got an array [1]"),
    (Duration(), float("inf"), "inf is not a finite duration"),
    (Duration(min=1.0), "500ms", "'500ms' is below the minimum 1s"),
    (Duration(max=60.0), "2m", "'2m' is above the maximum 1m"),
    (Size(), "10 parsecs", "'10 parsecs' has an unknown unit 'parsecs'"),
    (Size(), "-1KiB", "'-1KiB' is negative"),
    (Size(), -5, "-5 is negative"),
    (Size(), "1.0001KiB", "'1.0001KiB' is not a whole number of bytes"),
    (Size(), 1.5, "1.5 is not a whole number of bytes"),
    (Size(), "KiB", "'KiB' is not a size"),
    (Size(), False, "expected a size, got a boolean False"),
    (Size(max=1024), "2KiB", "'2KiB' is above the maximum 1024"),
    (Address(), "localhost", "'localhost' has no port"),
    (Address(), "localhost:", "'localhost:' has no port"),
    (Address(), ":8080", "':8080' has no host"),
    (Address(), "host:http", "'host:http' has a port 'http' that is not a number"),
    (Address(), "host:65536", "'host:65536' has a port out of range"),
    (Address(), "host:-1", "'host:-1' has a port '-1' that is not a number"),
    (Address(), "::1:80", "'::1:80' looks like an IPv6 address without [brackets]"),
    (Address(), "[::1]", "'[::1]' has no port"),
    (Address(), "[::1:80", "'[::1:80' has no closing ']' after the IPv6 address"),
    (Address(), "[::1]80", "'[::1]80' needs ':' between ']' and the port"),
    (Address(), "bad host:80", "'bad host:80' has an invalid host 'bad host'"),
    (Address(), 8080, "expected an address string, got an integer 8080"),
    (ListOf(Int()), "1,x,3", "item 2: 'x' is not an integer"),
    (ListOf(Int()), [1, "2", True], "item 3: expected an integer, got a boolean True"),
    (ListOf(Str()), 5, "expected a list, got an integer 5"),
    (Bool(), "maybe", "'maybe' is not a boolean"),
    (Bool(), 1, "expected a boolean, got an integer 1"),
    (Enum("json", "pretty"), "xml", "'xml' is not a known choice"),
    (Enum("json", "pretty"), 1, "expected a string, got an integer 1"),
    (Int(), "1.5", "'1.5' is not an integer"),
    (Int(), "abc", "'abc' is not an integer"),
    (Int(), 1.5, "expected an integer, got a float 1.5"),
    (Int(), True, "expected an integer, got a boolean True"),
    (Int(min=1, max=10), 0, "0 is below the minimum 1"),
    (Int(min=1, max=10), "11", "'11' is above the maximum 10"),
    (Float(), "fast", "'fast' is not a number"),
    (Float(), "nan", "'nan' is not a finite number"),
    (Float(min=0.0, max=1.0), 1.5, "1.5 is above the maximum 1.0"),
    (Str(), 123, "expected a string, got an integer 123"),
    (Str(), {"a": 1}, "expected a string, got a table {'a': 1}"),
    (Path(), "  ", "the path is empty"),
    (Path(), 7, "expected a path string, got an integer 7"),
    (Str(), datetime.date(2024, 1, 2), "expected a string, got a date or time"),
]


@pytest.mark.parametrize(("type_", "raw", "message"), INVALID)
def test_invalid_values_say_what_is_wrong(type_: ValueType, raw: object, message: str) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        type_.parse(raw)


@pytest.mark.parametrize("type_", [Duration(), Float()])
def test_huge_integers_are_refused_not_crashing(type_: ValueType) -> None:
    with pytest.raises(ValueError, match=r"\.\.\. is not a finite"):
        type_.parse(10**400)


def test_long_values_are_shortened_in_messages() -> None:
    with pytest.raises(ValueError, match=r"\.\.\. is not a duration$"):
        Duration().parse("x" * 500)


DESCRIPTIONS: list[tuple[ValueType, str]] = [
    (Duration(), "a duration such as 250ms, 5s, 2m, 1h or 1h30m (a bare number is seconds)"),
    (Duration(min=1.0, max=60.0), "a duration from 1s to 1m such as"),
    (Size(), "a size in bytes, with an optional unit B, KB, MB, GB, TB (powers of 1000)"),
    (Size(min=1), "a size of at least 1 in bytes"),
    (Address(), "host:port or [IPv6]:port with a port from 0 to 65535"),
    (ListOf(Int(max=9)), "a comma-separated list (a TOML array in a file) of: an integer of at"),
    (Bool(), "true/false, yes/no, on/off or 1/0"),
    (Enum("json", "pretty"), "one of json, pretty"),
    (Int(min=1, max=65535), "an integer from 1 to 65535"),
    (Int(), "an integer"),
    (Float(min=0.0), "a number of at least 0.0"),
    (Str(), "a string"),
    (Path(), "a filesystem path"),
]


@pytest.mark.parametrize(("type_", "text"), DESCRIPTIONS)
def test_descriptions_say_what_is_allowed(type_: ValueType, text: str) -> None:
    assert type_.describe().startswith(text)


ROUND_TRIPS: list[tuple[ValueType, Any, object]] = [
    (Duration(), 0.25, "250ms"),
    (Duration(), 5.0, "5s"),
    (Duration(), 90.0, "90s"),
    (Duration(), 120.0, "2m"),
    (Duration(), 7200.0, "2h"),
    (Duration(), 1.0001, "1.0001s"),
    (Duration(), 0.0, "0s"),
    (Size(), 65536, "64KiB"),
    (Size(), 1024**3, "1GiB"),
    (Size(), 10_000, 10_000),
    (Size(), 0, 0),
    (Address(), HostPort("::1", 80), "[::1]:80"),
    (Address(), ("example.com", 443), "example.com:443"),
    (ListOf(Address()), (HostPort("a", 1),), ["a:1"]),
    (Bool(), True, True),
    (Enum("a", "b"), "b", "b"),
    (Int(), 3, 3),
    (Float(), 0.5, 0.5),
    (Str(), "x", "x"),
    (Path(), pathlib.Path("/tmp/x"), "/tmp/x"),
]


@pytest.mark.parametrize(("type_", "value", "rendered"), ROUND_TRIPS)
def test_render_reads_back(type_: ValueType, value: Any, rendered: object) -> None:
    assert type_.render(value) == rendered
    assert type_.parse(type_.render(value)) == value


def test_host_port_unpacks_and_prints() -> None:
    host, port = Address().parse("[::1]:8080")
    assert (host, port) == ("::1", 8080)
    assert str(HostPort("127.0.0.1", 80)) == "127.0.0.1:80"


def test_path_expands_home() -> None:
    expected = pathlib.Path(os.path.expanduser("~/inferno.toml"))
    assert Path().parse("~/inferno.toml") == expected


def test_enum_needs_choices() -> None:
    with pytest.raises(ValueError, match="at least one choice"):
        Enum()
