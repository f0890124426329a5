"""The wire between a multi-process proxy's parent and its workers: frames and the boot.

One Unix socketpair per worker carries length-prefixed pickled frames
(:class:`Channel`).  Pickle is safe here only because both ends are this
program's own processes: the parent creates the pair and hands one end to the
worker it starts, and nothing else can write to it.  Messages are tuples whose
first item names them::

    parent -> worker   ("boot", WorkerBoot)          first, once
                       ("state", records, removed, full)   pool snapshot / delta
                       ("peers", {node id: in flight}, {model: waiting}, Spending | None)
                                                            the other workers' load, and
                                                            its own share of the next charge
                       ("charge", Spending)                 what every worker's rate limits
                                                            allowed (one pickle for all)
                       ("reload",)                          SIGHUP: read the API keys again
                       ("metrics?", n)                      send the metrics now, answering n
    worker -> parent   ("listening", pid) | ("failed", message)
                       ("report", Report)                   its traffic (replica.Report)
                       ("limits", depths | None, Spending | None)  its queue, its limits' spending
                       ("metrics", Registry.snapshot()[, n])  for /telemetry and vitals
"""

from __future__ import annotations

import asyncio
import contextlib
import pickle
import socket
import struct
from dataclasses import dataclass
from typing import Any, Final

__all__ = ["MAX_BACKLOG", "MAX_FRAME", "Channel", "ChannelClosed", "WorkerBoot", "frame"]

#: Largest frame on a channel: a snapshot of 10,000 nodes is a few MiB.
MAX_FRAME: Final = 64 * 1024 * 1024
#: Bytes a peer may leave unread before it counts as hung.
MAX_BACKLOG: Final = 64 * 1024 * 1024
_HEADER: Final = struct.Struct("!I")


@dataclass(frozen=True, slots=True)
class WorkerBoot:
    """The first frame a worker receives: everything it needs to serve like the parent.

    :ivar values: the effective configuration (``"section.key" -> value``),
        secrets removed; :ivar sources: where each value came from.
    :ivar port: the reserved service port.
    :ivar log_level: :ivar log_format: the parent's logging.
    :ivar drain_budget: seconds a stopping worker lets requests finish.
    :ivar worker_header: add ``X-Inferno-Worker: <pid>`` to responses.
    """

    values: dict[str, Any]
    sources: dict[str, str]
    port: int
    log_level: str
    log_format: str
    drain_budget: float
    worker_header: bool = False


# --- the channel -------------------------------------------------------------------------------


def frame(message: tuple[Any, ...]) -> bytes:
    """*message* as it travels: its pickle, after its length."""
    data = pickle.dumps(message, pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(data)) + data


class ChannelClosed(Exception):
    """Raised by :meth:`Channel.send` when the other side is gone or hung."""


class Channel:
    """Length-prefixed pickled frames over one end of a socketpair (asyncio streams).

    :meth:`send` never waits: a peer that stops reading is found by the size
    of what it left unread (:data:`MAX_BACKLOG`) instead of stalling the sender.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def open(cls, sock: socket.socket) -> Channel:
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        return cls(reader, writer)

    def send(self, message: tuple[Any, ...]) -> None:
        """Queue *message*; :raises ChannelClosed: when the peer is gone or not reading."""
        self.send_frame(frame(message))

    def send_frame(self, data: bytes) -> None:
        """Queue a message made by :func:`frame` (one pickling for many channels).

        :raises ChannelClosed: when the peer is gone or not reading.
        """
        writer = self._writer
        if writer.is_closing():
            raise ChannelClosed("channel closed")
        writer.write(data)
        if writer.transport.get_write_buffer_size() > MAX_BACKLOG:
            raise ChannelClosed(f"more than {MAX_BACKLOG} bytes left unread")

    async def flush(self) -> None:
        with contextlib.suppress(ConnectionError):
            await self._writer.drain()

    async def receive(self) -> tuple[Any, ...] | None:
        """The next message, or ``None`` at the end of the stream.

        :raises ValueError: on a frame over :data:`MAX_FRAME` or not a tuple.
        """
        try:
            (size,) = _HEADER.unpack(await self._reader.readexactly(_HEADER.size))
            if size > MAX_FRAME:
                raise ValueError(f"frame of {size} bytes exceeds {MAX_FRAME}")
            data = await self._reader.readexactly(size)
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        message = pickle.loads(data)  # from our own child or parent (see the module docstring)
        if not isinstance(message, tuple) or not message:
            raise ValueError(f"unexpected message {type(message).__name__}")
        return message

    def close(self) -> None:
        self._writer.close()
