"""load_config: four layers, sources, and every problem reported at once."""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Sequence

import pytest

from inferno.config import (
    FILE_KEY,
    RESERVED_ENV_VARS,
    Bool,
    Config,
    ConfigError,
    Duration,
    FlagValue,
    Int,
    Section,
    Setting,
    add_flags,
    env_name,
    flag_name,
    load_config,
)
from inferno.errors import ConfigProblem

WriteToml = Callable[..., str]  # the write_toml fixture of conftest.py


def problems_of(sections: Sequence[Section], **kwargs: object) -> list[tuple[str, str, str, str]]:
    """The problems load_config reports, as (key, source, problem, allowed) tuples."""
    kwargs.setdefault("environ", {})
    with pytest.raises(ConfigError) as caught:
        load_config(sections, **kwargs)  # type: ignore[arg-type]
    return [(p.key, p.source, p.problem, p.allowed) for p in caught.value.problems]


# --- precedence --------------------------------------------------------------


def test_each_layer_overrides_the_one_below(
    sections: tuple[Section, ...], write_toml: WriteToml
) -> None:
    path = write_toml("# comment\n[proxy]\nport = 1001\n")
    env = {"INFERNO_PROXY_PORT": "1002"}
    flags = {"proxy.port": "1003"}

    config = load_config(sections, role="proxy", environ={})
    assert (config["proxy.port"], config.source("proxy.port")) == (8080, "default")

    config = load_config(sections, role="proxy", toml_path=path, environ={})
    assert (config["proxy.port"], config.source("proxy.port")) == (1001, f"{path}:3")

    config = load_config(sections, role="proxy", toml_path=path, environ=env)
    assert (config["proxy.port"], config.source("proxy.port")) == (
        1002,
        "env INFERNO_PROXY_PORT",
    )

    config = load_config(sections, role="proxy", toml_path=path, environ=env, flags=flags)
    assert (config["proxy.port"], config.source("proxy.port")) == (1003, "flag --port")


def test_toml_path_may_be_a_path_object(
    sections: tuple[Section, ...], write_toml: WriteToml
) -> None:
    path = pathlib.Path(write_toml("[proxy]\nport = 1\n"))
    config = load_config(sections, toml_path=path, environ={})
    assert config.source("proxy.port") == f"{path}:2"


def test_layers_merge_per_setting(sections: tuple[Section, ...], write_toml: WriteToml) -> None:
    path = write_toml('[proxy]\ntimeout = "2m"\n[health]\ninterval = 1.5\n')
    config = load_config(
        sections,
        role="proxy",
        toml_path=path,
        environ={"INFERNO_HEALTH_FAILURE_THRESHOLD": "7"},
        flags={"proxy.tls": FlagValue("true", "--tls")},
    )
    assert config.section("proxy")["timeout"] == 120.0
    assert config.source("proxy.timeout") == f"{path}:2"
    assert config["health.interval"] == 1.5
    assert config.source("health.interval") == f"{path}:4"
    assert config["health.failure_threshold"] == 7
    assert config["proxy.tls"] is True
    assert config.source("proxy.tls") == "flag --tls"
    assert config["proxy.policy"] == "round_robin"
    assert config.source("proxy.policy") == "default"


def test_flag_source_uses_the_role(sections: tuple[Section, ...]) -> None:
    as_proxy = load_config(sections, role="proxy", environ={}, flags={"health.interval": "1s"})
    assert as_proxy.source("health.interval") == "flag --health-interval"
    as_none = load_config(sections, role=None, environ={}, flags={"proxy.port": "1"})
    assert as_none.source("proxy.port") == "flag --proxy-port"


