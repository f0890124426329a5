"""TLS: the server with a trustme certificate against http.client and our WebSocket client."""

from __future__ import annotations

import http.client
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
import trustme

from inferno.http import (
    Request,
    Response,
    TLSConfigError,
    WebSocket,
    WebSocketAccept,
    connect_websocket,
    server_ssl_context,
)
from tests.http.conftest import IO_TIMEOUT, exchange, read_until, running_server

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def server_context(ca: trustme.CA, tmp_path: Path) -> ssl.SSLContext:
    """Built by our helper from PEM files, as an operator would configure it."""
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_file = tmp_path / "cert.pem"
    key_file = tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    for extra in cert.cert_chain_pems[1:]:
        extra.write_to_path(str(cert_file), append=True)
    cert.private_key_pem.write_to_path(str(key_file))
    return server_ssl_context(cert_file, key_file)


@pytest.fixture
def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


async def describe(request: Request) -> Response:
    body = await request.read()
    return Response.json({"scheme": request.scheme, "path": request.path, "size": len(body)})


async def test_https_keep_alive_with_http_client(
    wire_mode: str, server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    def two_requests(port: int) -> list[tuple[int, bytes]]:
        conn = http.client.HTTPSConnection(
            "127.0.0.1", port, context=client_context, timeout=IO_TIMEOUT
        )
        try:
            out = []
            for body in (None, b"x" * 100_000):
                conn.request("POST", "/secure", body=body)
                response = conn.getresponse()
                out.append((response.status, response.read()))
            return out
        finally:
            conn.close()

    async with running_server(describe, ssl_context=server_context) as info:
        assert info.scheme == "https"
        assert info.url.startswith("https://")
        results = await anyio.to_thread.run_sync(two_requests, info.port)
    assert results == [
        (200, b'{"scheme":"https","path":"/secure","size":0}'),
        (200, b'{"scheme":"https","path":"/secure","size":100000}'),
    ]


async def test_streaming_over_tls_arrives_incrementally(
    wire_mode: str, server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    release = anyio.Event()

    async def handler(request: Request) -> Response:
        async def body() -> AsyncIterator[bytes]:
            yield b"first piece"
            await release.wait()
            yield b"second piece"

        return Response(200, body=body())

    async with running_server(handler, ssl_context=server_context) as info:
        tcp = await anyio.connect_tcp(
            "127.0.0.1", info.port, ssl_context=client_context, tls_standard_compatible=False
        )
        async with tcp:
            await tcp.send(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            data = await read_until(tcp, b"first piece")
            release.set()
            data = await read_until(tcp, b"0\r\n\r\n", data)
    assert b"second piece" in data


async def test_plain_http_on_the_tls_port_is_dropped_and_service_continues(
    wire_mode: str, server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    async with running_server(describe, ssl_context=server_context) as info:
        answer = await exchange(info.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert not answer.startswith(b"HTTP/")  # no plaintext answer on a TLS port

        def one_request() -> int:
            conn = http.client.HTTPSConnection(
                "localhost", info.port, context=client_context, timeout=IO_TIMEOUT
            )
            try:
                conn.request("GET", "/")
                return conn.getresponse().status
            finally:
                conn.close()

        assert await anyio.to_thread.run_sync(one_request) == 200


async def test_wss_echo(server_context: ssl.SSLContext, client_context: ssl.SSLContext) -> None:
    async def echo(ws: WebSocket) -> None:
        async for message in ws:
            await ws.send(message)

    async def handler(request: Request) -> Response:
        return WebSocketAccept(echo)

    async with running_server(handler, ssl_context=server_context) as info:
        with anyio.fail_after(IO_TIMEOUT):
            ws = await connect_websocket(
                f"wss://localhost:{info.port}/ws", ssl_context=client_context
            )
            await ws.send("over tls")
            assert await ws.receive() == "over tls"
            await ws.close()
        assert ws.close_code == 1000


async def test_wss_with_an_untrusted_certificate_fails_permanently(
    server_context: ssl.SSLContext,
) -> None:
    async def handler(request: Request) -> Response:
        return Response(200)

    async with running_server(handler, ssl_context=server_context) as info:
        from inferno.http import WebSocketError

        with pytest.raises(WebSocketError) as failed:
            await connect_websocket(f"wss://localhost:{info.port}/ws")  # system trust store
    assert failed.value.temporary is False


def test_server_ssl_context_names_the_files_it_cannot_load(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    with pytest.raises(TLSConfigError, match=r"missing\.pem"):
        server_ssl_context(missing)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    with pytest.raises(TLSConfigError, match=r"garbage\.pem"):
        server_ssl_context(garbage, garbage)
