"""Reading exposition text and negotiating its format: the other half of :mod:`inferno.metrics`.

:func:`parse_prometheus` reads Prometheus (0.0.4) or OpenMetrics text written by
others (vLLM, SGLang, llama.cpp server, TGI, our own peers); it is lenient by
default and skips lines it cannot read.  :func:`wants_prometheus` decides from an
``Accept`` header whether a vitals endpoint answers with text or JSON.
Split from :mod:`inferno.metrics` so that module holds only what a process
records; both names are re-exported there.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Final, NamedTuple

__all__ = ["Sample", "parse_prometheus", "wants_prometheus"]

log = logging.getLogger("inferno.metrics")

# --- content negotiation --------------------------------------------------------------------

_PROMETHEUS_MEDIA: Final = frozenset({"text/plain", "application/openmetrics-text", "text/*"})


def wants_prometheus(accept_header: str | None) -> bool:
    """Whether an ``Accept`` header asks for Prometheus text rather than JSON.

    JSON is the default (no header, ``*/*``, ``application/json``).  Prometheus
    text wins when ``text/plain`` or ``application/openmetrics-text`` has a
    positive q-value at least as high as an explicit ``application/json``
    (on a tie, whichever is listed first).  We answer OpenMetrics requests
    with 0.0.4 text, which every Prometheus scraper accepts as a fallback.
    """
    if not accept_header:
        return False
    prometheus = (0.0, 0)  # (q, -position): higher is better
    json_ = (0.0, 0)
    for position, part in enumerate(accept_header.split(",")):
        media, _, params = part.partition(";")
        media = media.strip().lower()
        if media in _PROMETHEUS_MEDIA or media == "application/json":
            rank = (_q_value(params), -position)
            if media == "application/json":
                json_ = max(json_, rank)
            else:
                prometheus = max(prometheus, rank)
    return prometheus[0] > 0 and prometheus > json_


def _q_value(params: str) -> float:
    for param in params.split(";"):
        key, _, value = param.partition("=")
        if key.strip().lower() == "q":
            try:
                q = float(value.strip())
            except ValueError:
                return 0.0
            return q if 0.0 <= q <= 1.0 else 0.0
    return 1.0


# --- parsing exposition text ----------------------------------------------------------------


class Sample(NamedTuple):
    """One sample line of exposition text.

    ``timestamp`` is the number as written, if any: milliseconds since the
    epoch in Prometheus text, seconds in OpenMetrics.  (A named tuple rather
    than a frozen dataclass: it is built per line, and builds 4x faster.)
    """

    name: str
    labels: Mapping[str, str]
    value: float
    timestamp: float | None = None


_NAME_AT: Final = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_AT: Final = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_QUOTED_AT: Final = re.compile(r'"([^"\\]*(?:\\.[^"\\]*)*)"')
# A sample without escapes, spaces in braces, quoted names or exemplars.
_SIMPLE_LINE: Final = re.compile(
    r"([a-zA-Z_:][a-zA-Z0-9_:]*)"
    r'(?:\{((?:[a-zA-Z_][a-zA-Z0-9_]*="[^"\\\n]*"(?:,(?=[a-zA-Z_]))?)*),?\})?'
    r"[ \t]+([^ \t#]+)(?:[ \t]+([^ \t#]+))?"
)
_SIMPLE_LABEL: Final = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="([^"\\\n]*)"')
_ESCAPE: Final = re.compile(r"\\(.)")
_UNESCAPES: Final = {"n": "\n", "\\": "\\", '"': '"'}
_TYPES: Final = frozenset({"counter", "gauge", "histogram", "summary", "untyped"})


class _BadLine(ValueError):
    pass


def parse_prometheus(text: str, *, strict: bool = False) -> list[Sample]:
    """Read Prometheus (0.0.4) or OpenMetrics exposition text into samples.

    Comments, ``# EOF``, blank lines, timestamps and exemplars are understood;
    label values are unescaped; ``NaN``/``+Inf``/``-Inf`` parse as floats;
    UTF-8 quoted names (``{"my.metric", a="b"} 1``) are accepted.  A line that
    cannot be read is skipped (a foreign server's one odd line must not blind
    us to the rest), unless *strict*, when it raises ``ValueError`` naming the
    line; strict mode also checks ``# HELP`` and ``# TYPE`` lines.
    """
    samples: list[Sample] = []
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.strip()
        if not line:
            continue
        try:
            if line[0] == "#":
                if strict:
                    _check_comment(line)
                continue
            samples.append(_parse_sample(line))
        except _BadLine as exc:
            if strict:
                raise ValueError(f"line {number}: {exc}: {raw!r}") from None
            log.debug("skipping unreadable exposition line %d (%s): %r", number, exc, raw)
    return samples


def _check_comment(line: str) -> None:
    parts = line.split(None, 3)
    if len(parts) < 2 or parts[1] not in ("HELP", "TYPE"):
        return
    if len(parts) < 3 or not _NAME_AT.fullmatch(parts[2]):
        raise _BadLine(f"# {parts[1]} needs a metric name")
    if parts[1] == "TYPE" and (len(parts) < 4 or parts[3] not in _TYPES):
        raise _BadLine("# TYPE needs one of " + ", ".join(sorted(_TYPES)))


def _unescape(value: str) -> str:
    if "\\" not in value:
        return value
    return _ESCAPE.sub(lambda m: _UNESCAPES.get(m.group(1), m.group(0)), value)


def _number(token: str) -> float:
    if "_" in token:  # Python's float() takes "1_000"; the exposition format does not
        raise _BadLine(f"not a number: {token!r}")
    try:
        return float(token)
    except ValueError:
        raise _BadLine(f"not a number: {token!r}") from None


def _parse_sample(line: str) -> Sample:
    simple = _SIMPLE_LINE.fullmatch(line)
    if simple is not None:  # the common shape, read in one regex pass (3-4x faster)
        name, inner, value, timestamp = simple.groups()
        pairs = _SIMPLE_LABEL.findall(inner) if inner else []
        labels = dict(pairs)
        if len(labels) != len(pairs):
            raise _BadLine("duplicate label")
        return Sample(
            name, labels, _number(value), None if timestamp is None else _number(timestamp)
        )
    return _parse_sample_fully(line)


def _parse_sample_fully(line: str) -> Sample:
    """Any line the fast path does not take: escapes, spaces, quoted names, exemplars, errors."""
    name: str | None = None
    labels: dict[str, str] = {}
    pos = 0
    if line[0] != "{":
        match = _NAME_AT.match(line)
        if match is None:
            raise _BadLine("expected a metric name")
        name, pos = match.group(), match.end()
        if pos < len(line) and line[pos] not in " \t{":
            raise _BadLine("expected a space or '{' after the metric name")
    brace = len(line) - len(line[pos:].lstrip(" \t"))  # blanks may precede '{'
    if brace < len(line) and line[brace] == "{":
        name, pos = _parse_labels(line, brace + 1, name, labels)
    if name is None:
        raise _BadLine("no metric name")
    tokens = line[pos:].split("#", 1)[0].split()
    if not tokens or len(tokens) > 2:
        raise _BadLine("expected a value and an optional timestamp")
    value = _number(tokens[0])
    timestamp = _number(tokens[1]) if len(tokens) == 2 else None
    return Sample(name, labels, value, timestamp)


def _parse_labels(
    line: str, pos: int, name: str | None, labels: dict[str, str]
) -> tuple[str | None, int]:
    """Parse ``key="value", ...}`` from *pos*; return the metric name and the end position."""
    end = len(line)
    while True:
        while pos < end and line[pos] in " \t":
            pos += 1
        if pos >= end:
            raise _BadLine("unterminated label set")
        if line[pos] == "}":
            return name, pos + 1
        quoted = line[pos] == '"'
        match = (_QUOTED_AT if quoted else _LABEL_AT).match(line, pos)
        if match is None:
            raise _BadLine("bad label name")
        key = _unescape(match.group(1)) if quoted else match.group()
        pos = match.end()
        while pos < end and line[pos] in " \t":
            pos += 1
        if pos < end and line[pos] == "=":
            pos += 1
            while pos < end and line[pos] in " \t":
                pos += 1
            match = _QUOTED_AT.match(line, pos)
            if match is None:
                raise _BadLine(f"label {key!r} needs a quoted value")
            if key in labels:
                raise _BadLine(f"duplicate label {key!r}")
            labels[key] = _unescape(match.group(1))
            pos = match.end()
        elif quoted and name is None:
            name = key
        else:
            raise _BadLine(f"expected '=' after label {key!r}")
        while pos < end and line[pos] in " \t":
            pos += 1
        if pos < end and line[pos] == ",":
            pos += 1
        elif pos >= end or line[pos] != "}":
            raise _BadLine("expected ',' or '}' in label set")
