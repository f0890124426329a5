"""``inferno proxy --workers 2`` as real processes: one port, one pool, clean stops.

The proxy runs as ``python -m inferno proxy --workers 2 --worker-header``: the
parent's JSON log lines say where it listens, and every answer names the worker
process that served it (``X-Inferno-Worker``).  Requests go out on fresh
connections, which the kernel spreads over the workers' sockets by hashing
their addresses: 40 of them all reaching one of two workers happens with
probability 2**-39.  Nodes are real servers on loopback in this process.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
from inferno_proxy.settings import ProxySettings, WorkerCount

from inferno.cli import main
from inferno.errors import HTTPError
from inferno.http import Request, Response, ServerInfo, serve
from inferno.http.client import HTTPClient
from inferno.http.client_errors import ClientError

pytestmark = pytest.mark.anyio

WAIT = 30.0  # seconds a test waits for what must happen before failing instead of hanging
ROOT = Path(__file__).resolve().parents[2]
LISTENING = re.compile(r"proxy listening on ([\d.]+):(\d+) \(ops ([\d.]+):(\d+)\)")
REQUESTS = 40  # fresh connections per check (see the module docstring)
CHAT = json.dumps({"model": "tiny", "messages": []}).encode()


class Node:
    """A backend stand-in: vitals, ``/health``, a chat answer naming it, and a
    ``/v1/held`` route that answers only once :attr:`release` is set."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.ready = True
        self.held = 0
        self.release = anyio.Event()

    async def handle(self, request: Request) -> Response:
        if request.path == "/metrics":
            return Response.json(
                {
                    "ready": self.ready,
                    "requests_in_progress": 0,
                    "requests_queued": 0,
                    "cpu_usage": 0.1,
                    "memory_usage": 0.2,
                    "uptime_seconds": 1.0,
                    "version": "0.1.0",
                    "models": ["tiny"],
                }
            )
        if request.path == "/health":
            return Response.json({"status": "ready"})
        if request.path == "/v1/held":
            self.held += 1
            await self.release.wait()
        if request.path in ("/v1/chat/completions", "/v1/held"):
            await request.read()
            return Response.json({"served_by": self.name})
        raise HTTPError(404, "no such route")


@contextlib.asynccontextmanager
async def running(node: Node) -> AsyncIterator[ServerInfo]:
    async with anyio.create_task_group() as tg:
        info: ServerInfo = await tg.start(functools.partial(serve, node.handle))
        yield info
        tg.cancel_scope.cancel()


@dataclass
class Proxy:
    """A proxy process, its log, and the URLs of its two ports."""

    process: anyio.abc.Process
    log: list[dict[str, Any]] = field(default_factory=list)
    listening: anyio.Event = field(default_factory=anyio.Event)
    service: str = ""
    ops: str = ""

    def messages(self) -> str:
        return "\n".join(str(record.get("message")) for record in self.log)

    async def read_log(self) -> None:
        assert self.process.stderr is not None
        buffer = b""
        async for data in self.process.stderr:
            buffer += data
            *complete, buffer = buffer.split(b"\n")
            for raw in complete:
                try:
                    record = json.loads(raw)
                except ValueError:
                    record = {"message": raw.decode(errors="replace")}
                self.log.append(record)
                found = LISTENING.search(str(record.get("message", "")))
                if found:
                    self.service = f"http://127.0.0.1:{found.group(2)}"
                    self.ops = f"http://127.0.0.1:{found.group(4)}"
                    self.listening.set()


@contextlib.asynccontextmanager
async def proxy_process(*args: str) -> AsyncIterator[Proxy]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERNO_")}
    env["INFERNO_LOG_FORMAT"] = "json"
    command = [
        sys.executable,
        "-m",
        "inferno",
        "proxy",
        "--port=0",
        "--ops-port=0",
        "--workers=2",
        "--worker-header",
        "--health-interval=50ms",
        *args,
    ]
    async with await anyio.open_process(command, env=env, cwd=ROOT) as process:
        proxy = Proxy(process)
        async with anyio.create_task_group() as tg:
            tg.start_soon(proxy.read_log)
            try:
                with anyio.fail_after(WAIT):
                    await proxy.listening.wait()
                yield proxy
            finally:
                if process.returncode is None:
                    process.kill()
                    await process.wait()
            tg.cancel_scope.cancel()


