"""A cluster from the built pex: a proxy and two sim backends as real processes.

What an operator relies on, end to end: backends register by themselves; a
request through the proxy reaches a backend and streams; a backend stopped
with SIGTERM under load costs no request and leaves the pool; one killed with
SIGKILL stops getting requests while requests keep succeeding; a proxy
restarted with no state learns both backends again from their
re-announcements.  And ``inferno.pex up`` starts the same cluster in one
command and stops all of it on Ctrl-C.

Every wait is bounded (:data:`~tests.e2e.conftest.WAIT`); nothing is timed.
"""

from __future__ import annotations

import re
import signal
import subprocess
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import openai
import pytest
from openai import AsyncOpenAI

from inferno.http import HTTPClient
from tests.e2e.conftest import (
    BUILD_TIMEOUT_S,
    WAIT,
    Node,
    Pex,
    eventually,
    pool,
    start,
    telemetry_total,
)

pytestmark = [
    pytest.mark.pex,
    pytest.mark.anyio,
    # A test's timeout also covers the session build its fixtures may start.
    pytest.mark.timeout(2 * BUILD_TIMEOUT_S),
]

MODEL = "sim-tiny"  # the default sim profile's model
#: Re-registration interval of the backends: a restarted proxy re-learns them within it.
ANNOUNCE = "1s"
#: Tokens per request under load: a fraction of a second each at the sim's speed 1, so
#: requests are in flight when a backend is stopped.
TOKENS = 100
#: Concurrent clients of the load.
WORKERS = 6
#: Checks often, so a killed node is seen as unhealthy soon (the wait is bounded anyway).
PROXY_FLAGS = ("--health-interval=0.5s", "--health-timeout=0.4s")
UPSTREAM_FAILURES = "inferno_proxy_upstream_failures_total"
BACKEND_REQUESTS = "inferno_backend_requests_total"


def proxy_args(port: int = 0, ops_port: int = 0) -> list[str]:
    return ["proxy", f"--port={port}", f"--ops-port={ops_port}", *PROXY_FLAGS]


def backend_args(index: int, proxy: Node) -> list[str]:
    return [
        "backend",
        "--port=0",
        "--ops-port=0",
        f"--node-id=backend-{index}",
        f"--discovery-lb={proxy.ops}",
        f"--announce-interval={ANNOUNCE}",
        "--sim-speed=1",
    ]


async def healthy(http: HTTPClient, proxy: Node, *ids: str) -> bool:
    entries = await pool(http, proxy)
    return all(entries.get(node_id, {}).get("healthy") is True for node_id in ids)


@dataclass
class Cluster:
    proxy: Node
    backends: list[Node]
    http: HTTPClient

    def client(self, proxy: Node | None = None) -> AsyncOpenAI:
        url = (proxy or self.proxy).url
        return AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=WAIT)


@asynccontextmanager
async def cluster(pex: Pex, stack: AsyncExitStack) -> AsyncIterator[Cluster]:
    """A proxy and two backends from the pex, both registered and healthy."""
    http = await stack.enter_async_context(HTTPClient())
    proxy = await stack.enter_async_context(start(pex, "proxy", *proxy_args()))
    await proxy.until_listening()
    backends = [
        await stack.enter_async_context(start(pex, f"backend-{i}", *backend_args(i, proxy)))
        for i in (1, 2)
    ]
    for backend in backends:
        await backend.until_listening()
    await eventually(
        lambda: healthy(http, proxy, "backend-1", "backend-2"), "both backends in the pool"
    )
    yield Cluster(proxy, backends, http)


