"""Test backends for the proxy's data path: real servers on ``inferno.http.serve``.

Each :class:`Backend` is a real HTTP server on 127.0.0.1 that records what it
received (requests, headers, bodies) and whether a client went away while it
was streaming, and answers with one of the behaviours below: an echo, a fixed
status, SSE streams gated by events (so a test controls exactly when each
chunk leaves), a stream that stalls or breaks after its first chunk, a ticker
that streams until its client leaves, a WebSocket echo.

:func:`proxied` runs a :class:`~inferno_proxy.forward.ServiceApp` in front of
some backends, each registered in a real pool, and yields a :class:`Harness`.
"""

from __future__ import annotations

import functools
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
from inferno_health.checkers import HTTPChecker
from inferno_proxy.auth import ApiKeys, RateLimits
from inferno_proxy.budget import RetryBudget
from inferno_proxy.forward import ForwardSettings, ServiceApp
from inferno_proxy.healthloop import ChangeReporter, HealthLoop
from inferno_proxy.nodes import PoolSettings
from inferno_proxy.policies import RoundRobin, RoutingPolicy
from inferno_proxy.pool import Pool

from inferno.http import (
    Headers,
    Request,
    Response,
    ServerInfo,
    WebSocket,
    WebSocketAccept,
    serve,
)
from inferno.http.client import HTTPClient
from inferno.metrics import Registry
from inferno.protocol import NodeVitals, Registration

IO_TIMEOUT = 10.0  # seconds a test waits for something before failing instead of hanging

Behaviour = Callable[["Backend", Request, bytes], Awaitable[Response]]


@dataclass
class Seen:
    """One request as a backend received it."""

    method: str
    target: str
    headers: Headers
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Backend:
    """A test backend: records requests, answers with *behaviour*.

    :ivar gates: events a gated behaviour waits on (``gate(i)`` releases step *i*).
    :ivar disconnected: set when a streamed response's client went away
        (the server closed the body before its end).
    :ivar ws_closes: close codes the WebSocket echo received from clients.
    """

    name: str
    behaviour: Behaviour
    models: tuple[str, ...] = ()
    seen: list[Seen] = field(default_factory=list)
    gates: dict[int, anyio.Event] = field(default_factory=dict)
    disconnected: anyio.Event = field(default_factory=anyio.Event)
    arrived: anyio.Event = field(default_factory=anyio.Event)  # set by the first request
    ws_closes: list[int] = field(default_factory=list)
    ws_closed: anyio.Event = field(default_factory=anyio.Event)  # set with the first close
    port: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def gate(self, step: int) -> anyio.Event:
        """The event step *step* of a gated behaviour waits for (created on first use)."""
        event = self.gates.get(step)
        if event is None:
            event = self.gates[step] = anyio.Event()
        return event

    async def handle(self, request: Request) -> Response:
        body = b"" if request.is_websocket_upgrade() else await request.read()
        self.seen.append(Seen(request.method, request.target, request.headers, body))
        self.arrived.set()
        return await self.behaviour(self, request, body)


# --- behaviours -----------------------------------------------------------------------------


