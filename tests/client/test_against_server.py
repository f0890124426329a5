"""Our HTTP client against our HTTP server over loopback: keep-alive, streaming both ways."""

from __future__ import annotations

import functools
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import anyio
import pytest
import trustme

from inferno.http.client import HTTPClient, Timeouts
from inferno.http.client_errors import ReadTimeout
from inferno.http.pool import OriginStats
from inferno.http.server import Request, Response, ServerInfo, ServerLimits, serve

pytestmark = pytest.mark.anyio

GUARD = 10  # seconds; a hung test fails here instead of at the 60 s pytest timeout


@asynccontextmanager
async def running(
    handler: Callable[[Request], object],
    limits: ServerLimits = ServerLimits(),  # noqa: B008 - frozen
    ssl_context: ssl.SSLContext | None = None,
) -> AsyncIterator[ServerInfo]:
    async with anyio.create_task_group() as tg:
        info = await tg.start(
            functools.partial(serve, handler, limits=limits, ssl_context=ssl_context)
        )
        yield info
        tg.cancel_scope.cancel()


@pytest.fixture
def server() -> Callable[..., AbstractAsyncContextManager[ServerInfo]]:
    return running


def assert_settled(client: HTTPClient) -> None:
    stats = client.pool_stats()
    idle = 0
    for origin, counts in stats.origins.items():
        assert (counts.active, counts.waiting) == (0, 0), origin
        idle += counts.idle
    assert stats.connections == idle


async def client_port(request: Request) -> Response:
    """Answers with the client's port: one port per client connection."""
    assert request.client is not None
    await request.read()
    return Response(200, [("content-type", "text/plain")], str(request.client[1]).encode())


async def test_keep_alive(server) -> None:
    async with server(client_port) as info, HTTPClient() as client:
        ports = {await (await client.request("GET", info.url + "/")).read() for _ in range(5)}
        assert len(ports) == 1
        assert client.pool_stats().opened == 1
        assert_settled(client)


async def test_pool_limit_against_our_server(server) -> None:
    release = anyio.Event()
    inside = 0
    most_inside = 0

    async def slow(request: Request) -> Response:
        nonlocal inside, most_inside
        inside += 1
        most_inside = max(most_inside, inside)
        await release.wait()
        inside -= 1
        return await client_port(request)

    async with server(slow) as info, HTTPClient(max_connections_per_origin=3) as client:
        ports: list[bytes] = []

        async def one() -> None:
            ports.append(await (await client.request("POST", info.url + "/", body=b"x")).read())

        with anyio.fail_after(GUARD):
            async with anyio.create_task_group() as tg:
                for _ in range(10):
                    tg.start_soon(one)
                await anyio.wait_all_tasks_blocked()
                origin = next(iter(client.pool_stats().origins.values()))
                assert origin == OriginStats(idle=0, active=3, waiting=7)
                release.set()
        assert most_inside == 3
        assert len(ports) == 10
        assert len(set(ports)) == 3
        assert_settled(client)


async def test_response_streams_chunk_by_chunk(server) -> None:
    second_allowed = anyio.Event()

    async def streaming(request: Request) -> Response:
        async def body() -> AsyncIterator[bytes]:
            yield b"data: one\n\n"
            await second_allowed.wait()
            yield b"data: two\n\n"

        return Response(200, [("content-type", "text/event-stream")], body())

    async with server(streaming) as info, HTTPClient() as client:
        with anyio.fail_after(GUARD):
            async with client.stream("GET", info.url + "/events") as response:
                assert response.headers.get("transfer-encoding") == "chunked"
                chunks = response.iter_bytes()
                assert await chunks.__anext__() == b"data: one\n\n"
                second_allowed.set()
                assert [chunk async for chunk in chunks] == [b"data: two\n\n"]
        assert client.pool_stats().opened == 1
        assert_settled(client)


async def test_request_streams_chunk_by_chunk(server) -> None:
    first_arrived = anyio.Event()

    async def collect(request: Request) -> Response:
        received = []
        async for chunk in request.stream():
            received.append(chunk)
            first_arrived.set()
        return Response(200, [], b"|".join(received))

    async def body() -> AsyncIterator[bytes]:
        yield b"first"
        await first_arrived.wait()  # the handler has chunk one before chunk two exists
        yield b"second"

    async with server(collect) as info, HTTPClient() as client:
        with anyio.fail_after(GUARD):
            response = await client.request("PUT", info.url + "/upload", body=body())
        assert await response.read() == b"first|second"
        again = await client.request("PUT", info.url + "/upload", body=b"whole")
        assert await again.read() == b"whole"
        assert client.pool_stats().opened == 1


