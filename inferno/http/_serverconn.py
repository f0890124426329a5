"""One HTTP/1.1 server connection: h11 events in, the handler, h11 events out.

h11 holds the protocol state; this driver adds what h11 leaves to its user:
deadlines (head, idle keep-alive, body gaps), size limits, ``100 Continue`` on
the first body read, oversize chunk extensions, and the one place that turns
a failure into an error answer (:meth:`_fail`), which answers only when h11
says a response may still be sent and then closes (RFC 9112 §9.6: half-close,
bounded drain, close).  The decisions that need no I/O live in
:mod:`inferno.http._responses`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterable
from typing import TYPE_CHECKING, cast

import anyio
import h11

from inferno.errors import HTTPError
from inferno.http._messages import Handler, Request, Response, ServerLimits, WebSocketAccept
from inferno.http._responses import (
    NO_BODY_STATUSES,
    REASONS,
    body_too_large,
    client_gone,
    encode_headers,
    has_obs_fold,
    http_date,
    inspect_head,
    internal_error,
    protocol_error,
    render_error,
    upgrade_headers,
    valid_websocket_key,
)
from inferno.http._wire import Wire, close_gracefully
from inferno.http.headers import Headers

if TYPE_CHECKING:
    from inferno.http.websocket import WebSocket

__all__ = ["ConnectionContext", "ServerConnection"]

logger = logging.getLogger("inferno.http")

COALESCE_MAX = 16 * 1024  # a bytes body up to this size goes out in the head's write
CHUNK_FRAMING_BYTES = 24  # framing of one chunk without extensions: 20 hex digits, two CRLFs
# Chunk extensions plus trailers allowed per request; h11 discards both, so an
# unbounded amount would be read for nothing (Node.js caps extensions at 16 KiB
# after CVE-2024-22019).  Beyond it: 400.
MAX_CHUNK_METADATA_BYTES = 16 * 1024


class ConnectionContext:
    """What every connection of one server shares."""

    __slots__ = ("handler", "limits", "scheme", "shutting_down")

    def __init__(self, handler: Handler, limits: ServerLimits, scheme: str) -> None:
        self.handler = handler
        self.limits = limits
        self.scheme = scheme
        self.shutting_down = False


class ServerConnection:
    """Serves requests on one connection until either side ends it.

    ``idle`` is true while waiting for the first byte of a request, the one
    moment the server may close the connection during shutdown without losing
    work.  ``scope`` is the connection's cancel scope (set by the server).
    """

    __slots__ = (
        "_body_allowed",
        "_body_base",
        "_body_done",
        "_body_error",
        "_body_fed",
        "_body_received",
        "_chunked",
        "_chunks",
        "_client",
        "_ctx",
        "_cycle",
        "_h11",
        "_maybe_fold",
        "_wire",
        "idle",
        "scope",
    )

    def __init__(self, wire: Wire, ctx: ConnectionContext, client: tuple[str, int] | None) -> None:
        self._wire = wire
        self._ctx = ctx
        self._client = client
        self._h11 = h11.Connection(
            h11.SERVER, max_incomplete_event_size=ctx.limits.max_header_bytes
        )
        self._cycle = 0
        self._maybe_fold = False
        self._body_allowed = False
        self._body_done = True
        self._body_error: HTTPError | None = None
        self._body_received = 0
        self._chunked = False
        self._chunks = 0
        self._body_base = 0
        self._body_fed = 0
        self.idle = True
        self.scope: anyio.CancelScope | None = None

    async def run(self) -> None:
        """Serve requests until the connection is to be closed.

        Returns without closing the wire when nothing more is to be sent; paths
        that answered something close it gracefully themselves.
        """
        fresh = True
        while True:
            request = await self._read_head(fresh)
            if request is None:
                return
            fresh = False
            if not await self._exchange(request):
                return

    # -- request head ---------------------------------------------------------------

    async def _read_head(self, fresh: bool) -> h11.Request | None:
        conn = self._h11
        wire = self._wire
        limits = self._ctx.limits
        deadline: float | None = None
        idle = False
        while True:
            if self._maybe_fold:
                self._maybe_fold = False
                if has_obs_fold(conn.trailing_data[0]):
                    await self._fail(
                        HTTPError(400, "obsolete line folding in a header", code="bad_request")
                    )
                    return None
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                await self._fail(protocol_error(exc))
                return None
            if event is h11.NEED_DATA:
                if deadline is None:
                    idle = not conn.trailing_data[0]
                    if idle and self._ctx.shutting_down:
                        return None
                    timeout = (
                        limits.keepalive_timeout if idle and not fresh else limits.header_timeout
                    )
                    deadline = wire.time() + timeout
                self.idle = idle
                try:
                    data = await wire.receive_some(deadline)
                except TimeoutError:
                    if idle and not fresh:
                        logger.debug("closing idle keep-alive connection from %s", self._client)
                        return None
                    await self._fail(
                        HTTPError(
                            408,
                            f"request head not received within {limits.header_timeout:g} s",
                            code="request_timeout",
                        )
                    )
                    return None
                finally:
                    self.idle = False
                if idle and data:
                    # The head must complete within header_timeout of its first byte.
                    idle = False
                    deadline = wire.time() + limits.header_timeout
                self._feed(data)
                continue
            if type(event) is h11.Request:
                return event
            return None  # ConnectionClosed: the client closed an idle connection

    def _feed(self, data: bytes) -> None:
        if data and (b"\n " in data or b"\n\t" in data or data[0] in (0x20, 0x09)):
            self._maybe_fold = True  # checked precisely before the next head is parsed
        self._h11.receive_data(data)

    # -- one request/response exchange -----------------------------------------------

    async def _exchange(self, event: h11.Request) -> bool:
        """Answer one request; whether the connection may serve another."""
        ctx = self._ctx
        limits = ctx.limits
        conn = self._h11
        try:
            raw, length, chunked = inspect_head(event, limits)
        except HTTPError as exc:
            return await self._fail(exc)

        self._cycle += 1
        self._body_error = None
        self._body_received = 0
        self._chunked = chunked
        if chunked:
            self._chunks = 0
            self._body_base = len(conn.trailing_data[0])
            self._body_fed = 0
        if chunked or length:
            self._body_done = False
        else:
            conn.next_event()  # the EndOfMessage of an empty body, already parsed
            self._body_done = True

        request = Request._received(
            event.method.decode("ascii"),
            event.target.decode("ascii"),
            Headers(raw),
            self._client,
            ctx.scheme,
            event.http_version.decode("ascii"),
            self,
            self._cycle,
        )
        self._body_allowed = True
        try:
            response = await ctx.handler(request)
        except HTTPError as exc:
            response = Response.error(exc)
        except Exception:
            logger.exception("handler failed on %s %s", request.method, request.target)
            response = Response.error(internal_error())
        finally:
            self._body_allowed = False
        if not isinstance(response, Response):
            logger.error(  # type: ignore[unreachable]  # handlers are not always typed
                "handler returned %r instead of a Response", response
            )
            response = Response.error(internal_error())

        if isinstance(response, WebSocketAccept):
            await self._upgrade(request, response)
            return False
        must_close = (
            self._body_error is not None
            or ctx.shutting_down
            or conn.they_are_waiting_for_100_continue  # client may never send the body
        )
        if not await self._send_response(request.method == "HEAD", response, must_close):
            return False
        if conn.our_state is h11.DONE and conn.their_state is h11.SEND_BODY:
            try:
                await self._discard_body()
            except HTTPError as exc:
                logger.debug("closing after unread body from %s: %s", self._client, exc)
                await close_gracefully(self._wire)
                return False
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
            return True
        await close_gracefully(self._wire)
        return False

    async def _send_response(self, head_only: bool, response: Response, must_close: bool) -> bool:
        """Write the response; false when the connection must end without more I/O."""
        conn = self._h11
        wire = self._wire
        status = response.status
        body = response.body
        headers = encode_headers(response.headers)
        has_framing = has_date = False
        for name, _ in headers:
            lname = name.lower()
            if lname == b"content-length" or lname == b"transfer-encoding":
                has_framing = True
            elif lname == b"date":
                has_date = True
        if not has_date:
            headers.append((b"date", http_date()))
        if must_close:
            headers.append((b"connection", b"close"))
        no_body = head_only or status in NO_BODY_STATUSES
        is_bytes = isinstance(body, (bytes, bytearray))
        if is_bytes and not has_framing and status not in NO_BODY_STATUSES:
            headers.append((b"content-length", b"%d" % len(cast(bytes, body))))
        try:
            head = conn.send(
                h11.Response(status_code=status, headers=headers, reason=REASONS.get(status, b""))
            )
        except h11.LocalProtocolError as exc:
            logger.error("handler returned an invalid response (%s): %s", response, exc)
            if conn.our_state is h11.SEND_RESPONSE:
                await self._fail(internal_error())
            return False

        if is_bytes or no_body:
            if no_body or not body:
                await wire.send_all(head + conn.send(h11.EndOfMessage()))
                if not is_bytes:  # an iterable body never iterated: let it release what it holds
                    aclose = getattr(body, "aclose", None)
                    if aclose is not None:
                        await aclose()
                return True
            try:
                data = conn.send(h11.Data(data=cast(bytes, body)))
                tail = conn.send(h11.EndOfMessage())
            except h11.LocalProtocolError as exc:
                logger.error("response body does not match its headers (%s): %s", response, exc)
                return False
            if len(data) <= COALESCE_MAX:
                await wire.send_all(head + data + tail)
            else:
                await wire.send_all(head)
                await wire.send_all(data)
                if tail:
                    await wire.send_all(tail)
            return True

        await wire.send_all(head)
        iterator = cast(AsyncIterable[bytes], body).__aiter__()
        finished = False
        Data = h11.Data  # the per-chunk loop is the SSE hot path
        send = conn.send
        send_all = wire.send_all
        try:
            async for chunk in iterator:
                if chunk:
                    await send_all(send(Data(data=chunk)))
            finished = True
            tail = send(h11.EndOfMessage())
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            raise  # the client went away: the connection ends quietly
        except h11.LocalProtocolError as exc:
            logger.error("response body does not match its headers (%s): %s", response, exc)
            return False
        except Exception:
            logger.exception("response body of status %d failed mid-stream", status)
            return False  # the client sees the body cut short
        finally:
            if not finished:
                aclose = getattr(iterator, "aclose", None)
                if aclose is not None:
                    await aclose()
        if tail:
            await wire.send_all(tail)
        return True

    # -- request body (BodySource) ---------------------------------------------------

    async def read_body_chunk(self, cycle: int) -> bytes | None:
        """The next piece of the current request's body; ``None`` once complete."""
        if cycle != self._cycle or not self._body_allowed:
            raise RuntimeError("the request body can only be read while its handler runs")
        if self._body_error is not None:
            raise self._body_error
        if self._body_done:
            return None
        conn = self._h11
        if conn.they_are_waiting_for_100_continue:
            interim = h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue")
            try:
                await self._wire.send_all(conn.send(interim))
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                raise self._broken(client_gone()) from None
        return await self._next_body_piece()

    async def _next_body_piece(self) -> bytes | None:
        conn = self._h11
        limits = self._ctx.limits
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise self._broken(HTTPError(400, f"malformed request body: {exc}")) from None
            if type(event) is h11.Data:
                data = event.data
                self._body_received += len(data)
                if self._body_received > limits.max_body_bytes:
                    raise self._broken(body_too_large(limits))
                if self._chunked and event.chunk_start:
                    self._chunks += 1
                return bytes(data)
            if type(event) is h11.EndOfMessage:
                if self._chunked:
                    self._check_chunk_metadata()
                self._body_done = True
                return None
            # NEED_DATA
            if self._chunked:
                self._check_chunk_metadata()
            try:
                data = await self._wire.receive_some(self._wire.time() + limits.body_timeout)
            except TimeoutError:
                raise self._broken(
                    HTTPError(
                        408,
                        f"request body stalled for {limits.body_timeout:g} s",
                        code="request_timeout",
                    )
                ) from None
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                raise self._broken(client_gone()) from None
            self._body_fed += len(data)
            self._feed(data)

    def _check_chunk_metadata(self) -> None:
        consumed = self._body_base + self._body_fed - len(self._h11.trailing_data[0])
        metadata = consumed - self._body_received - CHUNK_FRAMING_BYTES * (self._chunks + 1)
        if metadata > MAX_CHUNK_METADATA_BYTES:
            raise self._broken(
                HTTPError(
                    400,
                    f"chunk extensions and trailers exceed {MAX_CHUNK_METADATA_BYTES} bytes",
                )
            )

    def _broken(self, exc: HTTPError) -> HTTPError:
        """Remember a body failure: every later read raises it and the connection closes."""
        self._body_error = exc
        return exc

    async def _discard_body(self) -> None:
        """Read and drop what the handler left unread, within the body limits."""
        if self._body_error is not None:
            raise self._body_error
        while await self._next_body_piece() is not None:
            pass

    # -- errors ----------------------------------------------------------------------

    async def _fail(self, exc: HTTPError) -> bool:
        """Answer ``exc`` if h11 still allows a response, then close.  Always false."""
        conn = self._h11
        logger.debug("answering %d to %s: %s", exc.status, self._client, exc.message)
        data = render_error(conn, exc)
        if data is not None:
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                await self._wire.send_all(data)
        await close_gracefully(self._wire)
        return False

    # -- WebSocket -------------------------------------------------------------------

    async def _upgrade(self, request: Request, accept: WebSocketAccept) -> None:
        from inferno.http.websocket import WebSocket, accept_token, run_server_session

        conn = self._h11
        if not request.is_websocket_upgrade():
            await self._fail(
                HTTPError(
                    426,
                    "this endpoint expects a WebSocket upgrade",
                    code="upgrade_required",
                    headers=[("upgrade", "websocket"), ("connection", "Upgrade")],
                )
            )
            return
        if request.headers.get("sec-websocket-version") != "13":
            await self._fail(
                HTTPError(
                    426,
                    "unsupported WebSocket version (13 is supported)",
                    code="upgrade_required",
                    headers=[("sec-websocket-version", "13")],
                )
            )
            return
        key = request.headers.get("sec-websocket-key", "")
        if not valid_websocket_key(key):
            await self._fail(HTTPError(400, "invalid Sec-WebSocket-Key"))
            return
        if conn.their_state is h11.SEND_BODY:
            try:
                await self._discard_body()
            except HTTPError as exc:
                await self._fail(exc)
                return
        headers = upgrade_headers(
            accept_token(key.encode("latin-1")), accept.subprotocol, accept.headers
        )
        try:
            data = conn.send(
                h11.InformationalResponse(
                    status_code=101, headers=headers, reason=b"Switching Protocols"
                )
            )
        except h11.LocalProtocolError as exc:
            logger.error("could not accept the WebSocket upgrade: %s", exc)
            await self._fail(internal_error())
            return
        await self._wire.send_all(data)
        websocket: WebSocket = WebSocket._accepted(
            self._wire,
            conn.trailing_data[0],
            subprotocol=accept.subprotocol,
            max_message_bytes=accept.max_message_bytes,
        )
        await run_server_session(websocket, accept.session)
