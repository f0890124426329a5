"""A lean keep-alive load generator on raw asyncio sockets.

It runs in its own process so the server's CPU time can be read from
``/proc/<pid>/stat`` without the client's share in it.  It parses just enough
HTTP/1.1 to find the end of each response (Content-Length or the chunked
terminator) and records each request's latency.
"""

from __future__ import annotations

import asyncio
import socket
import time


def build_request(port: int, path: str = "/v1/echo") -> bytes:
    body = b'{"model":"bench","prompt":"hello","max_tokens":5}'
    return (
        f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    ).encode() + body


async def _read_response(reader: asyncio.StreamReader, buf: bytearray) -> int:
    """Consume one response from ``buf``/``reader``; return the number of body chunks seen."""
    while True:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            break
        data = await reader.read(65536)
        if not data:
            raise ConnectionError("server closed")
        buf += data
    head = bytes(buf[:end]).lower()
    del buf[: end + 4]
    if b"transfer-encoding: chunked" in head:
        chunks = 0
        while True:
            term = buf.find(b"\r\n0\r\n\r\n")
            if term >= 0 or buf.startswith(b"0\r\n\r\n"):
                if buf.startswith(b"0\r\n\r\n"):
                    del buf[:5]
                else:
                    chunks += buf[:term].count(b"\r\n") // 2 + 1
                    del buf[: term + 7]
                return chunks
            data = await reader.read(65536)
            if not data:
                raise ConnectionError("server closed mid-body")
            buf += data
    idx = head.find(b"content-length:")
    length = int(head[idx + 15 :].split(b"\r\n", 1)[0])
    while len(buf) < length:
        data = await reader.read(65536)
        if not data:
            raise ConnectionError("server closed mid-body")
        buf += data
    del buf[:length]
    return 1


async def _worker(port: int, request: bytes, deadline: float, latencies: list[float]) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray()
    done = 0
    try:
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            writer.write(request)
            await _read_response(reader, buf)
            latencies.append(time.perf_counter() - start)
            done += 1
    finally:
        writer.close()
    return done


async def run_load(port: int, connections: int, duration: float) -> tuple[int, list[float]]:
    """Drive ``connections`` keep-alive connections for ``duration`` seconds."""
    request = build_request(port)
    latencies: list[float] = []
    deadline = time.perf_counter() + duration
    counts = await asyncio.gather(
        *(_worker(port, request, deadline, latencies) for _ in range(connections))
    )
    return sum(counts), latencies


async def hold_idle(port: int, count: int) -> list[asyncio.StreamWriter]:
    """Open ``count`` connections that each made one request and then stay idle."""
    request = build_request(port)
    writers = []
    for _ in range(count):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        await _read_response(reader, bytearray())
        writers.append(writer)
    return writers
