"""The ``inferno`` command through ``main(argv)``: built-ins, config, errors, laziness."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import tomlkit

from inferno import __version__
from inferno.cli import main

pytestmark = pytest.mark.usefixtures("hello_env")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_version_names_inferno_python_and_platform(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "version")
    assert status == 0
    assert f"inferno {__version__}" in out
    assert platform.python_version() in out
    assert platform.platform() in out


def test_plugins_lists_each_plugin_with_its_hooks(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "plugins")
    assert status == 0
    assert "inferno_hello.plugin  (from INFERNO_PLUGINS)" in out
    assert "hooks: inferno_engines, inferno_health_checkers, inferno_providers" in out

    status, out, _ = run(capsys, "plugins", "--json")
    assert status == 0
    document = json.loads(out)
    (hello,) = [p for p in document["plugins"] if p["name"] == "inferno_hello.plugin"]
    assert "inferno_startup" in hello["hooks"]
    assert document["error"] is None


def test_plugins_shows_a_failure_and_exits_1(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("INFERNO_PLUGINS", "inferno_hello.plugin,inferno_absent_plugin")
    status, out, _ = run(capsys, "plugins")
    assert status == 1
    assert "inferno_absent_plugin  (from INFERNO_PLUGINS)" in out
    assert "FAILED: ModuleNotFoundError: No module named 'inferno_absent_plugin'" in out


def test_config_shows_every_value_with_its_source(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config_file = tmp_path / "inferno.toml"
    config_file.write_text('[runtime]\nshutdown_timeout = "5s"\n\n[hello]\ngreeting = "hi"\n')
    monkeypatch.setenv("INFERNO_HELLO_PORT", "8080")
    monkeypatch.setenv("INFERNO_HELLO_TOKEN", "s3cr3t-token")
    status, out, err = run(capsys, "config", "hello", "--config", str(config_file), "--stubborn")
    assert (status, err) == (0, "")
    lines = {line.split(" =")[0]: line for line in out.splitlines() if " = " in line}
    assert lines["event_loop"] == 'event_loop = "auto"  # from default'
    assert lines["shutdown_timeout"] == f'shutdown_timeout = "5s"  # from {config_file}:2'
    assert lines["greeting"] == f'greeting = "hi"  # from {config_file}:5'
    assert lines["port"] == "port = 8080  # from env INFERNO_HELLO_PORT"
    assert lines["stubborn"] == "stubborn = true  # from flag --stubborn"
    assert "s3cr3t-token" not in out
    # The output is TOML a role can read back.
    document: Any = tomlkit.parse(out)
    assert document["hello"]["port"] == 8080
    assert "token" not in document["hello"]


def test_config_file_may_come_from_inferno_config(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config_file = tmp_path / "inferno.toml"
    config_file.write_text("[hello]\nport = 9\n")
    monkeypatch.setenv("INFERNO_CONFIG", str(config_file))
    status, out, _ = run(capsys, "config", "hello")
    assert status == 0
    assert f"port = 9  # from {config_file}:2" in out


def test_bad_configuration_exits_2_with_one_line_per_problem(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config_file = tmp_path / "bad.toml"
    config_file.write_text('[hello]\ngreeting = 3\ncolour = "red"\n')
    monkeypatch.setenv("INFERNO_RUNTIME_SHUTDOWN_TIMEOUT", "soon")
    for command in (["config", "hello"], ["hello"]):
        argv = [*command, "--config", str(config_file), "--port", "70000", "--log-format", "fancy"]
        status, out, err = run(capsys, *argv)
        assert status == 2
        assert out == ""
        problems = err.splitlines()
        assert len(problems) == 5, err
        assert problems[0].startswith("log.format (flag --log-format): unknown format 'fancy'")
        starts = sorted(p.split(":")[0] for p in problems[1:])
        assert starts == [
            f"hello.colour ({config_file}",
            f"hello.greeting ({config_file}",
            "hello.port (flag --port)",
            "runtime.shutdown_timeout (env INFERNO_RUNTIME_SHUTDOWN_TIMEOUT)",
        ]
        assert "Traceback" not in err


def test_a_secret_is_not_echoed_in_errors(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config_file = tmp_path / "bad.toml"
    config_file.write_text('[hello]\ntoken = ["s3cr3t", "list"]\n')
    status, out, err = run(capsys, "config", "hello", "--config", str(config_file))
    assert status == 2
    assert "hello.token" in err
    assert "s3cr3t" not in out + err


def test_another_roles_section_in_a_shared_file_is_not_an_error(
    capsys: pytest.CaptureFixture[str], write_plugin: Any, tmp_path: Path
) -> None:
    write_plugin(
        "inferno_other_role",
        """
        from inferno.config import Int, Section, Setting
        from inferno.plugins import hookimpl
        from inferno.roles import Role

        SECTION = Section("other", (Setting("size", Int(), 1, "a size"),))

        @hookimpl
        def inferno_roles():
            return [Role(name="other", help="another role", entry="nowhere:run",
                         sections=(SECTION,))]
        """,
    )
    config_file = tmp_path / "shared.toml"
    config_file.write_text("[hello]\nport = 1\n\n[other]\nsize = 2\n")
    status, out, err = run(capsys, "config", "hello", "--config", str(config_file))
    assert (status, err) == (0, "")
    assert "size" not in out


def test_no_command_or_an_unknown_one_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    status, _, err = run(capsys)
    assert status == 2
    assert "usage: inferno" in err
    status, _, err = run(capsys, "governate")
    assert status == 2
    assert "invalid choice: 'governate'" in err


@pytest.mark.parametrize(
    "argv", [["--help"], ["hello", "--help"], ["config", "--help"], ["config", "hello", "--help"]]
)
def test_help_does_not_import_role_code(
    capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    status, out, _ = run(capsys, *argv)
    assert status == 0
    assert "hello" in out
    assert "inferno_hello.plugin" in sys.modules  # the plugin is read for its Role spec ...
    assert "inferno_hello.role" not in sys.modules  # ... but the role's code is not imported


def test_role_help_lists_common_and_role_options(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "hello", "--help")
    assert status == 0
    for option in (
        "--config FILE",
        "--log-level LEVEL",
        "--log-format FORMAT",
        "--runtime-shutdown-timeout",
        "--greeting",
    ):
        assert option in out


def test_help_in_a_fresh_interpreter_imports_neither_anyio_nor_tomlkit() -> None:
    source = Path(__file__).resolve().parent.parent / "fixtures" / "thirdparty_plugin" / "src"
    code = (
        "import sys; from inferno.cli import main; status = main(['hello', '--help']); "
        "print(status, sorted(m for m in ('anyio', 'tomlkit', 'inferno_hello.role') "
        "if m in sys.modules), file=sys.stderr)"
    )
    pythonpath = os.pathsep.join(filter(None, [str(source), os.environ.get("PYTHONPATH")]))
    env = {"PYTHONPATH": pythonpath, "INFERNO_PLUGINS": "inferno_hello.plugin", "PATH": ""}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=30
    )
    assert result.stderr.strip() == "0 []"


def test_a_role_offered_twice_is_one_error_line_but_plugins_still_works(
    capsys: pytest.CaptureFixture[str], write_plugin: Any
) -> None:
    write_plugin(
        "inferno_second_hello",
        """
        from inferno.plugins import hookimpl
        from inferno.roles import Role

        @hookimpl
        def inferno_roles():
            return [Role(name="hello", help="an impostor", entry="nowhere:run")]
        """,
    )
    status, out, err = run(capsys, "hello")
    assert status == 1
    assert err == (
        "inferno: error: role 'hello' is offered by both "
        "'inferno_hello.plugin' and 'inferno_second_hello'\n"
    )
    status, out, err = run(capsys, "plugins")
    assert status == 1
    assert "error: role 'hello' is offered by both" in out
    assert run(capsys, "version")[0] == 0


def test_a_role_whose_settings_clash_is_one_error_line(
    capsys: pytest.CaptureFixture[str], write_plugin: Any
) -> None:
    write_plugin(
        "inferno_clashing_role",
        """
        from inferno.config import Int, Section, Setting
        from inferno.plugins import hookimpl
        from inferno.roles import Role

        SECTION = Section("clash", (
            Setting("a", Int(), 1, "a", flag="--same"),
            Setting("b", Int(), 1, "b", flag="--same"),
        ))

        @hookimpl
        def inferno_roles():
            return [Role(name="clash", help="clashes", entry="nowhere:run",
                         sections=(SECTION,))]
        """,
    )
    status, _, err = run(capsys, "--help")
    assert status == 1
    assert err.startswith("inferno: error: role 'clash': ")
    assert len(err.splitlines()) == 1
    status, out, _ = run(capsys, "plugins")
    assert status == 1
    assert "error: role 'clash': " in out
