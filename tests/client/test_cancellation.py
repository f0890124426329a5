"""Cancel a request in each phase; the pool must stay consistent and keep working.

Each test drives a request into one phase against a scripted server, checks it
really is there (pool counters, what the server saw), cancels it, and then
checks: no slot held, no waiter left, every open connection idle in the pool,
the server saw the abandoned connection close, and the next request works.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import anyio
import pytest

from inferno.http.client import HTTPClient, parse_url
from inferno.http.pool import OriginStats

pytestmark = pytest.mark.anyio

NOTHING = OriginStats(idle=0, active=0, waiting=0)
GUARD = 10  # seconds; a hung test fails here instead of at the 60 s pytest timeout


def origin_stats(client: HTTPClient, url: str) -> OriginStats:
    return client.pool_stats().origins.get(str(parse_url(url).origin), NOTHING)


def assert_settled(client: HTTPClient) -> None:
    stats = client.pool_stats()
    idle = 0
    for origin, counts in stats.origins.items():
        assert (counts.active, counts.waiting) == (0, 0), origin
        idle += counts.idle
    assert stats.connections == idle


async def cancel_when_blocked(
    request: Callable[[], Awaitable[object]], check: Callable[[], None]
) -> None:
    """Run ``request`` until every task waits, ``check`` where it is, then cancel it."""
    finished = False

    async def run() -> None:
        nonlocal finished
        await request()
        finished = True

    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            await anyio.wait_all_tasks_blocked()
            check()
            tg.cancel_scope.cancel()
    assert not finished


async def serve_after_first(peer, first: Callable[[object], Awaitable[None]]) -> None:
    """Connection 1 runs the phase-specific ``first`` script; later ones answer normally."""
    if peer.number == 1:
        await first(peer)
        return
    while await peer.request() is not None:
        await peer.respond(body=b"fine")


async def test_cancel_while_waiting_for_the_pool(scripted) -> None:
    async def script(peer) -> None:
        while await peer.request() is not None:
            await peer.respond(body=b"fine")

    async with scripted(script) as server, HTTPClient(max_connections_per_origin=1) as client:
        url = server.url()
        async with client.stream("GET", url) as holding:

            def check() -> None:
                assert origin_stats(client, url) == OriginStats(idle=0, active=1, waiting=1)

            await cancel_when_blocked(lambda: client.request("GET", url), check)
            assert origin_stats(client, url) == OriginStats(idle=0, active=1, waiting=0)
            assert await holding.read() == b"fine"
        assert await (await client.request("GET", url)).read() == b"fine"
        assert server.connections == 1
        assert_settled(client)


@pytest.mark.parametrize("cancel_first", [True, False])
async def test_cancel_around_the_moment_the_pool_grants(scripted, cancel_first: bool) -> None:
    async def script(peer) -> None:
        while await peer.request() is not None:
            await peer.respond(body=b"x" * 10)

    async with scripted(script) as server, HTTPClient(max_connections_per_origin=1) as client:
        url = server.url()
        with anyio.fail_after(GUARD):
            async with client.stream("GET", url) as holding, anyio.create_task_group() as tg:
                tg.start_soon(client.request, "GET", url)
                await anyio.wait_all_tasks_blocked()
                assert origin_stats(client, url).waiting == 1
                if cancel_first:
                    # Cancelled, then granted the connection before it runs again:
                    # the grant must go back to the pool.
                    tg.cancel_scope.cancel()
                    with anyio.CancelScope(shield=True):
                        assert await holding.read() == b"x" * 10
                else:
                    # Granted, then cancelled: anyio lets it run to its next
                    # checkpoint, inside the request, which must clean up.
                    assert await holding.read() == b"x" * 10
                    tg.cancel_scope.cancel()
        assert_settled(client)
        if cancel_first:
            assert origin_stats(client, url) == OriginStats(idle=1, active=0, waiting=0)
        assert await (await client.request("GET", url)).read() == b"x" * 10


async def test_cancel_while_connecting(scripted, client_ssl_context) -> None:
    async def stall(peer) -> None:
        await peer.wait_closed()  # TCP accepted, the TLS handshake never answered

    async def script(peer) -> None:
        await serve_after_first(peer, stall)

    async with scripted(script) as server, HTTPClient(ssl_context=client_ssl_context) as client:
        url = f"https://127.0.0.1:{server.port}/"

        def check() -> None:
            assert origin_stats(client, url) == OriginStats(idle=0, active=1, waiting=0)
            assert client.pool_stats().opened == 0  # still connecting

        await cancel_when_blocked(lambda: client.request("GET", url), check)
        assert origin_stats(client, url) == NOTHING
        assert client.pool_stats().connections == 0
        with anyio.fail_after(GUARD):
            await server.wait_finished(1)  # the server saw the half-open connection go away
        assert await (await client.request("GET", server.url())).read() == b"fine"
        assert_settled(client)


async def test_cancel_while_sending_the_body(scripted) -> None:
    async def stop_reading(peer) -> None:
        await peer.request_head()
        await anyio.sleep_forever()  # never reads the body: the client's sends block

    async def script(peer) -> None:
        await serve_after_first(peer, stop_reading)

    async def endless() -> AsyncIterator[bytes]:
        chunk = b"x" * (1 << 20)
        while True:
            yield chunk

    async with scripted(script) as server, HTTPClient() as client:
        url = server.url()

        def check() -> None:
            assert origin_stats(client, url).active == 1
            assert client.pool_stats().opened == 1

        await cancel_when_blocked(lambda: client.request("POST", url, body=endless()), check)
        stats = client.pool_stats()
        assert (stats.opened, stats.closed) == (1, 1)
        assert await (await client.request("GET", url)).read() == b"fine"
        assert_settled(client)


async def test_cancel_while_waiting_for_the_response_head(scripted) -> None:
    async def never_answer(peer) -> None:
        await peer.request()
        await peer.wait_closed()

    async def script(peer) -> None:
        await serve_after_first(peer, never_answer)

    async with scripted(script) as server, HTTPClient() as client:
        url = server.url()

        def check() -> None:
            assert origin_stats(client, url).active == 1
            assert server.connections == 1

        await cancel_when_blocked(lambda: client.request("POST", url, body=b"job"), check)
        with anyio.fail_after(GUARD):
            await server.wait_finished(1)  # the abandoned connection was closed
        stats = client.pool_stats()
        assert (stats.opened, stats.closed) == (1, 1)
        assert await (await client.request("GET", url)).read() == b"fine"
        assert_settled(client)


@pytest.mark.parametrize("streaming", [True, False])
async def test_cancel_in_the_middle_of_the_body(scripted, streaming: bool) -> None:
    async def half_a_body(peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n" + b"a" * 10)
        await peer.wait_closed()

    async def script(peer) -> None:
        await serve_after_first(peer, half_a_body)

    async with scripted(script) as server, HTTPClient() as client:
        url = server.url()
        got: list[bytes] = []

        async def stream_it() -> None:
            async with client.stream("GET", url) as response:
                async for chunk in response.iter_bytes():
                    got.append(chunk)

        async def read_it() -> None:
            await client.request("GET", url)

        def check() -> None:
            assert origin_stats(client, url).active == 1
            if streaming:
                assert got == [b"a" * 10]

        await cancel_when_blocked(stream_it if streaming else read_it, check)
        with anyio.fail_after(GUARD):
            await server.wait_finished(1)
        stats = client.pool_stats()
        assert (stats.opened, stats.closed) == (1, 1)
        assert await (await client.request("GET", url)).read() == b"fine"
        assert_settled(client)


async def test_cancel_after_the_head_inside_the_stream_block(scripted) -> None:
    async def head_only(peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n")
        await peer.wait_closed()

    async def script(peer) -> None:
        await serve_after_first(peer, head_only)

    async with scripted(script) as server, HTTPClient() as client:
        url = server.url()

        async def caller_waits_elsewhere() -> None:
            async with client.stream("GET", url) as response:
                assert response.status == 200
                await anyio.sleep_forever()  # cancelled while holding the response

        await cancel_when_blocked(caller_waits_elsewhere, lambda: None)
        with anyio.fail_after(GUARD):
            await server.wait_finished(1)
        assert await (await client.request("GET", url)).read() == b"fine"
        assert_settled(client)
