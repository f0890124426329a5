"""Fixtures for lifecycle tests: role processes watched line by line, test roles in process."""

from __future__ import annotations

import importlib
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import IO

import pytest

from inferno.plugins import get_plugin_manager

HERE = Path(__file__).resolve().parent
HELLO_SRC = HERE.parent / "fixtures" / "thirdparty_plugin" / "src"

#: Bound on every wait for a line or an exit; far above what a healthy run needs.
WAIT_S = 30.0


class RoleProcess:
    """``python -m inferno ARGS`` in a subprocess, its output read by threads.

    Lines are queued as they arrive so a test can wait for one with a bound
    (no sleeps: each step waits for the line that proves the previous one).
    """

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "inferno", *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        assert self.proc.stdout is not None
        assert self.proc.stderr is not None
        self._threads = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self.stdout, True)),
            threading.Thread(target=self._read, args=(self.proc.stderr, self.stderr, False)),
        ]
        for thread in self._threads:
            thread.daemon = True
            thread.start()

    def _read(self, stream: IO[str], sink: list[str], forward: bool) -> None:
        for line in stream:
            sink.append(line.rstrip("\n"))
            if forward:
                self._lines.put(line.rstrip("\n"))
        if forward:
            self._lines.put(None)

    def expect(self, prefix: str) -> str:
        """Wait for the next stdout line starting with ``prefix``; return it."""
        while True:
            try:
                line = self._lines.get(timeout=WAIT_S)
            except queue.Empty:
                raise AssertionError(f"no {prefix!r} line in {WAIT_S}s: {self.output()}") from None
            if line is None:
                raise AssertionError(f"exited before {prefix!r}: {self.output()}")
            if line.startswith(prefix):
                return line

    def send(self, signum: signal.Signals) -> None:
        self.proc.send_signal(signum)

    def wait(self) -> int:
        """The exit status (negative: killed by that signal)."""
        status = self.proc.wait(timeout=WAIT_S)
        for thread in self._threads:
            thread.join(timeout=WAIT_S)
        return status

    def output(self) -> str:
        return "\nstdout:\n" + "\n".join(self.stdout) + "\nstderr:\n" + "\n".join(self.stderr)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=WAIT_S)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


StartRole = Callable[..., RoleProcess]


@pytest.fixture
def start_role() -> Iterator[StartRole]:
    """``start_role(*args, **env)``: run ``inferno ARGS`` with the third-party hello plugin."""
    started: list[RoleProcess] = []

    def start(*args: str, **extra_env: str) -> RoleProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("INFERNO_")}
        env.update(
            PYTHONPATH=os.pathsep.join(filter(None, [str(HELLO_SRC), env.get("PYTHONPATH")])),
            INFERNO_PLUGINS="inferno_hello.plugin",
            INFERNO_LOG_FORMAT="json",
            **extra_env,
        )
        process = RoleProcess(list(args), env)
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()


@pytest.fixture
def test_roles(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """``inferno_test_roles``, importable and offering its roles through INFERNO_PLUGINS."""
    monkeypatch.syspath_prepend(str(HERE))
    for name in list(os.environ):
        if name.startswith("INFERNO_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("INFERNO_PLUGINS", "inferno_test_roles")
    module = importlib.import_module("inferno_test_roles")
    module.EVENTS.clear()
    get_plugin_manager(refresh=True)
    return module


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Undo what ``main()`` did to the root logger (level, handler on a captured stderr)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
