"""One HTTP/1.1 client connection: h11 over a :class:`ClientWire`.

This is the protocol half of the client's driver: it turns a request into
bytes for the wire and the wire's bytes into a response, applies the deadline
of each phase and translates every foreign exception into
:mod:`inferno.http.client_errors`.  It makes no pool decision;
:mod:`inferno.http.client` asks it whether it can be reused and closes it.

The per-request path is kept short (the proxy runs it for every request): the
request head and a small body leave in one write, deadlines are absolute loop
times handed to the wire (no cancel scope per phase), no task is spawned.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, TypeAlias

import anyio
import h11

from inferno.http._clientwire import ClientWire, connect, describe
from inferno.http.client_errors import (
    ClientTimeout,
    ConnectTimeout,
    LocalProtocolError,
    ReadError,
    ReadTimeout,
    RemoteProtocolError,
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

COALESCE_BODY_BYTES = 64 * 1024  # bodies up to this size leave in the same write as the head

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


async def open_connection(
    origin: Origin,
    ssl_context: ssl.SSLContext | None,
    budget: Budget,
    max_header_bytes: int,
) -> ClientConnection:
    """Connect to ``origin`` (TCP, then TLS for https) within ``Timeouts.connect``."""
    delay, by_total = budget.limit(budget.timeouts.connect)
    with anyio.move_on_after(delay):
        wire = await connect(origin, ssl_context)
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

    def __init__(self, wire: ClientWire, origin: Origin, max_header_bytes: int) -> None:
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
            raise ReadError(f"receiving from {self.origin} failed: {describe(exc)}") from exc

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
                f"sending to {self.origin} failed: {describe(exc)}", request_sent=True
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
