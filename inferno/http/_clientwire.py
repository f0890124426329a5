"""The client's byte transport: one TCP (or TLS) connection on asyncio.

:class:`ClientWire` is an ``asyncio.Protocol`` that reads eagerly into a
buffer: a receive with data waiting returns at once, a send is one
``transport.write``, and a receive's deadline costs one lazy timer per
connection (a wait records its deadline; the timer re-arms itself when it
fires early) instead of a ``loop.call_at`` and a cancel per wait, which on a
streamed response was one timer per chunk.  A drain, rare, arms a timer of
its own.  anyio's socket stream instead pauses and resumes reading around
every receive and yields after every send, and a cancel scope per phase costs
about as much again.  Measured against the plain asyncio + h11 pool of
``bench/_baseline.py`` (client-side CPU per small request, a busy 2-CPU
machine): about 1.8x on anyio streams, about 1.3x on this wire, the rest being
timeouts, pool accounting and the response objects.  Cancellation stays
anyio's: a cancel scope cancels the task, which cancels the future a receive
or a drain waits on.

TLS is asyncio's own (``create_connection(ssl=...)``), so one protocol class
serves both schemes.  The client therefore needs anyio's asyncio backend
(asyncio or uvloop), which is what Inferno runs on.
"""

from __future__ import annotations

import asyncio
import os
import select
import socket
import ssl
from typing import Any, cast

import anyio

from inferno.http.client_errors import ConnectError, TLSError
from inferno.http.pool import Origin

__all__ = ["ClientWire", "connect", "describe"]

READ_HIGH_WATER = 256 * 1024  # bytes buffered unread before the socket stops being read
HAPPY_EYEBALLS_DELAY = 0.25  # seconds before trying a host's next address (RFC 8305)


async def connect(origin: Origin, ssl_context: ssl.SSLContext | None) -> ClientWire:
    """Open a connection to ``origin`` (TLS with SNI and host name checking when
    ``ssl_context`` is given); the caller applies the timeout.

    :raises ConnectError: the name did not resolve, or no address accepted.
    :raises TLSError: the TLS handshake failed.
    """
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        raise RuntimeError("Inferno's HTTP client needs anyio's asyncio backend") from None
    options: dict[str, Any] = {}
    if ssl_context is not None:
        options.update(ssl=ssl_context, server_hostname=origin.host)
    if isinstance(loop, asyncio.BaseEventLoop):  # uvloop refuses the argument (uvloop#406)
        options["happy_eyeballs_delay"] = HAPPY_EYEBALLS_DELAY
    try:
        _, wire = await loop.create_connection(
            lambda: ClientWire(loop), origin.host, origin.port, **options
        )
    except ssl.SSLError as exc:
        raise TLSError(f"TLS handshake with {origin} failed: {describe(exc)}") from exc
    except OSError as exc:
        raise ConnectError(f"cannot connect to {origin}: {describe(exc)}") from exc
    return wire


class ClientWire(asyncio.Protocol):
    """The bytes of one TCP (or TLS) connection, read eagerly into a buffer.

    ``receive`` and ``send`` take an absolute deadline (loop time) and raise
    :class:`TimeoutError` when it passes; a dead connection raises
    ``anyio.BrokenResourceError``; the end of the stream reads as ``b""``.
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
        "_read_paused",
        "_read_waiter",
        "_timer",
        "_timer_at",
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
        # The read deadline's lazy timer (as in the server's AsyncioWire): a kept-alive
        # connection costs about one timer event per read timeout, not one per receive.
        self._deadline: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

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
        self._cancel_timer()
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

    def _cancel_timer(self) -> None:
        # A closed connection must not stay referenced by the loop until its timer fires.
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

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
        self._cancel_timer()
        if self._transport is not None:
            self._transport.abort()
        _wake(self._read_waiter)
        _wake(self._drain_waiter)


def _wake(waiter: asyncio.Future[bool] | None, timed_out: bool = False) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(timed_out)


def describe(exc: BaseException) -> str:
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
