"""WebSocket upgrades on the service port, relayed to a node both ways.

The proxy opens the node's WebSocket *before* accepting the client's, so a
node that refuses or cannot be reached is tried like any request (another
node, within ``max_attempts`` and the retry budget) and a final refusal
reaches the client as an HTTP answer rather than a WebSocket that opens and
closes at once.  The client's subprotocol offer goes to the node and the
node's choice comes back in our ``101``.  When every node tried was
unreachable (connect refused or timed out after ``connect_timeout``, reset
or closed before an answer) and no attempt is left, the upgrade waits for a
node to come back, as a request does ("Unreachable nodes" in
:mod:`~inferno_proxy.selection`), for what is left of ``queue_timeout`` since
it arrived.  A node that answered the handshake with an HTTP status is not
waited for: its refusal is passed on.  Nor is one that took the connection
and did not answer the handshake within ``first_byte_timeout``: like a
request's first-byte timeout, a stalled node is not worth waiting for.

Once both are open, two pumps copy messages (text stays text, binary stays
binary) until one side closes; its close code and reason are passed to the
other side.  Codes that may not be sent in a close frame are mapped:
"no status" (1005) becomes 1000; a side that vanished without a close
(1006) makes the proxy close the other with 1011 (the node died: an
internal error as the client sees it) or 1001 (the client left: going away).

A WebSocket may sit idle for hours, so an established one is not a request
in flight for the pool (that would read as a stalled node): the node's lease
covers only the opening handshake.  Routing: ``?model=`` in the URL, when
given, restricts the nodes like a request's ``model``; ``X-Session-Id``
feeds the affinity policy.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
from typing import TYPE_CHECKING, Final
from urllib.parse import parse_qs

import anyio

from inferno.errors import HTTPError
from inferno.http import (
    Response,
    WebSocket,
    WebSocketAccept,
    WebSocketClosed,
    WebSocketError,
    WebSocketHandshakeError,
    WebSocketTimeout,
    connect_websocket,
)
from inferno_proxy.forward import RETRY_STATUSES
from inferno_proxy.nodes import Outcome
from inferno_proxy.policies import affinity_key

if TYPE_CHECKING:
    from inferno_proxy.forward import ServiceApp
    from inferno_proxy.requestinfo import Exchange

__all__ = ["close_code", "open_relay", "relay"]

logger = logging.getLogger("inferno.proxy")

CLOSE_NORMAL: Final = 1000
CLOSE_GOING_AWAY: Final = 1001
CLOSE_NO_STATUS: Final = 1005  # received as "no code"; never sent
CLOSE_ABNORMAL: Final = 1006  # the connection ended without a close frame; never sent
CLOSE_INTERNAL_ERROR: Final = 1011
CLOSE_TLS_FAILED: Final = 1015  # local only, never sent
SHUTDOWN_CLOSE_TIMEOUT: Final = 1.0  # seconds spent closing the node's side when cancelled
_DROPPED_REFUSAL_HEADERS: Final = frozenset({b"content-length"})  # the server frames it again


def close_code(code: int | None, *, lost: int) -> int:
    """The code to close one side with after the other closed with *code*.

    :param lost: what to send when the other side vanished without a close frame.
    """
    if code is None or code == CLOSE_ABNORMAL:
        return lost
    if code in (CLOSE_NO_STATUS, CLOSE_TLS_FAILED):
        return CLOSE_NORMAL
    return code


async def relay(client: WebSocket, upstream: WebSocket) -> None:
    """Copy messages both ways until one side closes, then close the other alike."""
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_pump, client, upstream, CLOSE_GOING_AWAY)
            await _pump(upstream, client, CLOSE_INTERNAL_ERROR)
    finally:
        if not upstream.closed:  # cancelled (server shutdown): tell the node too
            with anyio.move_on_after(SHUTDOWN_CLOSE_TIMEOUT, shield=True):
                await _close_quietly(upstream, CLOSE_GOING_AWAY, "proxy shutting down")


async def _pump(source: WebSocket, sink: WebSocket, lost: int) -> None:
    """Copy *source*'s messages to *sink*; when *source* closes, close *sink* alike."""
    async for message in source:  # ends when source closes
        try:
            await sink.send(message)
        except WebSocketClosed:
            return  # sink closed first: the other pump passes its close on
    await _close_quietly(sink, close_code(source.close_code, lost=lost), source.close_reason or "")


async def _close_quietly(websocket: WebSocket, code: int, reason: str) -> None:
    with contextlib.suppress(
        WebSocketError, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError
    ):
        await websocket.close(code, reason)


