"""HTTPClient against a foreign server (stdlib http.server) and scripted loopback peers."""

from __future__ import annotations

import socket
import ssl
from collections.abc import AsyncIterator

import anyio
import pytest

from inferno.http.client import URL, HTTPClient, Timeouts, parse_url
from inferno.http.client_errors import (
    ClientError,
    ClientTimeout,
    ConnectError,
    ConnectTimeout,
    DecodeError,
    InvalidURL,
    LocalProtocolError,
    PoolTimeout,
    ReadTimeout,
    RemoteProtocolError,
    ResponseTooLarge,
    TLSError,
    TotalTimeout,
    WriteTimeout,
)
from inferno.http.pool import OriginStats

pytestmark = pytest.mark.anyio

NOTHING = OriginStats(idle=0, active=0, waiting=0)
GUARD = 10  # seconds; a hung test fails here instead of at the 60 s pytest timeout


def origin_stats(client: HTTPClient, url: str) -> OriginStats:
    return client.pool_stats().origins.get(str(parse_url(url).origin), NOTHING)


def assert_settled(client: HTTPClient) -> None:
    """No request in flight and every open connection idle in the pool."""
    stats = client.pool_stats()
    idle = 0
    for origin, counts in stats.origins.items():
        assert counts.active == 0, origin
        assert counts.waiting == 0, origin
        idle += counts.idle
    assert stats.connections == idle


# -- keep-alive and the pool ---------------------------------------------------------


async def test_keep_alive_reuses_one_connection(foreign_server) -> None:
    async with HTTPClient() as client:
        url = foreign_server.url("/conn")
        bodies = [await (await client.request("GET", url)).read() for _ in range(3)]
        assert bodies == [b"1", b"1", b"1"]
        assert foreign_server.connections == 1
        assert origin_stats(client, foreign_server.url()) == OriginStats(
            idle=1, active=0, waiting=0
        )
        assert client.pool_stats().opened == 1


async def test_response_fields(foreign_server) -> None:
    async with HTTPClient() as client:
        response = await client.request("GET", foreign_server.url("/json"))
        assert (response.status, response.reason, response.http_version) == (200, "OK", "1.1")
        assert response.headers.get("content-type") == "application/json"
        assert response.headers.get("Content-Length") == "12"
        assert await response.json() == {"ok": True}
        assert response.url == parse_url(foreign_server.url("/json"))
        assert response.is_closed


async def test_connection_close_is_honoured(foreign_server) -> None:
    async with HTTPClient() as client:
        for _ in range(2):
            response = await client.request("GET", foreign_server.url("/connclose"))
            assert await response.read() == b"closing"
        assert foreign_server.connections == 2
        stats = client.pool_stats()
        assert (stats.opened, stats.closed) == (2, 2)
        assert_settled(client)


async def test_bodiless_responses_keep_the_connection(foreign_server) -> None:
    async with HTTPClient() as client:
        head = await client.request("HEAD", foreign_server.url("/anything"))
        assert head.headers.get("content-length") == "23"
        assert await head.read() == b""
        empty = await client.request("GET", foreign_server.url("/nocontent"))
        assert (empty.status, await empty.read()) == (204, b"")
        last = await client.request("GET", foreign_server.url("/conn"))
        assert await last.read() == b"1"
        assert foreign_server.connections == 1


async def test_requests_beyond_the_limit_wait_for_a_connection(scripted) -> None:
    gate = anyio.Event()

    async def script(peer) -> None:
        while await peer.request() is not None:
            await gate.wait()
            await peer.respond(body=str(peer.number).encode())

    async with scripted(script) as server, HTTPClient(max_connections_per_origin=2) as client:
        served: list[bytes] = []

        async def fetch() -> None:
            served.append(await (await client.request("GET", server.url())).read())

        with anyio.fail_after(GUARD):
            async with anyio.create_task_group() as tg:
                for _ in range(5):
                    tg.start_soon(fetch)
                await anyio.wait_all_tasks_blocked()
                assert origin_stats(client, server.url()) == OriginStats(0, 2, 3)
                assert server.connections == 2
                gate.set()
        assert len(served) == 5
        assert set(served) <= {b"1", b"2"}
        assert server.connections == 2
        assert origin_stats(client, server.url()) == OriginStats(idle=2, active=0, waiting=0)


