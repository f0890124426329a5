"""One HTTP/1.1 server connection: h11 events in, the handler, h11 events out.

h11 holds the protocol state; this driver adds what h11 leaves to its user:
deadlines (head, idle keep-alive, body gaps), size limits, ``100 Continue`` on
the first body read, oversize chunk extensions, and the one place that turns
a failure into an error answer (:meth:`_fail`), which answers only when h11
says a response may still be sent and then closes (RFC 9112 §9.6: half-close,
bounded drain, close).  The decisions that need no I/O live in
:mod:`inferno.http._responses`.

A client that goes away while its handler runs (or while a streamed body is
produced) is noticed without reading: the wire's :class:`~inferno.http._wire.PeerWatch`
calls :meth:`ServerConnection._peer_gone` from the event loop, which cancels
the connection's scope.  The handler's ``finally`` blocks run, nothing more is
written (unless the handler ignores the cancellation and returns an answer;
then it is written, harmlessly), the connection closes.  A reset always
counts.  An EOF counts once the whole request was read, as nginx treats it,
unless ``ServerLimits.cancel_on_client_eof`` is off (RFC 9112 §9.6 lets a
client half-close and still read the answer); an EOF that follows pipelined
requests never counts, they are all answered.  A handler that never reads the
body it was sent learns only of a reset.  Per request this costs two attribute
stores and a flag test: no task, no extra cancel scope.

A streamed body is always closed (``aclose``) when the response ends, however
it ends (see :mod:`inferno.http._streambody`).
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import AsyncIterable
from typing import TYPE_CHECKING, cast

import anyio
import h11

from inferno.errors import HTTPError
from inferno.http._messages import Handler, Request, Response, ServerLimits, WebSocketAccept
from inferno.http._responses import (
    EOF_GONE,
    EOF_HALF_CLOSED,
    EOF_PIPELINED,
    EOF_TOO_EARLY,
    NO_BODY_STATUSES,
    REASONS,
    body_too_large,
    client_gone,
    date_head_end,
    encode_headers,
    has_obs_fold,
    inspect_head,
    internal_error,
    judge_eof,
    protocol_error,
    render_error,
    upgrade_headers,
    websocket_refusal,
)
from inferno.http._streambody import close_body, send_stream
from inferno.http._wire import PeerWatch, PeerWatcher, Wire, close_gracefully
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
# A line that may begin with whitespace (obs-fold, see has_obs_fold): one regex
# pass costs half of two ``in`` scans for "\n " and "\n\t" (3.11, a small request).
_FOLD_HINT = re.compile(rb"\n[ \t]")


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
    work.  ``scope`` is the connection's cancel scope (set by the server); it
    is cancelled when the client goes away while a handler runs.  ``watch``
    tells of that client: the wire itself, or for TLS the raw connection below
    it, whose buffered bytes are ciphertext and do not count as a next request.
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
        "_on_peer_gone",
        "_peer",
        "_watch",
        "_watch_is_wire",
        "_wire",
        "idle",
        "scope",
    )

    def __init__(
        self,
        wire: Wire,
        ctx: ConnectionContext,
        client: tuple[str, int] | None,
        watch: PeerWatch | None = None,
    ) -> None:
        self._wire = wire
        self._watch = watch
        self._watch_is_wire = cast(object, watch) is wire
        self._on_peer_gone: PeerWatcher = self._peer_gone  # bound once, registered per request
        self._peer = EOF_TOO_EARLY  # the verdict on its EOF (EOF_TOO_EARLY: none yet)
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
        if data and (data[0] in (0x20, 0x09) or _FOLD_HINT.search(data) is not None):
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
        watch = self._watch
        if watch is not None:
            watch.watcher = self._on_peer_gone  # unset once the response is out
            if watch.peer_ended:  # it went before its handler started
                self._peer_gone(watch.peer_lost)
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
        if watch is not None and isinstance(response.body, (bytes, bytearray)):
            # Nothing more to cancel: the answer is ready (a streamed one is
            # watched until it ends).
            watch.watcher = None

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
        body = response.body
        if not isinstance(body, (bytes, bytearray)):
            return await self._send_stream(head_only, response, must_close)
        conn = self._h11
        wire = self._wire
        status = response.status
        head = self._encode_head(response, must_close, len(body))
        if head is None:
            return await self._fail_invalid()
        if head_only or status in NO_BODY_STATUSES or not body:
            await wire.send_all(head + conn.send(h11.EndOfMessage()))
            return True
        try:
            data = conn.send(h11.Data(data=body))
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

    def _encode_head(
        self, response: Response, must_close: bool, length: int | None
    ) -> bytes | None:
        """The response head's bytes (``length``: of a bytes body); ``None`` when h11 refuses it."""
        status = response.status
        headers = encode_headers(response.headers)
        has_framing = has_date = False
        for name, _ in headers:
            lname = name.lower()
            if lname == b"content-length" or lname == b"transfer-encoding":
                has_framing = True
            elif lname == b"date":
                has_date = True
        if must_close:
            headers.append((b"connection", b"close"))
        if length is not None and not has_framing and status not in NO_BODY_STATUSES:
            headers.append((b"content-length", b"%d" % length))
        try:
            head = self._h11.send(
                h11.Response(status_code=status, headers=headers, reason=REASONS.get(status, b""))
            )
        except h11.LocalProtocolError as exc:
            logger.error("handler returned an invalid response (%s): %s", response, exc)
            return None
        if has_date or head is None:
            return head
        # Our Date goes in after h11 encoded the head (which ends with an empty
        # line): h11 has no use for it, and a value from our own clock needs none
        # of the two regular expressions h11 runs on every field; through h11 it
        # cost about 3 % of a small request's CPU (callgrind).
        return head[:-2] + date_head_end()

    async def _fail_invalid(self) -> bool:
        if self._h11.our_state is h11.SEND_RESPONSE:
            await self._fail(internal_error())
        return False

    async def _send_stream(self, head_only: bool, response: Response, must_close: bool) -> bool:
        """Write a response with an async iterable body, watching the client until it ends."""
        body = cast(AsyncIterable[bytes], response.body)
        try:
            head = self._encode_head(response, must_close, None)
            if head is None:
                await close_body(body)  # before the error answer's bounded drain
                return await self._fail_invalid()
            return await send_stream(
                self._h11,
                self._wire,
                head,
                body,
                head_only=head_only or response.status in NO_BODY_STATUSES,
                what=response,
            )
        finally:
            self._unwatch()

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
                watch = self._watch
                if watch is not None and watch.peer_ended and self._body_allowed:
                    # An EOF while the body was unread did not count (the request
                    # was incomplete); now that the body is whole, it does.
                    self._peer_gone(watch.peer_lost)
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

    # -- a client gone while its handler runs ----------------------------------------

    def _peer_gone(self, reset: bool) -> None:
        """The wire saw the client reset the connection (``reset``) or end its side.

        Runs on the event loop's thread, from a protocol callback (or the
        read-ahead task), while a handler or a streamed body runs, and when one
        starts or finishes reading its body after an EOF: cancels the
        connection's scope when the client counts as gone.
        """
        peer = self._peer
        if peer == EOF_GONE or (peer != EOF_TOO_EARLY and not reset):
            return  # already gone, or an EOF already judged
        if not reset:
            watch = self._watch
            unread = watch.unread if self._watch_is_wire and watch is not None else 0
            verdict = judge_eof(self._h11, unread, self._ctx.limits.cancel_on_client_eof)
            if verdict == EOF_PIPELINED:
                logger.debug("client %s ended its side after pipelined requests", self._client)
            elif verdict == EOF_HALF_CLOSED:
                logger.debug("client %s closed its side after its request", self._client)
            if verdict != EOF_GONE:
                self._peer = verdict
                return
        self._peer = EOF_GONE
        logger.debug(
            "client %s %s while its request was handled: cancelled",
            self._client,
            "reset the connection" if reset else "closed the connection",
        )
        if self.scope is not None:
            self.scope.cancel()

    def _unwatch(self) -> None:
        if self._watch is not None:
            self._watch.watcher = None

    def client_disconnected(self) -> bool:
        """Whether the client reset the connection or closed it after its whole request."""
        if self._peer >= EOF_HALF_CLOSED:
            return True
        return self._watch is not None and self._watch.peer_lost

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
        refusal = websocket_refusal(request)
        if refusal is not None:
            await self._fail(refusal)
            return
        key = request.headers.get("sec-websocket-key", "")
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
