"""The HTTP server against foreign clients (http.client, raw sockets) on loopback."""

from __future__ import annotations

import email.utils
import http.client
import json
import logging
from collections.abc import AsyncIterator

import anyio
import pytest

from inferno.errors import HTTPError
from inferno.http import Request, Response, ServerLimits
from tests.http.conftest import (
    IO_TIMEOUT,
    assert_json_error,
    blocking_request,
    exchange,
    good_request,
    parse_response,
    parse_responses,
    read_until,
    read_until_eof,
    running_server,
)

pytestmark = pytest.mark.anyio


async def echo(request: Request) -> Response:
    body = await request.read()
    return Response(200, [("content-type", "text/plain")], request.path.encode() + b":" + body)


# -- keep-alive, pipelining, bodies ----------------------------------------------------


async def test_keep_alive_serves_several_requests_on_one_connection(wire_mode: str) -> None:
    clients: list[tuple[str, int] | None] = []

    async def handler(request: Request) -> Response:
        clients.append(request.client)
        return Response.json({"n": len(clients), "body": (await request.read()).decode()})

    def three_requests(port: int) -> list[tuple[int, bytes, str | None]]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=IO_TIMEOUT)
        out = []
        for body in (None, b"second", None):
            conn.request("POST" if body else "GET", "/", body=body)
            response = conn.getresponse()
            out.append((response.status, response.read(), response.getheader("connection")))
        conn.close()
        return out

    async with running_server(handler) as info:
        results = await anyio.to_thread.run_sync(three_requests, info.port)
    assert [json.loads(body) for _, body, _ in results] == [
        {"n": 1, "body": ""},
        {"n": 2, "body": "second"},
        {"n": 3, "body": ""},
    ]
    assert all(status == 200 and conn is None for status, _, conn in results)
    assert len(set(clients)) == 1  # the same client address and port: one connection


async def test_pipelined_requests_are_answered_in_order(wire_mode: str) -> None:
    requests = (
        b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /two HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
        b"POST /three HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nde\r\n0\r\n\r\n"
        b"GET /four HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    async with running_server(echo) as info:
        data = await exchange(info.port, requests, half_close=False)
        await good_request(info.port)
    responses = parse_responses(data)
    assert [r.body for r in responses] == [b"/one:", b"/two:abc", b"/three:de", b"/four:"]
    assert responses[-1].header("connection") == "close"


async def test_chunked_request_body_is_streamed(wire_mode: str) -> None:
    pieces: list[bytes] = []

    async def handler(request: Request) -> Response:
        async for piece in request.stream():
            pieces.append(piece)
        return Response.json({"total": sum(map(len, pieces))})

    def send_chunked(port: int) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=IO_TIMEOUT)
        try:
            conn.request(
                "POST", "/", body=iter([b"ab", b"cde", b"f" * 100_000]), encode_chunked=True
            )
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    async with running_server(handler) as info:
        status, body = await anyio.to_thread.run_sync(send_chunked, info.port)
    assert status == 200
    assert json.loads(body) == {"total": 100_005}
    assert b"".join(pieces) == b"abcde" + b"f" * 100_000


async def test_chunked_body_with_extensions_and_trailers(wire_mode: str) -> None:
    request = (
        b"POST /t HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        b"3\r\nabc\r\n2;name=value\r\nde\r\n0\r\nX-Trailer: yes\r\n\r\n"
    )
    async with running_server(echo) as info:
        response = parse_response(await exchange(info.port, request))
    assert response.status == 200
    assert response.body == b"/t:abcde"