@dataclass
class Load:
    """Clients sending requests in a loop until told to stop; every outcome counted."""

    client: AsyncOpenAI
    stream: bool
    succeeded: int = 0
    failures: list[str] = field(default_factory=list)
    stop: anyio.Event = field(default_factory=anyio.Event)
    changed: anyio.Event = field(default_factory=anyio.Event)

    async def worker(self, n: int) -> None:
        while not self.stop.is_set():
            try:
                finish = await self.one(f"request from worker {n}")
            except openai.APIError as exc:  # the client's error for every failure
                self.failures.append(f"{type(exc).__name__}: {exc}")
            else:
                if finish == "length":
                    self.succeeded += 1
                else:
                    self.failures.append(f"finish_reason {finish!r}")
            self.changed.set()
            self.changed = anyio.Event()

    async def one(self, prompt: str) -> str | None:
        """One request; its finish reason."""
        extra: dict[str, Any] = {"ignore_eos": True}
        if not self.stream:
            answer = await self.client.completions.create(
                model=MODEL, prompt=prompt, max_tokens=TOKENS, extra_body=extra
            )
            return answer.choices[0].finish_reason
        chunks = await self.client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=TOKENS, stream=True, extra_body=extra
        )
        finish: str | None = None
        async for chunk in chunks:
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
        return finish

    async def until_more(self, count: int) -> None:
        """Wait until ``count`` more requests have succeeded (or a failure ends the wait)."""
        target = self.succeeded + count
        with anyio.fail_after(WAIT):
            while self.succeeded < target and not self.failures:
                await self.changed.wait()


async def in_flight_at(http: HTTPClient, proxy: Node, node_id: str) -> bool:
    entry = (await pool(http, proxy)).get(node_id)
    return entry is not None and entry["in_flight"] > 0


# -- the tests -----------------------------------------------------------------------------------


async def test_backends_register_and_a_request_through_the_proxy_streams(pex: Pex) -> None:
    async with AsyncExitStack() as stack:
        nodes = await stack.enter_async_context(cluster(pex, stack))
        entries = await pool(nodes.http, nodes.proxy)
        for node_id, backend in zip(("backend-1", "backend-2"), nodes.backends, strict=True):
            assert entries[node_id]["address"] == backend.address
            assert entries[node_id]["models"] == [MODEL]

        async def served() -> float:
            totals = [
                await telemetry_total(nodes.http, b.ops_url, BACKEND_REQUESTS)
                for b in nodes.backends
            ]
            return sum(totals)

        before = await served()
        async with nodes.client() as client:
            chunks = await client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "Hello"}],
                max_tokens=20,
                stream=True,
            )
            pieces = [c.choices[0].delta.content async for c in chunks if c.choices]
        assert len([p for p in pieces if p]) > 1, pieces  # token by token
        assert await served() == before + 1  # one backend answered it, once


async def test_sigterm_on_a_backend_under_load_fails_no_request_and_it_leaves_the_pool(
    pex: Pex,
) -> None:
    async with AsyncExitStack() as stack:
        nodes = await stack.enter_async_context(cluster(pex, stack))
        http, proxy, leaving = nodes.http, nodes.proxy, nodes.backends[0]
        async with nodes.client() as client, anyio.create_task_group() as tg:
            load = Load(client, stream=True)
            for n in range(WORKERS):
                tg.start_soon(load.worker, n)
            await eventually(lambda: in_flight_at(http, proxy, "backend-1"), "load on backend-1")
            status = await leaving.stop(signal.SIGTERM)  # drains its streams first

            async def left() -> bool:
                return "backend-1" not in await pool(http, proxy)

            await eventually(left, "backend-1 gone from /backends")
            await load.until_more(WORKERS)  # and requests go on succeeding without it
            load.stop.set()
    assert status == 0, leaving.log()
    assert load.failures == []
    assert load.succeeded > WORKERS


