"""``inferno up`` as a user runs it: a real process that starts real child processes.

Each test starts ``python -m inferno up`` on free ports (``--port 0``), reads
the banner it prints on stdout and its JSON logs on stderr, and checks what is
left behind when it stops: no process (each pid gone or a zombie awaiting a
reaper that is not ours) and no listening port (each one binds again).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import astuple, dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
from inferno_up.children import CHILD_BOOT, describe_status, self_command
from inferno_up.role import stop_budget
from openai import AsyncOpenAI

from inferno.cli import main
from inferno.http import HTTPClient

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]
#: Bound of every wait on a process (start-up of three interpreters on a slow machine).
WAIT = 40.0
#: A node line of the banner: ``    backend-1  http://127.0.0.1:PORT  ops 127.0.0.1:PORT  pid N``.
NODE_LINE = re.compile(r"^ +(proxy|backend-\d+) +http://(\S+) +ops (\S+) +pid (\d+)$", re.M)
BASE_URL = re.compile(r"OpenAI base URL: +(\S+)")
MODEL = re.compile(r"model: +(\S+)")
BANNER_END = "Ctrl-C stops every node."


@dataclass
class Node:
    name: str
    address: str
    ops: str
    pid: int

    @property
    def ports(self) -> list[int]:
        return [int(self.address.rpartition(":")[2]), int(self.ops.rpartition(":")[2])]


@dataclass
class Up:
    """A running ``inferno up`` and what it said."""

    process: anyio.abc.Process
    stdout: list[str] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)
    ready: anyio.Event = field(default_factory=anyio.Event)
    logged: anyio.Event = field(default_factory=anyio.Event)

    @property
    def banner(self) -> str:
        return "".join(self.stdout)

    @property
    def nodes(self) -> dict[str, Node]:
        return {m[1]: Node(m[1], m[2], m[3], int(m[4])) for m in NODE_LINE.finditer(self.banner)}

    @property
    def base_url(self) -> str:
        found = BASE_URL.search(self.banner)
        assert found, self.banner
        return found[1]

    @property
    def model(self) -> str:
        found = MODEL.search(self.banner)
        assert found, self.banner
        return found[1]

    def log(self) -> str:
        return "\n".join(f"{r.get('child', 'up')}: {r.get('message')}" for r in self.records)

    async def until_ready(self) -> None:
        """Wait for the whole banner; fail with up's log if it exits first."""
        with anyio.fail_after(WAIT):
            while not self.ready.is_set():
                assert self.process.returncode is None, f"up exited:\n{self.log()}"
                await _first_of(self.ready.wait(), self.process.wait())

    async def until_exit(self) -> int:
        """Its exit status; fail with its log if it does not exit within :data:`WAIT`."""
        try:
            with anyio.fail_after(WAIT):
                return await self.process.wait()
        except TimeoutError:
            raise AssertionError(f"up still runs after {WAIT:g}s:\n{self.log()}") from None

    async def until_logged(self, condition: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """The first of up's own log records (not a child's) that meets ``condition``."""
        with anyio.fail_after(WAIT):
            while True:
                for record in self.records:
                    if "child" not in record and condition(record):
                        return record
                self.logged = anyio.Event()
                await self.logged.wait()


async def _first_of(*waits: Any) -> None:
    async with anyio.create_task_group() as tg:

        async def one(wait: Any) -> None:
            await wait
            tg.cancel_scope.cancel()

        for wait in waits:
            tg.start_soon(one, wait)


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("INFERNO_")}


async def _read_stdout(up: Up) -> None:
    assert up.process.stdout is not None
    async for data in up.process.stdout:
        up.stdout.append(data.decode())
        if BANNER_END in up.banner:
            up.ready.set()


async def _read_stderr(up: Up) -> None:
    assert up.process.stderr is not None
    buffer = b""
    async for data in up.process.stderr:
        buffer += data
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                record = {"message": line.decode(errors="replace"), "raw": True}  # not a log
            up.records.append(record if isinstance(record, dict) else {"message": record})
        up.logged.set()


