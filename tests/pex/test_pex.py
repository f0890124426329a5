"""End-to-end tests of dist/inferno.pex as built by build_pex.py and run as real processes.

The pexes are built once per session (see tests/pexbuild.py); each supported CPython
found on the machine runs them with its own PEX_ROOT.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.pexbuild import (
    BUILD_TIMEOUT_S,
    HELLO_PLUGIN,
    SUPPORTED_MINORS,
    Build,
    Interpreter,
    candidates,
    clean_env,
    probe,
    run_build,
    run_pex,
)

pytestmark = [
    pytest.mark.pex,
    # A test's timeout also covers the session builds its fixtures may start.
    pytest.mark.timeout(2 * BUILD_TIMEOUT_S),
]

NOBODY = 65534
#: setpriv then env: setpriv may exec a path root can reach but nobody cannot; env execs as nobody.
SETPRIV = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "env"]


def ok(result: subprocess.CompletedProcess[str]) -> str:
    """The output of a run that must succeed; a failure shows what the pex said."""
    assert result.returncode == 0, (
        f"exit status {result.returncode}\n{result.stdout}\n{result.stderr}"
    )
    return result.stdout


def commands_in_help(text: str) -> set[str]:
    """The subcommand names ``inferno --help`` lists (one indented name per line)."""
    return set(re.findall(r"(?m)^ {4}([a-z][a-z0-9_-]*)\s", text))


def import_packages(pex: Path) -> set[str]:
    """Top-level import packages of the distributions inside a pex."""
    with zipfile.ZipFile(pex) as archive:
        parts = (name.split("/") for name in archive.namelist() if name.startswith(".deps/"))
        return {
            p[2] for p in parts if len(p) > 3 and not p[2].endswith((".dist-info", ".pex-info"))
        }


# --- under every CPython 3.10-3.13 on this machine -------------------------------------------


def test_version_names_the_interpreter_that_runs_it(
    plain_build: Build, interpreter: Interpreter
) -> None:
    env = clean_env(PEX_ROOT=str(interpreter.pex_root))
    out = ok(run_pex(plain_build.pex(), "version", python=interpreter.python, env=env))
    # The exact patch version proves the pex did not re-execute under another Python,
    # and the venv path that it runs from this interpreter's own PEX_ROOT.
    assert f"CPython {interpreter.version} " in out
    assert str(interpreter.pex_root) in out


def test_help_and_plugins_run(plain_build: Build, interpreter: Interpreter) -> None:
    env = clean_env(PEX_ROOT=str(interpreter.pex_root))
    help_text = ok(run_pex(plain_build.pex(), "--help", python=interpreter.python, env=env))
    assert help_text.startswith("usage: inferno")
    assert {"plugins", "config", "version"} <= commands_in_help(help_text)
    ok(run_pex(plain_build.pex(), "plugins", python=interpreter.python, env=env))


# --- the /bin/sh boot and the PEX_ROOT fallback --------------------------------------------


def test_runs_itself_and_starts_warm_through_sh(
    plain_build: Build, build_interpreter: Interpreter, tmp_path: Path
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(build_interpreter.python.resolve())
    env = clean_env(PATH=str(bin_dir), PEX_ROOT=str(tmp_path / "pex-root"), PEX_VERBOSE="1")

    cold = run_pex(plain_build.pex(), "version", env=env)
    assert f"CPython {build_interpreter.version} " in ok(cold)
    assert "used /bin/sh boot to select python" in cold.stderr

    warm = run_pex(plain_build.pex(), "version", env=env)
    assert f"CPython {build_interpreter.version} " in ok(warm)
    # Warm: /bin/sh exec'd the unpacked venv directly, no interpreter search, no bootstrap.
    assert "used /bin/sh boot to select python" not in warm.stderr


def unprivileged_python() -> Path:
    """A supported CPython the user nobody may run (pyenv under /root is private)."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run as the user nobody")
    paths = [p for minor in SUPPORTED_MINORS for p in candidates(minor)]
    paths += [Path("/usr/local/bin/python3"), Path("/usr/bin/python3")]
    for path in paths:
        answer = probe(path, user=SETPRIV)
        if isinstance(answer, tuple) and answer[0] in SUPPORTED_MINORS:
            return path
    pytest.skip("no CPython 3.10-3.13 that the user nobody may run")