async def test_pool_timeout_when_the_origin_is_full(foreign_server) -> None:
    async with HTTPClient(max_connections_per_origin=1) as client:
        async with client.stream("GET", foreign_server.url("/bytes?10")) as holding:
            with pytest.raises(PoolTimeout) as caught:
                await client.request(
                    "GET", foreign_server.url("/conn"), timeouts=Timeouts(pool=0.05)
                )
            assert origin_stats(client, foreign_server.url()) == OriginStats(0, 1, 0)
            await holding.read()
        assert caught.value.temporary
        assert not caught.value.request_sent
        assert isinstance(caught.value, ClientTimeout)
        assert await (await client.request("GET", foreign_server.url("/conn"))).read() == b"1"
        assert_settled(client)


async def test_idle_connections_expire(foreign_server) -> None:
    async with HTTPClient(idle_timeout=0) as client:
        for _ in range(2):
            await client.request("GET", foreign_server.url("/conn"))
        assert foreign_server.connections == 2
        stats = client.pool_stats()
        assert (stats.opened, stats.closed) == (2, 1)
        assert_settled(client)


async def test_connection_closed_while_idle_is_replaced(scripted) -> None:
    hung_up = anyio.Event()

    async def script(peer) -> None:
        await peer.request()
        await peer.respond(body=b"from %d" % peer.number)
        if peer.number == 1:
            await peer.stream.aclose()  # keep-alive promised, then gone while idle
            hung_up.set()
        else:
            await peer.wait_closed()

    async with scripted(script) as server, HTTPClient() as client:
        with anyio.fail_after(GUARD):
            first = await client.request("POST", server.url(), body=b"not idempotent")
            assert await first.read() == b"from 1"
            await hung_up.wait()
            second = await client.request("POST", server.url(), body=b"not idempotent")
            assert await second.read() == b"from 2"
        assert server.connections == 2
        stats = client.pool_stats()
        assert (stats.opened, stats.closed) == (2, 1)
        assert_settled(client)


async def test_request_that_reached_the_server_is_not_retried(scripted) -> None:
    async def script(peer) -> None:
        await peer.request()
        await peer.respond(body=b"ok")
        await peer.request()  # read the second request, then hang up without answering

    async with scripted(script) as server, HTTPClient() as client:
        with anyio.fail_after(GUARD):
            await client.request("GET", server.url())
            with pytest.raises(RemoteProtocolError) as caught:
                await client.request("POST", server.url(), body=b"charge the card")
        assert caught.value.request_sent
        assert caught.value.temporary
        assert "without sending a response" in str(caught.value)
        assert server.connections == 1
        assert_settled(client)
        assert client.pool_stats().connections == 0


# -- streaming ----------------------------------------------------------------------


