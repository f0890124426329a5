"""The health checkers against real nodes on loopback sockets.

Every node here is a real server: :func:`inferno.http.server.serve` with a
handler whose answers a test chooses (valid vitals, ``ready: false``, invalid
vitals, 500, never answering...), or a raw anyio listener for what no HTTP
server would do (accept and stay silent, accept and hang up).  A refused port
is a socket bound but not listening, held for the test, so no other process
can take the port meanwhile.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
import pytest
from inferno_health.checkers import (
    MAX_REASON_CHARS,
    MAX_VITALS_BYTES,
    CheckResult,
    CheckTarget,
    HealthChecker,
    HTTPChecker,
    TCPChecker,
    VitalsChecker,
    describe_failure,
    judge_vitals,
    validate_path,
)

from inferno.errors import HTTPError
from inferno.http.client import HTTPClient
from inferno.http.client_errors import ConnectError, ConnectTimeout, ReadError
from inferno.http.server import Request, Response, serve
from inferno.protocol import NodeVitals

if sys.version_info >= (3, 11):
    _ExceptionGroup = ExceptionGroup  # noqa: F821  # builtin from 3.11
else:  # anyio depends on the backport there
    from exceptiongroup import (  # type: ignore[import-not-found,unused-ignore]
        ExceptionGroup as _ExceptionGroup,
    )

pytestmark = pytest.mark.anyio

#: Long enough that a loopback check never hits it by accident; the slow
#: nodes never answer, so tests that expect a timeout wait exactly this long.
TIMEOUT = 0.5

VITALS: dict[str, Any] = {
    "ready": True,
    "requests_in_progress": 3,
    "requests_queued": 1,
    "cpu_usage": 0.25,
    "memory_usage": 0.5,
    "gpu_usage": None,
    "uptime_seconds": 12.5,
    "version": "0.1.0",
    "models": ["tiny"],
}


@dataclass
class Node:
    """A test node: what its /metrics and /health answer, and what it saw."""

    metrics: str = "valid"  # valid | not_ready | invalid | error | slow | notjson | nested | huge
    health_status: int = 200
    seen: list[Request] = field(default_factory=list)
    clients: list[tuple[str, int] | None] = field(default_factory=list)

    async def handle(self, request: Request) -> Response:
        self.seen.append(request)
        self.clients.append(request.client)
        if request.path == "/metrics":
            return await self._metrics()
        if request.path in ("/health", "/ready"):
            return Response.json({"status": "x"}, status=self.health_status)
        raise HTTPError(404, f"no route {request.path}")

    async def _metrics(self) -> Response:
        mode = self.metrics
        if mode == "slow":
            await anyio.sleep_forever()
        if mode == "error":
            raise HTTPError(500, "engine exploded")
        if mode == "notjson":
            return Response.text("ready: yes")
        if mode == "nested":
            return Response(200, [("content-type", "application/json")], b"[" * 100_000)
        if mode == "huge":
            return Response.json({**VITALS, "padding": "x" * (MAX_VITALS_BYTES + 1)})
        document = dict(VITALS)
        if mode == "not_ready":
            document["ready"] = False
        elif mode == "invalid":
            document["cpu_usage"] = "very high"
        elif mode == "long_problem":
            document["models"] = ["m" * 250, "m" * 250]  # the duplicate's name is in the problem
        return Response.json(document)


@contextlib.asynccontextmanager
async def running(
    node: Node, host: str = "127.0.0.1", ops_node: Node | None = None
) -> AsyncIterator[CheckTarget]:
    """Serve ``node`` on a service and an operations port (``ops_node`` there if given)."""
    ops_handler = (ops_node or node).handle
    async with anyio.create_task_group() as tg:
        service = await tg.start(functools.partial(serve, node.handle, host=host))
        ops = await tg.start(functools.partial(serve, ops_handler, host=host))
        yield CheckTarget("node-1", host, service.port, ops.port)
        tg.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def raw_listener(on_connect: Any, host: str = "127.0.0.1") -> AsyncIterator[CheckTarget]:
    """A TCP listener running ``on_connect(stream)`` for each connection."""
    listener = await anyio.create_tcp_listener(local_host=host, local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, on_connect)
        yield CheckTarget("raw", host, port, port)
        tg.cancel_scope.cancel()


async def _silent(stream: anyio.abc.SocketStream) -> None:
    async with stream:
        await anyio.sleep_forever()


async def _hang_up(stream: anyio.abc.SocketStream) -> None:
    with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
        await stream.receive()  # the request arrived: now close without answering
    await stream.aclose()


@pytest.fixture
def refused_target() -> Iterator[CheckTarget]:
    """A port bound but not listening: the kernel answers a SYN with RST."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        yield CheckTarget("gone", "127.0.0.1", port, port)


