"""The server's wire on the portable path: a stream read ahead by a task of its own.

On asyncio the server reads through :class:`~inferno.http._wire.AsyncioWire`,
whose protocol callbacks say at once when a client closes or resets its
connection.  An anyio stream (another event loop, or the anyio-stream path the
tests exercise on asyncio) says so only to a reader, and while a handler runs
nobody reads.  :class:`ReadAheadWire` keeps a reader going: one task per
connection, only on this path, so the asyncio path pays nothing for it.
"""

from __future__ import annotations

import anyio
import anyio.abc

from inferno.http._wire import READ_HIGH_WATER, RECEIVE_SIZE, PeerWatcher, StreamWire

__all__ = ["ReadAheadWire"]


class ReadAheadWire(StreamWire):
    """A :class:`StreamWire` read by a task of its own (:meth:`pump`), and a :class:`PeerWatch`.

    The server's connections on the portable path (event loops other than
    asyncio, or anyio streams in tests): an anyio stream reports a closed or
    reset peer only to a reader, and while a handler runs nobody reads.  So the
    pump reads all the time, buffering up to :data:`READ_HIGH_WATER` bytes like
    :class:`AsyncioWire` does, and tells the ``watcher``.  One task per
    connection, only on this path; receives take from the buffer.
    """

    __slots__ = (
        "_arrived",
        "_buffered",
        "_chunks",
        "_closed",
        "_eof",
        "_error",
        "_lost",
        "_room",
        "watcher",
    )

    def __init__(
        self,
        stream: anyio.abc.ByteStream,
        eof_stream: anyio.abc.ByteStream | None = None,
        send_timeout: float | None = None,
    ) -> None:
        super().__init__(stream, eof_stream, send_timeout)
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._eof = False
        self._lost = False
        self._closed = False
        self._error: BaseException | None = None
        self._arrived: anyio.Event | None = None  # a receive waits for bytes or the end
        self._room: anyio.Event | None = None  # the pump waits for the buffer to be taken
        self.watcher: PeerWatcher | None = None

    @property
    def peer_ended(self) -> bool:
        return self._eof

    @property
    def peer_lost(self) -> bool:
        return self._lost

    @property
    def unread(self) -> int:
        return self._buffered

    async def pump(self) -> None:
        """Read into the buffer until the stream ends; run beside the connection, cancel after."""
        stream = self.stream
        chunks = self._chunks
        try:
            while True:
                if self._buffered >= READ_HIGH_WATER:
                    room = self._room = anyio.Event()
                    await room.wait()
                    continue
                data = await stream.receive(RECEIVE_SIZE)
                chunks.append(data)
                self._buffered += len(data)
                arrived = self._arrived
                if arrived is not None:
                    arrived.set()
        except anyio.EndOfStream:
            self._end(None)
        except Exception as exc:  # reset, TLS failure, closed: all end the stream
            self._end(exc)

    def _end(self, exc: Exception | None) -> None:
        self._eof = True
        if exc is not None and not self._closed:
            self._lost = True
            self._error = exc
        if self._arrived is not None:
            self._arrived.set()
        watcher = self.watcher
        if watcher is not None and not self._closed:
            watcher(self._lost)

    async def receive_some(self, deadline: float | None = None) -> bytes:
        chunks = self._chunks
        while not chunks:
            if self._eof or self._closed:
                if self._closed:
                    raise anyio.ClosedResourceError
                if self._error is not None:
                    raise anyio.BrokenResourceError from self._error
                return b""
            arrived = self._arrived = anyio.Event()
            if deadline is None:
                await arrived.wait()
            else:
                with anyio.CancelScope(deadline=deadline):
                    await arrived.wait()
                if not arrived.is_set():
                    raise TimeoutError
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        room = self._room
        if room is not None:
            self._room = None
            room.set()
        return data

    async def aclose(self) -> None:
        self._closed = True
        if self._arrived is not None:
            self._arrived.set()
        await super().aclose()
