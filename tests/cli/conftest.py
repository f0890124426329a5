"""Fixtures for CLI tests: the third-party ``hello`` plugin and small throwaway plugins."""

from __future__ import annotations

import logging
import os
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from inferno.plugins import get_plugin_manager

HELLO_SRC = Path(__file__).resolve().parent.parent / "fixtures" / "thirdparty_plugin" / "src"

WritePlugin = Callable[[str, str], str]


@pytest.fixture
def hello_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """``inferno_hello.plugin`` loaded through INFERNO_PLUGINS; no other INFERNO_ variable set."""
    for name in list(os.environ):
        if name.startswith("INFERNO_"):
            monkeypatch.delenv(name)
    monkeypatch.syspath_prepend(str(HELLO_SRC))
    for name in list(sys.modules):
        if name == "inferno_hello" or name.startswith("inferno_hello."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setenv("INFERNO_PLUGINS", "inferno_hello.plugin")
    get_plugin_manager(refresh=True)  # not one cached by an earlier test


@pytest.fixture
def write_plugin(hello_env: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> WritePlugin:
    """``write_plugin(module, source)``: an importable module, added to INFERNO_PLUGINS."""
    directory = tmp_path / "modules"
    directory.mkdir()
    monkeypatch.syspath_prepend(str(directory))

    def write(module: str, source: str) -> str:
        (directory / f"{module}.py").write_text(textwrap.dedent(source))
        monkeypatch.setenv("INFERNO_PLUGINS", f"{os.environ['INFERNO_PLUGINS']},{module}")
        return module

    return write


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Undo what ``main()`` did to the root logger (level, handler on a captured stderr)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
