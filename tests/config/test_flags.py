"""Command-line flags through a real argparse parser, into load_config."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import pytest

from inferno.config import (
    FLAG_DEST_PREFIX,
    Config,
    ConfigError,
    FlagValue,
    Section,
    add_flags,
    flags_from_namespace,
    load_config,
)


def make_parser(sections: Sequence[Section], role: str | None = "proxy") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="inferno proxy",
        allow_abbrev=False,
        # A narrow page forces argparse to wrap usage and help lines.
        formatter_class=lambda prog: argparse.HelpFormatter(prog, width=60),
    )
    parser.add_argument("--config")
    add_flags(parser, sections, role)
    return parser


def load(sections: Sequence[Section], argv: list[str], role: str | None = "proxy") -> Config:
    namespace = make_parser(sections, role).parse_args(argv)
    return load_config(sections, role=role, environ={}, flags=flags_from_namespace(namespace))


def test_only_given_flags_reach_the_namespace(sections: tuple[Section, ...]) -> None:
    namespace = make_parser(sections).parse_args(["--port", "9000", "--config", "x.toml"])
    assert namespace.config == "x.toml"
    assert flags_from_namespace(namespace) == {"proxy.port": FlagValue("9000", "--port")}
    assert vars(namespace)[FLAG_DEST_PREFIX + "proxy.port"] == FlagValue("9000", "--port")


def test_values_from_flags_and_their_sources(sections: tuple[Section, ...]) -> None:
    config = load(
        sections,
        [
            "--port=9000",
            "--timeout",
            "250ms",
            "--backends",
            "a:1,[::1]:2",
            "--health-interval",
            "2s",
            "--policy",
            "least_loaded",
        ],
    )
    assert config["proxy.port"] == 9000
    assert config["proxy.timeout"] == 0.25
    assert config["proxy.backends"] == (("a", 1), ("::1", 2))
    assert config["health.interval"] == 2.0
    assert config["proxy.policy"] == "least_loaded"
    assert config.source("proxy.port") == "flag --port"
    assert config.source("health.interval") == "flag --health-interval"
    assert config.source("proxy.max_body_bytes") == "default"


@pytest.mark.parametrize(
    ("argv", "value", "source"),
    [
        ([], False, "default"),
        (["--tls"], True, "flag --tls"),
        (["--tls=false"], False, "flag --tls"),
        (["--tls=yes"], True, "flag --tls"),
        (["--tls", "off"], False, "flag --tls"),
        (["--no-tls"], False, "flag --no-tls"),
        (["--tls", "--no-tls"], False, "flag --no-tls"),
        (["--no-tls", "--tls"], True, "flag --tls"),
    ],
)
def test_bool_flags(
    sections: tuple[Section, ...], argv: list[str], value: bool, source: str
) -> None:
    config = load(sections, argv)
    assert (config["proxy.tls"], config.source("proxy.tls")) == (value, source)


def test_bool_flag_with_a_bad_value_is_a_config_problem(sections: tuple[Section, ...]) -> None:
    with pytest.raises(ConfigError) as caught:
        load(sections, ["--tls=perhaps", "--port", "http"])
    assert str(caught.value).splitlines() == [
        "proxy.tls (flag --tls): 'perhaps' is not a boolean; "
        "allowed: true/false, yes/no, on/off or 1/0",
        "proxy.port (flag --port): 'http' is not an integer; allowed: an integer from 0 to 65535",
    ]


def test_negation_takes_no_value(
    sections: tuple[Section, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        make_parser(sections).parse_args(["--no-tls=true"])
    assert "ignored explicit argument 'true'" in capsys.readouterr().err


def test_last_occurrence_wins(sections: tuple[Section, ...]) -> None:
    assert load(sections, ["--port", "1", "--port", "2"])["proxy.port"] == 2


def test_other_role_gets_prefixed_flags(sections: tuple[Section, ...]) -> None:
    config = load(sections, ["--proxy-port", "7", "--no-proxy-tls"], role="backend")
    assert config["proxy.port"] == 7
    assert config.source("proxy.tls") == "flag --no-proxy-tls"
    with pytest.raises(SystemExit):
        make_parser(sections, role="backend").parse_args(["--port", "7"])


def test_help_shows_groups_defaults_and_variables(
    sections: tuple[Section, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    make_parser(sections).print_help()
    text = " ".join(capsys.readouterr().out.split())  # undo argparse's wrapping
    assert "[proxy] settings: The load balancer." in text
    assert "[health] settings:" in text
    assert "--timeout DURATION Read timeout. [default: 30s; env INFERNO_PROXY_TIMEOUT]" in text
    assert "--tls [BOOL] Serve TLS. [default: false; env INFERNO_PROXY_TLS]" in text
    assert "--no-tls same as --tls=false" in text
    assert "--backends HOST:PORT,... Static backends. [default: empty;" in text
    assert "--policy {round_robin,least_loaded}" in text
    assert "--secret TEXT Shared enrolment secret. [default: hidden;" in text
    assert "--listen HOST:PORT Where to listen. [default: 127.0.0.1:8080;" in text


def test_percent_in_help_is_not_formatting(capsys: pytest.CaptureFixture[str]) -> None:
    from inferno.config import Float, Setting

    section = Section("proxy", (Setting("target", Float(), 0.9, "Aim for 90% use."),))
    make_parser([section]).print_help()
    assert "Aim for 90% use." in capsys.readouterr().out


def test_flags_from_a_plain_mapping() -> None:
    given = {FLAG_DEST_PREFIX + "proxy.port": FlagValue("1", "--port"), "config": None}
    assert flags_from_namespace(given) == {"proxy.port": FlagValue("1", "--port")}


def test_conflict_with_a_cli_flag_is_loud(sections: tuple[Section, ...]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port")
    with pytest.raises(argparse.ArgumentError):
        add_flags(parser, sections, "proxy")