async def test_unread_body_is_discarded_and_the_connection_reused(wire_mode: str) -> None:
    async def handler(request: Request) -> Response:
        return Response(200, body=request.path.encode())  # never reads the body

    requests = (
        b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n"
        + b"x" * 5000
        + b"POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"4\r\nwxyz\r\n0\r\n\r\n"
        b"GET /c HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    async with running_server(handler) as info:
        responses = parse_responses(await exchange(info.port, requests, half_close=False))
    assert [r.body for r in responses] == [b"/a", b"/b", b"/c"]


async def test_unread_body_over_the_limit_closes_the_connection(wire_mode: str) -> None:
    async def handler(request: Request) -> Response:
        return Response(200, body=b"ok")

    requests = (
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"200\r\n" + b"y" * 0x200 + b"\r\n0\r\n\r\n"
        b"GET /never HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    async with running_server(handler, limits=ServerLimits(max_body_bytes=256)) as info:
        responses = parse_responses(await exchange(info.port, requests, half_close=False))
        await good_request(info.port)
    assert [r.body for r in responses] == [b"ok"]  # the pipelined GET was not served


async def test_head_request_gets_headers_without_body(wire_mode: str) -> None:
    async def handler(request: Request) -> Response:
        return Response.json({"hello": "world"})

    async with running_server(handler) as info:
        data = await exchange(info.port, b"HEAD / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    response = parse_response(data, method="HEAD")
    assert response.status == 200
    assert response.header("content-length") == str(len(b'{"hello":"world"}'))
    assert data.endswith(b"\r\n\r\n")  # nothing after the head


async def test_every_response_carries_one_date(wire_mode: str) -> None:
    # RFC 9110 §6.6.1: an origin server with a clock sends Date; ours is added to
    # the encoded head, a handler's own is kept instead.
    async def handler(request: Request) -> Response:
        if request.path == "/own":
            return Response(200, [("Date", "Tue, 01 Jan 2030 00:00:00 GMT")], b"own")
        if request.path == "/stream":

            async def pieces() -> AsyncIterator[bytes]:
                yield b"streamed"

            return Response(200, body=pieces())
        return Response(204 if request.path == "/empty" else 200, body=b"")

    requests = b"".join(
        b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path for path in (b"/", b"/empty", b"/stream")
    )
    requests += b"GET /own HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    async with running_server(handler) as info:
        data = await exchange(info.port, requests)
    responses = parse_responses(data)
    assert [r.status for r in responses] == [200, 204, 200, 200]
    assert [r.body for r in responses] == [b"", b"", b"streamed", b"own"]
    for response in responses:
        assert len(response.headers.get_all("date") or []) == 1
    assert responses[3].header("date") == "Tue, 01 Jan 2030 00:00:00 GMT"
    for response in responses[:3]:
        assert email.utils.parsedate_to_datetime(response.header("date") or "").tzinfo


async def test_http_1_0_client_gets_a_close_delimited_stream(wire_mode: str) -> None:
    async def handler(request: Request) -> Response:
        async def body() -> AsyncIterator[bytes]:
            yield b"one,"
            yield b"two"

        return Response(200, body=body())

    async with running_server(handler) as info:
        data = await exchange(info.port, b"GET / HTTP/1.0\r\n\r\n", half_close=False)
    response = parse_response(data)
    assert response.status == 200
    assert response.body == b"one,two"
    assert response.header("transfer-encoding") is None


# -- streaming responses ---------------------------------------------------------------


async def test_streamed_chunk_arrives_before_the_next_is_produced(wire_mode: str) -> None:
    release = anyio.Event()
    produced: list[int] = []

    async def handler(request: Request) -> Response:
        async def body() -> AsyncIterator[bytes]:
            produced.append(1)
            yield b"data: one\n\n"
            await release.wait()
            produced.append(2)
            yield b"data: two\n\n"

        return Response(200, [("content-type", "text/event-stream")], body())

    async with (
        running_server(handler) as info,
        await anyio.connect_tcp("127.0.0.1", info.port) as stream,
    ):
        await stream.send(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = await read_until(stream, b"data: one\n\n")
        assert produced == [1]  # chunk 2 does not exist yet, chunk 1 is here
        release.set()
        data += await read_until_eof(stream)
    response = parse_response(data)
    assert response.header("transfer-encoding") == "chunked"
    assert response.body == b"data: one\n\ndata: two\n\n"
    assert produced == [1, 2]


async def test_streamed_body_with_declared_length_is_not_chunked(wire_mode: str) -> None:
    async def handler(request: Request) -> Response:
        async def body() -> AsyncIterator[bytes]:
            yield b"12345"
            yield b""  # empty pieces are skipped
            yield b"67890"

        return Response(200, [("Content-Length", "10")], body())

    async with running_server(handler) as info:
        response = parse_response(
            await exchange(
                info.port,
                b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                half_close=False,  # a half-close after the request cancels a stream by default
            )
        )
    assert response.header("transfer-encoding") is None
    assert response.body == b"1234567890"


async def test_client_leaving_mid_stream_closes_the_body_iterator(wire_mode: str) -> None:
    first_sent = anyio.Event()
    client_gone = anyio.Event()
    body_closed = anyio.Event()

    async def handler(request: Request) -> Response:
        if request.path == "/":
            return Response(200)

        async def body() -> AsyncIterator[bytes]:
            try:
                yield b"first"
                first_sent.set()
                await client_gone.wait()
                while True:
                    yield b"more" * 1000
                    await anyio.lowlevel.checkpoint()
            finally:
                body_closed.set()

        return Response(200, body=body())

    async with running_server(handler) as info:
        async with await anyio.connect_tcp("127.0.0.1", info.port) as stream:
            await stream.send(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
            await read_until(stream, b"first")
        client_gone.set()
        with anyio.fail_after(IO_TIMEOUT):
            await body_closed.wait()
        await good_request(info.port)
    assert first_sent.is_set()


async def test_body_failing_mid_stream_cuts_the_response(
    wire_mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def handler(request: Request) -> Response:
        if request.path == "/":
            return Response(200, body=b"fine")

        async def body() -> AsyncIterator[bytes]:
            yield b"partial"
            raise RuntimeError("backend went away")

        return Response(200, body=body())

    async with running_server(handler) as info:
        data = await exchange(info.port, b"GET /s HTTP/1.1\r\nHost: x\r\n\r\n", half_close=False)
        await good_request(info.port)
    assert b"partial" in data
    assert not data.endswith(b"0\r\n\r\n")  # no terminating chunk: the client sees a cut
    with pytest.raises(http.client.IncompleteRead):
        parse_response(data)
    assert any("mid-stream" in r.getMessage() for r in caplog.records)


# -- 100-continue ---------------------------------------------------------------------


async def test_100_continue_is_sent_when_the_handler_reads(wire_mode: str) -> None:
    async with (
        running_server(echo) as info,
        await anyio.connect_tcp("127.0.0.1", info.port) as stream,
    ):
        await stream.send(
            b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
            b"Expect: 100-continue\r\nConnection: close\r\n\r\n"
        )
        interim = await read_until(stream, b"\r\n\r\n")
        assert interim.startswith(b"HTTP/1.1 100 ")
        await stream.send(b"hello")
        rest = interim[interim.index(b"\r\n\r\n") + 4 :] + await read_until_eof(stream)
    response = parse_response(rest)
    assert response.status == 200
    assert response.body == b"/up:hello"


async def test_100_continue_is_not_sent_when_the_handler_answers_without_reading(
    wire_mode: str,
) -> None:
    async def handler(request: Request) -> Response:
        if request.method == "GET":
            return Response(200)
        raise HTTPError(401, "who are you?")

    async with running_server(handler) as info:
        data = await exchange(
            info.port,
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
            half_close=False,
        )
        await good_request(info.port)
    assert b" 100 " not in data
    response = parse_response(data)
    assert_json_error(response, 401)
    assert response.header("connection") == "close"  # the body may never come: close


# -- handler errors --------------------------------------------------------------------


async def test_handler_exception_is_a_500_without_details(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def handler(request: Request) -> Response:
        if request.path == "/":
            return Response(200)
        raise RuntimeError("secret internal detail")

    caplog.set_level(logging.ERROR, logger="inferno.http")
    async with running_server(handler) as info:
        status, body = await anyio.to_thread.run_sync(blocking_request, info.port, "GET", "/boom")
        await good_request(info.port)
    assert status == 500
    assert json.loads(body) == {
        "error": {
            "message": "internal server error",
            "type": "server_error",
            "code": "internal_error",
        }
    }
    assert b"secret" not in body
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert errors
    assert errors[0].exc_info is not None


async def test_http_error_is_rendered_with_its_status_and_headers(wire_mode: str) -> None:
    async def handler(request: Request) -> Response:
        raise HTTPError(429, "slow down", code="rate_limited", headers=[("Retry-After", "3")])

    async with running_server(handler) as info:
        data = await exchange(info.port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    response = parse_response(data)
    error = assert_json_error(response, 429)
    assert error == {"message": "slow down", "type": "rate_limit_error", "code": "rate_limited"}
    assert response.header("retry-after") == "3"


async def test_invalid_json_body_is_a_400(wire_mode: str) -> None:
    async def handler(request: Request) -> Response:
        return Response.json(await request.json())

    async with running_server(handler) as info:
        bad = await exchange(
            info.port,
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\n{nope",
        )
        good = await exchange(
            info.port,
            b'POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 8\r\nConnection: close\r\n\r\n{"a": 1}',
        )
    assert assert_json_error(parse_response(bad), 400)["code"] == "invalid_json"
    assert parse_response(good).json() == {"a": 1}


async def test_handler_returning_a_non_response_is_a_500(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def handler(request: Request) -> Response:
        return "oops"  # type: ignore[return-value]

    async with running_server(handler) as info:
        status, _ = await anyio.to_thread.run_sync(blocking_request, info.port)
    assert status == 500
    assert any("instead of a Response" in r.getMessage() for r in caplog.records)


async def test_invalid_response_header_is_a_500(caplog: pytest.LogCaptureFixture) -> None:
    async def handler(request: Request) -> Response:
        return Response(200, [("x-bad", "line\r\nbreak")], b"")

    async with running_server(handler) as info:
        status, body = await anyio.to_thread.run_sync(blocking_request, info.port)
    assert status == 500
    assert b"line" not in body