async def test_echo_large_bodies_both_ways(server) -> None:
    async def echo(request: Request) -> Response:
        received = await request.read()

        async def back() -> AsyncIterator[bytes]:
            for start in range(0, len(received), 65_536):
                yield received[start : start + 65_536]

        return Response(200, [], back())

    payload = bytes(range(256)) * 8192  # 2 MiB

    async def pieces() -> AsyncIterator[bytes]:
        for start in range(0, len(payload), 100_000):
            yield payload[start : start + 100_000]

    async with server(echo) as info, HTTPClient() as client:
        with anyio.fail_after(GUARD):
            async with client.stream("POST", info.url + "/", body=pieces()) as response:
                received = b"".join([chunk async for chunk in response.iter_bytes()])
        assert received == payload
        assert_settled(client)


async def test_server_error_answers_arrive_as_responses(server) -> None:
    async with (
        server(client_port, limits=ServerLimits(max_body_bytes=10)) as info,
        HTTPClient() as client,
    ):
        response = await client.request("POST", info.url + "/", body=b"x" * 100)
        assert response.status == 413
        assert (await response.json())["error"]["type"] == "invalid_request_error"
        assert_settled(client)
        assert (await client.request("POST", info.url + "/", body=b"small")).status == 200


async def test_server_idle_timeout_then_a_fresh_connection(server) -> None:
    limits = ServerLimits(keepalive_timeout=0.05)
    async with server(client_port, limits=limits) as info, HTTPClient() as client:
        first = await (await client.request("POST", info.url + "/", body=b"job")).read()
        # Well past the server's keep-alive timeout: it has closed the connection.
        await anyio.sleep(0.5)
        second = await (await client.request("POST", info.url + "/", body=b"job")).read()
        assert first != second
        stats = client.pool_stats()
        assert (stats.opened, stats.closed) == (2, 1)
        assert_settled(client)


async def test_tls_keep_alive(server, tls_ca: trustme.CA, client_ssl_context) -> None:
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_ca.issue_cert("127.0.0.1").configure_cert(server_context)
    async with (
        server(client_port, ssl_context=server_context) as info,
        HTTPClient(ssl_context=client_ssl_context) as client,
    ):
        assert info.url.startswith("https://")
        ports = {await (await client.request("GET", info.url + "/")).read() for _ in range(3)}
        assert len(ports) == 1
        assert client.pool_stats().opened == 1


async def test_read_timeout_against_a_slow_handler(server) -> None:
    async def never(request: Request) -> Response:
        await anyio.sleep_forever()
        raise AssertionError

    async with server(never) as info, HTTPClient(timeouts=Timeouts(read=0.05)) as client:
        with pytest.raises(ReadTimeout, match="sent nothing"):
            await client.request("GET", info.url + "/")
        assert_settled(client)


async def test_read_deadlines_of_successive_requests_on_one_connection(server) -> None:
    # The wire keeps one lazy read timer per connection: a timer armed for an
    # earlier, shorter deadline must not cut a later, longer wait short, and one
    # armed for a later deadline must not let a shorter one overrun.
    async def handler(request: Request) -> Response:
        if request.path == "/slow":
            await anyio.sleep(1.0)
        elif request.path == "/never":
            await anyio.sleep_forever()
        return Response(200, body=b"ok")

    short, long = Timeouts(read=0.5), Timeouts(read=30)
    async with server(handler) as info, HTTPClient() as client:
        assert (await client.request("GET", info.url + "/", timeouts=short)).status == 200
        slow = await client.request("GET", info.url + "/slow", timeouts=Timeouts(read=5))
        assert slow.status == 200
        assert (await client.request("GET", info.url + "/", timeouts=long)).status == 200
        with anyio.fail_after(GUARD), pytest.raises(ReadTimeout, match="sent nothing"):
            await client.request("GET", info.url + "/never", timeouts=short)
        assert client.pool_stats().opened == 1  # all four on one connection
        assert_settled(client)