@pytest.fixture
async def vitals() -> AsyncIterator[VitalsChecker]:
    checker = VitalsChecker()
    yield checker
    await checker.aclose()


# --- vitals -----------------------------------------------------------------------------------


async def test_valid_vitals_pass_with_the_document(vitals: VitalsChecker) -> None:
    node = Node()
    async with running(node) as target:
        result = await vitals.check(target, timeout=TIMEOUT)
    assert result.ok, result.reason
    assert result.ready is True
    assert result.reason is None
    assert result.vitals == NodeVitals.from_json(VITALS)
    assert result.latency >= 0
    [request] = node.seen
    assert request.path == "/metrics"
    assert request.headers.get("accept") == "application/json"


async def test_ready_false_is_alive_but_out_of_rotation(vitals: VitalsChecker) -> None:
    async with running(Node(metrics="not_ready")) as target:
        result = await vitals.check(target, timeout=TIMEOUT)
    assert (result.ok, result.ready, result.reason) == (True, False, "ready=false")
    assert result.vitals is not None
    assert result.vitals.ready is False


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("invalid", "invalid vitals: field cpu_usage: expected a number from 0 to 1, got string"),
        ("error", "HTTP 500"),
        ("notjson", "invalid vitals: not JSON (Expecting value)"),
        ("nested", "invalid vitals: not JSON (RecursionError)"),
        ("huge", f"invalid vitals: document over {MAX_VITALS_BYTES} bytes"),
    ],
)
async def test_bad_answers_fail_with_a_short_reason(
    vitals: VitalsChecker, mode: str, reason: str
) -> None:
    async with running(Node(metrics=mode)) as target:
        result = await vitals.check(target, timeout=TIMEOUT)
    assert (result.ok, result.reason, result.ready, result.vitals) == (False, reason, None, None)


async def test_a_long_reason_is_clipped(vitals: VitalsChecker) -> None:
    async with running(Node(metrics="long_problem")) as target:
        result = await vitals.check(target, timeout=TIMEOUT)
    assert not result.ok
    assert result.reason is not None
    assert result.reason.startswith("invalid vitals: field models[1]: duplicate")
    assert len(result.reason) == MAX_REASON_CHARS
    assert result.reason.endswith("...")


async def test_a_slow_node_times_out_and_the_checker_recovers(vitals: VitalsChecker) -> None:
    node = Node(metrics="slow")
    async with running(node) as target:
        slow = await vitals.check(target, timeout=TIMEOUT)
        node.metrics = "valid"
        again = await vitals.check(target, timeout=TIMEOUT)
    assert (slow.ok, slow.reason) == (False, f"timeout after {TIMEOUT:g}s")
    assert again.ok, again.reason


async def test_checks_reuse_one_connection(vitals: VitalsChecker) -> None:
    node = Node()
    async with running(node) as target:
        for _ in range(3):
            assert (await vitals.check(target, timeout=TIMEOUT)).ok
    assert len(node.clients) == 3
    assert len(set(node.clients)) == 1, "each check opened a new connection"


async def test_a_node_without_metrics_port_fails(vitals: VitalsChecker) -> None:
    async with running(Node()) as target:
        result = await vitals.check(
            CheckTarget(target.node_id, target.host, target.port, None), timeout=TIMEOUT
        )
    assert (result.ok, result.reason) == (False, "no metrics port")


# --- failures below HTTP, for both HTTP checkers -------------------------------------------


