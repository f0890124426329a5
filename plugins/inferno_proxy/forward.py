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
``model`` and the affinity key.  The routing policy picks a node among
:meth:`Pool.eligible <inferno_proxy.pool.Pool.eligible>`; with none, the
request waits in the model's queue (:mod:`~inferno_proxy.waitqueue`).
:mod:`~inferno_proxy.selection` holds that part, and says when a model
nobody serves is 404 and when it waits ("Unknown models"), and how a request
whose nodes were all unreachable waits for one to come back ("Unreachable
nodes").

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
connection closes, so a chunked body is visibly truncated).  When every node
tried was unreachable and no attempt is left, the request waits for one to
come back (:meth:`~inferno_proxy.selection.NodeSelection.await_return`).

**Timeouts** are per phase, never a total: ``connect_timeout``, then
``first_byte_timeout``, one deadline for the whole start of the response (from
the attempt's start to its head *and* first body chunk, however the node
spaces them), then ``idle_timeout`` between chunks, so a long generation that
keeps streaming is never cut.

**Streaming.**  Each chunk from the node is handed to the server as it
arrives (SSE is never buffered; :mod:`~inferno_proxy.relay`).  A client that
goes away ends its exchange: the server cancels the handler or closes the
body, either of which closes the upstream connection, so the node sees its
client gone and stops generating.

**Headers** follow :mod:`~inferno_proxy.proxyheaders` (hop-by-hop removed,
``X-Forwarded-*`` and ``X-Request-Id``, security headers); request metrics
are in :mod:`~inferno_proxy.servicemetrics`; what is read of a request
(body, model, affinity key) in :mod:`~inferno_proxy.requestinfo`.

**Outcomes** go to the pool (:meth:`Pool.finish <inferno_proxy.pool.Pool.finish>`):
connect failures, resets and timeouts are transport failures (health and
circuit), 5xx answers server errors (circuit), 4xx, 429 and 503 backpressure
and clients that left are neutral.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import unquote

import anyio

from inferno.errors import HTTPError
from inferno.http import (
    ClientError,
    ClientResponse,
    HTTPClient,
    Request,
    Response,
    Timeouts,
)
from inferno.http.websocket import DEFAULT_MAX_MESSAGE_BYTES
from inferno.metrics import Registry
from inferno_proxy.attempts import Failed, error_outcome, first_byte_timeout, judge_failure
from inferno_proxy.auth import ApiKeys, RateLimits
from inferno_proxy.budget import RetryBudget
from inferno_proxy.modelmemory import ModelMemory
from inferno_proxy.nodes import Lease, Node, NodeChange, Outcome
from inferno_proxy.policies import RoutingPolicy
from inferno_proxy.pool import Pool
from inferno_proxy.proxyheaders import HeaderRules
from inferno_proxy.relay import Opened, Relay, close_stream, status_outcome
from inferno_proxy.requestinfo import Exchange, inspect_body, model_not_found, read_body
from inferno_proxy.selection import NodeSelection
from inferno_proxy.servicemetrics import ServiceMetrics
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