def test_names_derive_from_one_declaration(sections: tuple[Section, ...]) -> None:
    proxy, health = sections
    body = proxy.settings[3]
    assert env_name(proxy.name, body.key) == "INFERNO_PROXY_MAX_BODY_BYTES"
    assert flag_name(proxy, body, "proxy") == "--max-body-bytes"
    assert flag_name(proxy, body, "backend") == "--proxy-max-body-bytes"
    assert flag_name(health, health.settings[1], "proxy") == "--health-failure-threshold"
    listen = Setting("listen", Int(), 0, "x", flag="bind")
    assert flag_name(proxy, listen, "proxy") == "--bind"


# --- the Config object -------------------------------------------------------


def test_config_is_a_read_only_mapping(sections: tuple[Section, ...]) -> None:
    config = load_config(sections, role="proxy", environ={"INFERNO_PROXY_BACKENDS": "a:1"})
    assert "proxy.port" in config
    assert len(config) == 10
    assert list(config)[:2] == ["proxy.port", "proxy.listen"]
    assert config.setting("proxy.port").help == "Port of the service."
    assert config["proxy.backends"] == (("a", 1),)
    view = config.section("health")
    assert dict(view) == {"interval": 5.0, "failure_threshold": 3}
    with pytest.raises(TypeError):
        view["interval"] = 1.0  # type: ignore[index]
    with pytest.raises(TypeError):
        config["proxy.port"] = 1  # type: ignore[index]
    with pytest.raises(KeyError):
        config["proxy.nope"]
    with pytest.raises(KeyError):
        config.section("nope")


def test_config_repr_hides_secrets(sections: tuple[Section, ...]) -> None:
    config = load_config(sections, environ={"INFERNO_PROXY_SECRET": "hunter2"})
    assert config["proxy.secret"] == "hunter2"
    assert "hunter2" not in repr(config)
    assert "'proxy.secret': '<redacted>'" in repr(config)


def test_defaults_may_be_none_and_lists_become_tuples() -> None:
    section = Section("s", [Setting("items", Int(), [1, 2], "x")])  # type: ignore[arg-type]
    config = load_config([section], environ={})
    assert config["s.items"] == (1, 2)
    assert isinstance(section.settings, tuple)


# --- error messages ----------------------------------------------------------


def test_bad_values_name_key_source_problem_and_allowed(
    sections: tuple[Section, ...], write_toml: WriteToml
) -> None:
    path = write_toml("[proxy]\n\nport = 70000\n")
    assert problems_of(
        sections,
        role="proxy",
        toml_path=path,
        environ={"INFERNO_PROXY_TIMEOUT": "-5s"},
        flags={"proxy.listen": FlagValue(":8080", "--listen")},
    ) == [
        (
            "proxy.port",
            f"{path}:3",
            "70000 is above the maximum 65535",
            "an integer from 0 to 65535",
        ),
        (
            "proxy.timeout",
            "env INFERNO_PROXY_TIMEOUT",
            "'-5s' is negative",
            "a duration such as 250ms, 5s, 2m, 1h or 1h30m (a bare number is seconds)",
        ),
        (
            "proxy.listen",
            "flag --listen",
            "':8080' has no host",
            "host:port or [IPv6]:port with a port from 0 to 65535",
        ),
    ]


def test_error_lines_read_as_one_line_per_problem(sections: tuple[Section, ...]) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(
            sections,
            role="proxy",
            environ={"INFERNO_PROXY_TLS": "maybe", "INFERNO_PROXY_POLICY": "random"},
        )
    assert str(caught.value).splitlines() == [
        "proxy.policy (env INFERNO_PROXY_POLICY): 'random' is not a known choice; "
        "allowed: one of round_robin, least_loaded",
        "proxy.tls (env INFERNO_PROXY_TLS): 'maybe' is not a boolean; "
        "allowed: true/false, yes/no, on/off or 1/0",
    ]


def test_bad_secret_is_not_echoed(sections: tuple[Section, ...], write_toml: WriteToml) -> None:
    path = write_toml("[proxy]\nsecret = 12345678\n")
    with pytest.raises(ConfigError) as caught:
        load_config(sections, toml_path=path, environ={})
    (problem,) = caught.value.problems
    assert (problem.key, problem.source) == ("proxy.secret", f"{path}:2")
    assert problem.problem == "invalid value (not shown: the setting is secret)"
    assert "12345678" not in str(caught.value)


