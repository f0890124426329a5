"""A client that goes away while its handler runs, and streamed bodies always closed.

Real loopback sockets, over both transports (``wire_mode``) and TLS.  Waits
are on events, each bounded by ``IO_TIMEOUT``; where a test must know that the
server has judged the client's EOF, it waits for the server's debug log line.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Iterator

import anyio
import anyio.abc
import anyio.lowlevel
import h11
import pytest
import trustme
from anyio.abc import SocketAttribute

from inferno.http import Request, Response, ServerLimits
from inferno.http import _streambody as streambody_module
from inferno.http._responses import (
    EOF_GONE,
    EOF_HALF_CLOSED,
    EOF_PIPELINED,
    EOF_TOO_EARLY,
    judge_eof,
)
from tests.http.conftest import (
    IO_TIMEOUT,
    good_request,
    parse_response,
    parse_responses,
    read_until,
    read_until_eof,
    running_server,
)

pytestmark = pytest.mark.anyio

PARK = b"GET /park HTTP/1.1\r\nHost: x\r\n\r\n"


# -- helpers ---------------------------------------------------------------------------


class LogWatch(logging.Handler):
    """Events set when the server logs a line containing a given text."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.events: dict[str, anyio.Event] = {}

    def on(self, text: str) -> anyio.Event:
        return self.events.setdefault(text, anyio.Event())

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        for text, event in self.events.items():
            if text in message:
                event.set()


@pytest.fixture
def server_log() -> Iterator[LogWatch]:
    logger = logging.getLogger("inferno.http")
    watch = LogWatch()
    level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(watch)
    try:
        yield watch
    finally:
        logger.removeHandler(watch)
        logger.setLevel(level)


async def wait(event: anyio.Event) -> None:
    with anyio.fail_after(IO_TIMEOUT):
        await event.wait()


def set_reset_on_close(sock: socket.socket) -> None:
    """Linger 0: closing sends a reset, not a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def leave(stream: anyio.abc.SocketStream, how: str) -> None:
    if how == "reset":
        set_reset_on_close(stream.extra(SocketAttribute.raw_socket))
    await stream.aclose()


class Parked:
    """A handler that waits forever on ``/park``; ``/`` answers 200 at once."""

    def __init__(self) -> None:
        self.started = anyio.Event()
        self.ended = anyio.Event()
        self.cancelled = False

    async def __call__(self, request: Request) -> Response:
        if request.path != "/park":
            return Response(200)
        self.started.set()
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            self.cancelled = True
            raise
        finally:
            self.ended.set()
        return Response(200)  # pragma: no cover


class Body:
    """A streamed body that is no generator: yields ``chunks``, then blocks (or fails).

    Its ``aclose`` awaits twice before recording itself, as closing an
    upstream response would: it completes only if the server shields it.
    """

    def __init__(self, chunks: list[bytes], then: str = "block") -> None:
        self.chunks = list(chunks)
        self.then = then
        self.pulled = 0
        self.closed = anyio.Event()

    def __aiter__(self) -> Body:
        return self

    async def __anext__(self) -> bytes:
        self.pulled += 1
        if self.chunks:
            return self.chunks.pop(0)
        if self.then == "end":
            raise StopAsyncIteration
        if self.then == "fail":
            raise RuntimeError("the body broke")
        await anyio.sleep_forever()
        raise AssertionError("unreachable")  # pragma: no cover

    async def aclose(self) -> None:
        await anyio.lowlevel.checkpoint()
        await anyio.lowlevel.checkpoint()
        self.closed.set()


# -- what an EOF means (no I/O) --------------------------------------------------------


def server_after(data: bytes) -> h11.Connection:
    """A server-side h11 connection that received ``data`` and gave out the first request."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    assert isinstance(conn.next_event(), h11.Request)
    return conn


def read_body(conn: h11.Connection) -> None:
    while not isinstance(conn.next_event(), h11.EndOfMessage):
        pass


