"""TOML for configuration: read a file knowing the line of every key, and spell values.

tomlkit parses the file (it keeps comments, so ``inferno config`` output can
be edited and fed back), but it does not say on which line a key sits, and an
error that says ``proxy.port (inferno.toml:12)`` saves the operator a search.
:func:`scan_key_lines` therefore makes one light pass over the text, after
tomlkit has accepted it, tracking the current ``[table]`` header and each
``key =`` line while skipping strings, comments and multi-line arrays.

Writing is done by hand (:func:`format_value`, :func:`format_comment`)
because the effective configuration is flat and small, and building it as
text keeps ``tomlkit`` out of the import path of ``inferno --help``.
tomlkit itself is imported only when a file is actually read.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from inferno._configtypes import TomlValue
from inferno.errors import ConfigError, ConfigProblem

__all__ = [
    "FILE_KEY",
    "TomlFile",
    "find_redefinition",
    "format_comment",
    "format_key",
    "format_value",
    "read_toml_file",
    "scan_key_lines",
]

#: The ``key`` of a problem with the file as a whole (unreadable, not TOML).
FILE_KEY = "config file"

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
# tomlkit ends its messages with the position, which our source already names.
_POSITION_SUFFIX = re.compile(r"\s*at line \d+ col \d+\s*$")
_SHORT_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n"}
_SHORT_ESCAPES.update({"\f": "\\f", "\r": "\\r"})
_KEY_ESCAPES = {"b": "\b", "t": "\t", "n": "\n", "f": "\f", "r": "\r", '"': '"', "\\": "\\"}
_KEY_ESCAPES["e"] = "\x1b"


@dataclass(frozen=True, slots=True)
class TomlFile:
    """A parsed configuration file: plain data plus the line of each key path."""

    path: str
    data: dict[str, Any]
    lines: Mapping[tuple[str, ...], int]

    def source(self, *keys: str) -> str:
        """``"path:line"`` of the key path, or of its nearest enclosing table.

        Keys inside an inline table or a multi-line array are not scanned, so
        they are reported at the line of the value that contains them.
        """
        for length in range(len(keys), 0, -1):
            line = self.lines.get(keys[:length])
            if line is not None:
                return f"{self.path}:{line}"
        return self.path


def read_toml_file(path: str) -> TomlFile:
    """Read and parse ``path``.

    :raises ConfigError: with one problem when the file cannot be read, is not
        UTF-8, or is not valid TOML (naming the line tomlkit stopped at).
    """
    try:
        with open(path, "rb") as stream:
            raw = stream.read()
    except OSError as exc:
        unreadable = ConfigProblem(
            FILE_KEY, path, f"cannot read the file: {exc.strerror or exc}", "a readable TOML file"
        )
        raise ConfigError([unreadable]) from None
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        undecodable = ConfigProblem(
            FILE_KEY, path, f"the file is not UTF-8 (byte {exc.start})", "a UTF-8 TOML file"
        )
        raise ConfigError([undecodable]) from None

    import tomlkit  # Deferred: only a command that reads a file pays for the import.
    from tomlkit.exceptions import ParseError, TOMLKitError

    try:
        data = tomlkit.parse(text).unwrap()
    except TOMLKitError as exc:
        line = exc.line if isinstance(exc, ParseError) else find_redefinition(text)
        message = _POSITION_SUFFIX.sub("", str(exc)).rstrip(".")
        if isinstance(exc, ParseError):
            message += f" (column {exc.col})"
        source = f"{path}:{line}" if line else path
        syntax = ConfigProblem(FILE_KEY, source, f"invalid TOML: {message}", "TOML syntax")
        raise ConfigError([syntax]) from None
    return TomlFile(path, data, scan_key_lines(text))


# --- finding lines -----------------------------------------------------------


def scan_key_lines(text: str) -> dict[tuple[str, ...], int]:
    """Map each key path and table of a *valid* TOML text to its first line (1-based).

    ``[proxy]`` on line 3 gives ``{("proxy",): 3}``; ``port = 1`` under it on
    line 4 adds ``("proxy", "port"): 4``; a dotted ``a.b = 1`` records both
    ``("a",)`` and ``("a", "b")``.  Lines inside multi-line strings and arrays
    are skipped, so text that merely looks like ``key = value`` there is not
    taken for a key.
    """
    lines: dict[tuple[str, ...], int] = {}
    for number, _, path in _statements(text):
        for length in range(1, len(path) + 1):
            lines.setdefault(path[:length], number)
    return lines


def find_redefinition(text: str) -> int | None:
    """The line where a key or table is defined a second time, if any.

    tomlkit reports some redefinitions without a line number; this finds the
    first one so the problem can still name ``file:line``.
    """
    defined: set[tuple[str, ...]] = set()  # by `key =` lines, dotted prefixes included
    headers: set[tuple[str, ...]] = set()
    for number, kind, path in _statements(text):
        if kind == "array":
            # Each [[element]] starts afresh: its keys may repeat the previous element's.
            defined = {p for p in defined if p[: len(path)] != path}
            continue
        if kind == "table":
            if path in headers or path in defined:
                return number
            headers.add(path)
            continue
        if path in defined:
            return number
        defined.update(path[:length] for length in range(1, len(path) + 1))
    return None


def _statements(text: str) -> Iterator[tuple[int, str, tuple[str, ...]]]:
    """Yield ``(line, kind, path)`` for each header (``table``/``array``) and ``key`` line."""
    table: tuple[str, ...] = ()
    closing: str | None = None  # delimiter of a multi-line string left open
    depth = 0  # brackets of a value left open
    for number, line in enumerate(text.split("\n"), start=1):
        if closing is not None or depth > 0:
            closing, depth = _scan_value(line, 0, closing, depth)
            continue
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.startswith("["):
            array = stripped.startswith("[[")
            keys, _ = _parse_key(stripped, 2 if array else 1)
            table = tuple(keys)
            yield number, "array" if array else "table", table
            continue
        keys, end = _parse_key(stripped, 0)
        yield number, "key", table + tuple(keys)
        equals = stripped.find("=", end)
        if equals >= 0:
            closing, depth = _scan_value(stripped, equals + 1, None, 0)


def _parse_key(text: str, i: int) -> tuple[list[str], int]:
    """Read a possibly dotted, possibly quoted key starting at ``text[i]``."""
    keys: list[str] = []
    n = len(text)
    while i < n:
        while i < n and text[i] in " \t":
            i += 1
        if i < n and text[i] == '"':
            key, i = _read_basic_key(text, i + 1)
        elif i < n and text[i] == "'":
            end = text.find("'", i + 1)
            end = n if end < 0 else end
            key, i = text[i + 1 : end], end + 1
        else:
            match = _BARE_KEY.match(text, i)
            if not match:
                break
            key, i = match.group(), match.end()
        keys.append(key)
        while i < n and text[i] in " \t":
            i += 1
        if i < n and text[i] == ".":
            i += 1
            continue
        break
    return keys, i


def _read_basic_key(text: str, i: int) -> tuple[str, int]:
    """Decode a ``"quoted"`` key from just after its opening quote."""
    out: list[str] = []
    n = len(text)
    while i < n and text[i] != '"':
        char = text[i]
        if char == "\\" and i + 1 < n:
            code = text[i + 1]
            width = {"u": 4, "U": 8, "x": 2}.get(code)
            if width is not None:
                try:
                    out.append(chr(int(text[i + 2 : i + 2 + width], 16)))
                except ValueError:
                    out.append(text[i + 2 : i + 2 + width])
                i += 2 + width
                continue
            out.append(_KEY_ESCAPES.get(code, code))
            i += 2
            continue
        out.append(char)
        i += 1
    return "".join(out), i + 1


def _scan_value(text: str, i: int, closing: str | None, depth: int) -> tuple[str | None, int]:
    """Skip over (part of) a value; return what is still open at the end of ``text``."""
    n = len(text)
    while i < n:
        if closing is not None:
            if closing == '"""' and text[i] == "\\":
                i += 2
                continue
            if text.startswith(closing, i):
                i += 3
                # Up to two quotes of the content may sit right before the delimiter.
                while i < n and text[i] == closing[0]:
                    i += 1
                closing = None
                continue
            i += 1
            continue
        char = text[i]
        if char == "#":
            break
        if text.startswith('"""', i) or text.startswith("'''", i):
            closing = text[i : i + 3]
            i += 3
        elif char == '"':
            i += 1
            while i < n and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
            i += 1
        elif char == "'":
            end = text.find("'", i + 1)
            i = n if end < 0 else end + 1
        else:
            if char in "[{":
                depth += 1
            elif char in "]}":
                depth -= 1
            i += 1
    return closing, depth


