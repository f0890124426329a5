"""run_role in this process: hooks around the role, errors, reload, and how main() maps them."""

from __future__ import annotations

import importlib.util
import logging
from types import ModuleType

import pytest

from inferno.cli import main
from inferno.config import load_config
from inferno.errors import ConfigError, PluginError
from inferno.lifecycle import role_sections, run_role
from inferno.plugins import InfernoPluginManager, PluginInfo
from inferno.roles import Role


def manager(*plugins: object) -> InfernoPluginManager:
    pm = InfernoPluginManager()
    for index, plugin in enumerate(plugins):
        assert pm.load_plugin(plugin, PluginInfo(name=f"p{index}", source="test"))
    return pm


def run(role: Role, pm: InfernoPluginManager, **flags: str) -> int:
    config = load_config(role_sections(role), role=role.name, environ={}, flags=flags)
    return run_role(role, config, pm)


def test_a_role_that_returns_exits_0_between_startup_and_shutdown_hooks(
    test_roles: ModuleType,
) -> None:
    pm = manager(test_roles.Recorder("a"), test_roles.Recorder("b"))
    role = test_roles.role("returns")
    assert run(role, pm, **{"runtime.shutdown_timeout": "5s"}) == 0
    # pluggy calls the last registered plugin first; shutdown runs in reverse.
    assert test_roles.EVENTS == [
        "b startup returns",
        "a startup returns",
        "run returns timeout=5.0",
        "a shutdown returns stopping=True",
        "b shutdown returns stopping=True",
    ]


def test_a_failing_startup_hook_stops_the_start_but_shutdown_runs(
    test_roles: ModuleType,
) -> None:
    pm = manager(test_roles.Recorder("ok"), test_roles.Recorder("bad", fail_startup=True))
    with pytest.raises(PluginError, match="plugin 'p1': inferno_startup failed: OSError"):
        run(test_roles.role("returns"), pm)
    assert test_roles.EVENTS == [
        "bad startup returns",
        "ok shutdown returns stopping=True",
        "bad shutdown returns stopping=True",
    ]


def test_a_role_error_propagates_after_the_shutdown_hooks(test_roles: ModuleType) -> None:
    with pytest.raises(RuntimeError, match="role blew up"):
        run(test_roles.role("fails"), manager(test_roles.Recorder("a")))
    assert test_roles.EVENTS[-1] == "a shutdown fails stopping=True"


def test_role_code_that_cannot_be_imported_is_a_plugin_error(test_roles: ModuleType) -> None:
    role = Role(name="ghost", help="missing", entry="inferno_no_such_module:run")
    with pytest.raises(PluginError, match="role 'ghost': cannot load 'inferno_no_such_module:run'"):
        run(role, manager())


def test_reload_runs_hooks_then_callbacks_and_survives_a_failing_one(
    test_roles: ModuleType, caplog: pytest.LogCaptureFixture
) -> None:
    pm = manager(test_roles.Recorder("a"))
    with caplog.at_level(logging.ERROR, logger="inferno.lifecycle"):
        assert run(test_roles.role("reloads"), pm) == 0
    assert test_roles.EVENTS[1:4] == ["a reload", "callback later", "run done"]
    (record,) = caplog.records
    assert record.getMessage().startswith("reload callback")
    assert record.exc_info is not None
    assert "cannot reread" in str(record.exc_info[1])


@pytest.mark.skipif(importlib.util.find_spec("uvloop") is not None, reason="uvloop installed")
def test_asking_for_uvloop_without_it_is_a_config_error(test_roles: ModuleType) -> None:
    with pytest.raises(ConfigError) as caught:
        run(test_roles.role("returns"), manager(), **{"runtime.event_loop": "uvloop"})
    (problem,) = caught.value.problems
    assert str(problem).startswith("runtime.event_loop (flag --runtime-event-loop): uvloop")
    assert test_roles.EVENTS == []


@pytest.mark.parametrize(
    ("role", "status", "line"),
    [
        ("returns", 0, None),
        ("fails_expected", 1, "inferno: error: backend 10.0.0.7:8000 unreachable"),
        ("bad_config", 2, "tls.cert (default): file missing; allowed: a PEM file"),
        ("ghost", 1, "inferno: error: role 'ghost': cannot load 'inferno_no_such_module:run': "),
    ],
)
def test_main_maps_expected_errors_to_one_line_and_a_status(
    test_roles: ModuleType,
    capsys: pytest.CaptureFixture[str],
    role: str,
    status: int,
    line: str | None,
) -> None:
    assert main([role, "--log-level", "critical"]) == status
    err = capsys.readouterr().err
    if line is None:
        assert err == ""
    else:
        assert err.startswith(line)
        assert len(err.splitlines()) == 1


def test_main_shows_the_traceback_of_an_unexpected_error(
    test_roles: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["fails", "--log-level", "critical"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):")
    assert err.rstrip().endswith("RuntimeError: role blew up")
