"""One HTTP/1.1 client connection: h11 over a lean asyncio transport.

This is the thin driver of the client: it moves bytes between the socket and
h11, applies the deadline of each phase and translates every foreign exception
into :mod:`inferno.http.client_errors`.  It makes no pool decision;
:mod:`inferno.http.client` asks it whether it can be reused and closes it.

The proxy runs this path for every request, so it is kept short.  Bytes move
through :class:`_Wire`, an ``asyncio.Protocol`` that reads eagerly into a
buffer: a receive with data waiting returns at once, a send is one
``transport.write``, and a deadline is one ``loop.call_at`` armed only when a
receive or a drain really waits.  anyio's socket stream instead pauses and
resumes reading around every receive and yields after every send, and a cancel
scope per phase costs about as much again; together that was roughly twice
the per-request CPU of a plain asyncio + h11 hop.  Cancellation is still
anyio's: a cancel scope cancels the task, which cancels the future a receive
or drain waits on.  Connecting (rare) uses an anyio cancel scope for its timeout.

The client therefore needs anyio's asyncio backend (asyncio or uvloop), which
is what Inferno runs on.
"""

from __future__ import annotations

import asyncio
import os
import select
import socket
import ssl
from collections.abc import AsyncIterable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, TypeAlias, cast

import anyio
import h11

from inferno.http.client_errors import (
    ClientTimeout,
    ConnectError,
    ConnectTimeout,
    LocalProtocolError,
    ReadError,
    ReadTimeout,
    RemoteProtocolError,
    TLSError,
    TotalTimeout,
    WriteError,
    WriteTimeout,
)
from inferno.http.pool import Origin

if TYPE_CHECKING:
    from inferno.http.client import Timeouts

__all__ = [
    "Budget",
    "ClientConnection",
    "HeadersInput",
    "RequestBody",
    "build_request",
    "check_body",
    "open_connection",
]

READ_HIGH_WATER = 256 * 1024  # bytes buffered unread before the socket stops being read
COALESCE_BODY_BYTES = 64 * 1024  # bodies up to this size leave in the same write as the head
HAPPY_EYEBALLS_DELAY = 0.25  # seconds before trying a host's next address (RFC 8305)

RequestBody: TypeAlias = bytes | AsyncIterable[bytes] | None
HeadersInput: TypeAlias = Mapping[str, str] | Iterable[tuple[str | bytes, str | bytes]] | None
# Methods whose request carries content by definition: an empty one says so
# with "Content-Length: 0" (RFC 9110, section 8.6).
_BODY_METHODS = frozenset({b"POST", b"PUT", b"PATCH"})
_BROKEN = (anyio.BrokenResourceError, OSError)


class Budget:
    """The time limits of one request: each phase's timeout, capped by what is
    left of the total deadline (``Timeouts.total``), if any.  Times are the
    event loop's clock (``anyio.current_time()``).
    """

    __slots__ = ("deadline", "timeouts")

    def __init__(self, timeouts: Timeouts) -> None:
        self.timeouts = timeouts
        total = timeouts.total
        self.deadline = None if total is None else anyio.current_time() + total

    def limit(self, phase: float | None) -> tuple[float | None, bool]:
        """Seconds allowed for a phase from now, and whether the total deadline set it."""
        deadline = self.deadline
        if deadline is None:
            return phase, False
        remaining = max(deadline - anyio.current_time(), 0.0)
        if phase is None or remaining < phase:
            return remaining, True
        return phase, False

    def until(self, phase: float | None, now: float) -> tuple[float | None, bool]:
        """Absolute deadline for one step of a phase, and whether the total deadline set it."""
        end = None if phase is None else now + phase
        total = self.deadline
        if total is not None and (end is None or total < end):
            return total, True
        return end, False

    def expired(
        self, kind: type[ClientTimeout], by_total: bool, what: str, *, request_sent: bool
    ) -> ClientTimeout:
        """The error for a step that ran out of time: ``kind``, or TotalTimeout if the total did."""
        if by_total:
            return TotalTimeout(
                f"{what}: total timeout of {self.timeouts.total}s passed",
                request_sent=request_sent,
            )
        return kind(what, request_sent=request_sent)