@asynccontextmanager
async def running_up(*args: str, env: dict[str, str] | None = None) -> AsyncIterator[Up]:
    """``python -m inferno up`` on free ports, JSON logs; everything it started is killed after.

    :param env: variables added to the environment (the children inherit it).
    """
    command = [
        sys.executable,
        "-m",
        "inferno",
        "up",
        "--port=0",
        "--ops-port=0",
        "--log-format=json",
        "--sim-speed=20",
        *args,
    ]
    environ = {**clean_env(), **(env or {})}
    process = await anyio.open_process(command, stdin=subprocess.DEVNULL, env=environ, cwd=ROOT)
    up = Up(process)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_read_stdout, up)
            tg.start_soon(_read_stderr, up)
            try:
                yield up
            finally:
                with anyio.CancelScope(shield=True):
                    # A failed test must not leave processes behind either.
                    if process.returncode is None:
                        process.kill()
                        await process.wait()
                    for node in up.nodes.values():
                        with suppress(ProcessLookupError):
                            os.kill(node.pid, signal.SIGKILL)
                tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await process.aclose()  # its pipes, which children may still hold


def started_pids(up: Up) -> dict[str, int]:
    """``{child name: pid}`` from up's ``started NAME (pid N)`` log lines, in start order."""
    found = (
        re.fullmatch(r"started (\S+) \(pid (\d+)\)", str(r.get("message")))
        for r in up.records
        if "child" not in r
    )
    return {m[1]: int(m[2]) for m in found if m}