def registration(node_id: str, port: int) -> bytes:
    document = {
        "id": node_id,
        "address": f"127.0.0.1:{port}",
        "metrics_port": port,
        "node_type": "backend",
        "models": ["tiny"],
    }
    return json.dumps(document).encode()


async def post(url: str, body: bytes) -> int:
    async with HTTPClient() as client:
        return (await client.request("POST", url, body=body)).status


async def ask(proxy: Proxy, path: str = "/v1/chat/completions") -> tuple[str, int]:
    """One request on a fresh connection: ``(node that served it, worker pid)``."""
    async with HTTPClient() as client:
        answer = await client.request("POST", f"{proxy.service}{path}", body=CHAT)
        assert answer.status == 200, await answer.read()
        worker = answer.headers.get("x-inferno-worker")
        assert worker is not None
        return (await answer.json())["served_by"], int(worker)


async def spread(proxy: Proxy) -> tuple[set[str], set[int]]:
    """Nodes and workers that served :data:`REQUESTS` requests."""
    nodes: set[str] = set()
    pids: set[int] = set()
    for _ in range(REQUESTS):
        node, pid = await ask(proxy)
        nodes.add(node)
        pids.add(pid)
    return nodes, pids


async def backends(proxy: Proxy) -> dict[str, dict[str, Any]]:
    """``GET /backends`` by node id (the parent answers: the operations port is not shared)."""
    async with HTTPClient() as client:
        answer = await client.request("GET", f"{proxy.ops}/backends")
        return {node["id"]: node for node in (await answer.json())["backends"]}


async def eventually(condition: Callable[[], Awaitable[bool]]) -> None:
    """Wait, bounded, for what the proxy's loops must bring about."""
    with anyio.fail_after(WAIT):
        while True:
            if await condition():
                return
            await anyio.sleep(0.02)


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def test_two_workers_serve_one_pool_and_stop_with_the_parent() -> None:
    a, b = Node("a"), Node("b")
    async with running(a) as a_info, running(b) as b_info, proxy_process() as proxy:
        register = f"{proxy.ops}/register"
        assert await post(register, registration("a", a_info.port)) == 200
        # Answered once every worker has it: no request can miss it.
        nodes, pids = await spread(proxy)
        assert nodes == {"a"}
        assert len(pids) == 2
        assert proxy.process.pid not in pids

        assert await post(register, registration("b", b_info.port)) == 200
        assert await post(f"{proxy.ops}/deregister", b'{"id": "a"}') == 200
        assert await spread(proxy) == ({"b"}, pids)

        # A health change: "b" says it is not ready; the parent's check finds it...
        assert await post(register, registration("a", a_info.port)) == 200
        b.ready = False

        async def b_out() -> bool:
            return (await backends(proxy))["b"]["ready"] is False

        await eventually(b_out)
        # ... and every worker has it by the time the next registration is answered.
        assert await post(register, registration("a", a_info.port)) == 200
        assert (await spread(proxy))[0] == {"a"}

        # In-flight counts: requests held at "a" through both workers add up.
        async with anyio.create_task_group() as tg:
            for _ in range(6):
                tg.start_soon(ask, proxy, "/v1/held")

            async def all_counted() -> bool:
                found = await backends(proxy)
                return a.held == 6 and (found["a"]["in_flight"], found["b"]["in_flight"]) == (6, 0)

            await eventually(all_counted)
            a.release.set()

        async def none_left() -> bool:
            return [n["in_flight"] for n in (await backends(proxy)).values()] == [0, 0]

        await eventually(none_left)

        proxy.process.send_signal(signal.SIGTERM)
        with anyio.fail_after(WAIT):
            status = await proxy.process.wait()
    log = proxy.messages()
    assert status == 0, log
    assert all(gone(pid) for pid in pids), log
    assert log.count("exited (exited with status 0)") == 2
    assert "proxy stopped" in log