class _Wire(asyncio.Protocol):
    """The bytes of one TCP (or TLS) connection, read eagerly into a buffer.

    ``receive`` and ``send`` take an absolute deadline (loop time) and raise
    :class:`TimeoutError` when it passes; a dead connection raises
    ``anyio.BrokenResourceError``; the end of the stream reads as ``b""``.
    """

    __slots__ = (
        "_buffered",
        "_chunks",
        "_closed",
        "_drain_waiter",
        "_eof",
        "_error",
        "_loop",
        "_read_paused",
        "_read_waiter",
        "_transport",
        "_write_paused",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._eof = False  # the peer finished sending, or the connection is gone
        self._closed = False  # we closed it
        self._error: Exception | None = None
        self._read_paused = False
        self._write_paused = False
        self._read_waiter: asyncio.Future[bool] | None = None
        self._drain_waiter: asyncio.Future[bool] | None = None

    # -- asyncio.Protocol callbacks ------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not inherit from asyncio.Transport: no isinstance check.
        self._transport = cast("asyncio.Transport", transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Small requests and responses must not wait for Nagle's algorithm.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        _wake(self._read_waiter)
        if self._buffered > READ_HIGH_WATER and not self._read_paused:
            self._read_paused = True
            assert self._transport is not None
            self._transport.pause_reading()

    def eof_received(self) -> None:
        self._eof = True  # returning None lets the transport close: a client never half-closes
        _wake(self._read_waiter)

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self._error = exc
        _wake(self._read_waiter)
        _wake(self._drain_waiter)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        _wake(self._drain_waiter)

    # -- used by ClientConnection --------------------------------------------------

    def time(self) -> float:
        return self._loop.time()

    def at_rest(self) -> bool:
        """Nothing received and not closed: on an idle connection anything else is fatal.

        The kernel is asked too (one zero-timeout poll): a FIN or reset that
        arrived since the event loop last looked is not in our buffer yet.
        """
        if self._chunks or self._eof or self._closed or self._transport is None:
            return False
        sock = self._transport.get_extra_info("socket")
        if sock is None:
            return True
        fd = sock.fileno()
        if fd < 0:
            return False
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return not poller.poll(0)

    async def receive(self, deadline: float | None) -> bytes:
        chunks = self._chunks
        if not chunks:
            if self._eof or self._closed:
                return self._at_end()
            waiter = self._read_waiter = self._loop.create_future()
            timer = None if deadline is None else self._loop.call_at(deadline, _wake, waiter, True)
            try:
                timed_out = await waiter
            finally:
                self._read_waiter = None
                if timer is not None:
                    timer.cancel()
            if not chunks:
                if timed_out:
                    raise TimeoutError
                return self._at_end()
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        if self._read_paused:
            self._read_paused = False
            assert self._transport is not None
            self._transport.resume_reading()
        return data

    def _at_end(self) -> bytes:
        if self._closed or self._error is not None:
            raise anyio.BrokenResourceError from self._error
        return b""

    def writable(self) -> bool:
        """Whether a send can still reach the transport (neither side closed it)."""
        transport = self._transport
        return not self._closed and transport is not None and not transport.is_closing()

    async def send(self, data: bytes, deadline: float | None) -> None:
        transport = self._transport
        if not self.writable() or transport is None:
            raise anyio.BrokenResourceError from self._error
        transport.write(data)
        if self._write_paused:
            waiter = self._drain_waiter = self._loop.create_future()
            timer = None if deadline is None else self._loop.call_at(deadline, _wake, waiter, True)
            try:
                timed_out = await waiter
            finally:
                self._drain_waiter = None
                if timer is not None:
                    timer.cancel()
            if self._write_paused:
                if timed_out:
                    raise TimeoutError
                raise anyio.BrokenResourceError from self._error

    def close(self) -> None:
        """Close at once (no TLS close_notify, unsent bytes dropped): HTTP frames its
        messages, so nothing is lost that the peer could have relied on.
        """
        self._closed = True
        if self._transport is not None:
            self._transport.abort()
        _wake(self._read_waiter)
        _wake(self._drain_waiter)


def _wake(waiter: asyncio.Future[bool] | None, timed_out: bool = False) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(timed_out)


async def open_connection(
    origin: Origin,
    ssl_context: ssl.SSLContext | None,
    budget: Budget,
    max_header_bytes: int,
) -> ClientConnection:
    """Connect to ``origin`` (TCP, then TLS for https) within ``Timeouts.connect``."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        raise RuntimeError("Inferno's HTTP client needs anyio's asyncio backend") from None
    options: dict[str, Any] = {}
    if ssl_context is not None:
        options.update(ssl=ssl_context, server_hostname=origin.host)  # SNI + host name check
    if isinstance(loop, asyncio.BaseEventLoop):  # uvloop refuses the argument (uvloop#406)
        options["happy_eyeballs_delay"] = HAPPY_EYEBALLS_DELAY
    delay, by_total = budget.limit(budget.timeouts.connect)
    with anyio.move_on_after(delay):
        try:
            _, wire = await loop.create_connection(
                lambda: _Wire(loop), origin.host, origin.port, **options
            )
        except ssl.SSLError as exc:
            raise TLSError(f"TLS handshake with {origin} failed: {_describe(exc)}") from exc
        except OSError as exc:
            raise ConnectError(f"cannot connect to {origin}: {_describe(exc)}") from exc
        return ClientConnection(wire, origin, max_header_bytes)
    raise budget.expired(
        ConnectTimeout,
        by_total,
        f"connecting to {origin} took longer than {delay}s",
        request_sent=False,
    )


class ClientConnection:
    """One connection to one origin, carrying one request at a time."""

    __slots__ = ("_h11", "_max_head_bytes", "_wire", "origin", "request_sent")

    def __init__(self, wire: _Wire, origin: Origin, max_header_bytes: int) -> None:
        self._wire = wire
        # h11 refuses a response head growing past this while incomplete.
        self._h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=max_header_bytes)
        self._max_head_bytes = max_header_bytes
        self.origin = origin
        self.request_sent = False  # did any byte of the current request go out?

    # -- reuse ---------------------------------------------------------------

    def is_idle_alive(self) -> bool:
        """Whether an idle connection can carry a request: the server has neither
        closed it nor sent anything since the last response (on an idle HTTP/1.1
        connection, EOF, a reset or bytes nobody asked for are all fatal).
        """
        h = self._h11
        return (
            h.our_state is h11.IDLE
            and h.their_state is h11.IDLE
            and h.trailing_data == (b"", False)
            and self._wire.at_rest()
        )

    def finish(self) -> bool:
        """Prepare the next request/response cycle if HTTP/1.1 allows one.

        True when both sides completed their message with keep-alive; then
        the connection can go back to the pool.
        """
        h = self._h11
        if h.our_state is h11.DONE and h.their_state is h11.DONE:
            h.start_next_cycle()
            self.request_sent = False
            return True
        return False

    def drain_buffered(self) -> bool:
        """Consume the rest of a response that has already arrived, without waiting.

        Lets a response closed before its body was read keep its connection
        when the body came with the head; never reads from the network (an
        unread large body means closing instead).
        """
        h = self._h11
        try:
            while True:
                event = h.next_event()
                if type(event) is h11.Data:
                    continue
                if type(event) is h11.EndOfMessage:
                    return self.finish()
                return False
        except h11.ProtocolError:
            return False

    def close(self) -> None:
        """Close at once; safe to call in any state, and more than once."""
        self._wire.close()

    # -- request -------------------------------------------------------------

    async def send_request(self, request: h11.Request, body: RequestBody, budget: Budget) -> None:
        """Send the head and the whole body (bytes, or chunks as an async iterable)."""
        h = self._h11
        try:
            head = _encode(h, request)
            if body is None or isinstance(body, bytes):
                if body is None or len(body) <= COALESCE_BODY_BYTES:
                    parts = [head]
                    if body:
                        parts.append(_encode(h, h11.Data(data=body)))
                    parts.append(_encode(h, h11.EndOfMessage()))
                    await self._send(b"".join(parts), budget)
                else:
                    await self._send(head, budget)
                    await self._send(_encode(h, h11.Data(data=body)), budget)
                    await self._send(_encode(h, h11.EndOfMessage()), budget)
                return
            await self._send(head, budget)
            async for chunk in body:
                if not isinstance(chunk, (bytes, bytearray, memoryview)):
                    raise LocalProtocolError(
                        f"request body chunks must be bytes, not {type(chunk).__name__}",
                        request_sent=True,
                    )
                if chunk:
                    await self._send(_encode(h, h11.Data(data=chunk)), budget)
            await self._send(_encode(h, h11.EndOfMessage()), budget)
        except h11.LocalProtocolError as exc:
            raise LocalProtocolError(
                f"invalid request: {exc}", request_sent=self.request_sent
            ) from exc

    async def receive_head(self, budget: Budget) -> h11.Response:
        """Wait for the final response head, skipping 1xx informational responses."""
        h = self._h11
        received = 0
        while True:
            try:
                event = h.next_event()
            except h11.RemoteProtocolError as exc:
                if h.trailing_data == (b"", True):
                    raise RemoteProtocolError(
                        f"{self.origin} closed the connection without sending a response"
                    ) from exc
                raise _remote_error(self.origin, exc) from exc
            if event is h11.NEED_DATA:
                data = await self._receive(budget)
                received += len(data)
                h.receive_data(data)
            elif type(event) is h11.Response:
                # h11 bounds only a head still incomplete; one that arrived whole in
                # a single read is measured here (only when it could be too big).
                if received > self._max_head_bytes and _head_size(event) > self._max_head_bytes:
                    raise RemoteProtocolError(_HEAD_TOO_LARGE.format(self.origin))
                return event
            elif type(event) is not h11.InformationalResponse:
                raise RemoteProtocolError(f"unexpected {event!r} before the response head")

    async def receive_data(self, budget: Budget) -> bytes | None:
        """The next chunk of the response body as it arrives, or None at its end."""
        h = self._h11
        while True:
            try:
                event = h.next_event()
            except h11.RemoteProtocolError as exc:
                raise _remote_error(self.origin, exc) from exc
            if event is h11.NEED_DATA:
                h.receive_data(await self._receive(budget))
            elif type(event) is h11.Data:
                data = event.data
                return data if type(data) is bytes else bytes(data)
            elif type(event) is h11.EndOfMessage:
                return None
            else:
                raise RemoteProtocolError(f"{self.origin} ended the response early ({event!r})")

    # -- I/O -----------------------------------------------------------------

    async def _receive(self, budget: Budget) -> bytes:
        wire = self._wire
        deadline, by_total = budget.until(budget.timeouts.read, wire.time())
        try:
            return await wire.receive(deadline)  # b"" at the end: h11 reads it as EOF
        except TimeoutError:
            raise budget.expired(
                ReadTimeout,
                by_total,
                f"{self.origin} sent nothing for {budget.timeouts.read}s",
                request_sent=True,
            ) from None
        except _BROKEN as exc:
            raise ReadError(f"receiving from {self.origin} failed: {_describe(exc)}") from exc

    async def _send(self, data: bytes, budget: Budget) -> None:
        wire = self._wire
        if not wire.writable():  # known closed: not a byte of this goes out
            raise WriteError(f"{self.origin} closed the connection", request_sent=self.request_sent)
        # From here on the transport may put bytes on the wire before it can
        # report a failure, so the request counts as sent: never retried blindly.
        self.request_sent = True
        deadline, by_total = budget.until(budget.timeouts.write, wire.time())
        try:
            await wire.send(data, deadline)
        except TimeoutError:
            raise budget.expired(
                WriteTimeout,
                by_total,
                f"{self.origin} accepted no data for {budget.timeouts.write}s",
                request_sent=True,
            ) from None
        except _BROKEN as exc:
            raise WriteError(
                f"sending to {self.origin} failed: {_describe(exc)}", request_sent=True
            ) from exc


def check_body(body: object) -> RequestBody:
    """The body as the connection sends it; anything unusable is a clear error."""
    if body is None or isinstance(body, bytes):
        return body
    if isinstance(body, (bytearray, memoryview)):
        return bytes(body)
    if isinstance(body, AsyncIterable):
        return body
    raise LocalProtocolError(
        f"body must be bytes or an async iterable of bytes, not {type(body).__name__}"
    )


def build_request(
    method: str,
    target: bytes,
    host: bytes,
    headers: HeadersInput,
    body: RequestBody,
) -> h11.Request:
    """The h11 request event, with Host and body framing added unless given.

    Invalid input (a method or header h11 refuses, text that is not
    encodable) raises :class:`LocalProtocolError` before any connection is used.
    """
    try:
        method_bytes = method.encode("ascii").upper()
        out: list[tuple[bytes, bytes]] = [(b"host", host)]
        framed = False
        if headers:
            items = headers.items() if isinstance(headers, Mapping) else headers
            for name, value in items:
                raw_name = name if isinstance(name, bytes) else name.encode("ascii")
                raw_value = value if isinstance(value, bytes) else value.encode("latin-1")
                lower = raw_name.lower()
                if lower == b"host":
                    out[0] = (raw_name, raw_value)
                    continue
                if lower == b"content-length" or lower == b"transfer-encoding":
                    framed = True
                out.append((raw_name, raw_value))
        if not framed:
            if body is None:
                if method_bytes in _BODY_METHODS:
                    out.append((b"content-length", b"0"))
            elif isinstance(body, bytes):
                out.append((b"content-length", b"%d" % len(body)))
            else:
                out.append((b"transfer-encoding", b"chunked"))
        return h11.Request(method=method_bytes, target=target, headers=out)
    except (h11.LocalProtocolError, UnicodeError, AttributeError, TypeError, ValueError) as exc:
        raise LocalProtocolError(f"invalid request: {exc}", request_sent=False) from exc


def _encode(h: h11.Connection, event: Any) -> bytes:
    data: bytes | None = h.send(event)
    assert data is not None  # only ConnectionClosed encodes to None
    return data


_HEAD_TOO_LARGE = "{} sent a response head larger than max_response_header_bytes"


def _head_size(response: h11.Response) -> int:
    """Bytes of a response head as sent: status line, fields, blank line."""
    size = 17 + len(response.reason)  # "HTTP/1.1 200 " + reason + CRLF, final CRLF
    for name, value in response.headers:
        size += len(name) + len(value) + 4  # ": " and CRLF
    return size


def _remote_error(origin: Origin, exc: h11.RemoteProtocolError) -> RemoteProtocolError:
    if exc.error_status_hint == 431:  # h11's max_incomplete_event_size
        return RemoteProtocolError(_HEAD_TOO_LARGE.format(origin))
    return RemoteProtocolError(f"{origin} broke HTTP/1.1: {exc}")


def _describe(exc: BaseException) -> str:
    """A readable reason: errors often have no message, or a vague one
    ("Connect call failed"), and their errno or cause says what happened.
    """
    parts: list[str] = []
    seen: BaseException | None = exc
    while seen is not None and len(parts) < 3:
        if isinstance(seen, OSError) and seen.errno and not isinstance(seen, ssl.SSLError):
            text = os.strerror(seen.errno)
        else:
            text = str(seen)
        if text and text not in parts:
            parts.append(text)
        seen = seen.__cause__
    return ": ".join(parts) or type(exc).__name__
