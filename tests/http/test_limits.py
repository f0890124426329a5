"""The server's limits and graceful shutdown: each breach answered with its own
status and a JSON error, and the server goes on serving."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import anyio
import pytest

from inferno.errors import HTTPError
from inferno.http import Request, Response, ServerInfo, ServerLimits, serve
from tests.http.conftest import (
    IO_TIMEOUT,
    assert_json_error,
    exchange,
    good_request,
    parse_response,
    read_until,
    read_until_eof,
    running_server,
)

pytestmark = pytest.mark.anyio


async def echo(request: Request) -> Response:
    body = await request.read()
    return Response(200, [("content-type", "text/plain")], request.path.encode() + b":" + body)


async def test_oversized_head_is_a_431(wire_mode: str) -> None:
    limits = ServerLimits(max_header_bytes=1024)
    async with running_server(echo, limits=limits) as info:
        whole = await exchange(
            info.port, b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 2000 + b"\r\n\r\n"
        )
        # A head that is never completed but keeps growing hits h11's own bound.
        endless = await exchange(
            info.port, b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 4000, half_close=False
        )
        await good_request(info.port)
    for data in (whole, endless):
        error = assert_json_error(parse_response(data), 431)
        assert error["code"] == "request_header_fields_too_large"


async def test_announced_body_over_the_limit_is_a_413_before_reading(wire_mode: str) -> None:
    called: list[Request] = []

    async def handler(request: Request) -> Response:
        called.append(request)
        return Response(200)

    async with running_server(handler, limits=ServerLimits(max_body_bytes=1000)) as info:
        # Only the head is sent: the answer cannot wait for the body.
        data = await exchange(
            info.port,
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1001\r\nExpect: 100-continue\r\n\r\n",
            half_close=False,
        )
        await good_request(info.port)
    assert b" 100 " not in data
    assert assert_json_error(parse_response(data), 413)["code"] == "request_too_large"
    assert [r.path for r in called] == ["/"]  # only the good request reached the handler


async def test_chunked_body_over_the_limit_is_a_413_when_exceeded(wire_mode: str) -> None:
    seen: list[int] = []

    async def handler(request: Request) -> Response:
        async for piece in request.stream():
            seen.append(len(piece))
        return Response(200)

    async with running_server(handler, limits=ServerLimits(max_body_bytes=1000)) as info:
        async with await anyio.connect_tcp("127.0.0.1", info.port) as stream:
            await stream.send(
                b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"258\r\n" + b"a" * 600 + b"\r\n"
            )
            await stream.send(b"258\r\n" + b"b" * 600 + b"\r\n")  # 1200 > 1000, never finished
            data = await read_until_eof(stream)
        await good_request(info.port)
    assert assert_json_error(parse_response(data), 413)["code"] == "request_too_large"
    assert sum(seen) <= 1000


async def test_read_enforces_the_body_limit(wire_mode: str) -> None:
    caught: list[int] = []

    async def handler(request: Request) -> Response:
        try:
            await request.read()
        except HTTPError as exc:
            caught.append(exc.status)
            raise
        return Response(200)

    async with running_server(handler, limits=ServerLimits(max_body_bytes=10)) as info:
        data = await exchange(
            info.port,
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"b\r\nhello world\r\n0\r\n\r\n",
        )
    assert_json_error(parse_response(data), 413)
    assert caught == [413]


async def test_slow_head_is_a_408_and_closed(wire_mode: str) -> None:
    async with running_server(echo, limits=ServerLimits(header_timeout=0.2)) as info:
        started = await exchange(info.port, b"GET / HTTP/1.1\r\nHost: x", half_close=False)
        silent = await exchange(info.port, b"", half_close=False)
        await good_request(info.port)
    for data in (started, silent):
        assert assert_json_error(parse_response(data), 408)["code"] == "request_timeout"


async def test_slow_body_is_a_408(wire_mode: str) -> None:
    async with running_server(echo, limits=ServerLimits(body_timeout=0.2)) as info:
        data = await exchange(
            info.port,
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc",
            half_close=False,
        )
        await good_request(info.port)
    assert assert_json_error(parse_response(data), 408)["code"] == "request_timeout"


async def test_client_that_stops_reading_is_dropped(wire_mode: str) -> None:
    body_closed = anyio.Event()

    async def handler(request: Request) -> Response:
        if request.path == "/":
            return Response(200)

        async def endless() -> AsyncIterator[bytes]:
            try:
                while True:
                    yield b"z" * 65536
                    await anyio.lowlevel.checkpoint()
            finally:
                body_closed.set()

        return Response(200, body=endless())

    async with running_server(handler, limits=ServerLimits(body_timeout=0.3)) as info:
        async with await anyio.connect_tcp("127.0.0.1", info.port) as stream:
            await stream.send(b"GET /endless HTTP/1.1\r\nHost: x\r\n\r\n")
            with anyio.fail_after(IO_TIMEOUT):
                await body_closed.wait()  # never read: the server gave up on us
        await good_request(info.port)


async def test_idle_keep_alive_connection_is_closed_silently(wire_mode: str) -> None:
    async with running_server(echo, limits=ServerLimits(keepalive_timeout=0.2)) as info:
        async with await anyio.connect_tcp("127.0.0.1", info.port) as stream:
            await stream.send(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n")
            data = await read_until_eof(stream)  # served, then closed when idle
        await good_request(info.port)
    response = parse_response(data)  # exactly one response: no 408 after it
    assert response.status == 200
    assert response.header("connection") is None


async def test_connections_over_the_limit_get_503(wire_mode: str) -> None:
    async with running_server(echo, limits=ServerLimits(max_connections=2)) as info:
        held = [await anyio.connect_tcp("127.0.0.1", info.port) for _ in range(2)]
        for stream in held:  # both are being served
            await stream.send(b"GET /held HTTP/1.1\r\nHost: x\r\n\r\n")
            await read_until(stream, b"/held:")
        data = await exchange(info.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", half_close=False)
        # The held connections are still served.
        await held[0].send(b"GET /again HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        again = await read_until_eof(held[0])
        for stream in held:
            await stream.aclose()
    response = parse_response(data)
    assert assert_json_error(response, 503)["code"] == "too_many_connections"
    assert response.header("retry-after") == "1"
    assert parse_response(again).body == b"/again:"


# -- shutdown --------------------------------------------------------------------------


async def test_graceful_shutdown_finishes_in_flight_requests(wire_mode: str) -> None:
    entered = anyio.Event()
    release = anyio.Event()
    shutdown = anyio.Event()
    stopped = anyio.Event()

    async def handler(request: Request) -> Response:
        if request.path == "/slow":
            entered.set()
            await release.wait()
        return Response(200, body=b"done " + request.path.encode())

    async def run_server(*, task_status: anyio.abc.TaskStatus[ServerInfo]) -> None:
        await serve(
            handler, shutdown=shutdown, shutdown_timeout=IO_TIMEOUT, task_status=task_status
        )
        stopped.set()

    async with anyio.create_task_group() as tg:
        info: ServerInfo = await tg.start(run_server)
        idle = await anyio.connect_tcp("127.0.0.1", info.port)
        await idle.send(b"GET /idle HTTP/1.1\r\nHost: x\r\n\r\n")
        served = await read_until(idle, b"done /idle")
        busy = await anyio.connect_tcp("127.0.0.1", info.port)
        await busy.send(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        with anyio.fail_after(IO_TIMEOUT):
            await entered.wait()

        shutdown.set()
        assert await read_until_eof(idle) == b""  # the idle connection is closed at once
        assert not stopped.is_set()
        await idle.aclose()
        release.set()
        data = await read_until_eof(busy)
        await busy.aclose()
        with anyio.fail_after(IO_TIMEOUT):
            await stopped.wait()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", info.port), timeout=IO_TIMEOUT)
    assert parse_response(served).status == 200
    response = parse_response(data)
    assert response.body == b"done /slow"
    assert response.header("connection") == "close"


async def test_shutdown_cancels_requests_after_the_deadline(wire_mode: str) -> None:
    entered = anyio.Event()
    shutdown = anyio.Event()
    cancelled: list[bool] = []

    async def handler(request: Request) -> Response:
        entered.set()
        try:
            await anyio.sleep_forever()
        finally:
            cancelled.append(True)
        return Response(200)

    async with anyio.create_task_group() as tg:
        info: ServerInfo = await tg.start(
            lambda task_status: serve(
                handler, shutdown=shutdown, shutdown_timeout=0.2, task_status=task_status
            )
        )
        async with await anyio.connect_tcp("127.0.0.1", info.port) as stream:
            await stream.send(b"GET /forever HTTP/1.1\r\nHost: x\r\n\r\n")
            with anyio.fail_after(IO_TIMEOUT):
                await entered.wait()
            shutdown.set()
            data = await read_until_eof(stream)
    assert cancelled == [True]
    assert data == b""  # cancelled: no response at all