@pytest.fixture(params=["vitals", "http"])
async def http_like(request: pytest.FixtureRequest) -> AsyncIterator[HealthChecker]:
    checker: HealthChecker = VitalsChecker() if request.param == "vitals" else HTTPChecker()
    yield checker
    await checker.aclose()


async def test_refused_port(http_like: HealthChecker, refused_target: CheckTarget) -> None:
    result = await http_like.check(refused_target, timeout=TIMEOUT)
    assert (result.ok, result.reason, result.ready) == (False, "connect refused", None)


async def test_silent_listener_times_out(http_like: HealthChecker) -> None:
    async with raw_listener(_silent) as target:
        result = await http_like.check(target, timeout=TIMEOUT)
    assert (result.ok, result.reason) == (False, f"timeout after {TIMEOUT:g}s")


async def test_hang_up_without_response(http_like: HealthChecker) -> None:
    async with raw_listener(_hang_up) as target:
        result = await http_like.check(target, timeout=TIMEOUT)
    assert not result.ok
    assert result.reason is not None
    assert result.reason.startswith("bad HTTP response:")
    assert "without sending a response" in result.reason


@pytest.mark.parametrize("kind", ["vitals", "http"])
async def test_outer_cancellation_propagates(kind: str) -> None:
    """A check cancelled by its caller is cancelled, not turned into a result."""
    checker = VitalsChecker() if kind == "vitals" else HTTPChecker(path="/metrics")
    node = Node(metrics="slow")
    try:
        async with running(node) as target:
            with anyio.move_on_after(0.05) as scope:
                await checker.check(target, timeout=30)
            assert scope.cancelled_caught
            node.metrics = "valid"
            result = await checker.check(target, timeout=TIMEOUT)
    finally:
        await checker.aclose()
    assert result.ok, result.reason


# --- http ---------------------------------------------------------------------------------------


async def test_http_checker_expects_2xx() -> None:
    node = Node()
    checker = HTTPChecker()
    try:
        async with running(node) as target:
            good = await checker.check(target, timeout=TIMEOUT)
            node.health_status = 503
            bad = await checker.check(target, timeout=TIMEOUT)
    finally:
        await checker.aclose()
    assert (good.ok, good.reason, good.ready, good.vitals) == (True, None, None, None)
    assert (bad.ok, bad.reason) == (False, "HTTP 503")
    assert [r.target for r in node.seen] == ["/health", "/health"]


async def test_http_checker_path_and_metrics_port() -> None:
    node, ops_node = Node(), Node()
    checker = HTTPChecker(path="/ready?full=1", port="metrics")
    try:
        async with running(node, ops_node=ops_node) as target:
            result = await checker.check(target, timeout=TIMEOUT)
            no_ops = await checker.check(
                CheckTarget("n", target.host, target.port, None), timeout=TIMEOUT
            )
    finally:
        await checker.aclose()
    assert result.ok, result.reason
    [request] = ops_node.seen
    assert request.target == "/ready?full=1"
    assert node.seen == []
    assert (no_ops.ok, no_ops.reason) == (False, "no metrics port")


@pytest.mark.parametrize("path", ["health", "/a b", "/x#y", "/\u00e9", ""])
def test_http_checker_refuses_bad_paths(path: str) -> None:
    with pytest.raises(ValueError, match="path"):
        validate_path(path)


async def test_http_checker_refuses_unknown_port_choice() -> None:
    with pytest.raises(ValueError, match="'service' or 'metrics'"):
        HTTPChecker(port="admin")  # type: ignore[arg-type]


async def test_ipv6_target() -> None:
    try:
        probe = socket.socket(socket.AF_INET6)
        probe.bind(("::1", 0))
        probe.close()
    except OSError:
        pytest.skip("no IPv6 loopback")
    checker = HTTPChecker()
    try:
        async with running(Node(), host="::1") as target:
            result = await checker.check(target, timeout=TIMEOUT)
    finally:
        await checker.aclose()
    assert result.ok, result.reason


# --- tcp ----------------------------------------------------------------------------------------