@dataclass(frozen=True, slots=True)
class ForwardSettings:
    """How the service port forwards requests.

    :ivar connect_timeout: seconds to connect to a node (then another is tried).
    :ivar first_byte_timeout: seconds from the start of an attempt to the
        node's response head *and* first body chunk (for streams, the first
        token), one deadline for both, connecting included: 504 when passed.
    :ivar idle_timeout: longest silence, in seconds, between two chunks of a
        response; it ends the client's response early.  Never a total cap.
    :ivar max_attempts: nodes tried at most for one request (1: no retries).
    :ivar queue_timeout: seconds a request waits for a node when none is
        available, or for one to come back when every node tried was
        unreachable (counted from its arrival), then 503 (0: no waiting).
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


class ServiceApp(NodeSelection):
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
        self._policy = policy
        self.client = client
        self.budget = budget
        self.api_keys = api_keys
        self.rate_limits = rate_limits
        self.clock = clock
        self.on_pool_changes = on_pool_changes
        self.queue = WaitQueue(settings.max_queue)
        self.metrics = ServiceMetrics(metrics, pool, self.queue)
        self.created = int(time.time())  # the "created" of /v1/models entries
        self.models_seen = ModelMemory()
        self._in_flight = 0
        self.policy = policy
        self.reconfigure(settings)
        self.pool_changed()

    def reconfigure(self, settings: ForwardSettings) -> None:
        """Apply new settings (a reload); requests in flight keep their timeouts."""
        self.settings = settings
        self.queue.max_per_model = settings.max_queue
        self.headers = HeaderRules(settings.security_headers, settings.trust_forwarded_headers)
        first_byte, idle = settings.first_byte_timeout, settings.idle_timeout
        # The client's read timeout bounds each receive (a silence), not a phase:
        # a node sending its head just before it and its first chunk just before
        # it again would pass.  So the start of the response gets one deadline
        # per request (a cancel scope, :meth:`_attempt`), and the read timeout,
        # set to the longer phase, is the between-chunks limit when that is
        # idle_timeout; when idle_timeout is the shorter, each chunk costs a
        # cancel scope instead (:mod:`~inferno_proxy.relay`).
        read = max(first_byte, idle)
        self.timeouts = Timeouts(
            connect=settings.connect_timeout, read=read, write=idle, pool=settings.connect_timeout
        )
        self.first_byte_limit: float = first_byte
        self.chunk_limit: float | None = idle if idle < read else None

    @property
    def policy(self) -> RoutingPolicy:
        """The routing policy; assign another to switch (a reload)."""
        return self._policy

    @policy.setter
    def policy(self, policy: RoutingPolicy) -> None:
        self._policy = policy
        # Affinity keys cost a prompt scan: only policies that use them get them
        # (``affinity``, or any policy with a true ``uses_key`` attribute).
        self.wants_key = bool(getattr(policy, "uses_key", policy.name == "affinity"))

    def in_flight(self) -> int:
        """Requests being served now, responses still streaming included
        (established WebSocket sessions are not counted)."""
        return self._in_flight

    def pool_changed(self) -> None:
        """The pool changed (registration, check, circuit, removal, a node's model
        list): wake waiting requests, follow the node set in the metrics and note the
        models served.  Call from the event loop."""
        served = {model for node in self.pool.backends() for model in node.models}
        self.models_seen.observe(served, self.clock())
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
        settings = self.settings
        body = await read_body(request, settings.max_body_bytes)
        model, key = inspect_body(
            request, body, wants_key=self.wants_key, prefix_chars=settings.affinity_prefix_chars
        )
        if model is not None:
            self.check_model(exchange, model)
        return await self._forward(exchange, body, model, key)

    def _models(self, exchange: Exchange) -> Response:
        """``GET /v1/models`` (the models of the nodes in rotation) and ``/v1/models/{id}``."""
        path = exchange.request.path
        models = self.pool.models()
        if path in ("/v1/models", "/v1/models/"):
            document: dict[str, Any] = {
                "object": "list",
                "data": [self._model_object(m) for m in models],
            }
        else:
            name = unquote(path[len("/v1/models/") :])
            if name not in models:
                raise model_not_found(name)
            exchange.model = name
            document = self._model_object(name)
        return self.headers.decorate(Response.json(document), exchange.request_id)

    def _model_object(self, name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "inferno"}

    def finish(self, lease: Lease, outcome: Outcome, reason: str = "") -> None:
        """Report how a request to a node ended (safe to call twice)."""
        changes = self.pool.finish(lease, outcome, self.clock(), reason)
        if changes:
            self.note_changes(changes)

    def finish_status(self, lease: Lease, status: int) -> None:
        """Report a request the node answered with *status* (the reason names it, so a
        circuit opened by 500s says ``last: HTTP 500``)."""
        self.finish(lease, status_outcome(status), f"HTTP {status}")

    # --- forwarding ---------------------------------------------------------------------

    async def _forward(
        self, exchange: Exchange, body: bytes | None, model: str | None, key: str | None
    ) -> Response:
        self.budget.record_request(self.clock())
        node = await self.first_node(model, key)
        self.label_model(exchange, model, node)
        headers = self.headers.upstream(exchange, strip_authorization=self.api_keys is not None)
        tried: list[str] = []
        unreachable = True  # every attempt so far failed in transport
        while True:
            tried.append(node.id)
            result = await self._attempt(exchange, node, headers, body)
            if isinstance(result, Response):
                return result
            self.metrics.upstream_failures.labels(result.reason).inc()
            unreachable = unreachable and result.unreachable
            untried = self.untried(model, key, tried) if result.retryable else None
            following = untried if untried is not None and self.pay_retry() else None
            opened = result.opened
            if following is None:
                if opened is not None:  # the node's own 429/502/503: pass it on
                    return self._respond(exchange, opened)
                if not unreachable or untried is not None:  # (the budget refused it)
                    raise result.error()
                node = await self.await_return(exchange, model, key, result.error())
                logger.debug(
                    "sending %s to %s, back after %s",
                    exchange.request_id.decode("latin-1"),
                    node.id,
                    result.reason,
                )
                continue
            if opened is not None:
                self.finish_status(opened.lease, opened.response.status)
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
    ) -> Response | Failed:
        """One try on one node: a response to relay, or why it failed before any byte went out."""
        lease = self.pool.start(node, self.clock())
        cm = self.client.stream(
            exchange.request.method,
            f"http://{node.address}{exchange.target}",
            headers=headers,
            body=body,
            timeouts=self.timeouts,
        )
        opened: Opened | None = None
        try:
            # One deadline for head and first chunk together (see reconfigure).
            with anyio.move_on_after(self.first_byte_limit):
                opened = await self._open(cm, lease)
        except ClientError as exc:
            failed = judge_failure(exc, node)
            self.finish(lease, error_outcome(exc), str(exc))
            await close_stream(cm)
            return failed
        except BaseException:
            self.finish(lease, Outcome.NEUTRAL, "request abandoned")
            await close_stream(cm)
            raise
        if opened is None:  # first_byte_limit passed
            self.finish(lease, Outcome.TRANSPORT_FAILURE, "first byte timeout")
            await close_stream(cm)
            return first_byte_timeout(node, self.settings.first_byte_timeout)
        status = opened.response.status
        if status in RETRY_STATUSES:
            return Failed(
                status,
                f"{node.id} answered {status}",
                "upstream_unavailable",
                retryable=True,
                reason=f"status_{status}",
                opened=opened,
            )
        return self._respond(exchange, opened)

    async def _open(self, cm: Any, lease: Lease) -> Opened:
        """Send the request; wait for the head and the first chunk (or whole small body)."""
        response: ClientResponse = await cm.__aenter__()
        self._progress(lease)
        opened = Opened(cm, response, lease)
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

    def _respond(self, exchange: Exchange, opened: Opened) -> Response:
        """The client's response for an opened upstream answer."""
        upstream = opened.response
        status = upstream.status
        headers = self.headers.downstream(upstream.headers.raw, exchange.request_id)
        if opened.whole is not None:
            self.finish_status(opened.lease, status)
            return Response(status, headers, opened.whole)
        relay = Relay(self, exchange, opened, self.metrics.route(exchange.route))
        return Response(status, headers, relay)

    def request_done(self) -> None:
        """A streamed response ended (called by its :class:`~inferno_proxy.relay.Relay`)."""
        self._in_flight -= 1
