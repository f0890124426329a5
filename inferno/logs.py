"""Logging: ``--log-level`` / ``--log-format`` and the two output formats.

Inferno logs through the standard library.  :func:`setup_logging` installs one
handler on the root logger writing to stderr (stdout belongs to the role, for
example ``inferno config`` output) in one of two formats:

* ``json``: one JSON object per line with ``ts`` (ISO 8601, UTC, milliseconds),
  ``level``, ``logger``, ``message``, every ``extra=`` field given to the log
  call, and ``exc`` with the traceback when there is one.  For log collectors.
* ``pretty``: ``HH:MM:SS.mmm LEVEL logger: message key=value ...``.  For people.

``auto`` (the default) picks ``pretty`` when stderr is a terminal and ``json``
otherwise, so a container's log stream is machine-readable without asking.

Level and format come from ``--log-level`` / ``--log-format`` (every role has
them), else ``INFERNO_LOG_LEVEL`` / ``INFERNO_LOG_FORMAT``, else the defaults.
They are not a configuration section: logging is set up before the
configuration is read, so loading it (and the plugins) can already log; the
config module reserves these two variable names for that reason.

Nothing here logs configuration values; callers log setting *names*, never
values of settings marked ``secret``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TextIO

from inferno.errors import ConfigProblem

if TYPE_CHECKING:
    import argparse

__all__ = [
    "DEFAULT_FORMAT",
    "DEFAULT_LEVEL",
    "ENV_LOG_FORMAT",
    "ENV_LOG_LEVEL",
    "FORMATS",
    "LEVELS",
    "JSONFormatter",
    "PrettyFormatter",
    "add_logging_flags",
    "logging_options",
    "setup_logging",
]

LEVELS = ("debug", "info", "warning", "error", "critical")
FORMATS = ("auto", "json", "pretty")
DEFAULT_LEVEL = "info"
DEFAULT_FORMAT = "auto"
ENV_LOG_LEVEL = "INFERNO_LOG_LEVEL"
ENV_LOG_FORMAT = "INFERNO_LOG_FORMAT"


def add_logging_flags(parser: argparse.ArgumentParser) -> None:
    """Add ``--log-level`` and ``--log-format``; values are checked by :func:`logging_options`."""
    group = parser.add_argument_group("logging (to stderr)")
    group.add_argument(
        "--log-level",
        metavar="LEVEL",
        default=None,
        help=f"{', '.join(LEVELS)} [default: {DEFAULT_LEVEL}; env {ENV_LOG_LEVEL}]",
    )
    group.add_argument(
        "--log-format",
        metavar="FORMAT",
        default=None,
        help=f"json (one object per line), pretty, or auto: pretty on a terminal, else json "
        f"[default: {DEFAULT_FORMAT}; env {ENV_LOG_FORMAT}]",
    )


def logging_options(
    args: argparse.Namespace, environ: Mapping[str, str]
) -> tuple[tuple[str, str], list[ConfigProblem]]:
    """``(level, format)`` from the flags, else the environment, else the defaults.

    :returns: the options (defaults in place of bad values) and one problem per bad value,
        for the caller to report together with the configuration's problems.
    """
    chosen: list[str] = []
    problems: list[ConfigProblem] = []
    for key, flag, env, allowed, default in (
        ("level", "--log-level", ENV_LOG_LEVEL, LEVELS, DEFAULT_LEVEL),
        ("format", "--log-format", ENV_LOG_FORMAT, FORMATS, DEFAULT_FORMAT),
    ):
        given = getattr(args, f"log_{key}", None)
        raw, source = (
            (given, f"flag {flag}") if given is not None else (environ.get(env), f"env {env}")
        )
        if raw is None:
            chosen.append(default)
        elif raw.strip().lower() in allowed:
            chosen.append(raw.strip().lower())
        else:
            problems.append(
                ConfigProblem(f"log.{key}", source, f"unknown {key} {raw!r}", ", ".join(allowed))
            )
            chosen.append(default)
    return (chosen[0], chosen[1]), problems


# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_RECORD_ATTRS = frozenset(
    vars(logging.LogRecord("", logging.INFO, "", 0, "", None, None)).keys()
) | {"message", "asctime", "taskName"}


def _extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _RECORD_ATTRS}


class JSONFormatter(logging.Formatter):
    """One JSON object per line; values JSON cannot hold are written with ``str()``."""

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "ts": _iso_utc(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in _extra_fields(record).items():
            document.setdefault(key, value)
        if record.exc_info:
            document["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            document["exc"] = record.exc_text
        if record.stack_info:
            document["stack"] = self.formatStack(record.stack_info)
        return json.dumps(document, default=str, ensure_ascii=False)


class PrettyFormatter(logging.Formatter):
    """``HH:MM:SS.mmm LEVEL logger: message key=value``, traceback below."""

    def format(self, record: logging.LogRecord) -> str:
        clock = time.strftime("%H:%M:%S", time.localtime(record.created))
        line = (
            f"{clock}.{int(record.msecs):03d} {record.levelname:<7} "
            f"{record.name}: {record.getMessage()}"
        )
        extras = " ".join(f"{k}={v!r}" for k, v in _extra_fields(record).items())
        if extras:
            line = f"{line} {extras}"
        if record.exc_info:
            line = f"{line}\n{self.formatException(record.exc_info)}"
        if record.stack_info:
            line = f"{line}\n{self.formatStack(record.stack_info)}"
        return line


def _iso_utc(created: float) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    return f"{seconds}.{int(created % 1 * 1000):03d}Z"


class _InfernoHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the handler Inferno installed, so a second setup replaces only it."""


def setup_logging(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Send log records at ``level`` and above to ``stream`` (default stderr) in ``fmt``.

    Calling it again replaces the handler it installed before and leaves any
    other handler (a test harness's, say) in place.

    :param level: one of :data:`LEVELS`.
    :param fmt: ``"json"``, ``"pretty"`` or ``"auto"``.
    :param stream: where to write; stderr when ``None``.
    """
    if level not in LEVELS:
        raise ValueError(f"log level {level!r} is not one of {', '.join(LEVELS)}")
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r} is not one of {', '.join(FORMATS)}")
    out = sys.stderr if stream is None else stream
    if fmt == "auto":
        fmt = "pretty" if _isatty(out) else "json"
    handler = _InfernoHandler(out)
    handler.setFormatter(JSONFormatter() if fmt == "json" else PrettyFormatter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _InfernoHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or not a real file
        return False