def test_unknown_keys_and_sections_in_the_file(
    sections: tuple[Section, ...], write_toml: WriteToml
) -> None:
    path = write_toml(
        "stray = 1\n"
        "[proxy]\n"
        "prot = 1\n"
        "[proxy.limits]\n"
        "x = 1\n"
        "[helth]\n"
        "interval = 1\n"
        "[health]\n"
        "interval = 2\n"
        "health = 3\n"
    )
    proxy_keys = (
        "keys of [proxy]: port, listen, timeout, max_body_bytes, tls, policy, backends, secret"
    )
    assert problems_of(sections, toml_path=path) == [
        ("stray", f"{path}:1", "a key outside any [section]", "sections [proxy], [health]"),
        ("proxy.prot", f"{path}:3", "unknown key (did you mean port?)", proxy_keys),
        ("proxy.limits", f"{path}:4", "unknown key", proxy_keys),
        (
            "helth",
            f"{path}:6",
            "unknown section (did you mean health?)",
            "sections [proxy], [health]",
        ),
        (
            "health.health",
            f"{path}:10",
            "unknown key",
            "keys of [health]: interval, failure_threshold",
        ),
    ]


def test_a_section_that_is_not_a_table(
    sections: tuple[Section, ...], write_toml: WriteToml
) -> None:
    path = write_toml("proxy = 5\n")
    assert problems_of(sections, toml_path=path) == [
        ("proxy", f"{path}:1", "expected a table [proxy], got an integer", "a [proxy] table"),
    ]


def test_other_roles_sections_are_tolerated(
    sections: tuple[Section, ...], write_toml: WriteToml
) -> None:
    path = write_toml("[backend]\nengine = 'sim'\n[proxy]\nport = 1\n")
    config = load_config(
        sections,
        toml_path=path,
        environ={"INFERNO_BACKEND_ENGINE": "sim"},
        other_sections={"backend"},
    )
    assert config["proxy.port"] == 1
    assert problems_of(sections, toml_path=path)[0][:3] == (
        "backend",
        f"{path}:1",
        "unknown section",
    )


def test_unknown_environment_variables(sections: tuple[Section, ...]) -> None:
    environ = {
        "INFERNO_PROXY_PROT": "1",
        "INFERNO_HEALTH_INTERVALL": "1s",
        "INFERNO_PLUGINS": "a,b",  # reserved: not a setting
        "INFERNO_PLUGIN_PATH": "/x",
        "INFERNO_BACKEND_PORT": "1",  # a section not in play
        "INFERNO_OTHER": "1",
        "PATH": "/bin",
    }
    problems = problems_of(sections, environ=environ)
    assert [p[:3] for p in problems] == [
        (
            "health.intervall",
            "env INFERNO_HEALTH_INTERVALL",
            "unknown setting (did you mean INFERNO_HEALTH_INTERVAL?)",
        ),
        (
            "proxy.prot",
            "env INFERNO_PROXY_PROT",
            "unknown setting (did you mean INFERNO_PROXY_PORT?)",
        ),
    ]
    assert problems[0][3] == (
        "variables of [health]: INFERNO_HEALTH_INTERVAL, INFERNO_HEALTH_FAILURE_THRESHOLD"
    )
    assert {"INFERNO_PLUGINS", "INFERNO_PLUGIN_PATH"} <= RESERVED_ENV_VARS


def test_longest_section_prefix_owns_a_variable() -> None:
    health = Section("health", (Setting("interval", Duration(), 5.0, "x"),))
    check = Section("health_check", (Setting("path", Int(), 1, "x"),))
    problems = problems_of([health, check], environ={"INFERNO_HEALTH_CHECK_X": "1"})
    assert [p[:2] for p in problems] == [("health_check.x", "env INFERNO_HEALTH_CHECK_X")]
    # A longer prefix belonging to another role's section is not ours to judge.
    config = load_config(
        [health], environ={"INFERNO_HEALTH_CHECK_X": "1"}, other_sections={"health_check"}
    )
    assert config["health.interval"] == 5.0