@pytest.mark.parametrize("home", ["missing", "read-only"])
def test_runs_as_unprivileged_user_without_writable_home(
    plain_build: Build, public_dir: Path, home: str
) -> None:
    python = unprivileged_python()
    pex = public_dir / "inferno.pex"
    shutil.copyfile(plain_build.pex(), pex)
    pex.chmod(0o755)
    bin_dir = public_dir / "bin"
    bin_dir.mkdir(mode=0o755)
    (bin_dir / "python3").symlink_to(python)
    tmp = public_dir / "tmp"
    tmp.mkdir()
    tmp.chmod(0o1777)
    home_dir = public_dir / "home"  # exists, owned by root: read-only for nobody
    home_dir.mkdir(mode=0o755)
    env = {
        "HOME": "/nonexistent" if home == "missing" else str(home_dir),
        # /usr/bin too: pex's first start runs ldd (to tell glibc from musl).
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "TMPDIR": str(tmp),
    }
    command = [*SETPRIV, "-i", *(f"{k}={v}" for k, v in env.items()), str(pex), "version"]

    for _ in ("cold", "warm"):
        result = subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        assert "inferno" in ok(result)
        # pex's own fallback (a new temporary PEX_ROOT every run) warns; ours is silent.
        assert "un-writeable" not in result.stderr, result.stderr

    fallback = tmp / f"inferno-pex-root-{NOBODY}"
    assert fallback.stat().st_uid == NOBODY
    assert (fallback / "venvs").is_dir()
    assert str(fallback) in result.stdout


def test_fallback_never_adopts_a_directory_planted_by_someone_else(
    plain_build: Build, public_dir: Path
) -> None:
    """A fallback PEX_ROOT another user could write to is refused; pex's own fallback runs."""
    python = unprivileged_python()
    pex = public_dir / "inferno.pex"
    shutil.copyfile(plain_build.pex(), pex)
    pex.chmod(0o755)
    tmp = public_dir / "tmp"
    tmp.mkdir()
    tmp.chmod(0o1777)
    planted = tmp / f"inferno-pex-root-{NOBODY}"
    planted.mkdir()
    planted.chmod(0o777)  # root's and world-writable: anyone could have put code in it
    env = ["HOME=/nonexistent", f"TMPDIR={tmp}", "PATH=/usr/bin:/bin"]
    command = [*SETPRIV, "-i", *env, str(python), str(pex), "version"]
    result = subprocess.run(
        command, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=180, check=False
    )
    assert "inferno" in ok(result)
    assert "un-writeable" in result.stderr  # pex's own temporary PEX_ROOT, as documented
    assert str(planted) not in result.stdout
    assert not any(planted.iterdir())


# --- plugins: baked in, per role, and installed outside the pex ----------------------------


def test_baked_plugins_are_listed(plugin_build: Build, build_interpreter: Interpreter) -> None:
    env = clean_env(PEX_ROOT=str(build_interpreter.pex_root))
    python = build_interpreter.python
    help_text = ok(run_pex(plugin_build.pex(), "--help", python=python, env=env))
    assert {"hello", "left", "right"} <= commands_in_help(help_text)
    listing = ok(run_pex(plugin_build.pex(), "plugins", python=python, env=env))
    assert "inferno-hello-plugin 0.3.1" in listing
    assert "inferno-pair-plugin 0.1.0" in listing


def test_role_pex_holds_only_its_role(plugin_build: Build, build_interpreter: Interpreter) -> None:
    env = clean_env(PEX_ROOT=str(build_interpreter.pex_root))
    python = build_interpreter.python

    hello = plugin_build.pex("inferno-hello")
    help_text = ok(run_pex(hello, "--help", python=python, env=env))
    assert "hello" in commands_in_help(help_text)
    assert not {"left", "right"} & commands_in_help(help_text)
    packages = import_packages(hello)
    # A plugin offering no role stays: its distribution is rewritten without the roles.
    assert {"inferno", "inferno_hello", "inferno_pairtools", "anyio"} <= packages
    assert not {"inferno_left", "inferno_right", "inferno_pairlib"} & packages
    listing = ok(run_pex(hello, "plugins", python=python, env=env))
    assert "pairtools  inferno-pair-plugin 0.1.0+hello" in listing