async def echo(backend: Backend, request: Request, body: bytes) -> Response:
    """200 JSON naming the backend, the path and the request's model."""
    model = None
    if body:
        try:
            model = json.loads(body).get("model")
        except ValueError:
            model = None
    return Response.json(
        {"node": backend.name, "path": request.target, "model": model},
        headers=[
            ("connection", "x-backend-hop"),
            ("x-backend-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("x-backend-other", "kept"),
            ("x-content-type-options", "backend-value"),
        ],
    )


def status(code: int, *, retry_after: str | None = None) -> Behaviour:
    """Always answer *code* with an OpenAI-shaped error body."""

    async def answer(backend: Backend, request: Request, body: bytes) -> Response:
        headers = [("retry-after", retry_after)] if retry_after else []
        error = {"error": {"message": f"{backend.name} says {code}", "type": "x", "code": code}}
        return Response.json(error, status=code, headers=headers)

    return answer


def sse_event(index: int) -> bytes:
    return b"data: " + json.dumps({"chunk": index}).encode() + b"\n\n"


class _Stream:
    """A streamed body whose steps a test scripts; records a client going away."""

    def __init__(self, backend: Backend, steps: Callable[[], AsyncIterator[bytes]]) -> None:
        self._backend = backend
        self._iterator = steps()
        self._finished = False

    def __aiter__(self) -> _Stream:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await self._iterator.__anext__()
        except StopAsyncIteration:
            self._finished = True
            raise

    async def aclose(self) -> None:
        if not self._finished:  # the server stopped before the end: its client left
            self._backend.disconnected.set()
        await self._iterator.aclose()  # type: ignore[attr-defined]


def _streaming(
    backend: Backend, steps: Callable[[], AsyncIterator[bytes]], status_code: int = 200
) -> Response:
    return Response(status_code, [("content-type", "text/event-stream")], _Stream(backend, steps))


def gated_sse(count: int) -> Behaviour:
    """SSE: event *i* (1-based) is sent once ``backend.gate(i)`` is set, then ``[DONE]``."""

    async def answer(backend: Backend, request: Request, body: bytes) -> Response:
        async def steps() -> AsyncIterator[bytes]:
            for index in range(1, count + 1):
                await backend.gate(index).wait()
                yield sse_event(index)
            yield b"data: [DONE]\n\n"

        return _streaming(backend, steps)

    return answer


async def stall_after_first(backend: Backend, request: Request, body: bytes) -> Response:
    """Head and one event, then silence until the client goes away."""

    async def steps() -> AsyncIterator[bytes]:
        yield sse_event(1)
        await anyio.sleep_forever()
        yield b""  # pragma: no cover

    return _streaming(backend, steps)


async def break_after_first(backend: Backend, request: Request, body: bytes) -> Response:
    """Head and one event, then the connection closes mid-body."""

    async def steps() -> AsyncIterator[bytes]:
        yield sse_event(1)
        # What the server does with a body that cannot go on: close, no final chunk.
        raise anyio.BrokenResourceError("the backend died")

    return _streaming(backend, steps)


async def break_before_body(backend: Backend, request: Request, body: bytes) -> Response:
    """The head of a stream, then the connection closes before any chunk."""

    async def steps() -> AsyncIterator[bytes]:
        nothing: tuple[bytes, ...] = ()
        for chunk in nothing:  # not one chunk
            yield chunk
        raise anyio.BrokenResourceError("the backend died")

    return _streaming(backend, steps)


TICK = 0.005  # seconds between a ticker's chunks: a generation's pace, not a wait


async def ticker(backend: Backend, request: Request, body: bytes) -> Response:
    """After ``gate(0)`` (set it first for no wait): the head, then an event every
    :data:`TICK` until the client goes away."""
    await backend.gate(0).wait()

    async def steps() -> AsyncIterator[bytes]:
        index = 0
        while True:
            index += 1
            yield sse_event(index)
            await anyio.sleep(TICK)

    return _streaming(backend, steps)


async def slow_head(backend: Backend, request: Request, body: bytes) -> Response:
    """Sends nothing until ``gate(0)`` is set, then echoes; a cancelled wait (its
    client went away) sets ``disconnected``."""
    try:
        await backend.gate(0).wait()
    except anyio.get_cancelled_exc_class():
        backend.disconnected.set()
        raise
    return await echo(backend, request, body)


def spaced_start(gap: float) -> Behaviour:
    """The head after *gap* seconds, the first event *gap* seconds later, then the end:
    a slow prefill and a slow first token, each shorter than a timeout of more than
    *gap*, together longer than one below ``2 * gap``."""

    async def answer(backend: Backend, request: Request, body: bytes) -> Response:
        await anyio.sleep(gap)  # the node's pace, not a wait for readiness

        async def steps() -> AsyncIterator[bytes]:
            await anyio.sleep(gap)
            yield sse_event(1)
            yield b"data: [DONE]\n\n"

        return _streaming(backend, steps)

    return answer


def chat_stream(words: Sequence[str]) -> Behaviour:
    """An OpenAI chat completion stream of *words*, one chunk each, ``[DONE]`` last."""

    async def answer(backend: Backend, request: Request, body: bytes) -> Response:
        model = json.loads(body)["model"]

        def chunk(delta: dict[str, Any], finish: str | None) -> bytes:
            document = {
                "id": "chatcmpl-test",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            return b"data: " + json.dumps(document).encode() + b"\n\n"

        async def steps() -> AsyncIterator[bytes]:
            yield chunk({"role": "assistant", "content": ""}, None)
            for word in words:
                yield chunk({"content": word}, None)
            yield chunk({}, "stop")
            yield b"data: [DONE]\n\n"

        return _streaming(backend, steps)

    return answer


async def ws_echo(backend: Backend, request: Request, body: bytes) -> Response:
    """A WebSocket that echoes every message; ``"close:CODE"`` makes it close with CODE."""

    async def session(websocket: WebSocket) -> None:
        try:
            async for message in websocket:
                if isinstance(message, str) and message.startswith("close:"):
                    await websocket.close(int(message[6:]), "asked to")
                    return
                await websocket.send(message)
        finally:
            if websocket.close_code is not None:
                backend.ws_closes.append(websocket.close_code)
                backend.ws_closed.set()

    offered = request.headers.get("sec-websocket-protocol")
    chosen = offered.split(",")[0].strip() if offered else None
    return WebSocketAccept(session, subprotocol=chosen)


def refused_address() -> str:
    """A loopback address nothing listens on (connecting is refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"127.0.0.1:{port}"


@dataclass
class Collected:
    """A streamed response as a client read it, and how its body ended."""

    status: int
    headers: Headers
    body: bytes
    error: Exception | None  # what cut the body short, if anything


async def collect(client: HTTPClient, method: str, url: str, **options: Any) -> Collected:
    """Stream a response to its end (or its failure), within :data:`IO_TIMEOUT`."""
    body = b""
    with anyio.fail_after(IO_TIMEOUT):
        async with client.stream(method, url, **options) as response:
            try:
                async for chunk in response.iter_bytes():
                    body += chunk
            except Exception as exc:
                return Collected(response.status, response.headers, body, exc)
            return Collected(response.status, response.headers, body, None)


# --- running them ---------------------------------------------------------------------------


@dataclass
class Harness:
    """A proxy in front of test backends, all running."""

    app: ServiceApp
    pool: Pool
    registry: Registry
    info: ServerInfo
    backends: dict[str, Backend]
    client: HTTPClient

    @property
    def url(self) -> str:
        return self.info.url

    def register(self, name: str, address: str, models: tuple[str, ...] = ()) -> None:
        """Register a node (a backend or any address) and tell the app."""
        self.pool.register(
            Registration(
                id=name,
                address=address,
                metrics_port=int(address.rpartition(":")[2]),
                node_type="backend",
                models=models,
            ),
            time.monotonic(),
        )
        self.app.pool_changed()

    def in_flight(self, name: str) -> int:
        node = self.pool.get(name)
        assert node is not None
        return node.in_flight

    def metric(self, name: str, **labels: str) -> float:
        """A counter's value for *labels* (0 when the series does not exist)."""
        family = self.registry.snapshot().get(name)
        if family is None:
            return 0
        for series in family["series"]:
            if all(series["labels"].get(k) == v for k, v in labels.items()):
                return float(series.get("value", series.get("count", 0)))
        return 0


@asynccontextmanager
async def proxied(
    *backends: Backend,
    settings: ForwardSettings | None = None,
    policy: RoutingPolicy | None = None,
    budget: RetryBudget | None = None,
    api_keys: ApiKeys | None = None,
    rate_limits: RateLimits | None = None,
    extra_nodes: Sequence[tuple[str, str, tuple[str, ...]]] = (),
    unregistered: Sequence[Backend] = (),
) -> AsyncIterator[Harness]:
    """Serve *backends* and a proxy in front of them, registered in pool order.

    :param unregistered: backends served too, left for the test to register.
    :param extra_nodes: ``(name, address, models)`` registered after the
        backends (a refused address, say); registered first when the name
        starts with ``"first"``.
    """
    pool = Pool(PoolSettings(slow_start=0.0))
    registry = Registry()
    async with anyio.create_task_group() as tg, HTTPClient() as client:
        for backend in (*backends, *unregistered):
            info: ServerInfo = await tg.start(functools.partial(serve, backend.handle, port=0))
            backend.port = info.port
        app = ServiceApp(
            pool,
            policy or RoundRobin(),
            client,
            budget or RetryBudget(),
            settings or ForwardSettings(),
            registry,
            api_keys=api_keys,
            rate_limits=rate_limits,
        )
        proxy_info: ServerInfo = await tg.start(functools.partial(serve, app.handle, port=0))
        harness = Harness(
            app, pool, registry, proxy_info, {b.name: b for b in backends}, HTTPClient()
        )
        for name, address, models in extra_nodes:
            if name.startswith("first"):
                harness.register(name, address, models)
        for backend in backends:
            harness.register(backend.name, backend.address, backend.models)
        for name, address, models in extra_nodes:
            if not name.startswith("first"):
                harness.register(name, address, models)
        async with harness.client:
            yield harness
        tg.cancel_scope.cancel()


# --- waiting on the proxy, nodes that are down or out -------------------------------------


async def until(condition: Callable[[], bool]) -> None:
    """Wait, bounded, for something the proxy does on its own (no event to wait on)."""
    with anyio.fail_after(IO_TIMEOUT):
        while not condition():  # noqa: ASYNC110
            await anyio.sleep(0.002)


def reserved_port() -> socket.socket:
    """A loopback port bound with ``SO_REUSEPORT`` but not listening: connections are
    refused until a server listens there too (``serve(..., reuse_port=True)``)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@asynccontextmanager
async def health_checks(h: Harness) -> AsyncIterator[None]:
    """Real ``http`` checks of the harness's pool, round after round, telling its app."""
    checker = HTTPChecker()
    reporter = ChangeReporter(h.pool, Registry(), on_change=h.app.pool_changed)
    loop = HealthLoop(h.pool, checker=checker, interval=0.02, timeout=1.0, reporter=reporter)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(loop.run)
            yield
            tg.cancel_scope.cancel()
    finally:
        await checker.aclose()


def not_ready(h: Harness, name: str) -> None:
    vitals = NodeVitals(
        ready=False,
        requests_in_progress=0,
        requests_queued=0,
        cpu_usage=0.0,
        memory_usage=0.0,
        uptime_seconds=1.0,
        version="test",
    )
    h.pool.check_passed(name, time.monotonic(), vitals)
    h.app.pool_changed()