def test_unknown_flag_key_is_a_problem(sections: tuple[Section, ...]) -> None:
    assert problems_of(sections, flags={"proxy.nope": "1"}) == [
        ("proxy.nope", "flag proxy.nope", "unknown setting", ""),
    ]


# --- the file as a whole -----------------------------------------------------


def test_toml_syntax_error_names_the_line(
    sections: tuple[Section, ...], write_toml: WriteToml
) -> None:
    path = write_toml("[proxy]\nport = 1\ntimeout = = 2\n")
    assert problems_of(sections, toml_path=path) == [
        (
            FILE_KEY,
            f"{path}:3",
            "invalid TOML: Unexpected character: '=' (column 10)",
            "TOML syntax",
        ),
    ]


def test_table_redefined_by_a_header_names_the_line(
    sections: tuple[Section, ...], write_toml: WriteToml
) -> None:
    path = write_toml("[proxy]\nbackends.a = 1\n[proxy.backends]\nb = 2\n")
    ((key, source, problem, _),) = problems_of(sections, toml_path=path)
    assert (key, source) == (FILE_KEY, f"{path}:3")
    assert problem == "invalid TOML: Redefinition of an existing table"


def test_duplicate_key_is_a_syntax_error(
    sections: tuple[Section, ...], write_toml: WriteToml
) -> None:
    path = write_toml("[proxy]\nport = 1\nport = 2\n")
    ((key, source, problem, _),) = problems_of(sections, toml_path=path)
    assert (key, source) == (FILE_KEY, f"{path}:3")
    assert problem.startswith('invalid TOML: Key "port" already exists')


def test_missing_file(sections: tuple[Section, ...], tmp_path: pathlib.Path) -> None:
    path = f"{tmp_path}/absent.toml"
    assert problems_of(sections, toml_path=path) == [
        (FILE_KEY, path, "cannot read the file: No such file or directory", "a readable TOML file")
    ]


def test_file_that_is_not_utf8(sections: tuple[Section, ...], tmp_path: pathlib.Path) -> None:
    path = f"{tmp_path}/latin1.toml"
    with open(path, "wb") as stream:
        stream.write(b"[proxy]\n# caf\xe9\n")
    assert problems_of(sections, toml_path=path) == [
        (FILE_KEY, path, "the file is not UTF-8 (byte 13)", "a UTF-8 TOML file")
    ]


def test_all_problems_are_reported_together(
    sections: tuple[Section, ...], write_toml: WriteToml
) -> None:
    path = write_toml("[proxy]\nport = 'x'\nbogus = 1\n[health]\ninterval = -1\n")
    problems = problems_of(
        sections,
        role="proxy",
        toml_path=path,
        environ={"INFERNO_PROXY_MAX_BODY_BYTES": "lots", "INFERNO_PROXY_X": "1"},
        flags={"health.failure_threshold": "0", "proxy.tls": FlagValue("perhaps", "--tls")},
    )
    assert [(key, source) for key, source, _, _ in problems] == [
        ("proxy.port", f"{path}:2"),
        ("proxy.bogus", f"{path}:3"),
        ("health.interval", f"{path}:5"),
        ("proxy.max_body_bytes", "env INFERNO_PROXY_MAX_BODY_BYTES"),
        ("proxy.x", "env INFERNO_PROXY_X"),
        ("health.failure_threshold", "flag --health-failure-threshold"),
        ("proxy.tls", "flag --tls"),
    ]