@pytest.mark.parametrize("last", [b"", b"Connection: close\r\n"])
def test_eof_after_the_whole_request_is_the_client_gone(last: bytes) -> None:
    conn = server_after(b"GET / HTTP/1.1\r\nHost: x\r\n" + last + b"\r\n")
    read_body(conn)
    assert judge_eof(conn, 0, cancel_on_eof=True) == EOF_GONE
    assert judge_eof(conn, 0, cancel_on_eof=False) == EOF_HALF_CLOSED


def test_eof_after_pipelined_requests_is_not() -> None:
    conn = server_after(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\nGET /2 HTTP/1.1\r\nHost: x\r\n\r\n")
    read_body(conn)
    assert judge_eof(conn, 0, cancel_on_eof=True) == EOF_PIPELINED
    alone = server_after(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n")
    read_body(alone)
    assert judge_eof(alone, 30, cancel_on_eof=True) == EOF_PIPELINED  # still in the wire


def test_eof_before_the_body_is_read_is_judged_later() -> None:
    conn = server_after(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nbody")
    assert judge_eof(conn, 0, cancel_on_eof=True) == EOF_TOO_EARLY
    read_body(conn)
    assert judge_eof(conn, 0, cancel_on_eof=True) == EOF_GONE


def test_a_request_built_by_hand_is_never_disconnected() -> None:
    assert Request("GET", "/").disconnected is False


# -- the handler is cancelled ----------------------------------------------------------


@pytest.mark.parametrize("how", ["close", "reset"])
async def test_client_leaving_cancels_the_waiting_handler(wire_mode: str, how: str) -> None:
    parked = Parked()
    async with running_server(parked) as info:
        stream = await anyio.connect_tcp("127.0.0.1", info.port)
        await stream.send(PARK)
        await wait(parked.started)
        await leave(stream, how)
        await wait(parked.ended)
        assert parked.cancelled
        await good_request(info.port)  # the server serves on


async def test_client_reset_cancels_a_handler_before_it_reads_the_body(wire_mode: str) -> None:
    parked = Parked()
    async with running_server(parked) as info:
        stream = await anyio.connect_tcp("127.0.0.1", info.port)
        await stream.send(b"POST /park HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nhalf")
        await wait(parked.started)
        await leave(stream, "reset")
        await wait(parked.ended)
        assert parked.cancelled


async def test_half_close_after_the_request_cancels_and_nothing_is_written(
    wire_mode: str,
) -> None:
    parked = Parked()
    async with running_server(parked) as info:
        async with await anyio.connect_tcp("127.0.0.1", info.port) as stream:
            await stream.send(PARK)
            await wait(parked.started)
            await stream.send_eof()
            assert await read_until_eof(stream) == b""
        assert parked.cancelled


async def test_half_closed_client_is_answered_when_cancel_on_eof_is_off(
    wire_mode: str, server_log: LogWatch
) -> None:
    eof_judged = server_log.on("closed its side after its request")
    seen: list[bool] = []

    async def handler(request: Request) -> Response:
        seen.append(request.disconnected)
        await wait(eof_judged)
        seen.append(request.disconnected)
        return Response.text("still here")

    limits = ServerLimits(cancel_on_client_eof=False)
    async with (
        running_server(handler, limits=limits) as info,
        await anyio.connect_tcp("127.0.0.1", info.port) as stream,
    ):
        await stream.send(PARK)
        await stream.send_eof()
        response = parse_response(await read_until_eof(stream))
    assert response.status == 200
    assert response.body == b"still here"
    assert seen[-1] is True  # the handler could tell, and chose to answer


@pytest.mark.parametrize("half_close", [False, True])
async def test_pipelined_requests_are_all_answered(
    wire_mode: str, half_close: bool, server_log: LogWatch
) -> None:
    eof_judged = server_log.on("ended its side after pipelined requests")

    async def handler(request: Request) -> Response:
        if request.path == "/1" and half_close:
            await wait(eof_judged)  # the EOF arrives while /2 and /3 wait their turn
        await anyio.lowlevel.checkpoint()  # where a wrong cancellation would strike
        await anyio.lowlevel.checkpoint()
        return Response.text(request.path)

    requests = (
        b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /2 HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /3 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    async with (
        running_server(handler) as info,
        await anyio.connect_tcp("127.0.0.1", info.port) as stream,
    ):
        await stream.send(requests)
        if half_close:
            await stream.send_eof()
        responses = parse_responses(await read_until_eof(stream))
    assert [r.body for r in responses] == [b"/1", b"/2", b"/3"]


async def test_eof_before_the_body_was_read_counts_once_it_is(wire_mode: str) -> None:
    parked = Parked()
    body_read = anyio.Event()
    release = anyio.Event()

    async def handler(request: Request) -> Response:
        await wait(release)
        await request.read()
        body_read.set()
        return await parked(request)

    async with running_server(handler) as info:
        async with await anyio.connect_tcp("127.0.0.1", info.port) as stream:
            await stream.send(b"POST /park HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nbody")
            await stream.send_eof()
            release.set()
            assert await read_until_eof(stream) == b""
        await wait(parked.ended)
    assert body_read.is_set()
    assert parked.cancelled


# -- streamed bodies -------------------------------------------------------------------


@pytest.mark.parametrize("how", ["close", "reset"])
async def test_client_leaving_finalizes_a_blocked_generator(wire_mode: str, how: str) -> None:
    finalized = anyio.Event()

    async def handler(request: Request) -> Response:
        if request.path != "/park":
            return Response(200)

        async def body() -> AsyncIterator[bytes]:
            try:
                yield b"first"
                await anyio.sleep_forever()
                yield b"never"  # pragma: no cover
            finally:
                finalized.set()

        return Response(200, [("content-type", "text/plain")], body())

    async with running_server(handler) as info:
        stream = await anyio.connect_tcp("127.0.0.1", info.port)
        await stream.send(PARK)
        await read_until(stream, b"first")
        await leave(stream, how)
        await wait(finalized)
        await good_request(info.port)


async def test_client_leaving_mid_stream_closes_the_body_shielded(wire_mode: str) -> None:
    body = Body([b"first"])

    async def handler(request: Request) -> Response:
        return Response(200, [], body)

    async with running_server(handler) as info:
        stream = await anyio.connect_tcp("127.0.0.1", info.port)
        await stream.send(PARK)
        await read_until(stream, b"first")
        await leave(stream, "reset")
        await wait(body.closed)  # its aclose awaited, inside the cancelled connection


async def test_failed_head_write_closes_the_body(wire_mode: str, server_log: LogWatch) -> None:
    reset_seen = server_log.on("reset the connection")
    started = anyio.Event()
    body = Body([b"never sent"])

    async def handler(request: Request) -> Response:
        if request.path != "/park":
            return Response(200)
        started.set()
        with anyio.CancelScope(shield=True):  # answers although cancelled
            await wait(reset_seen)
        assert request.disconnected
        return Response(200, [], body)

    async with running_server(handler) as info:
        stream = await anyio.connect_tcp("127.0.0.1", info.port)
        await stream.send(PARK)
        await wait(started)
        await leave(stream, "reset")
        await wait(body.closed)
        assert body.pulled == 0  # closed without ever being iterated
        await good_request(info.port)


@pytest.mark.parametrize("then", ["end", "fail"])
async def test_body_is_closed_when_it_ends_or_fails(wire_mode: str, then: str) -> None:
    body = Body([b"one", b"two"], then=then)

    async def handler(request: Request) -> Response:
        return Response(200, [], body)

    async with (
        running_server(handler) as info,
        await anyio.connect_tcp("127.0.0.1", info.port) as stream,
    ):
        await stream.send(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = await read_until_eof(stream)
        await wait(body.closed)
    assert b"one" in data
    assert b"two" in data


async def test_body_of_a_head_request_is_closed_unread(wire_mode: str) -> None:
    body = Body([b"one"])

    async def handler(request: Request) -> Response:
        return Response(200, [], body)

    async with (
        running_server(handler) as info,
        await anyio.connect_tcp("127.0.0.1", info.port) as stream,
    ):
        await stream.send(b"HEAD / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        await read_until_eof(stream)
        await wait(body.closed)
    assert body.pulled == 0


async def test_shutdown_closes_a_streaming_body(wire_mode: str) -> None:
    body = Body([b"first"])
    shutdown = anyio.Event()

    async def handler(request: Request) -> Response:
        return Response(200, [], body)

    async with (
        running_server(handler, shutdown=shutdown, shutdown_timeout=0.01) as info,
        await anyio.connect_tcp("127.0.0.1", info.port) as stream,
    ):
        await stream.send(PARK)
        await read_until(stream, b"first")
        shutdown.set()
        await wait(body.closed)


async def test_a_body_that_will_not_close_is_abandoned(
    wire_mode: str, server_log: LogWatch, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(streambody_module, "BODY_CLOSE_TIMEOUT", 0.01)
    abandoned = server_log.on("did not close within")

    class Stuck(Body):
        async def aclose(self) -> None:
            await anyio.sleep_forever()

    body = Stuck([b"first"])

    async def handler(request: Request) -> Response:
        return Response(200, [], body) if request.path == "/park" else Response(200)

    async with running_server(handler) as info:
        stream = await anyio.connect_tcp("127.0.0.1", info.port)
        await stream.send(PARK)
        await read_until(stream, b"first")
        await leave(stream, "close")
        await wait(abandoned)
        await good_request(info.port)


# -- TLS -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def contexts(ca: trustme.CA) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return server, client


def tls_send(port: int, context: ssl.SSLContext, data: bytes) -> ssl.SSLSocket:
    """A blocking TLS client (the standard library's, a foreign one) that sent ``data``."""
    sock = context.wrap_socket(
        socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT),
        server_hostname="127.0.0.1",
    )
    sock.sendall(data)
    return sock


def tls_leave(sock: ssl.SSLSocket, how: str) -> None:
    if how == "reset":
        set_reset_on_close(sock)
    elif how == "close_notify":  # as browsers and curl do: alert, then close at once
        sock.setblocking(False)
        with contextlib.suppress(ssl.SSLWantReadError):
            sock.unwrap()  # sends the alert; the answer it would wait for never comes
    sock.close()


def tls_request(port: int, context: ssl.SSLContext) -> bytes:
    sock = tls_send(port, context, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    with sock:
        chunks = []
        while data := sock.recv(65536):
            chunks.append(data)
    return b"".join(chunks)


@pytest.mark.parametrize("how", ["close", "close_notify", "reset"])
async def test_tls_client_leaving_cancels_the_waiting_handler(
    wire_mode: str, how: str, contexts: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    server_context, client_context = contexts
    parked = Parked()
    async with running_server(parked, ssl_context=server_context) as info:
        sock = await anyio.to_thread.run_sync(tls_send, info.port, client_context, PARK)
        await wait(parked.started)
        await anyio.to_thread.run_sync(tls_leave, sock, how)
        await wait(parked.ended)
        assert parked.cancelled
        answer = await anyio.to_thread.run_sync(tls_request, info.port, client_context)
    assert parse_response(answer).status == 200


async def test_tls_client_leaving_finalizes_a_streamed_body(
    wire_mode: str, contexts: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    server_context, client_context = contexts
    body = Body([b"first"])
    sent = anyio.Event()

    async def handler(request: Request) -> Response:
        sent.set()
        return Response(200, [], body)

    async with running_server(handler, ssl_context=server_context) as info:
        sock = await anyio.to_thread.run_sync(tls_send, info.port, client_context, PARK)
        await wait(sent)
        await anyio.to_thread.run_sync(tls_leave, sock, "close")
        await wait(body.closed)
