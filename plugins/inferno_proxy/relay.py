"""The body of a forwarded response: a node's chunks, each handed on as it arrives.

By the time a :class:`Relay` exists the client's response has been decided:
its head goes out as soon as the handler returns.  From then on nothing can
be retried; the relay only moves bytes and keeps the books:

* every chunk is reported to the pool (:meth:`Pool.progress
  <inferno_proxy.pool.Pool.progress>`), which is how a stalled node is told
  from a slow one;
* the end of the body finishes the node's lease with the outcome its status
  deserves; a failure mid-stream (reset, idle timeout) finishes it as a
  transport failure and ends the client's response early by raising
  :class:`UpstreamBroke`, which makes the server close the connection
  without the final chunk, so the client sees the body cut short;
* the server closing the body early (:meth:`Relay.aclose`: the client went
  away, or shutdown) closes the upstream connection, so the node sees its
  client gone and stops generating.

No task per response: the server's connection task pulls each chunk through
:meth:`Relay.__anext__`.  Idle time between chunks is bounded by the HTTP
client's read timeout when it equals ``idle_timeout``; only when
``first_byte_timeout`` is the longer does each chunk cost a cancel scope.
(The start of the response, head and first chunk, has its own deadline,
applied before the relay exists.)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

import anyio

from inferno.http import ClientError, ClientResponse, ClientTimeout
from inferno_proxy.nodes import Lease, Outcome

if TYPE_CHECKING:
    from inferno_proxy.forward import ServiceApp
    from inferno_proxy.requestinfo import Exchange
    from inferno_proxy.servicemetrics import RouteMetrics

__all__ = ["Opened", "Relay", "UpstreamBroke", "close_stream", "status_outcome"]

logger = logging.getLogger("inferno.proxy")


@dataclass(slots=True)
class Opened:
    """An upstream response whose head (and first chunk, or whole body) arrived.

    :ivar cm: the client's stream context; close it with :func:`close_stream`.
    :ivar first: the first body chunk, still to be relayed.
    :ivar whole: the whole body, when it was read before answering.
    """

    cm: Any
    response: ClientResponse
    lease: Lease
    first: bytes | None = None
    whole: bytes | None = None


class UpstreamBroke(anyio.BrokenResourceError):
    """Raised from a relayed body when the node failed after the client's response began.

    A subclass of :class:`anyio.BrokenResourceError` because that is what the
    server treats as "this response cannot go on": it closes the connection
    without ending the body, so the client sees it cut short.
    """


def status_outcome(status: int) -> Outcome:
    """How a node's answer counts for its health: 5xx fail it, 503 is backpressure."""
    if status < 400:
        return Outcome.SUCCESS
    if status < 500 or status == 503:
        return Outcome.NEUTRAL
    return Outcome.SERVER_ERROR


async def close_stream(cm: Any) -> None:
    """Close a client stream context, whatever state it is in (shielded: cleanup)."""
    with anyio.CancelScope(shield=True):
        await cm.__aexit__(None, None, None)


class Relay:
    """The response body of one forwarded request (see the module docstring).

    The server closes it (:meth:`aclose`) however the response ends, so the
    lease and the upstream connection are always given back.
    """

    __slots__ = ("_app", "_done", "_exchange", "_iterator", "_opened", "_route")

    def __init__(
        self, app: ServiceApp, exchange: Exchange, opened: Opened, route: RouteMetrics
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
            status = opened.response.status
            self._end(status_outcome(status), f"HTTP {status}")
            raise
        except ClientError as exc:
            await self._broke(exc)
        changes = app.pool.progress(opened.lease, app.clock())
        if changes:
            app.note_changes(changes)
        return chunk

    async def _broke(self, exc: ClientError) -> NoReturn:
        node = self._opened.lease.node
        logger.warning(
            "response %s from %s broke mid-stream: %s",
            self._exchange.request_id.decode("latin-1"),
            node.id,
            exc,
        )
        reason = "idle_timeout" if isinstance(exc, ClientTimeout) else "mid_stream"
        self._app.metrics.upstream_failures.labels(reason).inc()
        self._end(Outcome.TRANSPORT_FAILURE, f"mid-stream: {exc}")
        await close_stream(self._opened.cm)
        raise UpstreamBroke(f"{node.id} broke the response mid-stream: {exc}") from exc

    async def aclose(self) -> None:
        """The server is done with the body: at its end, or early (client gone, shutdown)."""
        if not self._done:
            self._end(Outcome.NEUTRAL, "client went away")
        if not self._opened.response.is_closed:
            await close_stream(self._opened.cm)

    def _end(self, outcome: Outcome, reason: str = "") -> None:
        if self._done:
            return
        self._done = True
        app = self._app
        app.request_done()
        app.finish(self._opened.lease, outcome, reason)
        self._route.duration.observe(app.clock() - self._exchange.started)
