"""Byte transports under the HTTP server and WebSockets.

The protocol code (h11, wsproto) talks to a :class:`Wire`: receive whatever
bytes are there (with an optional absolute deadline), send bytes, half-close,
close.  Two implementations:

* :class:`AsyncioWire`, the data path on asyncio (and uvloop): an
  ``asyncio.Protocol`` that keeps the socket readable and buffers what arrives,
  so a receive with data already buffered returns at once and a send is one
  ``transport.write``.  anyio's socket stream pauses and resumes reading around
  every receive (two ``epoll_ctl`` calls) and yields to the loop after every
  send; on the request path that costs 15–25 % per request and 55–65 % per
  streamed chunk (measured for issue 2).  Cancellation still comes from anyio
  cancel scopes: on asyncio they cancel the task, which cancels the future a
  receive or drain is waiting on.  Deadlines cost one lazy timer per connection
  (a wait records its deadline; the timer re-arms itself when it fires early),
  cheaper than a cancel scope, or a timer, per wait.
* :class:`StreamWire`, over any anyio byte stream: TLS (anyio's ``TLSStream``,
  itself layered on an ``AsyncioWire`` through :class:`WireByteStream`), other
  event loops, and the WebSocket client (the server's variant, read by a task
  of its own, is :class:`~inferno.http._readahead.ReadAheadWire`).

Receives return ``b""`` at end of stream and raise :class:`TimeoutError` when the
deadline passes; a reset raises ``anyio.BrokenResourceError``.

A server must learn that its client went away while a handler runs, when
nobody reads (see :class:`PeerWatch`).  ``AsyncioWire`` knows it for free: its
``eof_received`` and ``connection_lost`` callbacks run whether or not anyone
waits, so it tells its ``watcher`` from there; under TLS the raw
``AsyncioWire`` below the ``TLSStream`` is the one watched.  An anyio stream
tells nothing until read, so on that path (other event loops) the server reads
ahead in one task per connection (:mod:`inferno.http._readahead`).

Watching TLS from below has two limits, both for rare clients: a TLS client
that sends its ``close_notify`` but keeps TCP open, waiting for ours, counts
as gone only once it closes TCP (browsers and curl close at once); and bytes
still encrypted cannot be told from a ``close_notify``, so requests pipelined
over TLS just before a TCP half-close may be cancelled instead of answered.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Protocol, cast

import anyio
import anyio.abc

__all__ = [
    "DRAIN_MAX_BYTES",
    "DRAIN_TIMEOUT",
    "READ_HIGH_WATER",
    "RECEIVE_SIZE",
    "AsyncioWire",
    "PeerWatch",
    "PeerWatcher",
    "StreamWire",
    "Wire",
    "WireByteStream",
    "close_gracefully",
]

RECEIVE_SIZE = 64 * 1024  # bytes asked of a stream per receive: large reads, few wake-ups
READ_HIGH_WATER = 256 * 1024  # unread bytes buffered before the socket stops being read
DRAIN_TIMEOUT = 1.0  # seconds to discard what a peer still sends after our last response
DRAIN_MAX_BYTES = 256 * 1024  # bytes discarded at most before closing anyway

_TIMED_OUT = True  # result of a read waiter woken by its deadline

PeerWatcher = Callable[[bool], None]  # called with True for a reset, False for an EOF


class Wire(Protocol):
    """What the HTTP and WebSocket drivers need from a connection."""

    def time(self) -> float:
        """The clock deadlines are expressed in (``anyio.current_time()``)."""
        ...

    async def receive_some(self, deadline: float | None = None) -> bytes:
        """Bytes that arrived (``b""`` at end of stream).

        :raises TimeoutError: when ``deadline`` passes first.
        :raises anyio.BrokenResourceError: when the connection was reset.
        """
        ...

    async def send_all(self, data: bytes) -> None:
        """Queue ``data`` for sending, waiting only while the peer is slow.

        :raises anyio.BrokenResourceError: when the connection is gone, or the
            peer has not read for ``send_timeout`` seconds.
        """
        ...

    async def send_eof(self) -> None:
        """Half-close: no more bytes from us, reading goes on."""
        ...

    async def aclose(self) -> None:
        """Close the connection (bytes already queued are still delivered)."""
        ...


class PeerWatch(Protocol):
    """What a connection learns about its peer without reading.

    ``watcher``, while set, is called on the event loop's thread the moment the
    peer ends its side (``False``) or the connection is reset or lost
    (``True``); never for a close of our own.  ``unread`` counts bytes that
    arrived and were not taken by a receive yet.
    """

    watcher: PeerWatcher | None

    @property
    def peer_ended(self) -> bool:
        """The peer sent its EOF, or the connection was lost."""
        ...

    @property
    def peer_lost(self) -> bool:
        """The connection was reset or lost (not closed by us)."""
        ...

    @property
    def unread(self) -> int:
        """Bytes received and buffered, not yet returned by a receive."""
        ...


def _wake(waiter: asyncio.Future[bool] | None, timed_out: bool = False) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(timed_out)


class AsyncioWire(asyncio.Protocol):
    """A TCP connection on asyncio, read eagerly into a buffer (see the module docstring).

    ``send_timeout`` bounds how long a send waits for a peer that stopped reading.
    """

    __slots__ = (
        "_buffered",
        "_chunks",
        "_closed",
        "_deadline",
        "_drain_waiter",
        "_eof",
        "_error",
        "_loop",
        "_lost",
        "_read_paused",
        "_read_waiter",
        "_timer",
        "_timer_at",
        "_transport",
        "_write_paused",
        "send_timeout",
        "watcher",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, send_timeout: float | None = None) -> None:
        self._loop = loop
        self.send_timeout = send_timeout
        self.watcher: PeerWatcher | None = None  # see PeerWatch
        self._transport: asyncio.Transport | None = None
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._eof = False
        self._lost = False
        self._closed = False
        self._error: BaseException | None = None
        self._read_paused = False
        self._write_paused = False
        self._read_waiter: asyncio.Future[bool] | None = None
        self._drain_waiter: asyncio.Future[bool] | None = None
        # One lazy timer per connection: a wait only records its deadline; the
        # timer re-arms itself when it fires early, so a keep-alive connection
        # costs about one timer event per timeout period, not one per request.
        self._deadline: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    @classmethod
    async def from_socket(cls, sock: object, send_timeout: float | None = None) -> AsyncioWire:
        """Wrap an accepted, connected socket (TCP_NODELAY already set by the caller)."""
        loop = asyncio.get_running_loop()
        wire = cls(loop, send_timeout)
        await loop.connect_accepted_socket(lambda: wire, sock)  # type: ignore[arg-type]
        return wire

    # -- asyncio.Protocol callbacks ------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport; uvloop's is not an asyncio.Transport subclass.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        _wake(self._read_waiter)
        if self._buffered > READ_HIGH_WATER and not self._read_paused:
            self._read_paused = True
            assert self._transport is not None
            self._transport.pause_reading()

    def eof_received(self) -> bool:
        self._eof = True
        _wake(self._read_waiter)
        watcher = self.watcher
        if watcher is not None:
            watcher(False)
        return True  # keep the transport open: we may still answer a half-closed peer

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._lost = True
        self._eof = True
        self._error = exc
        _wake(self._read_waiter)
        _wake(self._drain_waiter)
        watcher = self.watcher
        if watcher is not None and not self._closed:
            watcher(True)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        _wake(self._drain_waiter)

    # -- PeerWatch ----------------------------------------------------------------

    @property
    def peer_ended(self) -> bool:
        return self._eof

    @property
    def peer_lost(self) -> bool:
        return self._lost and not self._closed

    @property
    def unread(self) -> int:
        return self._buffered

    # -- Wire ---------------------------------------------------------------------

    def time(self) -> float:
        return self._loop.time()

    async def receive_some(self, deadline: float | None = None) -> bytes:
        chunks = self._chunks
        if not chunks:
            if self._eof or self._closed:
                return self._at_end()
            waiter = self._loop.create_future()
            self._read_waiter = waiter
            if deadline is not None:
                self._deadline = deadline
                if self._timer is None or self._timer_at > deadline:
                    self._arm(deadline)
            try:
                timed_out = await waiter
            finally:
                self._read_waiter = None
                self._deadline = None
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

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_at(when, self._on_timer)
        self._timer_at = when

    def _on_timer(self) -> None:
        self._timer = None
        deadline = self._deadline
        if deadline is None or self._read_waiter is None:
            return  # nobody waits now; the next wait arms the timer again
        if self._loop.time() >= deadline:
            _wake(self._read_waiter, True)
        else:
            self._arm(deadline)

    def _at_end(self) -> bytes:
        if self._closed:
            raise anyio.ClosedResourceError
        if self._error is not None:
            raise anyio.BrokenResourceError from self._error
        return b""

    async def send_all(self, data: bytes) -> None:
        transport = self._transport
        assert transport is not None
        if self._lost or self._closed or transport.is_closing():
            raise anyio.ClosedResourceError if self._closed else anyio.BrokenResourceError
        transport.write(data)
        if self._write_paused:  # rare: the peer reads slower than we write
            waiter = self._loop.create_future()
            self._drain_waiter = waiter
            timer = None
            if self.send_timeout is not None:
                timer = self._loop.call_later(self.send_timeout, _wake, waiter, True)
            try:
                timed_out = await waiter
            finally:
                self._drain_waiter = None
                if timer is not None:
                    timer.cancel()
            if self._lost:
                raise anyio.BrokenResourceError from self._error
            if timed_out:
                self.abort()
                raise anyio.BrokenResourceError("the peer stopped reading")

    async def send_eof(self) -> None:
        transport = self._transport
        if (
            transport is not None
            and not self._lost
            and not transport.is_closing()
            and transport.can_write_eof()
        ):
            transport.write_eof()

    async def aclose(self) -> None:
        self.close()

    def close(self) -> None:
        """Close now, without waiting; queued bytes are still flushed by the transport."""
        if not self._closed:
            self._closed = True
            if self._transport is not None:
                self._transport.close()
            _wake(self._read_waiter)
            _wake(self._drain_waiter)

    def abort(self) -> None:
        """Close at once, discarding queued bytes (used when a connection is cancelled)."""
        self._closed = True
        if self._transport is not None:
            self._transport.abort()
        _wake(self._read_waiter)
        _wake(self._drain_waiter)


class WireByteStream(anyio.abc.ByteStream):
    """An :class:`AsyncioWire` as an anyio byte stream, so anyio's TLS can ride on it."""

    def __init__(self, wire: AsyncioWire) -> None:
        self.wire = wire

    async def receive(self, max_bytes: int = RECEIVE_SIZE) -> bytes:
        data = await self.wire.receive_some()
        if not data:
            raise anyio.EndOfStream
        if len(data) > max_bytes:
            # Put the excess back in front for the next receive.
            self.wire._chunks.insert(0, data[max_bytes:])
            self.wire._buffered += len(data) - max_bytes
            data = data[:max_bytes]
        return data

    async def send(self, item: bytes) -> None:
        await self.wire.send_all(item)

    async def send_eof(self) -> None:
        await self.wire.send_eof()

    async def aclose(self) -> None:
        self.wire.close()


