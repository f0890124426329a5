"""The proxy's request path when nodes fail: retries, budgets, timeouts, disconnects.

Real backends and a real proxy over loopback sockets; the round-robin
policy with slow start off makes the first attempt go to the first node
registered, so each test knows which node fails first.
"""

from __future__ import annotations

import json
import socket
import struct

import anyio
import pytest
from inferno_proxy.budget import RetryBudget
from inferno_proxy.circuit import CircuitSettings
from inferno_proxy.forward import ForwardSettings
from inferno_proxy.health import HealthState
from inferno_proxy.nodes import ChangeKind, NodeChange

from inferno.http.client_errors import RemoteProtocolError
from tests.proxy.upstreams import (
    IO_TIMEOUT,
    Backend,
    Harness,
    break_before_body,
    collect,
    echo,
    proxied,
    refused_address,
    slow_head,
    spaced_start,
    stall_after_first,
    status,
    ticker,
)

pytestmark = pytest.mark.anyio

JSON = {"content-type": "application/json"}
BODY = json.dumps({"model": "m", "prompt": "hello"}).encode()
NO_RETRIES = RetryBudget(ratio=0.0, min_per_second=0.0)


async def post(h: Harness, path: str = "/v1/completions") -> tuple[int, dict[str, object]]:
    response = await h.client.request("POST", f"{h.url}{path}", headers=JSON, body=BODY)
    return response.status, await response.json()


async def test_a_refused_connection_is_retried_on_another_node() -> None:
    good = Backend("good", echo, models=("m",))
    async with proxied(good, extra_nodes=[("first-dead", refused_address(), ("m",))]) as h:
        code, answer = await post(h)
        assert code == 200
        assert answer["node"] == "good"
        dead = h.pool.get("first-dead")
        assert dead is not None
        assert dead.health.consecutive_failures == 1  # a transport failure, counted at once
        assert dead.in_flight == 0
        assert h.metric("inferno_proxy_retries_total", reason="connect") == 1


@pytest.mark.parametrize("code", [502, 503, 429])
async def test_a_refusing_node_is_retried_on_another(code: int) -> None:
    refusing = Backend("refusing", status(code), models=("m",))
    good = Backend("good", echo, models=("m",))
    async with proxied(refusing, good) as h:
        answer_code, answer = await post(h)
        assert answer_code == 200
        assert answer["node"] == "good"
        assert len(refusing.seen) == 1
        assert h.in_flight("refusing") == 0
        node = h.pool.get("refusing")
        assert node is not None
        assert node.health.consecutive_failures == 0  # a status is no transport failure
        assert h.metric("inferno_proxy_retries_total", reason=f"status_{code}") == 1


async def test_a_server_error_other_than_502_is_passed_on_without_retry() -> None:
    failing = Backend("failing", status(500), models=("m",))
    good = Backend("good", echo, models=("m",))
    async with proxied(failing, good) as h:
        code, answer = await post(h)
        assert code == 500
        assert good.seen == []
        assert "failing says 500" in str(answer)


async def test_a_circuit_opened_by_answers_names_their_status() -> None:
    failing = Backend("failing", status(500), models=("m",))
    async with proxied(failing) as h:
        changes: list[NodeChange] = []
        h.app.on_pool_changes = changes.extend
        for _ in range(CircuitSettings().failure_threshold):
            code, _ = await post(h)
            assert code == 500
        [opened] = [c for c in changes if c.kind is ChangeKind.CIRCUIT]
        assert opened.new == "open"
        assert opened.reason == "5 consecutive failures, last: HTTP 500"


async def test_a_head_then_a_close_before_any_chunk_is_retried() -> None:
    """The head is held back until the first chunk: nothing had reached the client."""
    broken = Backend("broken", break_before_body, models=("m",))
    good = Backend("good", echo, models=("m",))
    async with proxied(broken, good) as h:
        code, answer = await post(h)
        assert code == 200
        assert answer["node"] == "good"
        assert h.metric("inferno_proxy_retries_total", reason="reset") == 1