def alive(pid: int) -> bool:
    """Whether ``pid`` runs: not gone, and not a zombie (exited, waiting for its reaper)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


async def until_gone(pids: list[int]) -> None:
    """Wait until none of ``pids`` runs (they are not our children: nothing to wait on)."""
    with anyio.fail_after(WAIT):
        # Not our children: no exit to wait on, and pidfds are not on every kernel.
        while any(alive(pid) for pid in pids):  # noqa: ASYNC110
            await anyio.sleep(0.05)


async def assert_free(ports: list[int]) -> None:
    """Each port binds again: nothing listens on it any more.

    The ports were picked by the kernel from the ephemeral range, so for a
    moment one may be the local port of some other process's outgoing
    connection; the probe retries for that reason, and the test fails with a
    timeout after :data:`WAIT` seconds if a port never frees.
    """
    with anyio.fail_after(WAIT):
        for port in ports:
            while True:
                try:
                    with socket.socket() as probe:
                        # TIME_WAIT of closed connections may remain; a listener may not.
                        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                        probe.bind(("127.0.0.1", port))
                        probe.listen()
                    break
                except OSError:
                    await anyio.sleep(0.1)


def the_python_example(banner: str) -> str:
    start = banner.index("  from openai import OpenAI")
    end = banner.index("  print()\n", start) + len("  print()\n")
    return textwrap.dedent(banner[start:end])


def the_curl_example(banner: str) -> list[str]:
    found = re.search(r"curl -N (\S+) \\\n +-H '([^']+)' \\\n +-d '([^']+)'", banner)
    assert found, banner
    return ["curl", "-sS", "-N", found[1], "-H", found[2], "-d", found[3]]


# -- the cluster ---------------------------------------------------------------------------------


async def test_up_serves_the_openai_api_and_sigint_stops_everything() -> None:
    async with running_up() as up:
        await up.until_ready()
        nodes = up.nodes
        assert set(nodes) == {"proxy", "backend-1", "backend-2"}, up.banner
        async with HTTPClient() as http:
            pool = await (await http.request("GET", f"http://{nodes['proxy'].ops}/backends")).json()
        assert {b["id"] for b in pool["backends"] if b["healthy"]} == {"backend-1", "backend-2"}

        async with AsyncOpenAI(base_url=up.base_url, api_key="unused", max_retries=0) as client:
            stream = await client.chat.completions.create(
                model=up.model,
                messages=[{"role": "user", "content": "Hello"}],
                max_tokens=16,
                stream=True,
            )
            pieces = [
                chunk.choices[0].delta.content
                async for chunk in stream
                if chunk.choices and chunk.choices[0].delta.content
            ]
        assert len(pieces) > 1, pieces  # streamed, chunk by chunk

        # The printed examples work as printed.
        example = await anyio.run_process(
            [sys.executable, "-c", the_python_example(up.banner)], check=False
        )
        assert example.returncode == 0, example.stderr.decode()
        assert example.stdout.strip()
        if shutil.which("curl"):
            curl = await anyio.run_process(the_curl_example(up.banner), check=False)
            assert curl.returncode == 0, curl.stderr.decode()
            assert b"data: [DONE]" in curl.stdout

        up.process.send_signal(signal.SIGINT)
        status = await up.until_exit()
    assert status == 0, up.log()
    # The backends stopped first: they could still deregister from the proxy.
    assert "cannot deregister" not in up.log()
    assert "deregistered from" in up.log()
    pids = [node.pid for node in nodes.values()]
    assert not [pid for pid in pids if alive(pid)]  # reaped by up before it exited
    await assert_free([port for node in nodes.values() for port in node.ports])
    # Every child's log reached up's stderr, tagged with its name.
    assert {"proxy", "backend-1", "backend-2"} <= {r.get("child") for r in up.records}


async def test_a_sigkilled_up_leaves_no_child_and_no_port_behind() -> None:
    async with running_up("--backends=1") as up:
        await up.until_ready()
        nodes = up.nodes
        up.process.kill()
        await up.until_exit()
        await until_gone([node.pid for node in nodes.values()])
    await assert_free([port for node in nodes.values() for port in node.ports])


async def test_a_child_that_dies_is_logged_and_up_keeps_running_until_sigterm() -> None:
    async with running_up() as up:
        await up.until_ready()
        victim = up.nodes["backend-1"]
        os.kill(victim.pid, signal.SIGKILL)
        record = await up.until_logged(lambda r: "unexpectedly" in str(r.get("message")))
        assert record["level"] == "error"
        assert "backend-1" in record["message"]
        assert "SIGKILL" in record["message"]
        assert up.process.returncode is None
        up.process.terminate()
        status = await up.until_exit()
    assert status == 0, up.log()
    assert not [node.pid for node in up.nodes.values() if alive(node.pid)]


async def test_a_child_that_cannot_start_fails_up_with_its_last_lines_and_stops_the_others() -> (
    None
):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        async with running_up("--backends=1", f"--backend-port={port}") as up:
            status = await up.until_exit()
    assert status == 1, up.log()
    assert BANNER_END not in up.banner
    errors = "\n".join(
        str(r["message"]) for r in up.records if "child" not in r and r.get("level") == "error"
    )
    assert "backend-1 exited with status" in errors, up.log()
    assert "in use" in errors.lower()  # the backend's own words, from its last lines
    assert "inferno: error: up: backend-1 exited with status" in up.log()
    assert not [r for r in up.records if r.get("raw") and "Traceback" in r["message"]]
    started = started_pids(up)
    assert list(started) == ["proxy", "backend-1"], up.log()
    assert not [pid for pid in started.values() if alive(pid)]


async def test_backends_that_never_register_fail_up_at_the_startup_timeout() -> None:
    # The proxy inherits a secret the backends do not have: every registration gets a 401.
    secret = {"INFERNO_PROXY_SHARED_SECRET": "only-the-proxy-knows"}
    async with running_up("--startup-timeout=3s", env=secret) as up:
        status = await up.until_exit()
    assert status == 1, up.log()
    assert BANNER_END not in up.banner
    errors = "\n".join(
        str(r["message"]) for r in up.records if "child" not in r and r.get("level") == "error"
    )
    for name in ("backend-1", "backend-2"):
        assert f"{name} did not register with the proxy within 3s" in errors, up.log()
    assert "cannot register" in errors  # a backend's own words, from its last lines
    # The CLI's one line, as for every failed role: no traceback.
    assert "inferno: error: up: backend-1, backend-2 did not register" in up.log()
    assert not [r for r in up.records if r.get("raw") and "Traceback" in r["message"]]
    assert "only-the-proxy-knows" not in up.log()
    started = started_pids(up)
    assert list(started) == ["proxy", "backend-1", "backend-2"], up.log()
    assert not [pid for pid in started.values() if alive(pid)]


async def test_ctrl_c_while_starting_stops_what_was_started_and_exits_0() -> None:
    # Backends the proxy refuses: up waits for their registration until told to stop.
    secret = {"INFERNO_PROXY_SHARED_SECRET": "only-the-proxy-knows"}
    async with running_up("--startup-timeout=10m", env=secret) as up:
        await up.until_logged(lambda r: str(r.get("message")).startswith("started backend-2 "))
        up.process.send_signal(signal.SIGINT)
        status = await up.until_exit()
    assert status == 0, up.log()
    assert BANNER_END not in up.banner
    started = started_pids(up)
    assert list(started) == ["proxy", "backend-1", "backend-2"], up.log()
    assert not [pid for pid in started.values() if alive(pid)]


# -- settings ------------------------------------------------------------------------------------


@pytest.mark.usefixtures("clean_inferno_env")
@pytest.mark.parametrize(
    ("args", "key"),
    [
        (["--host=0.0.0.0"], "up.host"),
        (["--host=example.com"], "up.host"),
        (["--backends=0"], "up.backends"),
        (["--backends=3", "--backend-port=65534"], "up.backend_port"),
        (["--backends=2", "--backend-ops-port=65535"], "up.backend_ops_port"),
        (["--startup-timeout=-1s"], "up.startup_timeout"),
    ],
)
def test_bad_settings_exit_2_naming_the_key(
    args: list[str], key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["up", "--port=0", "--ops-port=0", *args]) == 2
    err = capsys.readouterr().err
    assert key in err
    assert "Traceback" not in err


# -- the parts -----------------------------------------------------------------------------------


@pytest.mark.parametrize("shutdown_timeout", [0.5, 2.0, 10.0, 14.9, 15.0, 30.0, 120.0])
def test_the_stop_budget_lets_children_stop_before_up_kills_them_and_up_before_the_core(
    shutdown_timeout: float,
) -> None:
    budget = stop_budget(shutdown_timeout)
    assert 0 <= budget.drain < budget.child_shutdown < budget.term_grace
    assert budget.term_grace + budget.kill_grace < shutdown_timeout


def test_the_default_stop_budget() -> None:
    assert astuple(stop_budget(30.0)) == pytest.approx((24.0, 21.0, 27.0, 1.8))


@pytest.mark.parametrize(
    ("status", "words"),
    [
        (None, "is running"),
        (0, "exited with status 0"),
        (2, "exited with status 2"),
        (-9, "was killed by SIGKILL"),
        (-15, "was killed by SIGTERM"),
    ],
)
def test_describe_status(status: int | None, words: str) -> None:
    assert describe_status(status) == words


async def test_the_child_command_runs_inferno_again() -> None:
    command = self_command()
    assert command[0] == sys.executable
    assert command[-3:] == ["-c", CHILD_BOOT, str(os.getpid())]
    result = await anyio.run_process([*command, "version"], env=clean_env(), check=False)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode().startswith("inferno ")


async def test_the_child_command_keeps_the_interpreter_flags() -> None:
    code = "from inferno_up.children import self_command; print(self_command()[1:-3])"
    result = await anyio.run_process([sys.executable, "-I", "-B", "-c", code], env=clean_env())
    flags = result.stdout.decode().strip()
    assert "'-I'" in flags
    assert "'-B'" in flags


async def test_a_child_whose_parent_is_gone_exits_at_once() -> None:
    command = self_command(parent_pid=1 if os.getppid() != 1 else 2)
    result = await anyio.run_process([*command, "version"], env=clean_env(), check=False)
    assert result.returncode == 1
    assert b"exited before this node started" in result.stderr
    assert b"inferno " not in result.stdout