class StreamWire:
    """A :class:`Wire` over any anyio byte stream (TLS, other event loops, clients).

    ``eof_stream`` is where a half-close goes when the stream itself cannot do
    one (TLS before 1.3 has no half-close; the TCP stream below it has).
    """

    __slots__ = ("eof_stream", "send_timeout", "stream")

    def __init__(
        self,
        stream: anyio.abc.ByteStream,
        eof_stream: anyio.abc.ByteStream | None = None,
        send_timeout: float | None = None,
    ) -> None:
        self.stream = stream
        self.eof_stream = eof_stream
        self.send_timeout = send_timeout

    def time(self) -> float:
        return anyio.current_time()

    async def receive_some(self, deadline: float | None = None) -> bytes:
        try:
            if deadline is None:
                return await self.stream.receive(RECEIVE_SIZE)
            with anyio.CancelScope(deadline=deadline):
                return await self.stream.receive(RECEIVE_SIZE)
            raise TimeoutError  # only reached when the deadline cancelled the receive
        except anyio.EndOfStream:
            return b""

    async def send_all(self, data: bytes) -> None:
        if self.send_timeout is None:
            await self.stream.send(data)
            return
        with anyio.move_on_after(self.send_timeout) as scope:
            await self.stream.send(data)
        if scope.cancelled_caught:
            await self.aclose()
            raise anyio.BrokenResourceError("the peer stopped reading")

    async def send_eof(self) -> None:
        target = self.eof_stream or self.stream
        with contextlib.suppress(
            NotImplementedError, anyio.BrokenResourceError, anyio.ClosedResourceError
        ):
            await target.send_eof()

    async def aclose(self) -> None:
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            await self.stream.aclose()


async def close_gracefully(wire: Wire) -> None:
    """Half-close, discard what the peer still sends (bounded), then close.

    Closing a socket with unread bytes in its receive buffer makes the kernel
    send a reset, and a reset can destroy the response we just sent before the
    client reads it (RFC 9112 §9.6).  So: FIN first, then read and discard until
    the peer closes too, for at most :data:`DRAIN_TIMEOUT` seconds and
    :data:`DRAIN_MAX_BYTES` bytes.
    """
    try:
        await wire.send_eof()
        deadline = wire.time() + DRAIN_TIMEOUT
        drained = 0
        while drained < DRAIN_MAX_BYTES:
            data = await wire.receive_some(deadline)
            if not data:
                break
            drained += len(data)
    except (TimeoutError, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        pass
    finally:
        with anyio.CancelScope(shield=True):
            await wire.aclose()
