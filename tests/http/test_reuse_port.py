"""``serve(reuse_port=True)``: several servers on one port, the kernel spreading connections."""

from __future__ import annotations

import functools
from collections.abc import Coroutine
from typing import Any

import anyio
import anyio.abc
import pytest

from inferno.http import Request, Response, ServerInfo, serve
from inferno.http.client import HTTPClient

pytestmark = pytest.mark.anyio

#: Connections opened; each goes to either server (Linux hashes the 4-tuple), so
#: all of them reaching one server happens with probability 2**-63.
CONNECTIONS = 64


async def hello(request: Request) -> Response:
    return Response.text("hello")


def answering(name: str) -> functools.partial[Coroutine[Any, Any, None]]:
    """``serve`` with ``reuse_port``, answering *name* to every request."""

    async def handle(request: Request) -> Response:
        return Response.text(name)

    return functools.partial(serve, handle, reuse_port=True)


async def test_two_servers_share_a_port_and_both_accept() -> None:
    stop_first, first_done = anyio.Event(), anyio.Event()

    async def run_first(*, task_status: anyio.abc.TaskStatus[ServerInfo]) -> None:
        await answering("first")(shutdown=stop_first, task_status=task_status)
        first_done.set()

    async with anyio.create_task_group() as tg:
        first: ServerInfo = await tg.start(run_first)
        second: ServerInfo = await tg.start(functools.partial(answering("second"), port=first.port))
        assert second.port == first.port
        seen: set[str] = set()
        for _ in range(CONNECTIONS):
            # A fresh client per request: a new connection, a new source port.
            async with HTTPClient() as client:
                answer = await client.request("GET", f"{first.url}/")
                seen.add((await answer.read()).decode())
        assert seen == {"first", "second"}
        stop_first.set()
        await first_done.wait()
        for _ in range(8):  # the other keeps the port serving
            async with HTTPClient() as client:
                answer = await client.request("GET", f"{first.url}/")
                assert await answer.read() == b"second"
        tg.cancel_scope.cancel()


async def test_a_server_without_reuse_port_cannot_take_the_port() -> None:
    async with anyio.create_task_group() as tg:
        shared: ServerInfo = await tg.start(answering("shared"))
        with pytest.raises(OSError, match="in use"):
            await tg.start(functools.partial(serve, hello, port=shared.port))
        tg.cancel_scope.cancel()