def test_role_pex_rewrites_a_distribution_shared_by_two_roles(
    plugin_build: Build, build_interpreter: Interpreter
) -> None:
    env = clean_env(PEX_ROOT=str(build_interpreter.pex_root))
    python = build_interpreter.python

    left = plugin_build.pex("inferno-left")
    help_text = ok(run_pex(left, "--help", python=python, env=env))
    assert "left" in commands_in_help(help_text)
    assert not {"hello", "right"} & commands_in_help(help_text)
    listing = ok(run_pex(left, "plugins", python=python, env=env))
    assert "left  inferno-pair-plugin 0.1.0+left" in listing
    assert "pairtools  inferno-pair-plugin 0.1.0+left" in listing
    assert "right" not in listing
    packages = import_packages(left)
    # Role.packages of left names inferno_pairlib: it stays with inferno_left.
    assert {"inferno", "inferno_left", "inferno_pairlib", "inferno_pairtools"} <= packages
    assert not {"inferno_right", "inferno_hello"} & packages


def test_plugin_installed_outside_the_pex_is_found(
    plain_build: Build, build_interpreter: Interpreter, tmp_path: Path
) -> None:
    target = tmp_path / "plugins"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps"]
    install = subprocess.run(
        [*pip, "--target", str(target), str(HELLO_PLUGIN)],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=BUILD_TIMEOUT_S,
        check=False,
    )
    ok(install)
    env = clean_env(PEX_ROOT=str(build_interpreter.pex_root), INFERNO_PLUGIN_PATH=str(target))
    listing = ok(run_pex(plain_build.pex(), "plugins", python=build_interpreter.python, env=env))
    assert "inferno-hello-plugin 0.3.1" in listing
    help_text = ok(run_pex(plain_build.pex(), "--help", python=build_interpreter.python, env=env))
    assert "hello" in commands_in_help(help_text)


# --- expansion into a venv (read-only images) -----------------------------------------------


def test_expands_into_a_venv_that_runs_without_pex_root(
    plain_build: Build, build_interpreter: Interpreter, tmp_path: Path
) -> None:
    venv = tmp_path / "opt-inferno"
    env = clean_env(PEX_ROOT=str(tmp_path / "pex-root"), PEX_TOOLS="1")
    ok(run_pex(plain_build.pex(), "venv", str(venv), python=build_interpreter.python, env=env))

    home = tmp_path / "no-home"
    run_env = clean_env(HOME=str(home))
    for command in ([str(venv / "bin" / "inferno"), "version"], [str(venv / "pex"), "version"]):
        result = subprocess.run(
            command, capture_output=True, text=True, env=run_env, timeout=120, check=False
        )
        assert f"CPython {build_interpreter.version} " in ok(result)
    assert not home.exists()  # nothing cached, nothing written at run time


# --- the build itself -------------------------------------------------------------------------


def test_build_prints_size_and_sha256(plain_build: Build) -> None:
    data = plain_build.pex().read_bytes()
    line = next(line for line in plain_build.stdout.splitlines() if "inferno.pex" in line)
    assert f"{len(data)} bytes" in line
    assert f"sha256 {hashlib.sha256(data).hexdigest()}" in line


def test_build_is_reproducible(plain_build: Build, snapshot: Path, tmp_path: Path) -> None:
    again = run_build(snapshot, tmp_path)
    assert again.returncode == 0, again.stderr
    first = hashlib.sha256(plain_build.pex().read_bytes()).hexdigest()
    second = hashlib.sha256((tmp_path / "inferno.pex").read_bytes()).hexdigest()
    assert first == second


def test_unknown_role_is_a_usage_error(snapshot: Path, tmp_path: Path) -> None:
    result = run_build(snapshot, tmp_path, "--roles", "nosuchrole")
    assert result.returncode == 2, result.stderr
    assert "unknown role(s): nosuchrole" in result.stderr
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.glob("*.pex"))  # nothing written when the build fails


def test_malformed_roles_is_a_usage_error(snapshot: Path, tmp_path: Path) -> None:
    result = run_build(snapshot, tmp_path, "--roles", "hello,,x y")
    assert result.returncode == 2
    assert "is not a role name" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_with_path_is_a_usage_error(snapshot: Path, tmp_path: Path) -> None:
    result = run_build(snapshot, tmp_path, "--with", str(tmp_path / "no-such-plugin"))
    assert result.returncode == 2
    assert "no such file or directory" in result.stderr
    assert "Traceback" not in result.stderr