def _valid_handshake(exchange: Exchange) -> bool:
    """Whether the server will accept this upgrade (else it answers 4xx itself)."""
    headers = exchange.request.headers
    if headers.get("sec-websocket-version") != "13":
        return False
    try:
        key = headers.get("sec-websocket-key", "").encode("latin-1")
        return len(base64.b64decode(key, validate=True)) == 16
    except (binascii.Error, ValueError):
        return False


async def _never(websocket: WebSocket) -> None:
    """The session of an upgrade the server refuses on its own (never runs)."""


async def open_relay(app: ServiceApp, exchange: Exchange) -> Response:
    """Open a node's WebSocket for a client's upgrade and accept the client's.

    :raises HTTPError: 404 for an unknown ``?model=``; 429/503 from the queue
        (waiting for a first node, or for one to come back after every node
        tried was unreachable); 502/503 when no node accepted.
    """
    if not _valid_handshake(exchange):
        return WebSocketAccept(_never)  # the server answers 426 or 400
    request = exchange.request
    models = parse_qs(request.query).get("model")
    model = models[0] if models else None
    if model is not None:
        app.check_model(exchange, model)
    session = request.headers.get("x-session-id")
    key = affinity_key(session, None) if session and app.wants_key else None
    app.budget.record_request(app.clock())
    node = await app.first_node(model, key)
    app.label_model(exchange, model, node)
    headers = app.headers.websocket(exchange, strip_authorization=app.api_keys is not None)
    offered = [
        p.strip()
        for value in request.headers.get_all("sec-websocket-protocol")
        for p in value.split(",")
        if p.strip()
    ]
    settings = app.settings
    tried: list[str] = []
    unreachable = True  # every attempt so far failed in transport
    while True:
        tried.append(node.id)
        lease = app.pool.start(node, app.clock())
        try:
            upstream = await connect_websocket(
                f"ws://{node.address}{exchange.target}",
                headers=headers,
                timeout=settings.connect_timeout + settings.first_byte_timeout,
                connect_timeout=settings.connect_timeout,
                subprotocols=offered,
                max_message_bytes=settings.max_websocket_message_bytes,
            )
        except WebSocketHandshakeError as exc:  # the node answered with an HTTP status
            app.finish_status(lease, exc.status)
            unreachable = False
            retryable = exc.status in RETRY_STATUSES
            reason = f"status_{exc.status}"
            refused = [(n, v) for n, v in exc.headers.raw if n not in _DROPPED_REFUSAL_HEADERS]
            answer: Response | HTTPError = Response(
                exc.status, app.headers.downstream(refused, exchange.request_id), exc.body
            )
        except WebSocketError as exc:
            app.finish(lease, Outcome.TRANSPORT_FAILURE, str(exc))
            retryable = exc.temporary
            # A handshake that timed out reached a node that is not worth waiting for.
            unreachable = unreachable and retryable and not isinstance(exc, WebSocketTimeout)
            reason = "timeout" if isinstance(exc, WebSocketTimeout) else "connect"
            answer = HTTPError(
                503 if retryable else 502,
                f"cannot open a WebSocket to {node.id}: {exc}",
                code="no_healthy_upstream" if retryable else "bad_gateway",
                headers=[("retry-after", "1")] if retryable else None,
            )
        except BaseException:
            app.finish(lease, Outcome.NEUTRAL, "request abandoned")
            raise
        else:
            app.finish(lease, Outcome.SUCCESS)
            return _accept(app, exchange, upstream)
        app.metrics.upstream_failures.labels(reason).inc()
        untried = app.untried(model, key, tried) if retryable else None
        following = untried if untried is not None and app.pay_retry() else None
        if following is None:
            if not isinstance(answer, HTTPError):
                return answer  # the last node's own refusal
            if not unreachable or untried is not None:  # (the budget refused it)
                raise answer
            node = await app.await_return(exchange, model, key, answer)
            logger.debug(
                "sending upgrade %s to %s, back after %s",
                exchange.request_id.decode("latin-1"),
                node.id,
                reason,
            )
            continue
        app.metrics.retries.labels(reason).inc()
        node = following


def _accept(app: ServiceApp, exchange: Exchange, upstream: WebSocket) -> Response:
    async def session(client: WebSocket) -> None:
        await relay(client, upstream)

    accept = WebSocketAccept(
        session,
        subprotocol=upstream.subprotocol,
        max_message_bytes=app.settings.max_websocket_message_bytes,
    )
    return app.headers.decorate(accept, exchange.request_id)