async def test_a_killed_worker_is_restarted_and_the_port_keeps_serving() -> None:
    a = Node("a")
    async with running(a) as a_info, proxy_process() as proxy:
        assert await post(f"{proxy.ops}/register", registration("a", a_info.port)) == 200
        _, pids = await spread(proxy)
        victim = min(pids)
        os.kill(victim, signal.SIGKILL)

        async def replaced() -> bool:
            try:
                served = (await spread(proxy))[1]
            except ClientError:
                # Connections the kernel had queued on the dying worker's socket
                # are reset with it (Linux moves them only with tcp_migrate_req).
                return False
            return victim not in served and len(served) == 2

        await eventually(replaced)
        assert "was killed by SIGKILL; restarting" in proxy.messages()
        _, pids = await spread(proxy)
        proxy.process.kill()  # no goodbye: the workers must not outlive it

        async def orphans_gone() -> bool:
            return all(gone(pid) for pid in pids)

        await eventually(orphans_gone)


async def test_telemetry_gathers_every_workers_metrics() -> None:
    a = Node("a")
    async with running(a) as a_info, proxy_process() as proxy:
        assert await post(f"{proxy.ops}/register", registration("a", a_info.port)) == 200
        await spread(proxy)

        async def both_counted() -> bool:
            async with HTTPClient() as client:
                text = (
                    await (await client.request("GET", f"{proxy.ops}/telemetry")).read()
                ).decode()
            served = re.findall(
                r'^inferno_proxy_requests_total\{.*worker="(\d)"\} (\d+)', text, re.M
            )
            return {w for w, _ in served} == {"0", "1"} and sum(
                int(n) for _, n in served
            ) == REQUESTS

        # At once: the parent asks the workers for their counts before answering.
        assert await both_counted()
        proxy.process.send_signal(signal.SIGTERM)
        with anyio.fail_after(WAIT):
            assert await proxy.process.wait() == 0, proxy.messages()


