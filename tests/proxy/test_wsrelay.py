"""WebSocket upgrades relayed through the proxy to a real echo backend."""

from __future__ import annotations

import functools
import json
import socket

import anyio
import pytest
from inferno_proxy.budget import RetryBudget
from inferno_proxy.forward import ForwardSettings
from inferno_proxy.wsrelay import close_code

from inferno.http import (
    Request,
    Response,
    WebSocket,
    WebSocketClosed,
    WebSocketHandshakeError,
    connect_websocket,
    serve,
)
from tests.proxy.upstreams import (
    IO_TIMEOUT,
    Backend,
    Harness,
    echo,
    health_checks,
    proxied,
    refused_address,
    reserved_port,
    status,
    until,
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


# --- nodes that are unreachable ---------------------------------------------------------------


async def ws_or_echo(backend: Backend, request: Request, body: bytes) -> Response:
    """The WebSocket echo for upgrades, the JSON echo (200) for the rest: health checks."""
    if request.is_websocket_upgrade():
        return await ws_echo(backend, request, body)
    return await echo(backend, request, body)


async def open_into(opened: list[WebSocket | WebSocketHandshakeError], h: Harness) -> None:
    try:
        opened.append(await connect_websocket(ws_url(h.url), timeout=IO_TIMEOUT))
    except WebSocketHandshakeError as exc:
        opened.append(exc)


async def refusal(h: Harness) -> WebSocketHandshakeError:
    """The proxy's HTTP answer to an upgrade it could not relay."""
    with anyio.fail_after(IO_TIMEOUT), pytest.raises(WebSocketHandshakeError) as caught:
        await connect_websocket(ws_url(h.url), timeout=IO_TIMEOUT)
    return caught.value


def error(refused: WebSocketHandshakeError) -> dict[str, str]:
    found = json.loads(refused.body)["error"]
    assert isinstance(found, dict)
    return found


async def test_an_upgrade_whose_lone_node_is_down_is_relayed_once_it_is_back() -> None:
    """Tried, found down, the upgrade waits for the node (not for a retry: the budget
    allows none) and is relayed once real health checks find it back."""
    node = Backend("node", ws_or_echo)
    placeholder = reserved_port()
    port = placeholder.getsockname()[1]
    no_retries = RetryBudget(ratio=0.0, min_per_second=0.0)
    settings = ForwardSettings(queue_timeout=IO_TIMEOUT)
    opened: list[WebSocket | WebSocketHandshakeError] = []
    with placeholder:
        async with proxied(settings=settings, budget=no_retries) as h:
            h.register("node", f"127.0.0.1:{port}")
            async with health_checks(h), anyio.create_task_group() as tg:
                tg.start_soon(open_into, opened, h)
                await until(lambda: h.app.queue.depth(None) == 1)  # tried, found down: waits
                found = h.pool.get("node")
                assert found is not None
                assert found.health.last_failure is not None
                await tg.start(functools.partial(serve, node.handle, port=port, reuse_port=True))
                placeholder.close()
                await until(lambda: bool(opened))
                [ws] = opened
                assert isinstance(ws, WebSocket), ws
                with anyio.fail_after(IO_TIMEOUT):
                    await ws.send("back again")
                    assert await ws.receive() == "back again"
                    await ws.close()
                    await node.ws_closed.wait()
                tg.cancel_scope.cancel()
            assert h.metric("inferno_proxy_queue_wait_seconds") == 1
            assert h.metric("inferno_proxy_retries_total", reason="connect") == 0
    upgrades = [seen for seen in node.seen if seen.target != "/health"]
    assert [seen.target for seen in upgrades] == ["/v1/ws"]


async def test_an_upgrade_whose_node_stays_down_is_503_after_the_queue_timeout() -> None:
    settings = ForwardSettings(queue_timeout=0.3)
    async with proxied(settings=settings, extra_nodes=[("dead", refused_address(), ())]) as h:
        refused = await refusal(h)
        assert refused.status == 503
        assert refused.headers.get("retry-after") == "5"
        found = error(refused)
        assert found["code"] == "no_healthy_upstream"
        assert "cannot open a WebSocket to dead" in found["message"]
        assert "no node came back within 0.3 s" in found["message"]
        assert h.metric("inferno_proxy_queue_wait_seconds") == 1
        dead = h.pool.get("dead")
        assert dead is not None
        assert dead.health.consecutive_failures == 1  # tried once: nothing woke the upgrade


async def test_retries_come_first_within_max_attempts_then_the_wait() -> None:
    settings = ForwardSettings(queue_timeout=0.3, max_attempts=2)
    dead = [(f"first-{i}", refused_address(), ()) for i in range(3)]
    async with proxied(settings=settings, extra_nodes=dead) as h:
        refused = await refusal(h)
        assert (refused.status, refused.headers.get("retry-after")) == (503, "5")
        failures = []
        for name, _, _ in dead:
            node = h.pool.get(name)
            assert node is not None
            failures.append(node.health.consecutive_failures)
        assert failures == [1, 1, 0]  # max_attempts nodes, then waiting, not a third
        assert h.metric("inferno_proxy_retries_total", reason="connect") == 1
        assert h.metric("inferno_proxy_queue_wait_seconds") == 1


async def test_a_retry_the_budget_refuses_ends_the_upgrade_at_once() -> None:
    """Another node was left to try: the budget said no, so nothing waits."""
    no_retries = RetryBudget(ratio=0.0, min_per_second=0.0)
    settings = ForwardSettings(queue_timeout=IO_TIMEOUT)
    dead = [(f"first-{i}", refused_address(), ()) for i in range(2)]
    async with proxied(settings=settings, budget=no_retries, extra_nodes=dead) as h:
        refused = await refusal(h)
        assert (refused.status, refused.headers.get("retry-after")) == (503, "1")
        assert "came back" not in error(refused)["message"]
        assert h.metric("inferno_proxy_retry_budget_exhausted_total") == 1
        assert h.metric("inferno_proxy_queue_wait_seconds") == 0


async def test_a_refusal_from_a_node_is_passed_on_without_waiting() -> None:
    settings = ForwardSettings(queue_timeout=IO_TIMEOUT)
    busy = Backend("busy", status(503, retry_after="3"))
    async with proxied(busy, settings=settings) as h:
        refused = await refusal(h)
        assert (refused.status, refused.headers.get("retry-after")) == (503, "3")
        assert h.metric("inferno_proxy_queue_wait_seconds") == 0
    # Down, then a refusal: the node that answered has the last word.
    busy = Backend("busy", status(503, retry_after="3"))
    dead = [("first-dead", refused_address(), ())]
    async with proxied(busy, settings=settings, extra_nodes=dead) as h:
        refused = await refusal(h)
        assert (refused.status, refused.headers.get("retry-after")) == (503, "3")
        assert h.metric("inferno_proxy_queue_wait_seconds") == 0
    # A refusal, then down: not every node was unreachable, so nothing waits either.
    busy = Backend("busy", status(503, retry_after="3"))
    dead = [("dead", refused_address(), ())]
    async with proxied(busy, settings=settings, extra_nodes=dead) as h:
        refused = await refusal(h)
        assert (refused.status, refused.headers.get("retry-after")) == (503, "1")
        found = error(refused)
        assert "cannot open a WebSocket to dead" in found["message"]
        assert "came back" not in found["message"]
        assert len(busy.seen) == 1
        assert h.metric("inferno_proxy_queue_wait_seconds") == 0


async def test_a_node_that_never_answers_the_handshake_is_not_waited_for() -> None:
    """It accepted the connection (the kernel does, for a listening socket) and was
    silent: a timeout, which is not a node being away."""
    settings = ForwardSettings(
        queue_timeout=IO_TIMEOUT, connect_timeout=0.05, first_byte_timeout=0.05
    )
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)  # never accepted: connections complete, nothing answers
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        async with proxied(settings=settings, extra_nodes=[("silent", address, ())]) as h:
            refused = await refusal(h)
            assert refused.status == 503
            found = error(refused)
            assert "timed out" in found["message"]
            assert "came back" not in found["message"]
            assert h.metric("inferno_proxy_queue_wait_seconds") == 0


