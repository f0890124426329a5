"""Fixtures and helpers of the end-to-end tests: real processes from the built pex.

The pex is the one ``tests/pex`` uses (``build_pex.py`` as a user runs it,
from a snapshot of the working tree): :mod:`tests.pexbuild` builds it once
per session for both.

Each node runs as ``inferno.pex <role> ... --log-format json`` through the
pex's own ``/bin/sh`` boot (as the README runs it) with a private
``PEX_ROOT``, unpacked once per session by the :func:`pex` fixture.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest

from inferno.http import HTTPClient
from tests.pexbuild import BUILD_TIMEOUT_S, RUN_TIMEOUT_S, Build, clean_env

__all__ = [
    "BUILD_TIMEOUT_S",
    "WAIT",
    "Node",
    "Pex",
    "eventually",
    "pex",
    "pool",
    "start",
    "telemetry_total",
]

#: Bound of every wait on a process or on the pool (several interpreters starting at once).
WAIT = 60.0
#: Seconds between two looks at another process's state.
POLL_INTERVAL = 0.1
#: ``proxy listening on HOST:PORT (ops HOST:PORT)``, and the same for a backend.
LISTENING = re.compile(r"\b(proxy|backend) listening on (\S+) \(ops ([^)\s]+)\)")


@dataclass(frozen=True, slots=True)
class Pex:
    """The built ``inferno.pex`` and the environment to run it in (its own PEX_ROOT)."""

    path: Path
    env: Mapping[str, str]

    def command(self, *args: str) -> list[str]:
        return [str(self.path), *args]


@pytest.fixture(scope="session")
def pex(plain_build: Build, tmp_path_factory: pytest.TempPathFactory) -> Pex:
    """``inferno.pex`` as it ships, unpacked once into a private PEX_ROOT."""
    built = Pex(plain_build.pex(), clean_env(PEX_ROOT=str(tmp_path_factory.mktemp("e2e-pex-root"))))
    # The first run unpacks the pex; nodes started together later all start warm.
    result = subprocess.run(
        built.command("version"),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=dict(built.env),
        timeout=RUN_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return built


@dataclass
class Node:
    """One running process of the pex: its log records and where it listens."""

    name: str
    process: anyio.abc.Process
    records: list[dict[str, Any]] = field(default_factory=list)
    listening: anyio.Event = field(default_factory=anyio.Event)
    address: str = ""
    ops: str = ""

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    @property
    def ops_url(self) -> str:
        return f"http://{self.ops}"

    def log(self) -> str:
        return "\n".join(f"{self.name}: {r.get('message')}" for r in self.records)

    async def until_listening(self) -> None:
        """Wait until it logged its addresses; fail with its log if it exits first."""
        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as tg:

                async def exited() -> None:
                    await self.process.wait()
                    tg.cancel_scope.cancel()

                tg.start_soon(exited)
                await self.listening.wait()
                tg.cancel_scope.cancel()
        assert self.listening.is_set(), f"{self.name} exited:\n{self.log()}"

    async def stop(self, signum: signal.Signals = signal.SIGTERM) -> int:
        """Send ``signum`` and wait (bounded) for the exit status."""
        self.process.send_signal(signum)
        with anyio.fail_after(WAIT):
            return await self.process.wait()


async def _read_log(node: Node) -> None:
    stream = node.process.stderr
    assert stream is not None
    buffer = b""
    async for data in stream:
        buffer += data
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                record = {"message": line.decode(errors="replace")}
            if not isinstance(record, dict):
                record = {"message": record}
            node.records.append(record)
            found = LISTENING.search(str(record.get("message", "")))
            if found and not node.listening.is_set():
                node.address, node.ops = found[2], found[3]
                node.listening.set()


@asynccontextmanager
async def start(pex: Pex, name: str, *args: str) -> AsyncIterator[Node]:
    """Run ``inferno.pex <args>`` until the block ends; it is killed then if still running."""
    process = await anyio.open_process(
        pex.command(*args, "--log-format=json"),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        env=dict(pex.env),
    )
    node = Node(name, process)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_read_log, node)
            try:
                yield node
            finally:
                with anyio.CancelScope(shield=True):
                    if process.returncode is None:
                        with suppress(ProcessLookupError):
                            os.kill(process.pid, signal.SIGKILL)
                        await process.wait()
                tg.cancel_scope.cancel()
    finally:
        # Its stderr may outlive it (a proxy's workers hold it until they notice):
        # closed here, not left to the garbage collector's ResourceWarning.
        with anyio.CancelScope(shield=True):
            await process.aclose()


async def pool(http: HTTPClient, proxy: Node) -> dict[str, dict[str, Any]]:
    """The proxy's ``GET /backends``, by node id."""
    response = await http.request("GET", f"{proxy.ops_url}/backends")
    assert response.status == 200
    document = await response.json()
    return {entry["id"]: entry for entry in document["backends"]}


async def eventually(check: Callable[[], Awaitable[Any]], what: str) -> Any:
    """Await ``check()`` until it returns something true, bounded by :data:`WAIT`.

    For the state of other processes (a pool, a counter), which nothing here
    can wait on directly.

    :raises AssertionError: saying ``what`` did not happen.
    """
    try:
        with anyio.fail_after(WAIT):
            while True:
                result = await check()
                if result:
                    return result
                await anyio.sleep(POLL_INTERVAL)
    except TimeoutError:
        raise AssertionError(f"not within {WAIT:g}s: {what}") from None


async def telemetry_total(http: HTTPClient, ops_url: str, metric: str) -> float:
    """The sum of every series of a counter in a node's Prometheus ``/telemetry``."""
    response = await http.request("GET", f"{ops_url}/telemetry")
    assert response.status == 200
    text = (await response.read()).decode()
    total = 0.0
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name == metric:
            total += float(line.rsplit(" ", 1)[1])
    return total