async def test_sigkill_on_a_backend_under_load_stops_routing_to_it_and_requests_succeed(
    pex: Pex,
) -> None:
    async with AsyncExitStack() as stack:
        nodes = await stack.enter_async_context(cluster(pex, stack))
        http, proxy, killed = nodes.http, nodes.proxy, nodes.backends[0]
        async with nodes.client() as client:
            # Answers not streamed: none has started when the node dies, so each is retried.
            load = Load(client, stream=False)
            async with anyio.create_task_group() as tg:
                for n in range(WORKERS):
                    tg.start_soon(load.worker, n)
                await eventually(
                    lambda: in_flight_at(http, proxy, "backend-1"), "load on backend-1"
                )
                status = await killed.stop(signal.SIGKILL)

                async def out() -> bool:
                    entry = (await pool(http, proxy)).get("backend-1")
                    return entry is None or entry["health"] == "unhealthy"

                await eventually(out, "backend-1 out of rotation")
                await load.until_more(WORKERS)
                load.stop.set()
            assert load.failures == []

            # Out of rotation: no request is even tried on it any more.
            failed_before = await telemetry_total(http, proxy.ops_url, UPSTREAM_FAILURES)
            quiet = Load(client, stream=False)
            for n in range(10):
                assert await quiet.one(f"after {n}") == "length"
            assert await telemetry_total(http, proxy.ops_url, UPSTREAM_FAILURES) == failed_before
    assert status == -signal.SIGKILL


async def test_a_restarted_proxy_relearns_both_backends_from_their_announcements(
    pex: Pex,
) -> None:
    async with AsyncExitStack() as stack:
        nodes = await stack.enter_async_context(cluster(pex, stack))
        old = nodes.proxy
        port, ops_port = (int(a.rpartition(":")[2]) for a in (old.address, old.ops))
        assert await old.stop(signal.SIGTERM) == 0, old.log()

        # Same ports, no state: the backends' next announcement (every 1 s) fills the pool.
        new = await stack.enter_async_context(start(pex, "proxy-2", *proxy_args(port, ops_port)))
        await new.until_listening()
        await eventually(
            lambda: healthy(nodes.http, new, "backend-1", "backend-2"),
            "both backends registered with the restarted proxy",
        )
        async with nodes.client(new) as client:
            answer = await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "again"}], max_tokens=8
            )
        assert answer.choices[0].message.content
        added = [r for r in new.records if "added (registered)" in str(r.get("message"))]
        assert len(added) == 2, new.log()


# -- inferno.pex up ------------------------------------------------------------------------------

NODE_LINE = re.compile(r"^ +(proxy|backend-\d+) +http://(\S+) +ops (\S+) +pid (\d+)$", re.M)
BASE_URL = re.compile(r"OpenAI base URL: +(\S+)")


def running(pid: int) -> bool:
    """Whether ``pid`` runs: neither gone nor a zombie awaiting its reaper."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


async def test_up_from_the_pex_starts_the_cluster_and_ctrl_c_stops_it(pex: Pex) -> None:
    command = pex.command("up", "--port=0", "--ops-port=0", "--sim-speed=20", "--log-format=json")
    process = await anyio.open_process(
        command, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(pex.env)
    )
    try:
        assert process.stdout is not None
        banner = ""
        with anyio.fail_after(WAIT):
            async for data in process.stdout:
                banner += data.decode()
                if "Ctrl-C stops every node." in banner:
                    break
        nodes = {m[1]: (m[2], int(m[4])) for m in NODE_LINE.finditer(banner)}
        assert set(nodes) == {"proxy", "backend-1", "backend-2"}, banner
        base_url = BASE_URL.search(banner)
        assert base_url, banner
        async with AsyncOpenAI(base_url=base_url[1], api_key="unused", max_retries=0) as client:
            chunks = await client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "Hello"}],
                max_tokens=12,
                stream=True,
            )
            pieces = [c.choices[0].delta.content async for c in chunks if c.choices]
        assert len([p for p in pieces if p]) > 1

        process.send_signal(signal.SIGINT)
        with anyio.fail_after(WAIT):
            status = await process.wait()
    finally:
        with anyio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
            await process.aclose()
    assert status == 0
    assert not [name for name, (_, pid) in nodes.items() if running(pid)]