def test_a_broken_file_does_not_hide_other_layers(
    sections: tuple[Section, ...], write_toml: WriteToml
) -> None:
    path = write_toml("[proxy\n")
    problems = problems_of(sections, toml_path=path, environ={"INFERNO_PROXY_PORT": "x"})
    assert [(key, source.split(":")[-1]) for key, source, _, _ in problems] == [
        (FILE_KEY, "1"),
        ("proxy.port", "env INFERNO_PROXY_PORT"),
    ]


def test_problem_str_matches_the_cli_line() -> None:
    problem = ConfigProblem(
        "proxy.port", "env INFERNO_PROXY_PORT", "'x' is not an integer", "an integer"
    )
    assert str(problem) == (
        "proxy.port (env INFERNO_PROXY_PORT): 'x' is not an integer; allowed: an integer"
    )


# --- declaration mistakes ----------------------------------------------------


def test_colliding_names_are_refused() -> None:
    proxy = Section("proxy", (Setting("health_interval", Duration(), 1.0, "x"),))
    health = Section("health", (Setting("interval", Duration(), 1.0, "x"),))
    with pytest.raises(
        ValueError, match=r"proxy\.health_interval and health\.interval both derive"
    ):
        load_config([proxy, health], role="proxy", environ={})
    # As another role the flags differ (--proxy-health-interval), but not the variables:
    a = Section("a", (Setting("b_c", Int(), 1, "x"),))
    a_b = Section("a_b", (Setting("c", Int(), 1, "x"),))
    with pytest.raises(ValueError, match="both derive INFERNO_A_B_C"):
        load_config([a, a_b], environ={})


def test_bool_negation_collision_is_refused() -> None:
    section = Section(
        "proxy", (Setting("tls", Bool(), False, "x"), Setting("no_tls", Int(), 1, "y"))
    )
    with pytest.raises(ValueError, match="both derive --no-tls"):
        load_config([section], role="proxy", environ={})


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Section("Proxy", ()), "section name 'Proxy' must be snake_case"),
        (lambda: Setting("max-body", Int(), 1, "x"), "setting key 'max-body' must be snake_case"),
        (lambda: Setting("a", Int(), 1, "x", flag="--A B"), "flag '--A B' is not a long option"),
        (
            lambda: Section("s", (Setting("a", Int(), 1, "x"), Setting("a", Int(), 2, "y"))),
            "declares 'a' twice",
        ),
        (
            lambda: load_config([Section("plugin", (Setting("path", Int(), 1, "x"),))], environ={}),
            "reserved variable INFERNO_PLUGIN_PATH",
        ),
        (
            lambda: load_config(
                [Section("s", ()), Section("s", (Setting("a", Int(), 1, "x"),))], environ={}
            ),
            "two different sections are named 's'",
        ),
    ],
)
def test_bad_declarations_are_refused(make: object, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        make()  # type: ignore[operator]


def test_flag_override_gets_dashes_and_the_same_section_twice_is_fine() -> None:
    setting = Setting("listen", Int(), 0, "x", flag="bind")
    assert setting.flag == "--bind"
    section = Section("s", (setting,))
    config = load_config([section, section], environ={}, flags={"s.listen": "3"})
    assert (config["s.listen"], config.source("s.listen")) == (3, "flag --bind")


def test_config_built_directly_falls_back_to_defaults(sections: tuple[Section, ...]) -> None:
    config = Config(sections, {"proxy.port": 1}, {"proxy.port": "test"}, role="proxy")
    assert (config["proxy.port"], config.source("proxy.port")) == (1, "test")
    assert (config["health.interval"], config.source("health.interval")) == (5.0, "default")
    assert config.role == "proxy"
    assert config.sections == sections


def test_add_flags_refuses_collisions_too() -> None:
    import argparse

    proxy = Section("proxy", (Setting("health_interval", Duration(), 1.0, "x"),))
    health = Section("health", (Setting("interval", Duration(), 1.0, "x"),))
    with pytest.raises(ValueError, match="both derive --health-interval"):
        add_flags(argparse.ArgumentParser(), [proxy, health], "proxy")