async def test_sighup_reloads_the_api_keys_of_every_worker(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("old:sk-old-key-0123456789\n")

    async def answers(proxy: Proxy, key: str) -> tuple[set[int], set[int]]:
        """Statuses and workers of requests on fresh connections with *key*."""
        statuses, pids = set(), set()
        for _ in range(REQUESTS):
            async with HTTPClient() as client:
                headers = [("authorization", f"Bearer {key}")]
                answer = await client.request("GET", f"{proxy.service}/v1/models", headers=headers)
                statuses.add(answer.status)
                pids.add(int(answer.headers.get("x-inferno-worker") or 0))
        return statuses, pids

    async with proxy_process(f"--api-keys={keys}") as proxy:
        statuses, pids = await answers(proxy, "sk-old-key-0123456789")
        assert statuses == {200}
        assert len(pids) == 2
        keys.write_text("new:sk-new-key-0123456789\n")
        proxy.process.send_signal(signal.SIGHUP)

        async def reloaded() -> bool:
            return proxy.messages().count("API keys reloaded: 1 key(s)") == 2

        await eventually(reloaded)
        assert await answers(proxy, "sk-new-key-0123456789") == ({200}, pids)
        assert (await answers(proxy, "sk-old-key-0123456789"))[0] == {401}
        proxy.process.send_signal(signal.SIGTERM)
        with anyio.fail_after(WAIT):
            assert await proxy.process.wait() == 0, proxy.messages()
    assert "sk-old-key" not in proxy.messages()


async def test_static_backends_options_reach_every_worker() -> None:
    a = Node("a")
    async with running(a) as a_info:
        entry = f"127.0.0.1:{a_info.port};weight=2.5;model=pinned"
        async with proxy_process(f"--backends={entry}", "--static-health-checker=http") as proxy:
            node_id = f"127.0.0.1:{a_info.port}"

            async def in_rotation() -> bool:
                return bool((await backends(proxy)).get(node_id, {}).get("healthy"))

            await eventually(in_rotation)
            found = (await backends(proxy))[node_id]
            assert (found["weight"], found["models"]) == (2.5, ["pinned"])
            pids: set[int] = set()
            body = json.dumps({"model": "pinned", "messages": []}).encode()
            for _ in range(REQUESTS):
                async with HTTPClient() as client:
                    answer = await client.request(
                        "POST", f"{proxy.service}/v1/chat/completions", body=body
                    )
                    assert answer.status == 200
                    assert (await answer.json())["served_by"] == "a"
                    pids.add(int(answer.headers.get("x-inferno-worker") or 0))
                    listed = await client.request("GET", f"{proxy.service}/v1/models")
                    assert [m["id"] for m in (await listed.json())["data"]] == ["pinned"]
            assert len(pids) == 2


async def pinned_client(
    stack: contextlib.AsyncExitStack, proxy: Proxy, *, avoid: int | None = None
) -> tuple[HTTPClient, int]:
    """A client whose one keep-alive connection is served by one worker (not *avoid*):
    ``(client, worker pid)``.  Finding the worker costs one ``GET /v1/models``."""
    with anyio.fail_after(WAIT):
        while True:
            client = await stack.enter_async_context(HTTPClient(max_connections_per_origin=1))
            answer = await client.request("GET", f"{proxy.service}/v1/models")
            await answer.read()
            pid = int(answer.headers.get("x-inferno-worker") or 0)
            if answer.status == 200 and pid != avoid:
                return client, pid


async def test_a_client_rate_limit_holds_across_workers() -> None:
    burst = 10
    # Practically no refill during the test: every allowed request spends the burst.
    async with proxy_process("--rate-limit-per-ip=0.001", f"--rate-limit-burst={burst}") as proxy:
        url = f"{proxy.service}/v1/models"
        async with contextlib.AsyncExitStack() as stack:
            first, first_pid = await pinned_client(stack, proxy)
            for _ in range(burst - 1):  # the probe spent one already
                answer = await first.request("GET", url)
                await answer.read()
                assert answer.status == 200
                assert answer.headers.get("x-inferno-worker") == str(first_pid)
            refused = await first.request("GET", url)
            assert refused.status == 429
            await refused.read()
            # Another worker never saw this client: alone, it would allow a whole burst.
            # It allows what it does before the first worker's spending reaches it
            # (two exchanges of 100 ms with the parent), then refuses too.
            allowed_there = 0
            with anyio.fail_after(WAIT):
                while True:
                    async with HTTPClient() as fresh:
                        answer = await fresh.request("GET", url)
                        body = await answer.json()
                    pid = int(answer.headers.get("x-inferno-worker") or 0)
                    if pid != first_pid and answer.status == 200:
                        allowed_there += 1
                    elif pid != first_pid:
                        break
                    await anyio.sleep(0.1)  # paces the client: a burst in 1 s is the bug
        assert answer.status == 429
        assert body["error"]["code"] == "rate_limit_exceeded"
        assert answer.headers.get("retry-after")
        assert allowed_there < burst


async def test_the_wait_queue_bound_holds_across_workers() -> None:
    chat = json.dumps({"model": "tiny", "messages": []}).encode()
    # No node at all: requests wait (up to the queue timeout) for one to register.
    async with proxy_process("--max-queue=2", "--queue-timeout=60s") as proxy:
        url = f"{proxy.service}/v1/chat/completions"
        async with contextlib.AsyncExitStack() as stack:
            holders: dict[int, list[HTTPClient]] = {}
            while max((len(v) for v in holders.values()), default=0) < 2:
                client, pid = await pinned_client(stack, proxy)
                holders.setdefault(pid, []).append(client)
            waiting_pid = next(pid for pid, clients in holders.items() if len(clients) >= 2)
            async with anyio.create_task_group() as tg:
                for client in holders[waiting_pid][:2]:
                    tg.start_soon(functools.partial(client.request, "POST", url, body=chat))

                async def two_waiting() -> bool:
                    async with HTTPClient() as client:
                        answer = await client.request("GET", f"{proxy.ops}/metrics")
                        return bool((await answer.json())["requests_queued"] == 2)

                await eventually(two_waiting)
                # The other worker holds none: alone it would let two more wait.
                with anyio.fail_after(WAIT):
                    while True:
                        async with contextlib.AsyncExitStack() as inner:
                            other, _ = await pinned_client(inner, proxy, avoid=waiting_pid)
                            with anyio.move_on_after(1.0):
                                answer = await other.request("POST", url, body=chat)
                                body = await answer.json()
                                break
                        # It waited: the count had not reached it yet; leaving dequeues it.
                tg.cancel_scope.cancel()
    assert answer.status == 429
    assert body["error"]["code"] == "queue_full"
    assert answer.headers.get("retry-after") == "1"


async def test_a_node_back_before_its_failures_counted_wakes_requests_in_every_worker() -> None:
    a = Node("a")
    # Plenty of failures allowed: the node never leaves rotation, so its return
    # changes no state a worker could see; the parent must still wake them.
    args = (
        "--health-checker=http",
        "--failure-threshold=1000",
        "--removal-threshold=100000",
        "--circuit-failure-threshold=1000",
        "--queue-timeout=60s",
    )
    async with proxy_process(*args) as proxy:
        async with running(a) as a_info:
            port = a_info.port
            assert await post(f"{proxy.ops}/register", registration("a", port)) == 200
            await spread(proxy)  # in rotation, in every worker
        # "a" is down: requests through both workers find it unreachable and wait.
        async with anyio.create_task_group() as tg:
            served: list[tuple[str, int]] = []
            all_served = anyio.Event()

            async def one() -> None:
                served.append(await ask(proxy))
                if len(served) == REQUESTS // 4:
                    all_served.set()

            for _ in range(REQUESTS // 4):
                tg.start_soon(one)

            async def all_failed_once() -> bool:
                async with HTTPClient() as client:
                    text = (
                        await (await client.request("GET", f"{proxy.ops}/telemetry")).read()
                    ).decode()
                found = re.findall(
                    r'^inferno_proxy_upstream_failures_total\{.*worker="(\d)"\} (\d+)', text, re.M
                )
                return {w for w, _ in found} == {"0", "1"}

            await eventually(all_failed_once)
            async with running_on(a, port):
                with anyio.fail_after(WAIT):  # well before the queue timeout
                    await all_served.wait()
        assert {node for node, _ in served} == {"a"}
        assert len({pid for _, pid in served}) == 2


@contextlib.asynccontextmanager
async def running_on(node: Node, port: int) -> AsyncIterator[ServerInfo]:
    """*node* served on *port* again (its previous server closed)."""
    async with anyio.create_task_group() as tg:
        info: ServerInfo = await tg.start(functools.partial(serve, node.handle, port=port))
        yield info
        tg.cancel_scope.cancel()


def test_workers_setting_takes_a_count_or_auto() -> None:
    count = WorkerCount()
    assert count.parse("auto") == 0
    assert count.parse("4") == 4
    assert count.render(0) == "auto"
    assert ProxySettings(workers=0).worker_count() >= 1
    assert ProxySettings(workers=3).worker_count() == 3
    with pytest.raises(ValueError, match="1024"):
        count.parse("2000")


def test_a_bad_worker_count_exits_2(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("INFERNO_LOG_FORMAT", "json")
    assert main(["proxy", "--port=0", "--ops-port=0", "--workers=many"]) == 2
    assert "proxy.workers (" in capsys.readouterr().err
