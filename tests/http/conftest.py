"""Helpers for the HTTP server tests: a running server, raw sockets, a foreign parser.

Responses are parsed with the standard library's ``http.client`` (a foreign
client), never with our own code.
"""

from __future__ import annotations

import functools
import http.client
import io
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import pytest

from inferno.http import server as server_module
from inferno.http.server import Handler, ServerInfo, serve

IO_TIMEOUT = 10.0  # seconds a test waits for the server before failing instead of hanging


@asynccontextmanager
async def running_server(handler: Handler, **options: Any) -> AsyncIterator[ServerInfo]:
    """Serve ``handler`` on 127.0.0.1, port 0, for the duration of the block."""
    async with anyio.create_task_group() as tg:
        info: ServerInfo = await tg.start(functools.partial(serve, handler, **options))
        yield info
        tg.cancel_scope.cancel()


@pytest.fixture
def anyio_backend() -> object:
    """asyncio, as in production; ``INFERNO_TEST_UVLOOP=1`` runs it on uvloop (extra ``speed``)."""
    if os.environ.get("INFERNO_TEST_UVLOOP"):
        return ("asyncio", {"use_uvloop": True})
    return "asyncio"


@pytest.fixture(params=["asyncio-wire", "anyio-streams"])
def wire_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test over both transports: the asyncio fast path and anyio's streams."""
    monkeypatch.setattr(server_module, "USE_ASYNCIO_WIRE", request.param == "asyncio-wire")
    return str(request.param)


@dataclass
class Parsed:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def header(self, name: str) -> str | None:
        return self.headers.get(name)


class _KeepOpen(io.BytesIO):
    """http.client closes its file after each response; the next one is still in it."""

    def close(self) -> None:
        pass


class _BufferSocket:
    """Enough of a socket for ``http.client.HTTPResponse`` to parse bytes we hold."""

    def __init__(self, fp: io.BytesIO) -> None:
        self.fp = fp

    def makefile(self, mode: str) -> io.BytesIO:
        return self.fp


def parse_responses(data: bytes, method: str = "GET") -> list[Parsed]:
    """Every complete response in ``data``, parsed by http.client, in order."""
    fp = _KeepOpen(data)
    out: list[Parsed] = []
    while fp.tell() < len(data):
        response = http.client.HTTPResponse(_BufferSocket(fp), method=method)  # type: ignore[arg-type]
        response.begin()
        out.append(Parsed(response.status, response.headers, response.read()))
    return out


def parse_response(data: bytes, method: str = "GET") -> Parsed:
    responses = parse_responses(data, method)
    assert len(responses) == 1, f"expected one response, got {len(responses)}: {data!r}"
    return responses[0]


async def exchange(port: int, data: bytes, *, half_close: bool = True) -> bytes:
    """Send raw bytes on a fresh connection and read until the server closes it."""
    with anyio.fail_after(IO_TIMEOUT):
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            await stream.send(data)
            if half_close:
                await stream.send_eof()
            return await read_until_eof(stream)


async def read_until_eof(stream: anyio.abc.ByteReceiveStream) -> bytes:
    chunks = []
    with anyio.fail_after(IO_TIMEOUT):
        while True:
            try:
                chunks.append(await stream.receive())
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return b"".join(chunks)


async def read_until(
    stream: anyio.abc.ByteReceiveStream, marker: bytes, buffer: bytes = b""
) -> bytes:
    """Read until ``marker`` occurs in what was read (``buffer`` included)."""
    with anyio.fail_after(IO_TIMEOUT):
        while marker not in buffer:
            buffer += await stream.receive()
    return buffer


def assert_json_error(parsed: Parsed, status: int) -> dict[str, Any]:
    """The response is ``status`` with the OpenAI error shape; returns ``error``."""
    assert parsed.status == status, (parsed.status, parsed.body)
    assert parsed.header("content-type") == "application/json"
    document = parsed.json()
    assert set(document) == {"error"}
    error = document["error"]
    assert set(error) == {"message", "type", "code"}
    assert isinstance(error["message"], str)
    assert error["message"]
    assert isinstance(error["type"], str)
    assert error["type"]
    return dict(error)


def blocking_request(
    port: int, method: str = "GET", path: str = "/", body: bytes | None = None
) -> tuple[int, bytes]:
    """One request with http.client (call through ``anyio.to_thread``)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=IO_TIMEOUT)
    try:
        conn.request(method, path, body=body)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


async def good_request(port: int) -> None:
    """The server still answers a well-formed request on a new connection."""
    status, _ = await anyio.to_thread.run_sync(blocking_request, port)
    assert status == 200
