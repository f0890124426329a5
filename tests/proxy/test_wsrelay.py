"""WebSocket upgrades relayed through the proxy to a real echo backend."""

from __future__ import annotations

import anyio
import pytest
from inferno_proxy.wsrelay import close_code

from inferno.http import WebSocketClosed, WebSocketHandshakeError, connect_websocket
from tests.proxy.upstreams import (
    IO_TIMEOUT,
    Backend,
    echo,
    proxied,
    refused_address,
    status,
    ws_echo,
)

pytestmark = pytest.mark.anyio


def ws_url(url: str, path: str = "/v1/ws") -> str:
    return "ws" + url[len("http") :] + path


async def test_messages_are_relayed_both_ways() -> None:
    node = Backend("a", ws_echo, models=("m",))
    async with proxied(node) as h:
        with anyio.fail_after(IO_TIMEOUT):
            ws = await connect_websocket(
                ws_url(h.url, "/v1/ws?model=m"),
                headers=[("x-request-id", "ws-1")],
                subprotocols=["chat.v1", "chat.v0"],
            )
            assert ws.subprotocol == "chat.v1"  # the node's choice, passed back
            await ws.send("hello")
            assert await ws.receive() == "hello"
            await ws.send(b"\x00\x01binary")
            assert await ws.receive() == b"\x00\x01binary"  # binary stays binary
            big = "x" * 200_000
            await ws.send(big)
            assert await ws.receive() == big
            await ws.close(4002, "done here")
            await node.ws_closed.wait()
        assert node.ws_closes == [4002]  # the client's code reached the node
        seen = node.seen[0]
        assert seen.target == "/v1/ws?model=m"
        assert seen.headers.get("x-request-id") == "ws-1"
        assert seen.headers.get("x-forwarded-for") == "127.0.0.1"
        assert h.in_flight("a") == 0  # an open WebSocket is no request in flight
        assert h.metric("inferno_proxy_requests_total", status="101", model="m") == 1


async def test_a_close_by_the_node_reaches_the_client() -> None:
    node = Backend("a", ws_echo)
    async with proxied(node) as h:
        with anyio.fail_after(IO_TIMEOUT):
            ws = await connect_websocket(ws_url(h.url))
            await ws.send("close:4001")
            with pytest.raises(WebSocketClosed) as caught:
                await ws.receive()
        assert caught.value.code == 4001
        assert caught.value.reason == "asked to"


async def test_an_unreachable_node_is_skipped() -> None:
    node = Backend("good", ws_echo)
    async with proxied(node, extra_nodes=[("first-dead", refused_address(), ())]) as h:
        with anyio.fail_after(IO_TIMEOUT):
            ws = await connect_websocket(ws_url(h.url))
            await ws.send("still here")
            assert await ws.receive() == "still here"
            await ws.close()
        dead = h.pool.get("first-dead")
        assert dead is not None
        assert dead.health.consecutive_failures == 1


async def test_a_refused_upgrade_is_retried_then_passed_on() -> None:
    busy = Backend("busy", status(503, retry_after="3"))
    plain = Backend("plain", echo)  # answers the upgrade with a plain 200
    async with proxied(busy, plain) as h:
        with anyio.fail_after(IO_TIMEOUT), pytest.raises(WebSocketHandshakeError) as caught:
            await connect_websocket(ws_url(h.url))
        assert caught.value.status == 200  # the second node's own answer
        assert len(busy.seen) == 1
        assert len(plain.seen) == 1
    only_busy = Backend("busy", status(503, retry_after="3"))
    async with proxied(only_busy) as h:
        with anyio.fail_after(IO_TIMEOUT), pytest.raises(WebSocketHandshakeError) as caught:
            await connect_websocket(ws_url(h.url))
        assert caught.value.status == 503
        assert caught.value.headers.get("retry-after") == "3"


async def test_an_unknown_model_is_404_before_any_node_is_asked() -> None:
    node = Backend("a", ws_echo, models=("m",))
    async with proxied(node) as h:
        with anyio.fail_after(IO_TIMEOUT), pytest.raises(WebSocketHandshakeError) as caught:
            await connect_websocket(ws_url(h.url, "/v1/ws?model=other"))
        assert caught.value.status == 404
        assert node.seen == []


def test_close_codes_that_cannot_be_sent_are_mapped() -> None:
    assert close_code(4001, lost=1011) == 4001
    assert close_code(1000, lost=1011) == 1000
    assert close_code(1005, lost=1011) == 1000  # "no status" is never sent
    assert close_code(1015, lost=1011) == 1000
    assert close_code(1006, lost=1011) == 1011  # vanished: the proxy's own code
    assert close_code(None, lost=1001) == 1001
