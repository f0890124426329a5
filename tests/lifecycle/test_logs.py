"""Log formats and options: JSON lines, pretty lines, flags over environment over defaults."""

from __future__ import annotations

import argparse
import io
import json
import logging
from collections.abc import Iterator

import pytest

from inferno.logs import add_logging_flags, logging_options, setup_logging


@pytest.fixture
def logger() -> Iterator[logging.Logger]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield logging.getLogger("inferno.test")
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_format_writes_one_object_per_line_with_extra_fields(
    logger: logging.Logger,
) -> None:
    stream = io.StringIO()
    setup_logging("debug", "json", stream)
    logger.debug("hello %s", "world", extra={"node": "b1", "port": 8000})
    try:
        raise ValueError("bad value")
    except ValueError:
        logger.exception("it failed")
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "hello world"
    assert (first["level"], first["logger"]) == ("debug", "inferno.test")
    assert (first["node"], first["port"]) == ("b1", 8000)
    assert first["ts"].endswith("Z")
    assert second["level"] == "error"
    assert "ValueError: bad value" in second["exc"]


def test_json_lines_stay_one_line_and_hold_any_value(logger: logging.Logger) -> None:
    stream = io.StringIO()
    setup_logging("info", "json", stream)
    logger.info("two\nlines", extra={"thing": object()})
    (line,) = stream.getvalue().splitlines()
    record = json.loads(line)
    assert record["message"] == "two\nlines"
    assert record["thing"].startswith("<object object")


def test_pretty_format_is_for_people(logger: logging.Logger) -> None:
    stream = io.StringIO()
    setup_logging("info", "pretty", stream)
    logger.debug("not shown")
    logger.warning("disk %d%% full", 91, extra={"node": "b1"})
    (line,) = stream.getvalue().splitlines()
    assert line.endswith(" WARNING inferno.test: disk 91% full node='b1'")


def test_auto_format_is_json_when_not_a_terminal(logger: logging.Logger) -> None:
    stream = io.StringIO()
    setup_logging("info", "auto", stream)
    logger.info("x")
    assert json.loads(stream.getvalue())["message"] == "x"


def test_setting_up_again_replaces_only_our_handler(logger: logging.Logger) -> None:
    other = logging.StreamHandler(io.StringIO())
    logging.getLogger().addHandler(other)
    first, second = io.StringIO(), io.StringIO()
    setup_logging("info", "json", first)
    setup_logging("info", "json", second)
    logger.info("once")
    assert first.getvalue() == ""
    assert json.loads(second.getvalue())["message"] == "once"
    assert other in logging.getLogger().handlers


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_logging_flags(parser)
    return parser.parse_args(list(argv))


def test_flags_win_over_environment_over_defaults() -> None:
    env = {"INFERNO_LOG_LEVEL": "DEBUG", "INFERNO_LOG_FORMAT": "pretty"}
    assert logging_options(parse(), {}) == (("info", "auto"), [])
    assert logging_options(parse(), env) == (("debug", "pretty"), [])
    assert logging_options(parse("--log-level", "error"), env) == (("error", "pretty"), [])


def test_bad_logging_options_are_problems_naming_their_source() -> None:
    env = {"INFERNO_LOG_LEVEL": "chatty"}
    options, problems = logging_options(parse("--log-format", "xml"), env)
    assert options == ("info", "auto")
    assert [str(p) for p in problems] == [
        "log.level (env INFERNO_LOG_LEVEL): unknown level 'chatty'; "
        "allowed: debug, info, warning, error, critical",
        "log.format (flag --log-format): unknown format 'xml'; allowed: auto, json, pretty",
    ]