# --- writing -----------------------------------------------------------------


def format_key(key: str) -> str:
    """A TOML key: bare when it can be, quoted otherwise."""
    return key if _BARE_KEY.fullmatch(key) else _quote(key)


def format_value(value: TomlValue) -> str:
    """Spell a value as TOML text (strings, integers, floats, booleans, arrays)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value:
            return "nan"
        if value in (float("inf"), float("-inf")):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _quote(value)
    return "[" + ", ".join(format_value(item) for item in value) + "]"


def format_comment(text: str) -> str:
    """One ``# comment`` line: control characters (newlines too) become spaces.

    Comments carry text from outside (file paths, help), which must not be
    able to end the comment and inject TOML.
    """
    return "# " + "".join(_comment_char(char) for char in text)


def _comment_char(char: str) -> str:
    code = ord(char)
    if (code < 0x20 and char != "\t") or code == 0x7F:
        return " "
    if 0xD800 <= code <= 0xDFFF:  # a lone surrogate (undecodable bytes) cannot be written
        return "\ufffd"
    return char


def _quote(text: str) -> str:
    out = ['"']
    for char in text:
        code = ord(char)
        if char in _SHORT_ESCAPES:
            out.append(_SHORT_ESCAPES[char])
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\u{code:04x}")
        elif 0xD800 <= code <= 0xDFFF:
            out.append("\\ufffd")
        else:
            out.append(char)
    out.append('"')
    return "".join(out)
