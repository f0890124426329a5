"""Fixtures for plugin tests: the fixture distributions, really installed.

The distributions under ``tests/fixtures`` are installed with pip into a
temporary directory (never into the shared virtual environment) and reached
through ``INFERNO_PLUGIN_PATH`` in a subprocess, so discovery goes through real
``.dist-info`` entry points exactly as for a plugin installed next to a pex.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
HELLO_SRC = FIXTURES / "thirdparty_plugin" / "src"

#: pip builds two tiny wheels with hatchling from the venv; generous but bounded.
PIP_TIMEOUT_S = 120
#: One ``python -m inferno`` run; it starts in well under a second.
COMMAND_TIMEOUT_S = 30


@pytest.fixture(scope="session")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding inferno-hello-plugin and inferno-broken-plugin, pip-installed."""
    target = tmp_path_factory.mktemp("plugin-site")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",  # inferno-cloud itself is already importable
            "--no-build-isolation",  # build with the venv's hatchling: no network
            "--no-index",
            "--target",
            str(target),
            str(FIXTURES / "thirdparty_plugin"),
            str(FIXTURES / "broken_plugin"),
        ],
        check=False,
        timeout=PIP_TIMEOUT_S,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, f"pip could not install the fixtures:\n{result.stderr}"
    return target


@pytest.fixture
def clean_env() -> dict[str, str]:
    """The current environment without any INFERNO_ variable."""
    return {k: v for k, v in os.environ.items() if not k.startswith("INFERNO_")}


RunInferno = Callable[..., "subprocess.CompletedProcess[str]"]


@pytest.fixture
def run_inferno() -> RunInferno:
    """``run_inferno(*args, env=...)``: ``python -m inferno ARGS`` in a fresh interpreter."""

    def run(*args: str, env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "inferno", *args],
            env=dict(env),
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_S,
            check=False,
        )

    return run


@pytest.fixture
def hello_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``inferno_hello`` importable in this process (source tree, not installed)."""
    monkeypatch.syspath_prepend(str(HELLO_SRC))
    for name in list(sys.modules):
        if name == "inferno_hello" or name.startswith("inferno_hello."):
            monkeypatch.delitem(sys.modules, name)