async def test_attempts_are_bounded_and_the_last_answer_is_passed_on() -> None:
    nodes = [Backend(f"n{i}", status(503, retry_after="7"), models=("m",)) for i in range(3)]
    async with proxied(*nodes, settings=ForwardSettings(max_attempts=2)) as h:
        response = await h.client.request(
            "POST", f"{h.url}/v1/completions", headers=JSON, body=BODY
        )
        assert response.status == 503
        assert response.headers.get("retry-after") == "7"  # the node's own answer
        assert "n1 says 503" in (await response.read()).decode()
        assert [len(n.seen) for n in nodes] == [1, 1, 0]
        assert [h.in_flight(n.name) for n in nodes] == [0, 0, 0]


async def test_no_retry_once_the_budget_is_spent() -> None:
    good = Backend("good", echo, models=("m",))
    async with proxied(
        good, budget=NO_RETRIES, extra_nodes=[("first-dead", refused_address(), ("m",))]
    ) as h:
        response = await h.client.request(
            "POST", f"{h.url}/v1/completions", headers=JSON, body=BODY
        )
        assert response.status == 503
        assert response.headers.get("retry-after") is not None
        assert (await response.json())["error"]["code"] == "no_healthy_upstream"
        assert good.seen == []
        assert h.metric("inferno_proxy_retry_budget_exhausted_total") == 1
        assert h.metric("inferno_proxy_queue_wait_seconds") == 0  # refused: no waiting either


async def test_every_node_unreachable_without_waiting_is_503_with_retry_after() -> None:
    """queue_timeout 0: no waiting for a node to come back (tests/proxy/test_forward_queue.py
    has the waiting)."""
    async with proxied(
        settings=ForwardSettings(queue_timeout=0.0),
        extra_nodes=[
            ("first-a", refused_address(), ("m",)),
            ("first-b", refused_address(), ("m",)),
        ],
    ) as h:
        response = await h.client.request(
            "POST", f"{h.url}/v1/completions", headers=JSON, body=BODY
        )
        assert response.status == 503
        assert response.headers.get("retry-after") == "1"
        assert "cannot reach first-b" in (await response.json())["error"]["message"]
        assert h.metric("inferno_proxy_retries_total", reason="connect") == 1


@pytest.mark.parametrize(
    ("first_byte", "idle"),
    [(0.2, 30.0), (0.2, 0.2)],  # bounded by a cancel scope; by the client's read timeout
)
async def test_no_first_byte_in_time_is_504(first_byte: float, idle: float) -> None:
    slow = Backend("slow", slow_head, models=("m",))
    good = Backend("good", echo, models=("m",))
    settings = ForwardSettings(first_byte_timeout=first_byte, idle_timeout=idle)
    async with proxied(slow, good, settings=settings) as h:
        response = await h.client.request(
            "POST", f"{h.url}/v1/completions", headers=JSON, body=BODY
        )
        slow.gate(0).set()
        assert response.status == 504
        assert (await response.json())["error"]["code"] == "upstream_timeout"
        assert good.seen == []  # the node may be working on it: not sent twice
        node = h.pool.get("slow")
        assert node is not None
        assert node.health.consecutive_failures == 1
        assert node.in_flight == 0


@pytest.mark.parametrize("idle", [1.0, 30.0])
async def test_head_and_first_chunk_share_one_first_byte_deadline(idle: float) -> None:
    """Each gap is shorter than every timeout; together they pass first_byte_timeout
    (the client's read timeout alone, a limit per receive, would let them through)."""
    slow = Backend("slow", spaced_start(0.6), models=("m",))
    settings = ForwardSettings(first_byte_timeout=1.0, idle_timeout=idle)
    async with proxied(slow, settings=settings) as h:
        got = await collect(h.client, "POST", f"{h.url}/v1/completions", headers=JSON, body=BODY)
        assert got.status == 504
        error = json.loads(got.body)["error"]
        assert error["code"] == "upstream_timeout"
        assert "head and first chunk" in error["message"]
        node = h.pool.get("slow")
        assert node is not None
        assert node.health.consecutive_failures == 1  # a timeout counts against the node
        assert node.in_flight == 0
        assert h.metric("inferno_proxy_upstream_failures_total", reason="timeout") == 1


