"""The baseline the HTTP benchmark compares against: a minimal h11 server and
proxy hop on plain asyncio streams, with none of Inferno's limits or structure.

It is deliberately the simplest correct code (what a careful engineer writes in
an afternoon), so the ratio printed by ``bench/http_server.py`` says what
anyio's structure and Inferno's protections cost on top of the bare protocol.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import h11

PAYLOAD = b'{"id":"bench","object":"ok","usage":{"prompt_tokens":3,"completion_tokens":5}}'
CHUNK = b'data: {"choices":[{"delta":{"content":"token"}}]}\n\n'


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def _next_event(conn: h11.Connection, reader: asyncio.StreamReader) -> object:
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await reader.read(65536))
            continue
        return event


async def _serve_connection(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, chunks: int
) -> None:
    _nodelay(writer)
    conn = h11.Connection(h11.SERVER)
    try:
        while True:
            event = await _next_event(conn, reader)
            if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                break
            if not isinstance(event, h11.Request):
                break
            while not isinstance(await _next_event(conn, reader), h11.EndOfMessage):
                pass
            if chunks:
                writer.write(
                    conn.send(
                        h11.Response(
                            status_code=200,
                            headers=[
                                ("content-type", "text/event-stream"),
                                ("transfer-encoding", "chunked"),
                            ],
                        )
                    )
                )
                for _ in range(chunks):
                    writer.write(conn.send(h11.Data(data=CHUNK)))
                    await writer.drain()
            else:
                head = conn.send(
                    h11.Response(
                        status_code=200,
                        headers=[
                            ("content-type", "application/json"),
                            ("content-length", str(len(PAYLOAD))),
                        ],
                    )
                )
                writer.write(head + conn.send(h11.Data(data=PAYLOAD)))
            writer.write(conn.send(h11.EndOfMessage()))
            await writer.drain()
            if conn.our_state is h11.MUST_CLOSE:
                break
            conn.start_next_cycle()
    except (ConnectionError, h11.ProtocolError):
        pass
    finally:
        writer.close()


async def serve_baseline(port: int, chunks: int, ready: asyncio.Future[int]) -> None:
    """Answer every request with PAYLOAD (or ``chunks`` SSE chunks) until cancelled."""
    server = await asyncio.start_server(
        lambda r, w: _serve_connection(r, w, chunks), "127.0.0.1", port, backlog=1024
    )
    ready.set_result(server.sockets[0].getsockname()[1])
    async with server:
        await server.serve_forever()


class _UpstreamConn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.conn = h11.Connection(h11.CLIENT)


class BaselinePool:
    """A keep-alive pool of h11 client connections to one upstream (LIFO reuse)."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.idle: list[_UpstreamConn] = []

    async def acquire(self) -> _UpstreamConn:
        if self.idle:
            return self.idle.pop()
        reader, writer = await asyncio.open_connection(self.host, self.port)
        _nodelay(writer)
        return _UpstreamConn(reader, writer)

    def release(self, up: _UpstreamConn) -> None:
        if up.conn.our_state is h11.DONE and up.conn.their_state is h11.DONE:
            up.conn.start_next_cycle()
            self.idle.append(up)
        else:
            up.writer.close()

    async def forward(
        self, method: bytes, target: bytes, body: bytes
    ) -> tuple[int, list[tuple[bytes, bytes]], AsyncIterator[bytes], _UpstreamConn]:
        up = await self.acquire()
        headers = [
            (b"host", f"{self.host}:{self.port}".encode()),
            (b"content-length", str(len(body)).encode()),
            (b"content-type", b"application/json"),
        ]
        up.writer.write(
            up.conn.send(h11.Request(method=method, target=target, headers=headers))
            + up.conn.send(h11.Data(data=body))
            + up.conn.send(h11.EndOfMessage())
        )
        event = await _next_event(up.conn, up.reader)
        assert isinstance(event, h11.Response)

        async def body_iter() -> AsyncIterator[bytes]:
            while True:
                ev = await _next_event(up.conn, up.reader)
                if isinstance(ev, h11.Data):
                    yield bytes(ev.data)
                elif isinstance(ev, h11.EndOfMessage):
                    return

        return event.status_code, list(event.headers), body_iter(), up


_HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"host"}


async def _hop_connection(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pool: BaselinePool
) -> None:
    _nodelay(writer)
    conn = h11.Connection(h11.SERVER)
    try:
        while True:
            event = await _next_event(conn, reader)
            if not isinstance(event, h11.Request):
                break
            body = b""
            while True:
                ev = await _next_event(conn, reader)
                if isinstance(ev, h11.Data):
                    body += ev.data
                elif isinstance(ev, h11.EndOfMessage):
                    break
            status, headers, chunks, up = await pool.forward(event.method, event.target, body)
            out = [(k, v) for k, v in headers if k not in _HOP]
            out.append((b"transfer-encoding", b"chunked"))
            writer.write(conn.send(h11.Response(status_code=status, headers=out)))
            async for chunk in chunks:
                writer.write(conn.send(h11.Data(data=chunk)))
                await writer.drain()
            pool.release(up)
            writer.write(conn.send(h11.EndOfMessage()))
            await writer.drain()
            if conn.our_state is h11.MUST_CLOSE:
                break
            conn.start_next_cycle()
    except (ConnectionError, h11.ProtocolError):
        pass
    finally:
        writer.close()


async def serve_baseline_hop(port: int, upstream_port: int, ready: asyncio.Future[int]) -> None:
    """Relay every request to the upstream through a keep-alive pool, streaming the answer."""
    pool = BaselinePool("127.0.0.1", upstream_port)
    server = await asyncio.start_server(
        lambda r, w: _hop_connection(r, w, pool), "127.0.0.1", port, backlog=1024
    )
    ready.set_result(server.sockets[0].getsockname()[1])
    async with server:
        await server.serve_forever()