async def test_chunked_response_arrives_chunk_by_chunk(scripted) -> None:
    second_allowed = anyio.Event()

    async def script(peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\none\r\n")
        await second_allowed.wait()
        await peer.send(b"3\r\ntwo\r\n0\r\n\r\n")
        await peer.wait_closed()

    async with scripted(script) as server, HTTPClient() as client:
        with anyio.fail_after(GUARD):
            async with client.stream("GET", server.url()) as response:
                chunks = response.iter_bytes()
                assert await chunks.__anext__() == b"one"  # before chunk two exists
                second_allowed.set()
                assert [chunk async for chunk in chunks] == [b"two"]
                assert response.is_closed  # back in the pool as soon as the body ended
        assert origin_stats(client, server.url()) == OriginStats(1, 0, 0)


async def test_chunked_response_from_foreign_server(foreign_server) -> None:
    async with HTTPClient() as client:
        async with client.stream("GET", foreign_server.url("/stream?3")) as response:
            body = b"".join([chunk async for chunk in response.iter_bytes()])
        assert body == b"part0;part1;part2;"
        again = await client.request("GET", foreign_server.url("/stream?2"))
        assert await again.read() == b"part0;part1;"
        assert foreign_server.connections == 1


async def test_request_body_streams_chunk_by_chunk(scripted) -> None:
    first_seen = anyio.Event()

    async def script(peer) -> None:
        await peer.request_head()
        received = b""
        while True:
            event = peer.h11.next_event()
            if type(event).__name__ == "NEED_DATA":
                peer.h11.receive_data(await peer.stream.receive())
            elif type(event).__name__ == "Data":
                received += event.data
                first_seen.set()
            else:
                break
        await peer.respond(body=received)
        await peer.wait_closed()

    async def body() -> AsyncIterator[bytes]:
        yield b"first,"
        await first_seen.wait()  # the server has chunk one before chunk two is made
        yield b"second"

    async with scripted(script) as server, HTTPClient() as client:
        with anyio.fail_after(GUARD):
            response = await client.request("PUT", server.url(), body=body())
        assert await response.read() == b"first,second"


async def test_async_iterable_body_is_sent_chunked(foreign_server) -> None:
    async def body() -> AsyncIterator[bytes]:
        for part in (b"ab", b"", bytearray(b"cd")):
            yield part  # empty chunks are skipped; bytearray is fine

    async with HTTPClient() as client:
        response = await client.request("POST", foreign_server.url("/echo"), body=body())
        assert await response.read() == b"abcd"
        assert response.headers.get("x-chunked") == "yes"


async def test_async_iterable_body_with_content_length(foreign_server) -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b"ab"
        yield b"cd"

    async with HTTPClient() as client:
        response = await client.request(
            "POST", foreign_server.url("/echo"), headers={"Content-Length": "4"}, body=body()
        )
        assert await response.read() == b"abcd"
        assert response.headers.get("x-chunked") == "no"
        assert response.headers.get("x-content-length") == "4"


@pytest.mark.parametrize(
    ("body", "sent_length"), [(b"hello", "5"), (None, "0"), (b"", "0"), (bytearray(b"xy"), "2")]
)
async def test_bytes_body_has_content_length(foreign_server, body, sent_length) -> None:
    async with HTTPClient() as client:
        response = await client.request("POST", foreign_server.url("/echo"), body=body)
        assert response.headers.get("x-content-length") == sent_length
        assert await response.read() == bytes(body or b"")


async def test_large_body_both_ways(foreign_server) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB, several sends and receives
    async with HTTPClient() as client:
        response = await client.request("POST", foreign_server.url("/echo"), body=payload)
        assert await response.read() == payload


async def test_closing_a_stream_early_closes_its_connection(foreign_server) -> None:
    async with HTTPClient() as client:
        async with client.stream("GET", foreign_server.url("/bytes?5000000")) as response:
            assert await response.iter_bytes().__anext__()
        stats = client.pool_stats()
        assert (stats.opened, stats.closed) == (1, 1)
        with pytest.raises(RuntimeError, match="closed before its body"):
            await response.read()
        assert await (await client.request("GET", foreign_server.url("/conn"))).read() == b"2"


async def test_unread_body_that_already_arrived_keeps_the_connection(scripted) -> None:
    async def script(peer) -> None:
        while await peer.request() is not None:
            await peer.respond(body=b"small")  # head and body in one send

    async with scripted(script) as server, HTTPClient() as client:
        async with client.stream("GET", server.url()) as response:
            assert response.status == 200
            await anyio.wait_all_tasks_blocked()  # whatever will arrive has arrived
        async with client.stream("GET", server.url()) as response:
            assert await response.read() == b"small"
        assert server.connections == 1
        assert_settled(client)


# -- timeouts -----------------------------------------------------------------------


async def test_connect_timeout(scripted, client_ssl_context) -> None:
    async def script(peer) -> None:
        await peer.wait_closed()  # accepts TCP, never answers the TLS ClientHello

    async with scripted(script) as server, HTTPClient(ssl_context=client_ssl_context) as client:
        url = f"https://127.0.0.1:{server.port}/"
        with anyio.fail_after(GUARD), pytest.raises(ConnectTimeout) as caught:
            await client.request("GET", url, timeouts=Timeouts(connect=0.05))
        assert isinstance(caught.value, ConnectError)
        assert isinstance(caught.value, ClientTimeout)
        assert not caught.value.request_sent
        assert client.pool_stats().connections == 0
        assert_settled(client)


async def test_read_timeout(scripted) -> None:
    async def script(peer) -> None:
        await peer.request()
        await peer.wait_closed()

    async with scripted(script) as server, HTTPClient(timeouts=Timeouts(read=0.05)) as client:
        with anyio.fail_after(GUARD), pytest.raises(ReadTimeout) as caught:
            await client.request("GET", server.url())
        assert caught.value.request_sent
        assert caught.value.temporary
        assert_settled(client)
        assert client.pool_stats().closed == 1


async def test_write_timeout(scripted) -> None:
    async def script(peer) -> None:
        await peer.request_head()
        await anyio.sleep_forever()  # never reads the body

    async def endless() -> AsyncIterator[bytes]:
        chunk = b"x" * (1 << 20)
        while True:
            yield chunk

    async with scripted(script) as server, HTTPClient() as client:
        with anyio.fail_after(GUARD), pytest.raises(WriteTimeout) as caught:
            await client.request(
                "POST", server.url(), body=endless(), timeouts=Timeouts(write=0.05)
            )
        assert caught.value.request_sent
        assert_settled(client)


async def test_total_timeout_covers_the_body(scripted) -> None:
    async def script(peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")
        await peer.wait_closed()

    async with scripted(script) as server, HTTPClient() as client:
        timeouts = Timeouts(read=GUARD, total=0.1)
        with anyio.fail_after(GUARD):
            async with client.stream("GET", server.url(), timeouts=timeouts) as response:
                chunks = response.iter_bytes()
                assert await chunks.__anext__() == b"abc"
                with pytest.raises(TotalTimeout) as caught:
                    await chunks.__anext__()
        assert caught.value.request_sent
        assert not isinstance(caught.value, ReadTimeout)
        assert_settled(client)


def test_timeouts_are_validated() -> None:
    with pytest.raises(ValueError, match=r"Timeouts\.read"):
        Timeouts(read=-1)
    with pytest.raises(ValueError, match=r"Timeouts\.total"):
        Timeouts(total=float("nan"))
    assert Timeouts(connect=None).connect is None


# -- connection and TLS errors ---------------------------------------------------------


async def test_connect_error_on_a_closed_port() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with HTTPClient() as client:
        with pytest.raises(ConnectError) as caught:
            await client.request("GET", f"http://127.0.0.1:{port}/")
        assert not isinstance(caught.value, ClientTimeout)
        assert caught.value.temporary
        assert not caught.value.request_sent
        assert "refused" in str(caught.value).lower()
        assert isinstance(caught.value.__cause__, OSError)
        assert_settled(client)


async def test_tls_request_with_sni_and_reuse(tls_server, client_ssl_context) -> None:
    async with HTTPClient(ssl_context=client_ssl_context) as client:
        for host in ("localhost", "localhost"):
            response = await client.request("GET", tls_server.url("/conn", host=host))
            assert await response.read() == b"1"
        first_ip = await client.request("GET", tls_server.url("/conn"))
        assert await first_ip.read() == b"2"  # another origin, another connection
    assert tls_server.server_names[0] == "localhost"
    assert tls_server.connections == 2


async def test_tls_untrusted_certificate(tls_server) -> None:
    async with HTTPClient() as client:  # the system trust store does not know the test CA
        with pytest.raises(TLSError) as caught:
            await client.request("GET", tls_server.url("/conn"))
        assert not caught.value.temporary
        assert not caught.value.request_sent
        assert isinstance(caught.value.__cause__, ssl.SSLError)
        assert client.pool_stats().connections == 0


async def test_tls_certificate_for_another_name(tls_server_other_name, client_ssl_context) -> None:
    async with HTTPClient(ssl_context=client_ssl_context) as client:
        with pytest.raises(TLSError, match=r"127\.0\.0\.1"):
            await client.request("GET", tls_server_other_name.url("/conn"))


async def test_ipv6_literal(foreign_server_v6) -> None:
    async with HTTPClient() as client:
        response = await client.request("GET", foreign_server_v6.url("/conn", host="::1"))
        assert await response.read() == b"1"
        assert str(response.url.origin) == f"http://[::1]:{foreign_server_v6.port}"


# -- protocol errors and bad input -------------------------------------------------------


async def test_response_head_over_the_limit(scripted) -> None:
    async def script(peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nx-big: " + b"a" * 20_000 + b"\r\n\r\n")
        await peer.wait_closed()

    async with scripted(script) as server, HTTPClient(max_response_header_bytes=8192) as client:
        with pytest.raises(RemoteProtocolError, match="max_response_header_bytes"):
            await client.request("GET", server.url())
        assert_settled(client)


@pytest.mark.parametrize(
    "reply",
    [
        b"HTTP/1.1 abc Nope\r\n\r\n",  # not a status code
        b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc",  # cut short
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",  # bad chunk size
    ],
)
async def test_broken_responses(scripted, reply) -> None:
    async def script(peer) -> None:
        await peer.request()
        await peer.send(reply)

    async with scripted(script) as server, HTTPClient() as client:
        with anyio.fail_after(GUARD), pytest.raises(RemoteProtocolError) as caught:
            await client.request("GET", server.url())
        assert caught.value.request_sent
        assert_settled(client)


async def test_failure_mid_body_releases_the_connection_at_once(scripted) -> None:
    async def script(peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")

    async with scripted(script) as server, HTTPClient() as client:
        with anyio.fail_after(GUARD):
            async with client.stream("GET", server.url()) as response:
                with pytest.raises(RemoteProtocolError):
                    await response.read()
                # Still inside the block: the broken connection is already gone.
                assert response.is_closed
                assert_settled(client)
                assert client.pool_stats().connections == 0


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/",
        "127.0.0.1:80/",
        "http://",
        "http://host:0/",
        "http://host:port/",
        "http://user:pw@host/",
        "http://[::1/",
        "http://[not-v6]/",
        "http://host/a b",
        "http://héllo.example/",
    ],
)
async def test_invalid_urls(url) -> None:
    async with HTTPClient() as client:
        with pytest.raises(InvalidURL) as caught:
            await client.request("GET", url)
        assert not caught.value.temporary
        assert isinstance(caught.value, ValueError)


def test_url_parsing() -> None:
    url = parse_url("HTTP://Example.COM:8080/a/b?q=1#frag")
    assert (url.scheme, url.host, url.port) == ("http", "example.com", 8080)
    assert url.target == b"/a/b?q=1"
    assert url.host_header == b"example.com:8080"
    assert parse_url("https://h").target == b"/"
    assert parse_url("https://h").host_header == b"h"
    assert parse_url("http://h?x").target == b"/?x"
    v6 = parse_url("http://[::1]:9/")
    assert (v6.host, v6.host_header) == ("::1", b"[::1]:9")
    assert v6.with_target("/v1/models") == URL("http", "::1", 9, b"/v1/models")


@pytest.mark.parametrize(
    ("headers", "body"),
    [
        ({"bad name": "x"}, None),
        ({"x-ok": "line\nbreak"}, None),
        ({"x-ok": "snowman ☃"}, None),
        ({"content-length": "2"}, b"four"),
        (None, "text is not bytes"),
    ],
)
async def test_invalid_requests_are_refused(foreign_server, headers, body) -> None:
    async with HTTPClient() as client:
        with pytest.raises(LocalProtocolError) as caught:
            await client.request("POST", foreign_server.url("/echo"), headers=headers, body=body)
        assert not caught.value.temporary
        assert not caught.value.request_sent
        assert_settled(client)
        assert client.pool_stats().connections == 0


async def test_body_chunk_that_is_not_bytes(foreign_server) -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b"fine"
        yield "not bytes"  # type: ignore[misc]

    async with HTTPClient() as client:
        with pytest.raises(LocalProtocolError, match="must be bytes") as caught:
            await client.request("POST", foreign_server.url("/echo"), body=body())
        assert caught.value.request_sent
        assert_settled(client)


async def test_read_with_a_size_limit(foreign_server) -> None:
    async with HTTPClient() as client:
        async with client.stream("GET", foreign_server.url("/bytes?100000")) as response:
            with pytest.raises(ResponseTooLarge):
                await response.read(max_bytes=1000)
        assert_settled(client)
        async with client.stream("GET", foreign_server.url("/bytes?1000")) as response:
            assert len(await response.read(max_bytes=1000)) == 1000


async def test_json_that_is_not_json(foreign_server) -> None:
    async with HTTPClient() as client:
        response = await client.request("GET", foreign_server.url("/bytes?3"))
        with pytest.raises(DecodeError, match="not valid JSON"):
            await response.json()


async def test_errors_are_inferno_errors() -> None:
    from inferno.errors import InfernoError

    assert issubclass(ClientError, InfernoError)
    for error in (ConnectTimeout, ReadTimeout, WriteTimeout, PoolTimeout, TotalTimeout):
        assert error("x").temporary
    assert ConnectTimeout("x", request_sent=False).request_sent is False


async def test_closed_client_refuses_requests(foreign_server) -> None:
    client = HTTPClient()
    await client.request("GET", foreign_server.url("/conn"))
    await client.aclose()
    stats = client.pool_stats()
    assert (stats.opened, stats.closed) == (1, 1)
    with pytest.raises(RuntimeError, match="closed"):
        await client.request("GET", foreign_server.url("/conn"))


async def test_closing_the_client_wakes_waiting_requests(foreign_server) -> None:
    client = HTTPClient(max_connections_per_origin=1)
    async with client.stream("GET", foreign_server.url("/bytes?10")) as holding:
        outcome: list[BaseException] = []

        async def wait_for_a_slot() -> None:
            try:
                await client.request("GET", foreign_server.url("/conn"))
            except RuntimeError as exc:
                outcome.append(exc)

        with anyio.fail_after(GUARD):
            async with anyio.create_task_group() as tg:
                tg.start_soon(wait_for_a_slot)
                await anyio.wait_all_tasks_blocked()
                await client.aclose()
        assert "closed" in str(outcome[0])
        await holding.read()
    stats = client.pool_stats()
    assert (stats.opened, stats.closed) == (1, 1)  # the active one closed on release


async def test_parsed_origin_reused_with_other_targets(foreign_server) -> None:
    base = parse_url(foreign_server.url())
    async with HTTPClient() as client:
        first = await client.request("GET", base.with_target("/conn"))
        second = await client.request("GET", base.with_target(b"/bytes?4"))
        assert (await first.read(), await second.read()) == (b"1", b"xxxx")