async def test_tcp_checker(refused_target: CheckTarget) -> None:
    checker = TCPChecker()
    async with raw_listener(_silent) as target:
        up = await checker.check(target, timeout=TIMEOUT)
    down = await checker.check(refused_target, timeout=TIMEOUT)
    await checker.aclose()
    assert (up.ok, up.reason, up.ready) == (True, None, None)
    assert (down.ok, down.reason) == (False, "connect refused")


# --- many nodes at once -------------------------------------------------------------------------


async def test_fifty_nodes_are_checked_concurrently(vitals: VitalsChecker) -> None:
    """Half the nodes never answer: checked one after another, that would take 25 timeouts."""
    nodes = [Node(metrics="slow" if i % 2 else "valid") for i in range(50)]
    results: dict[int, CheckResult] = {}
    async with contextlib.AsyncExitStack() as stack:
        targets = [await stack.enter_async_context(running(node)) for node in nodes]

        async def check(index: int) -> None:
            results[index] = await vitals.check(targets[index], timeout=TIMEOUT)

        with anyio.fail_after(TIMEOUT * 2):
            async with anyio.create_task_group() as tg:
                for index in range(len(targets)):
                    tg.start_soon(check, index)
    assert len(results) == 50
    for index, result in results.items():
        if index % 2:
            assert (result.ok, result.reason) == (False, f"timeout after {TIMEOUT:g}s")
        else:
            assert result.ok, result.reason


# --- the checker's own contract ----------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf")])
async def test_bad_timeouts_are_the_callers_mistake(
    vitals: VitalsChecker, bad: float, refused_target: CheckTarget
) -> None:
    with pytest.raises(ValueError, match="timeout"):
        await vitals.check(refused_target, timeout=bad)


async def test_a_shared_client_stays_open() -> None:
    node = Node()
    async with HTTPClient() as client, running(node) as target:
        checker = VitalsChecker(client=client)
        assert (await checker.check(target, timeout=TIMEOUT)).ok
        await checker.aclose()
        response = await client.request("GET", f"http://127.0.0.1:{target.port}/health")
        assert response.status == 200


def test_checkers_implement_the_protocol() -> None:
    for checker in (VitalsChecker(), HTTPChecker(), TCPChecker()):
        assert isinstance(checker, HealthChecker)
    assert (VitalsChecker.name, HTTPChecker.name, TCPChecker.name) == ("vitals", "http", "tcp")


# --- the pure parts -----------------------------------------------------------------------------


def test_judge_vitals_table() -> None:
    body = json.dumps(VITALS).encode()
    assert judge_vitals(200, body).ok
    assert judge_vitals(204, body).ok
    assert judge_vitals(301, body).reason == "HTTP 301"
    assert (
        judge_vitals(200, b"[]").reason
        == "invalid vitals: field body: expected a JSON object, got array"
    )
    assert judge_vitals(200, b"\xff").reason == "invalid vitals: not JSON (UnicodeDecodeError)"
    missing = {k: v for k, v in VITALS.items() if k != "version"}
    assert judge_vitals(200, json.dumps(missing).encode()).reason == (
        "invalid vitals: field version: is required"
    )


def _refused() -> ConnectionRefusedError:
    return ConnectionRefusedError(errno.ECONNREFUSED, "Connect call failed")


def _caused(exc: BaseException, cause: BaseException) -> BaseException:
    exc.__cause__ = cause
    return exc


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (_caused(ConnectError("x"), _refused()), "connect refused"),
        (
            _caused(OSError("All connection attempts failed"), _ExceptionGroup("", [_refused()])),
            "connect refused",
        ),
        (_caused(ConnectError("x"), socket.gaierror(-2, "Name unknown")), "cannot resolve host"),
        (
            _caused(ConnectError("x"), OSError(errno.EHOSTUNREACH, "No route")),
            "host unreachable",
        ),
        (ConnectError("x"), "connect failed"),
        (ConnectTimeout("x"), "timeout after 2s"),
        (ReadError("x"), "connection lost"),
        (OSError(errno.EACCES, "Permission denied"), "connect failed: Permission denied"),
    ],
)
def test_describe_failure(exc: BaseException, reason: str) -> None:
    assert describe_failure(exc, 2.0) == reason