async def test_a_node_whose_connect_times_out_is_waited_for() -> None:
    """Its accept queue is full (``listen(0)`` and one connection waiting), so the
    kernel drops new SYNs: the connect times out, which is a node being away."""
    settings = ForwardSettings(queue_timeout=0.5, connect_timeout=0.05, first_byte_timeout=5.0)
    with socket.socket() as full, socket.socket() as filler:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        filler.connect(full.getsockname())
        address = f"127.0.0.1:{full.getsockname()[1]}"
        async with proxied(settings=settings, extra_nodes=[("full", address, ())]) as h:
            refused = await refusal(h)
            assert refused.status == 503
            found = error(refused)
            assert "timed out connecting" in found["message"]
            assert "no node came back within 0.5 s" in found["message"]
            assert h.metric("inferno_proxy_queue_wait_seconds") == 1


def test_close_codes_that_cannot_be_sent_are_mapped() -> None:
    assert close_code(4001, lost=1011) == 4001
    assert close_code(1000, lost=1011) == 1000
    assert close_code(1005, lost=1011) == 1000  # "no status" is never sent
    assert close_code(1015, lost=1011) == 1000
    assert close_code(1006, lost=1011) == 1011  # vanished: the proxy's own code
    assert close_code(None, lost=1001) == 1001
