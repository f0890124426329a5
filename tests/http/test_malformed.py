"""Malformed requests, sent as raw bytes: each gets its error status and a JSON
body, and the same server then serves a good request on a new connection.

Statuses: 400 for malformed messages; 431 for an oversized head; 501 for a
transfer coding we do not implement (RFC 9112 §6.1: "SHOULD respond with 501");
505 for an HTTP version other than 1.0/1.1 (RFC 9110 §15.6.6).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import anyio
import anyio.from_thread
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inferno.http import Request, Response, ServerInfo, ServerLimits, serve
from tests.http.conftest import (
    IO_TIMEOUT,
    assert_json_error,
    exchange,
    good_request,
    parse_response,
    running_server,
)

H = b"Host: example\r\n"
CHUNKED = b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"

CORPUS: list[tuple[str, bytes, int]] = [
    # request lines
    ("no target", b"GET HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("no version (HTTP/0.9)", b"GET /\r\n\r\n", 400),
    ("HTTP/0.9 with headers", b"GET /\r\n" + H + b"\r\n", 400),
    ("extra token", b"GET / HTTP/1.1 extra\r\n" + H + b"\r\n", 400),
    ("double space", b"GET  / HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("bad method character", b"G(T / HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("lower-case protocol name", b"GET / http/1.1\r\n" + H + b"\r\n", 400),
    ("version without minor", b"GET / HTTP/1\r\n" + H + b"\r\n", 400),
    ("non-ASCII target", b"GET /caf\xc3\xa9 HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("leading space", b" GET / HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("control byte first", b"\x00GET / HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("TLS ClientHello on plain port", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" * 4, 400),
    ("HTTP/2 version", b"GET / HTTP/2.0\r\n" + H + b"\r\n", 505),
    ("HTTP/0.9 version", b"GET / HTTP/0.9\r\n" + H + b"\r\n", 505),
    # header names and values
    ("space in name", b"GET / HTTP/1.1\r\n" + H + b"Bad Name: v\r\n\r\n", 400),
    ("space before colon", b"GET / HTTP/1.1\r\nHost : example\r\n\r\n", 400),
    ("empty name", b"GET / HTTP/1.1\r\n" + H + b": v\r\n\r\n", 400),
    ("no colon", b"GET / HTTP/1.1\r\n" + H + b"NoColon\r\n\r\n", 400),
    ("control byte in name", b"GET / HTTP/1.1\r\n" + H + b"X\x01Y: v\r\n\r\n", 400),
    ("NUL in value", b"GET / HTTP/1.1\r\n" + H + b"X-A: a\x00b\r\n\r\n", 400),
    ("bare CR in value", b"GET / HTTP/1.1\r\n" + H + b"X-A: a\rb\r\n\r\n", 400),
    ("bare CR as line end", b"GET / HTTP/1.1\r" + H + b"\r\n", 400),
    ("obs-fold", b"GET / HTTP/1.1\r\n" + H + b"X-A: one\r\n two\r\n\r\n", 400),
    ("obs-fold with tab", b"GET / HTTP/1.1\r\n" + H + b"X-A: one\r\n\ttwo\r\n\r\n", 400),
    ("continuation first", b"GET / HTTP/1.1\r\n folded\r\n" + H + b"\r\n", 400),
    ("missing Host", b"GET / HTTP/1.1\r\n\r\n", 400),
    ("two Hosts", b"GET / HTTP/1.1\r\n" + H + H + b"\r\n", 400),
    # framing
    (
        "Content-Length and Transfer-Encoding",
        b"POST / HTTP/1.1\r\n"
        + H
        + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    (
        "two different Content-Lengths",
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        400,
    ),
    (
        "Content-Length list that disagrees",
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5, 6\r\n\r\nhello!",
        400,
    ),
    (
        "Content-Length not a number",
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length: abc\r\n\r\n",
        400,
    ),
    ("negative Content-Length", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: -1\r\n\r\n", 400),
    (
        "Content-Length with sign",
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length: +5\r\n\r\nhello",
        400,
    ),
    ("invalid chunk size", CHUNKED + b"zz\r\nhello\r\n0\r\n\r\n", 400),
    ("negative chunk size", CHUNKED + b"-5\r\nhello\r\n0\r\n\r\n", 400),
    ("hex prefix in chunk size", CHUNKED + b"0x5\r\nhello\r\n0\r\n\r\n", 400),
    ("chunk longer than its size", CHUNKED + b"3\r\nhello\r\n0\r\n\r\n", 400),
    ("chunk line ends with bare LF", CHUNKED + b"5\nhello\r\n0\r\n\r\n", 400),
    ("body ends mid-chunk", CHUNKED + b"a\r\nhello", 400),
    (
        "oversize chunk extension, whole",
        CHUNKED + b"5;ext=" + b"x" * 20_000 + b"\r\nhello\r\n0\r\n\r\n",
        400,
    ),
    ("oversize chunk extension, unterminated", CHUNKED + b"5;ext=" + b"x" * 40_000, 400),
    (
        "many chunk extensions",
        CHUNKED + b"".join(b"1;e=" + b"y" * 900 + b"\r\nz\r\n" for _ in range(30)) + b"0\r\n\r\n",
        400,
    ),
    (
        "unsupported transfer coding",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip\r\n\r\n",
        501,
    ),
    (
        "transfer coding list",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        501,
    ),
    (
        "two Transfer-Encoding fields",
        b"POST / HTTP/1.1\r\n"
        + H
        + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        501,
    ),
    # limits
    (
        "head over max_header_bytes",
        b"GET / HTTP/1.1\r\n" + H + b"X-Big: " + b"a" * 20_000 + b"\r\n\r\n",
        431,
    ),
    (
        "many headers over max_header_bytes",
        b"GET / HTTP/1.1\r\n" + H + b"".join(b"X-%d: v\r\n" % i for i in range(3000)) + b"\r\n",
        431,
    ),
]


async def read_body(request: Request) -> Response:
    body = await request.read()
    return Response(200, body=b"read %d" % len(body))


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("raw", "status"), [pytest.param(raw, status, id=name) for name, raw, status in CORPUS]
)
async def test_malformed_request_is_answered_and_the_server_goes_on(
    raw: bytes, status: int
) -> None:
    async with running_server(read_body) as info:
        data = await exchange(info.port, raw)
        await good_request(info.port)
    assert_json_error(parse_response(data), status)


@pytest.mark.anyio
async def test_well_formed_requests_of_the_corpus_kind_are_accepted() -> None:
    """Controls: the near-misses a lenient-but-correct server must accept."""
    accepted = [
        b"GET / HTTP/1.0\r\n\r\n",  # HTTP/1.0 needs no Host
        b"GET / HTTP/1.1\r\n" + H + b"X-Empty:\r\n\r\n",  # empty value
        b"GET / HTTP/1.1\r\n" + H + b"X-Obs-Text: caf\xe9\r\n\r\n",  # obs-text value
        b"GET / HTTP/1.1\n" + H.replace(b"\r\n", b"\n") + b"\n",  # bare LF (RFC 9112 §2.2)
        CHUNKED + b"5;name=value\r\nhello\r\n0\r\n\r\n",  # a modest extension
        CHUNKED + b"5 \r\nhello\r\n0\r\n\r\n",  # whitespace before CRLF: h11 reads 5, as most do
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5, 5\r\n\r\nhello",  # same length twice
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: Chunked\r\n\r\n0\r\n\r\n",
    ]
    async with running_server(read_body) as info:
        for raw in accepted:
            response = parse_response(await exchange(info.port, raw))
            assert response.status == 200, raw


# -- random bytes never break the server ------------------------------------------------


@pytest.fixture(scope="module")
def portal_server() -> Iterator[int]:
    """One server on its own event-loop thread, shared by every hypothesis example."""
    limits = ServerLimits(header_timeout=2.0, body_timeout=2.0)
    with anyio.from_thread.start_blocking_portal() as portal:
        stop = portal.call(anyio.Event)

        async def run(*, task_status: anyio.abc.TaskStatus[ServerInfo]) -> None:
            await serve(read_body, limits=limits, shutdown=stop, task_status=task_status)

        future, info = portal.start_task(run)
        yield info.port
        portal.call(stop.set)
        future.result(timeout=IO_TIMEOUT)


def _send_and_read(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server may answer and close before everything is sent
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            pass
        return b"".join(chunks)


_REQUEST_PIECES = st.sampled_from(
    [
        b"GET ",
        b"POST ",
        b"/ ",
        b"HTTP/1.1",
        b"HTTP/1.0",
        b"\r\n",
        b"\n",
        b"\r",
        b" ",
        b":",
        b"Host: x",
        b"Content-Length: ",
        b"Transfer-Encoding: chunked",
        b"Expect: 100-continue",
        b"Connection: close",
        b"0\r\n\r\n",
        b"5\r\nhello\r\n",
        b"\x00",
        b"\xff",
    ]
)


@settings(
    max_examples=150,
    deadline=None,
    database=None,  # nothing written into the working tree
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    data=st.one_of(
        st.binary(max_size=600),
        st.lists(st.one_of(_REQUEST_PIECES, st.binary(max_size=8)), max_size=30).map(b"".join),
    )
)
def test_random_bytes_never_break_the_server(portal_server: int, data: bytes) -> None:
    answer = _send_and_read(portal_server, data)
    if answer:
        assert answer.startswith(b"HTTP/1.1 "), answer[:100]
    # A good request on a new connection is still served.
    good = _send_and_read(portal_server, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert good.startswith(b"HTTP/1.1 200 "), good[:100]
    assert threading.active_count() < 50  # no runaway threads either