@pytest.mark.parametrize(
    ("first_byte", "idle"),
    [(30.0, 0.2), (0.2, 0.2)],  # bounded by a cancel scope per chunk; by the client's read
)
async def test_a_stream_idle_too_long_is_cut_and_counts_against_the_node(
    first_byte: float, idle: float
) -> None:
    stalling = Backend("stalling", stall_after_first, models=("m",))
    settings = ForwardSettings(first_byte_timeout=first_byte, idle_timeout=idle)
    async with proxied(stalling, settings=settings) as h:
        got = await collect(h.client, "POST", f"{h.url}/v1/completions", headers=JSON, body=BODY)
        assert got.status == 200
        assert got.body == b'data: {"chunk": 1}\n\n'
        assert isinstance(got.error, RemoteProtocolError)  # the body was cut short
        node = h.pool.get("stalling")
        assert node is not None
        assert node.in_flight == 0
        assert node.health.consecutive_failures == 1
        stats = h.app.client.pool_stats()
        assert stats.opened == 1
        assert stats.connections == 0  # its connection was closed: the node is told


async def test_a_long_stream_is_never_cut_while_it_keeps_flowing() -> None:
    """Idle timeout far below the stream's length: only silence counts."""
    flowing = Backend("flowing", ticker, models=("m",))
    flowing.gate(0).set()
    settings = ForwardSettings(first_byte_timeout=5.0, idle_timeout=0.5)
    async with proxied(flowing, settings=settings) as h:
        received = b""
        with anyio.fail_after(IO_TIMEOUT):
            async with h.client.stream(
                "POST", f"{h.url}/v1/completions", headers=JSON, body=BODY
            ) as response:
                async for chunk in response.iter_bytes():
                    received += chunk
                    if received.count(b"data:") >= 200:  # well past idle_timeout in ticks
                        break
        assert received.count(b"data:") >= 200


async def test_a_client_that_leaves_mid_stream_stops_the_node() -> None:
    generating = Backend("generating", ticker, models=("m",))
    generating.gate(0).set()
    async with proxied(generating) as h, await anyio.connect_tcp("127.0.0.1", h.info.port) as s:
        await s.send(
            b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(BODY), BODY)
        )
        received = b""
        with anyio.fail_after(IO_TIMEOUT):
            while b"data:" not in received:
                received += await s.receive()
        assert received.startswith(b"HTTP/1.1 200")
        await s.aclose()
        with anyio.fail_after(IO_TIMEOUT):
            await generating.disconnected.wait()
        assert h.in_flight("generating") == 0
        assert h.app.in_flight() == 0
        node = h.pool.get("generating")
        assert node is not None
        assert node.health.state is HealthState.HEALTHY  # a client leaving says nothing


async def test_a_client_gone_before_the_head_still_frees_the_node() -> None:
    """A reset before the response: the server cancels the handler or closes the
    body unsent, and either gives the lease and the upstream connection back."""
    generating = Backend("generating", ticker, models=("m",))
    async with proxied(generating) as h:
        raw = socket.create_connection(("127.0.0.1", h.info.port))
        raw.sendall(
            b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(BODY), BODY)
        )
        with anyio.fail_after(IO_TIMEOUT):
            await generating.arrived.wait()
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        raw.close()  # a reset, at once
        generating.gate(0).set()
        with anyio.fail_after(IO_TIMEOUT):
            while h.in_flight("generating"):  # noqa: ASYNC110  # it unwinds on its own
                await anyio.sleep(0.005)
            await generating.disconnected.wait()
        assert h.app.in_flight() == 0
