"""Clients that go away before their response starts: the node's request is cancelled.

The server cancels the handler of a client that went away (it watches the
connection while the handler runs); the proxy's handler then closes its
upstream connection, and the node's own server cancels the node's handler.
"""

from __future__ import annotations

import json

import anyio
import pytest
from inferno_proxy.forward import ForwardSettings

from tests.proxy.upstreams import IO_TIMEOUT, Backend, Harness, echo, not_ready, proxied, slow_head

pytestmark = pytest.mark.anyio

BODY = json.dumps({"model": "m", "prompt": "hello"}).encode()


async def send_and_leave(h: Harness, until: anyio.Event | None = None) -> None:
    """Send a request on a raw connection, then close it (once *until* is set)."""
    async with await anyio.connect_tcp("127.0.0.1", h.info.port) as s:
        await s.send(
            b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(BODY), BODY)
        )
        if until is not None:
            with anyio.fail_after(IO_TIMEOUT):
                await until.wait()


async def test_a_client_that_leaves_before_the_first_byte_cancels_the_node_request() -> None:
    slow = Backend("slow", slow_head, models=("m",))
    async with proxied(slow) as h:
        await send_and_leave(h, slow.arrived)
        with anyio.fail_after(IO_TIMEOUT):
            await slow.disconnected.wait()
        assert h.in_flight("slow") == 0
        node = h.pool.get("slow")
        assert node is not None
        assert node.health.consecutive_failures == 0  # the client left: says nothing
        assert node.circuit.state.value == "closed"
        with anyio.fail_after(IO_TIMEOUT):
            while h.app.in_flight():  # noqa: ASYNC110  # the handler unwinds on its own
                await anyio.sleep(0.002)


async def test_a_client_that_leaves_the_queue_frees_its_place() -> None:
    starting = Backend("starting", echo, models=("m",))
    settings = ForwardSettings(queue_timeout=IO_TIMEOUT, max_queue=1)
    async with proxied(starting, settings=settings) as h:
        not_ready(h, "starting")
        queued = anyio.Event()

        async def watch() -> None:
            while not h.app.queue.total():  # noqa: ASYNC110  # no event for "joined"
                await anyio.sleep(0.002)
            queued.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            await send_and_leave(h, queued)
        with anyio.fail_after(IO_TIMEOUT):
            while h.app.queue.total():  # noqa: ASYNC110  # the handler unwinds on its own
                await anyio.sleep(0.002)
        assert h.app.in_flight() == 0
        assert starting.seen == []
