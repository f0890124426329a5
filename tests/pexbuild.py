"""Fixtures for the pex and end-to-end tests: the pexes, built once per session, and
the interpreters to run them.

A pytest plugin (``pytest_plugins`` in ``tests/conftest.py``), not a
directory's conftest: pytest caches a fixture per place it is defined, so
``tests/pex`` and ``tests/e2e`` share one build only if both find the same
definition.

Every build runs ``build_pex.py`` as a user would, from a snapshot of the
working tree taken once per session: the files cannot change between the
builds of one session (other work may be editing the tree), so two builds of
the snapshot must be byte-identical.

Each interpreter gets its own ``PEX_ROOT``: a pex unpacks itself into a venv
under ``PEX_ROOT`` keyed by the pex alone, so a venv unpacked by one Python
would be reused by the next and hide that one's failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HERE = REPO / "tests" / "pex"
#: The third-party plugin fixture: distribution inferno-hello-plugin, package inferno_hello.
HELLO_PLUGIN = REPO / "tests" / "fixtures" / "thirdparty_plugin"
#: One distribution offering two roles, ``left`` (which also needs inferno_pairlib) and ``right``.
PAIR_PLUGIN = HERE / "pair_plugin"

#: CPython 3.<minor> versions the pex promises to run under.
SUPPORTED_MINORS = (10, 11, 12, 13)
#: A whole build (resolve for four CPython minors, maybe download); generous for 2 slow cores.
BUILD_TIMEOUT_S = 900
#: One run of a pex: a cold start unpacks it into a venv first.
RUN_TIMEOUT_S = 180
#: Asking an interpreter its version (seconds, even on a loaded machine).
PROBE_TIMEOUT_S = 60

#: Left out of the snapshot: the environment, build output, caches, VCS data.
SNAPSHOT_IGNORE = shutil.ignore_patterns(
    ".git", ".venv", "venv", "dist", "build", "__pycache__", "*.pyc", ".*_cache", ".build-*"
)


@dataclass(frozen=True, slots=True)
class Interpreter:
    """A CPython found on this machine, with the PEX_ROOT reserved for it."""

    minor: int
    python: Path
    version: str  # platform.python_version(), e.g. "3.10.13"
    pex_root: Path


@dataclass(frozen=True, slots=True)
class Build:
    """The output directory of one ``build_pex.py`` run and what it printed."""

    out: Path
    stdout: str
    stderr: str

    def pex(self, name: str = "inferno") -> Path:
        return self.out / f"{name}.pex"


def clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without anything that steers Python, pex or Inferno."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PEX_", "INFERNO_", "PYTHON", "VIRTUAL_ENV", "__PEX"))
    }
    env.update(extra)
    return env


def run_build(source: Path, out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the snapshot's ``build_pex.py`` into ``out``; the caller checks the result."""
    return subprocess.run(
        [sys.executable, str(source / "build_pex.py"), "--out", str(out), *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=BUILD_TIMEOUT_S,
        check=False,
    )


def built(result: subprocess.CompletedProcess[str], out: Path) -> Build:
    """A successful build, or a failure that shows the build's own output."""
    assert result.returncode == 0, f"build_pex.py failed:\n{result.stdout}\n{result.stderr}"
    return Build(out, result.stdout, result.stderr)


def run_pex(
    pex: Path,
    *args: str,
    python: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a pex (through ``python`` when given, else its own ``/bin/sh`` boot)."""
    command = [str(python), str(pex)] if python else [str(pex)]
    return subprocess.run(
        [*command, *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=dict(env) if env is not None else clean_env(),
        timeout=RUN_TIMEOUT_S,
        check=False,
    )


def probe(python: Path, user: Sequence[str] = ()) -> tuple[int, str] | str:
    """Ask ``python`` (as ``user`` when a setpriv prefix is given) for its version.

    :returns: (minor, full version) when it runs with the standard library the
        pex's runtime contract names, else why not.
    """
    code = (
        "import platform, sys, ssl, sqlite3, ctypes, venv; "
        "print(sys.implementation.name, sys.version_info.minor, platform.python_version())"
    )
    try:
        result = subprocess.run(
            [*user, str(python), "-I", "-c", code],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=clean_env(),
            timeout=PROBE_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{python}: {exc}"
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        return f"{python}: exit status {result.returncode} ({last})"
    implementation, minor, version = result.stdout.split()
    if implementation != "cpython":
        return f"{python}: {implementation}, not CPython"
    return int(minor), version


def candidates(minor: int) -> list[Path]:
    """Where a CPython 3.<minor> may be: every PATH entry, pyenv's versions, the usual prefixes."""
    name = f"python3.{minor}"
    # Not pyenv's shims: they only dispatch to the versions searched below, and fail
    # (or, on a busy machine, hang) for a version pyenv has not activated.
    found = [
        Path(d) / name
        for d in os.environ.get("PATH", "").split(os.pathsep)
        if d and Path(d).name != "shims"
    ]
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    found += sorted(pyenv.glob(f"versions/3.{minor}.*/bin/{name}"), reverse=True)
    found += [Path("/usr/local/bin") / name, Path("/usr/bin") / name]
    unique: list[Path] = []
    for path in found:
        if path not in unique and path.is_file() and os.access(path, os.X_OK):
            unique.append(path)
    return unique


def find_interpreter(minor: int) -> Path | str:
    """The first working CPython 3.<minor> (a pyenv shim of an inactive version does not work)."""
    reasons = []
    for path in candidates(minor):
        answer = probe(path)
        if isinstance(answer, tuple) and answer[0] == minor:
            return path
        reasons.append(answer if isinstance(answer, str) else f"{path}: reports 3.{answer[0]}")
    return f"no working python3.{minor} in PATH or pyenv" + (
        f" ({'; '.join(reasons)})" if reasons else ""
    )


@pytest.fixture(scope="session")
def snapshot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the working tree: every build of this session builds the same files."""
    source = tmp_path_factory.mktemp("snapshot") / "src"
    shutil.copytree(REPO, source, ignore=SNAPSHOT_IGNORE, symlinks=True)
    return source


@pytest.fixture(scope="session")
def plain_build(snapshot: Path, tmp_path_factory: pytest.TempPathFactory) -> Build:
    """``python build_pex.py``: dist/inferno.pex as it ships."""
    out = tmp_path_factory.mktemp("plain")
    return built(run_build(snapshot, out), out)


@pytest.fixture(scope="session")
def plugin_build(snapshot: Path, tmp_path_factory: pytest.TempPathFactory) -> Build:
    """Both fixture plugins baked in with ``--with``, and per-role pexes for hello and left."""
    out = tmp_path_factory.mktemp("plugins")
    result = run_build(
        snapshot,
        out,
        "--with",
        str(HELLO_PLUGIN),
        "--with",
        str(PAIR_PLUGIN),
        "--roles",
        "hello,left",
    )
    return built(result, out)


@pytest.fixture(scope="session", params=SUPPORTED_MINORS, ids=lambda m: f"py3{m}")
def interpreter(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Interpreter:
    """Each supported CPython found on this machine, with its own PEX_ROOT; skipped if missing."""
    minor: int = request.param
    found = find_interpreter(minor)
    if isinstance(found, str):
        pytest.skip(found)
    answer = probe(found)
    assert isinstance(answer, tuple)
    return Interpreter(minor, found, answer[1], tmp_path_factory.mktemp(f"pex-root-py3{minor}"))


@pytest.fixture(scope="session")
def build_interpreter(tmp_path_factory: pytest.TempPathFactory) -> Interpreter:
    """The interpreter running the tests (and the builds), with its own PEX_ROOT."""
    answer = probe(Path(sys.executable))
    assert isinstance(answer, tuple), answer
    root = tmp_path_factory.mktemp("pex-root-build")
    return Interpreter(answer[0], Path(sys.executable), answer[1], root)


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory every user can read and enter (pytest's own temp root is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="inferno-pex-test."))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
