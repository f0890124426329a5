"""The service port's request path: admit, route, forward, retry, stream back.

One :class:`ServiceApp` serves every client request of a proxy process::

    app = ServiceApp(pool, policy, client, RetryBudget(), ForwardSettings(), registry,
                     api_keys=ApiKeys.from_file(path), rate_limits=RateLimits.build(per_ip=50))
    await serve(app.handle, port=8080, limits=...)
    ...
    app.pool_changed()   # after every change the control plane makes to the pool

A request goes through, in order: the per-IP rate limit, the API key and its
rate limit (:mod:`~inferno_proxy.auth`); ``GET /v1/models`` is answered here,
WebSocket upgrades go to :mod:`~inferno_proxy.wsrelay`; any other request has
its body buffered (so it can be sent again) and, when it is JSON, read for
``model`` and the affinity key.  An unknown model is 404.  The routing policy
picks a node among :meth:`Pool.eligible <inferno_proxy.pool.Pool.eligible>`;
with none, the request waits in the model's queue (:mod:`~inferno_proxy.waitqueue`).

**Attempts.**  The request goes to the node through the pooled HTTP client.
Until the first byte goes to the client, a connect failure, a reset, a
broken response, or a 502, 503 or 429 from the node sends it to another
node: at most ``max_attempts`` nodes, each retry paid from the
:class:`~inferno_proxy.budget.RetryBudget`.  "Until the first byte goes out"
includes the first body chunk: the response head is held back until the
first chunk (or, for a small response with a ``Content-Length``, the whole
body) has arrived, so a node that dies between its head and its first token
(vLLM sends the head at once) costs the client nothing.  Once a byte went
out, nothing is retried: a failure ends the client's response early (the
connection closes, so a chunked body is visibly truncated).

**Timeouts** are per phase, never a total: ``connect_timeout``, then
``first_byte_timeout`` until the first body chunk, then ``idle_timeout``
between chunks, so a long generation that keeps streaming is never cut.

**Streaming.**  Each chunk from the node is handed to the server as it
arrives (SSE is never buffered).  A client that goes away makes the server's
next write fail; the server then closes the body, which closes the upstream
connection, and the node sees its client gone and stops generating.

**Outcomes** go to the pool (:meth:`Pool.finish <inferno_proxy.pool.Pool.finish>`):
connect failures, resets and timeouts are transport failures (health and
circuit), 5xx answers server errors (circuit), 4xx, 429 and 503 backpressure
and clients that left are neutral.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import unquote

import anyio

from inferno.errors import HTTPError
from inferno.http import Request, Response
from inferno.http._messages import DEFAULT_MAX_MESSAGE_BYTES
from inferno.http.client import ClientResponse, HTTPClient, Timeouts
from inferno.http.client_errors import (
    ClientError,
    ClientTimeout,
    ConnectError,
    PoolTimeout,
    ReadError,
    RemoteProtocolError,
    WriteError,
)
from inferno.metrics import Registry
from inferno_proxy.auth import ApiKeys, RateLimits
from inferno_proxy.budget import RetryBudget, retry_after_header
from inferno_proxy.nodes import Lease, Node, NodeChange, Outcome
from inferno_proxy.policies import RoutingPolicy, affinity_key
from inferno_proxy.pool import Pool
from inferno_proxy.proxyheaders import HeaderRules
from inferno_proxy.servicemetrics import RouteMetrics, ServiceMetrics
from inferno_proxy.waitqueue import WaitQueue

__all__ = ["DEFAULT_SECURITY_HEADERS", "ForwardSettings", "ServiceApp"]

logger = logging.getLogger("inferno.proxy")

#: Added to every response (``security_headers``): no MIME sniffing, no framing, no referrer.
DEFAULT_SECURITY_HEADERS: Final = (
    ("x-content-type-options", "nosniff"),
    ("x-frame-options", "DENY"),
    ("referrer-policy", "no-referrer"),
)
RETRY_STATUSES: Final = frozenset({429, 502, 503})  # the node refused or failed before answering
FAILED_RETRY_AFTER: Final = 1.0  # seconds, Retry-After of a 503 when every node tried failed
_JSON_SNIFF_BYTES: Final = 64  # leading bytes looked at to guess JSON without a Content-Type
# Routes counted by name; any other path counts as "other" (paths are unbounded).
_ROUTES: Final = frozenset(
    {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/models",
        "/v1/responses",
        "/v1/ws",
        "/health",
    }
)


@dataclass(frozen=True, slots=True)
class ForwardSettings:
    """How the service port forwards requests.

    :ivar connect_timeout: seconds to connect to a node (then another is tried).
    :ivar first_byte_timeout: seconds from sending a request to its first
        body chunk (its head and, for streams, the first token): 504 when passed.
    :ivar idle_timeout: longest silence, in seconds, between two chunks of a
        response; it ends the client's response early.  Never a total cap.
    :ivar max_attempts: nodes tried at most for one request (1: no retries).
    :ivar queue_timeout: seconds a request waits for a node when none is
        available, then 503 (0: no waiting).
    :ivar max_queue: requests that may wait per model; beyond it, 429.
    :ivar security_headers: ``(name, value)`` pairs set on every response
        (replacing a node's own).
    :ivar trust_forwarded_headers: whether a trusted proxy stands in front
        of this one: its ``X-Forwarded-For`` (last entry: the client) and
        ``X-Forwarded-Proto`` are believed and extended.  Otherwise a client's
        own are replaced, so it cannot spoof its address.
    :ivar affinity_prefix_chars: prompt characters the affinity key hashes.
    :ivar max_body_bytes: largest request body (413 beyond); bodies are
        buffered so a request can be sent to another node.
    :ivar max_buffered_response_bytes: a response announcing a
        ``Content-Length`` up to this is read whole before it is answered,
        so it can still be retried if it breaks.
    :ivar max_websocket_message_bytes: largest WebSocket message relayed.
    :raises ValueError: on an out-of-range value.
    """

    connect_timeout: float = 5.0
    first_byte_timeout: float = 60.0
    idle_timeout: float = 60.0
    max_attempts: int = 3
    queue_timeout: float = 30.0
    max_queue: int = 256
    security_headers: tuple[tuple[str, str], ...] = DEFAULT_SECURITY_HEADERS
    trust_forwarded_headers: bool = False
    affinity_prefix_chars: int = 512
    max_body_bytes: int = 8 * 1024 * 1024
    max_buffered_response_bytes: int = 256 * 1024
    max_websocket_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES

    def __post_init__(self) -> None:
        for name in ("connect_timeout", "first_byte_timeout", "idle_timeout"):
            if not getattr(self, name) > 0.0:
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)!r}")
        if not self.queue_timeout >= 0.0:
            raise ValueError(f"queue_timeout must be >= 0 seconds, got {self.queue_timeout!r}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts!r}")
        for name in ("max_queue", "max_buffered_response_bytes", "affinity_prefix_chars"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("max_body_bytes", "max_websocket_message_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")


class Exchange:
    """One client request on its way through the proxy (what every step needs)."""

    __slots__ = ("client_ip", "model", "request", "request_id", "route", "started")

    def __init__(self, request: Request, started: float, client_ip: str, request_id: bytes):
        self.request = request
        self.started = started
        self.client_ip = client_ip
        self.request_id = request_id
        path = request.path
        self.route = path if path in _ROUTES else "other"
        self.model = ""  # the metrics label: a model the pool knows, "unknown", or ""

    @property
    def target(self) -> str:
        """The request-target to send upstream (origin form)."""
        request = self.request
        if request.target.startswith("/"):
            return request.target
        return request.path + ("?" + request.query if request.query else "")


@dataclass(slots=True)
class _Failed:
    """An attempt that failed before any byte went to the client."""

    status: int  # what the client gets if no other node is tried
    message: str
    code: str
    retryable: bool
    reason: str  # metrics label
    opened: _Opened | None = None  # an upstream answer (429/502/503) to pass on instead

    def error(self) -> HTTPError:
        headers = [("retry-after", retry_after_header(FAILED_RETRY_AFTER))]
        return HTTPError(
            self.status, self.message, code=self.code, headers=headers if self.status == 503 else []
        )


@dataclass(slots=True)
class _Opened:
    """An upstream response whose head (and first chunk, or whole body) arrived."""

    cm: Any  # the client's stream context, closed through close_stream()
    response: ClientResponse
    lease: Lease
    first: bytes | None = None  # the first body chunk, still to be relayed
    whole: bytes | None = None  # the whole body, when read before answering


class ServiceApp:
    """The handler of the service port (:meth:`handle`) and its per-process state.

    :param pool: the node pool the control plane maintains.
    :param policy: the routing policy (``--policy``).
    :param client: the pooled HTTP client to the nodes (owned by the caller,
        who closes it; give it a ``max_connections_per_origin`` above the
        concurrency of one node).
    :param budget: the retry budget.
    :param settings: forwarding settings; :meth:`reconfigure` replaces them.
    :param metrics: the role's registry; the ``inferno_proxy_*`` request
        metrics are registered in it (once per registry).
    :param api_keys: accepted client keys, or ``None`` for an open service port.
    :param rate_limits: per-key and per-IP request rates, or ``None``.
    :param clock: monotonic seconds, the pool's time base.
    :param on_pool_changes: called with the :class:`~inferno_proxy.nodes.NodeChange`
        records that live traffic caused (a circuit opening, a node unstalling,
        a drained node removed), for the control plane to log and share.

    ``api_keys`` and ``rate_limits`` are plain attributes: assign new ones to reload.
    """

    def __init__(
        self,
        pool: Pool,
        policy: RoutingPolicy,
        client: HTTPClient,
        budget: RetryBudget,
        settings: ForwardSettings,
        metrics: Registry,
        *,
        api_keys: ApiKeys | None = None,
        rate_limits: RateLimits | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_pool_changes: Callable[[tuple[NodeChange, ...]], None] | None = None,
    ) -> None:
        self.pool = pool
        self.policy = policy
        self.client = client
        self.budget = budget
        self.api_keys = api_keys
        self.rate_limits = rate_limits
        self.clock = clock
        self.on_pool_changes = on_pool_changes
        self.queue = WaitQueue(settings.max_queue)
        self.metrics = ServiceMetrics(metrics, pool, self.queue)
        self.created = int(time.time())  # the "created" of /v1/models entries
        self._in_flight = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self.reconfigure(settings)
        self.metrics.sync_nodes()

    def reconfigure(self, settings: ForwardSettings) -> None:
        """Apply new settings (a reload); requests in flight keep their timeouts."""
        self.settings = settings
        self.queue.max_per_model = settings.max_queue
        self.headers = HeaderRules(settings.security_headers, settings.trust_forwarded_headers)
        first_byte, idle = settings.first_byte_timeout, settings.idle_timeout
        # The client has one read timeout per request; give it the longer phase
        # and bound the shorter one with a cancel scope (none when they match).
        read = max(first_byte, idle)
        self.timeouts = Timeouts(
            connect=settings.connect_timeout, read=read, write=idle, pool=settings.connect_timeout
        )
        self.first_byte_limit: float | None = first_byte if first_byte < read else None
        self.chunk_limit: float | None = idle if idle < read else None
        # Affinity keys cost a prompt scan; only policies that use them get them.
        self.wants_key = bool(getattr(self.policy, "uses_key", self.policy.name == "affinity"))

    def in_flight(self) -> int:
        """Requests being served now, responses still streaming included
        (established WebSocket sessions are not counted)."""
        return self._in_flight

    def pool_changed(self) -> None:
        """The pool changed (registration, check, circuit, removal): wake waiting
        requests and follow the node set in the metrics.  Call from the event loop."""
        self.queue.wake()
        self.metrics.sync_nodes()

    def note_changes(self, changes: tuple[NodeChange, ...]) -> None:
        """Changes live traffic made to the pool: report them and wake waiters."""
        if self.on_pool_changes is not None:
            try:
                self.on_pool_changes(changes)
            except Exception:
                logger.exception("on_pool_changes callback failed")
        self.pool_changed()

    # --- the handler --------------------------------------------------------------------

    async def handle(self, request: Request) -> Response:
        """Answer one client request (the service port's :data:`~inferno.http.Handler`)."""
        started = self.clock()
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        request_id = self.headers.request_id(request.headers.get("x-request-id"))
        exchange = Exchange(request, started, self.headers.client_ip(request), request_id)
        self._in_flight += 1
        streaming = False
        try:
            try:
                response = await self._route(exchange)
            except HTTPError as exc:
                response = self.headers.decorate(Response.error(exc), request_id)
            except Exception:
                logger.exception("request %s failed", request_id.decode("latin-1"))
                error = HTTPError(500, "internal error in the proxy", code="internal_error")
                response = self.headers.decorate(Response.error(error), request_id)
            streaming = type(response.body) is Relay
        finally:
            if not streaming:
                self._in_flight -= 1
        route = self.metrics.route(exchange.route)
        now = self.clock()
        route.first_byte.observe(now - started)
        if not streaming:
            route.duration.observe(now - started)
        self.metrics.requests.labels(exchange.route, str(response.status), exchange.model).inc()
        return response

    async def _route(self, exchange: Exchange) -> Response:
        request = exchange.request
        limits = self.rate_limits
        if limits is not None and limits.per_ip is not None:
            limits.check_ip(exchange.client_ip, self.clock())
        if self.api_keys is not None:
            name = self.api_keys.require(request.headers.get("authorization"))
            if limits is not None:
                limits.check_key(name, self.clock())
        path = request.path
        if (path == "/v1/models" or path.startswith("/v1/models/")) and request.method in (
            "GET",
            "HEAD",
        ):
            return self._models(exchange)
        if request.is_websocket_upgrade():
            from inferno_proxy.wsrelay import open_relay

            return await open_relay(self, exchange)
        body = await self._read_body(request)
        model, key = self._inspect(request, body)
        if model is not None:
            if not self.pool.serves(model):
                exchange.model = "unknown"
                raise HTTPError(
                    404,
                    f"the model {model!r} does not exist or no node serves it",
                    type_="invalid_request_error",
                    code="model_not_found",
                )
            exchange.model = model
        return await self._forward(exchange, body, model, key)

    def _models(self, exchange: Exchange) -> Response:
        path = exchange.request.path
        models = self.pool.models()
        if path == "/v1/models":
            listing = {"object": "list", "data": [self._model_object(m) for m in models]}
            return self.headers.decorate(Response.json(listing), exchange.request_id)
        name = unquote(path[len("/v1/models/") :])
        if name not in models:
            raise HTTPError(
                404,
                f"the model {name!r} does not exist or no node serves it",
                type_="invalid_request_error",
                code="model_not_found",
            )
        exchange.model = name
        return self.headers.decorate(Response.json(self._model_object(name)), exchange.request_id)

    def _model_object(self, name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "inferno"}

    async def _read_body(self, request: Request) -> bytes | None:
        """The whole request body (``None`` when it has none), within ``max_body_bytes``."""
        headers = request.headers
        length = headers.get("content-length")
        limit = self.settings.max_body_bytes
        if length is None:
            if "transfer-encoding" not in headers:
                return None
            chunks: list[bytes] = []
            size = 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise _too_large(limit)
                chunks.append(chunk)
            return b"".join(chunks)
        if int(length) > limit:  # h11 checked that it is digits
            raise _too_large(limit)
        return await request.read()

    def _inspect(self, request: Request, body: bytes | None) -> tuple[str | None, str | None]:
        """``(model, affinity key)``: JSON is parsed only for a POST that carries JSON."""
        session = request.headers.get("x-session-id") if self.wants_key else None
        if not body or request.method != "POST":
            return None, affinity_key(session, None) if session else None
        content_type = request.headers.get("content-type")
        if content_type is None:
            sniffed = body[:_JSON_SNIFF_BYTES].lstrip()[:1] == b"{"
            if not sniffed:
                return None, affinity_key(session, None) if session else None
        elif "json" not in content_type.lower():
            return None, affinity_key(session, None) if session else None
        try:
            document = json.loads(body)
        except ValueError as exc:  # UnicodeDecodeError included
            if content_type is None:  # only guessed: let the node judge it
                return None, None
            raise HTTPError(
                400, f"request body is not valid JSON: {exc}", code="invalid_json"
            ) from None
        if not isinstance(document, dict):
            return None, None
        model = document.get("model")
        if model is not None and not isinstance(model, str):
            raise HTTPError(400, "'model' must be a string", code="invalid_type")
        if not self.wants_key:
            return model, None
        return model, affinity_key(
            session, document, prefix_chars=self.settings.affinity_prefix_chars
        )

    # --- choosing a node ----------------------------------------------------------------

    def choose(self, model: str | None, key: str | None, exclude: list[str]) -> Node | None:
        """The policy's pick among the nodes eligible for *model*, or ``None``."""
        candidates = self.pool.eligible(model).candidates
        if not candidates:
            return None
        return self.policy.choose(candidates, key=key, now=self.clock(), exclude=exclude)

    async def first_node(self, model: str | None, key: str | None) -> Node:
        """The node for a request's first attempt, waiting in the queue when there is none.

        :raises QueueFull: 429 when the model's queue is full.
        :raises QueueTimeout: 503 when no node came within ``queue_timeout``.
        """
        clock = self.clock
        began = clock()
        node = self.choose(model, key, [])
        self.metrics.selection.observe(clock() - began)
        if node is not None:
            return node
        queued = clock()
        try:
            return await self.queue.wait_for(
                model, lambda: self.choose(model, key, []), self.settings.queue_timeout
            )
        finally:
            self.metrics.queue_wait.observe(clock() - queued)

    def next_node(self, model: str | None, key: str | None, tried: list[str]) -> Node | None:
        """Another node for a retry, if one is left and the budget allows; ``None`` otherwise."""
        if len(tried) >= self.settings.max_attempts:
            return None
        node = self.choose(model, key, tried)
        if node is None:
            return None
        if not self.budget.try_retry(self.clock()):
            self.metrics.budget_exhausted.inc()
            return None
        return node

    def finish(self, lease: Lease, outcome: Outcome, reason: str = "") -> None:
        """Report how a request to a node ended (safe to call twice)."""
        changes = self.pool.finish(lease, outcome, self.clock(), reason)
        if changes:
            self.note_changes(changes)

    # --- forwarding ---------------------------------------------------------------------

    async def _forward(
        self, exchange: Exchange, body: bytes | None, model: str | None, key: str | None
    ) -> Response:
        self.budget.record_request(self.clock())
        node = await self.first_node(model, key)
        headers = self.headers.upstream(exchange, strip_authorization=self.api_keys is not None)
        tried: list[str] = []
        while True:
            tried.append(node.id)
            result = await self._attempt(exchange, node, headers, body)
            if isinstance(result, Response):
                return result
            self.metrics.upstream_failures.labels(result.reason).inc()
            following = self.next_node(model, key, tried) if result.retryable else None
            opened = result.opened
            if following is None:
                if opened is not None:  # the node's own 429/502/503: pass it on
                    return self._respond(exchange, opened)
                raise result.error()
            if opened is not None:
                self.finish(opened.lease, _status_outcome(opened.response.status))
                await close_stream(opened.cm)
            logger.debug(
                "retrying %s on %s after %s from %s",
                exchange.request_id.decode("latin-1"),
                following.id,
                result.reason,
                node.id,
            )
            self.metrics.retries.labels(result.reason).inc()
            node = following

    async def _attempt(
        self, exchange: Exchange, node: Node, headers: list[tuple[bytes, bytes]], body: bytes | None
    ) -> Response | _Failed:
        """One try on one node: a response to relay, or why it failed before any byte went out."""
        lease = self.pool.start(node, self.clock())
        cm = self.client.stream(
            exchange.request.method,
            f"http://{node.address}{exchange.target}",
            headers=headers,
            body=body,
            timeouts=self.timeouts,
        )
        opened: _Opened | None = None
        try:
            limit = self.first_byte_limit
            if limit is None:
                opened = await self._open(cm, lease)
            else:
                with anyio.move_on_after(limit):
                    opened = await self._open(cm, lease)
        except ClientError as exc:
            failed = _failure(exc, node)
            self.finish(lease, _error_outcome(exc), str(exc))
            await close_stream(cm)
            return failed
        except BaseException:
            self.finish(lease, Outcome.NEUTRAL, "request abandoned")
            await close_stream(cm)
            raise
        if opened is None:  # first_byte_limit passed
            self.finish(lease, Outcome.TRANSPORT_FAILURE, "first byte timeout")
            await close_stream(cm)
            return _first_byte_timeout(node, self.settings.first_byte_timeout)
        status = opened.response.status
        if status in RETRY_STATUSES:
            return _Failed(
                status,
                f"{node.id} answered {status}",
                "upstream_unavailable",
                retryable=True,
                reason=f"status_{status}",
                opened=opened,
            )
        return self._respond(exchange, opened)

    async def _open(self, cm: Any, lease: Lease) -> _Opened:
        """Send the request; wait for the head and the first chunk (or whole small body)."""
        response: ClientResponse = await cm.__aenter__()
        self._progress(lease)
        opened = _Opened(cm, response, lease)
        if response.status in RETRY_STATUSES:
            return opened  # decided on the status alone
        length = response.headers.get("content-length")
        if (
            length is not None
            and length.isdigit()
            and int(length) <= self.settings.max_buffered_response_bytes
        ):
            opened.whole = await response.read()
            return opened
        try:
            opened.first = await response.iter_bytes().__anext__()
        except StopAsyncIteration:
            opened.whole = b""
            return opened
        self._progress(lease)
        return opened

    def _progress(self, lease: Lease) -> None:
        changes = self.pool.progress(lease, self.clock())
        if changes:
            self.note_changes(changes)

    def _respond(self, exchange: Exchange, opened: _Opened) -> Response:
        """The client's response for an opened upstream answer."""
        upstream = opened.response
        status = upstream.status
        headers = self.headers.downstream(upstream.headers.raw, exchange.request_id)
        if opened.whole is not None:
            self.finish(opened.lease, _status_outcome(status))
            return Response(status, headers, opened.whole)
        relay = Relay(self, exchange, opened, self.metrics.route(exchange.route))
        return Response(status, headers, relay)

    def _abandoned(self, relay: Relay) -> None:
        """A relay was dropped without being closed: release what it holds (see Relay)."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon(relay.abandon)


class Relay:
    """The body of a forwarded response: the node's chunks, each passed on as it arrives.

    The server iterates it and calls :meth:`aclose` when it stops early (the
    client went away, or the server is shutting down).  A server that drops
    the body without either (its head write failed) leaves the finaliser to
    give the lease and the upstream connection back.
    """

    __slots__ = ("_app", "_done", "_exchange", "_iterator", "_opened", "_route")

    def __init__(
        self, app: ServiceApp, exchange: Exchange, opened: _Opened, route: RouteMetrics
    ) -> None:
        self._app = app
        self._exchange = exchange
        self._opened = opened
        self._route = route
        self._iterator = opened.response.iter_bytes()
        self._done = False

    def __aiter__(self) -> Relay:
        return self

    async def __anext__(self) -> bytes:
        opened = self._opened
        first = opened.first
        if first is not None:
            opened.first = None
            return first
        if self._done:
            raise StopAsyncIteration
        app = self._app
        try:
            limit = app.chunk_limit
            if limit is None:
                chunk = await self._iterator.__anext__()
            else:
                chunk = b""
                with anyio.move_on_after(limit) as scope:
                    chunk = await self._iterator.__anext__()
                if scope.cancelled_caught:
                    raise ClientTimeout(f"no chunk for {limit:g} s", request_sent=True)
        except StopAsyncIteration:
            self._end(_status_outcome(opened.response.status))
            raise
        except ClientError as exc:
            node = opened.lease.node
            logger.warning(
                "response %s from %s broke mid-stream: %s",
                self._exchange.request_id.decode("latin-1"),
                node.id,
                exc,
            )
            app.metrics.upstream_failures.labels("mid_stream").inc()
            self._end(Outcome.TRANSPORT_FAILURE, f"mid-stream: {exc}")
            await close_stream(opened.cm)
            raise UpstreamBroke(f"{node.id} broke the response mid-stream: {exc}") from exc
        changes = app.pool.progress(opened.lease, app.clock())
        if changes:
            app.note_changes(changes)
        return chunk

    async def aclose(self) -> None:
        """The server stopped early: the client went away, or shutdown."""
        if not self._done:
            self._end(Outcome.NEUTRAL, "client went away")
        await close_stream(self._opened.cm)

    def _end(self, outcome: Outcome, reason: str = "") -> None:
        if self._done:
            return
        self._done = True
        app = self._app
        app._in_flight -= 1
        app.finish(self._opened.lease, outcome, reason)
        self._route.duration.observe(app.clock() - self._exchange.started)

    def abandon(self) -> None:
        """Release the lease and the connection of a relay nobody will iterate or close."""
        if not self._done:
            self._end(Outcome.NEUTRAL, "response abandoned")
            _run_to_end(self._opened.cm.__aexit__(None, None, None))

    def __del__(self) -> None:
        if not self._done:
            self._app._abandoned(self)


class UpstreamBroke(anyio.BrokenResourceError):
    """Raised from a relayed body when the node failed after the client's response began.

    A subclass of :class:`anyio.BrokenResourceError` because that is what the
    server treats as "this response cannot go on": it closes the connection
    without ending the body, so the client sees it cut short.
    """


async def close_stream(cm: Any) -> None:
    """Close a client stream context, whatever state it is in (shielded: cleanup)."""
    with anyio.CancelScope(shield=True):
        await cm.__aexit__(None, None, None)


def _run_to_end(coroutine: Coroutine[Any, Any, Any]) -> None:
    """Run a coroutine that never suspends (the client's close) outside the event loop's
    scheduling, as a finaliser must; one that would suspend is abandoned."""
    try:
        coroutine.send(None)
    except StopIteration:
        return
    except Exception:
        logger.exception("closing an abandoned upstream response failed")
        return
    coroutine.close()


def _too_large(limit: int) -> HTTPError:
    return HTTPError(413, f"request body is larger than {limit} bytes", code="request_too_large")


def _status_outcome(status: int) -> Outcome:
    """How a node's answer counts for its health: 5xx fail it, 503 is backpressure."""
    if status < 400:
        return Outcome.SUCCESS
    if status < 500 or status == 503:
        return Outcome.NEUTRAL
    return Outcome.SERVER_ERROR


def _error_outcome(exc: ClientError) -> Outcome:
    # A full pool is our own limit, not the node's fault.
    return Outcome.NEUTRAL if isinstance(exc, PoolTimeout) else Outcome.TRANSPORT_FAILURE


def _failure(exc: ClientError, node: Node) -> _Failed:
    """What a client error before the first byte means for the request."""
    if isinstance(exc, (ConnectError, PoolTimeout)):  # nothing was sent: try elsewhere
        return _Failed(
            503, f"cannot reach {node.id}: {exc}", "no_healthy_upstream", True, "connect"
        )
    if isinstance(exc, ClientTimeout):
        return _Failed(504, f"{node.id} timed out: {exc}", "upstream_timeout", False, "timeout")
    if isinstance(exc, (ReadError, WriteError, RemoteProtocolError)):
        return _Failed(502, f"{node.id} failed: {exc}", "bad_gateway", exc.temporary, "reset")
    return _Failed(502, f"cannot forward to {node.id}: {exc}", "bad_gateway", False, "error")


def _first_byte_timeout(node: Node, limit: float) -> _Failed:
    return _Failed(
        504,
        f"{node.id} sent no response within {limit:g} s",
        "upstream_timeout",
        False,
        "timeout",
    )
