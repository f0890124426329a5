"""Servers the HTTP client tests talk to, all on real loopback sockets.

* ``foreign_server``: the standard library's ``ThreadingHTTPServer`` speaking
  HTTP/1.1 with keep-alive, in a background thread: a server we did not write.
* ``tls_server``: the same behind TLS, with a trustme CA the client may trust.
* ``scripted``: an anyio listener whose every connection runs a test's own
  coroutine, for edge cases scripted byte by byte (with h11 on the server side).
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import anyio
import anyio.abc
import h11
import pytest
import trustme

# -- a foreign server: stdlib http.server ----------------------------------------


class _ForeignHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], family: int) -> None:
        self.address_family = family
        self.lock = threading.Lock()
        self.connections = 0
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client hanging up mid-response is part of several tests


class _Handler(BaseHTTPRequestHandler):
    """Routes: /conn, /bytes?N, /stream?N, /close, /connclose, /nocontent, /json, POST /echo."""

    protocol_version = "HTTP/1.1"
    server: _ForeignHTTPServer

    def setup(self) -> None:
        super().setup()
        with self.server.lock:
            self.server.connections += 1
            self.connection_number = self.server.connections

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _reply(self, status: int, body: bytes, headers: tuple[tuple[str, str], ...] = ()) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Connection", str(self.connection_number))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self) -> None:
        self._reply(200, b"head body is never sent")

    def do_GET(self) -> None:
        path, _, query = self.path.partition("?")
        if path == "/conn":
            self._reply(200, str(self.connection_number).encode())
        elif path == "/bytes":
            self._reply(200, b"x" * int(query))
        elif path == "/json":
            self._reply(200, b'{"ok": true}', (("Content-Type", "application/json"),))
        elif path == "/stream":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for number in range(int(query)):
                part = f"part{number};".encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        elif path == "/close":
            # Looks keep-alive to the client, then the server hangs up anyway.
            self._reply(200, b"bye")
            self.close_connection = True
        elif path == "/connclose":
            self._reply(200, b"closing", (("Connection", "close"),))
        elif path == "/nocontent":
            self.send_response(204)
            self.send_header("X-Connection", str(self.connection_number))
            self.end_headers()
        else:
            self._reply(404, b"not found")

    def do_POST(self) -> None:
        chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
        body = self._read_chunked() if chunked else self.rfile.read(self._length())
        self._reply(
            200,
            body,
            (
                ("X-Chunked", "yes" if chunked else "no"),
                ("X-Content-Length", self.headers.get("Content-Length", "-")),
            ),
        )

    def _length(self) -> int:
        return int(self.headers.get("Content-Length", "0"))

    def _read_chunked(self) -> bytes:
        body = bytearray()
        while True:
            size = int(self.rfile.readline().split(b";")[0], 16)
            if size == 0:
                while self.rfile.readline() not in (b"\r\n", b""):
                    pass  # trailers
                return bytes(body)
            body += self.rfile.read(size)
            self.rfile.readline()


@dataclass
class ForeignServer:
    httpd: _ForeignHTTPServer
    scheme: str = "http"
    server_names: list[str | None] = field(default_factory=list)  # SNI, for TLS servers

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    @property
    def connections(self) -> int:
        """Connections the server has accepted so far."""
        with self.httpd.lock:
            return self.httpd.connections

    def url(self, path: str = "/", host: str = "127.0.0.1") -> str:
        if ":" in host:
            host = f"[{host}]"
        return f"{self.scheme}://{host}:{self.port}{path}"


@contextlib.contextmanager
def _run_foreign(
    host: str, family: int, context: ssl.SSLContext | None = None
) -> Iterator[ForeignServer]:
    httpd = _ForeignHTTPServer((host, 0), family)
    if context is not None:
        # Handshake lazily in the handler thread, not in the accept loop.
        httpd.socket = context.wrap_socket(
            httpd.socket, server_side=True, do_handshake_on_connect=False
        )
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield ForeignServer(httpd, "https" if context else "http")
    finally:
        httpd.shutdown()
        thread.join()
        httpd.server_close()


@pytest.fixture
def foreign_server() -> Iterator[ForeignServer]:
    with _run_foreign("127.0.0.1", socket.AF_INET) as server:
        yield server


@pytest.fixture
def foreign_server_v6() -> Iterator[ForeignServer]:
    try:
        with _run_foreign("::1", socket.AF_INET6) as server:
            yield server
    except OSError as exc:  # pragma: no cover - depends on the machine
        pytest.skip(f"no IPv6 loopback: {exc}")


@pytest.fixture(scope="session")
def tls_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def client_ssl_context(tls_ca: trustme.CA) -> ssl.SSLContext:
    """What the client uses to trust the test CA, with host name checking on."""
    context = ssl.create_default_context()
    tls_ca.configure_trust(context)
    return context


def server_ssl_context(ca: trustme.CA, *names: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(context)
    return context


@pytest.fixture
def tls_server(tls_ca: trustme.CA) -> Iterator[ForeignServer]:
    """Certificate for 127.0.0.1 and localhost; ``server_names`` records each SNI seen."""
    context = server_ssl_context(tls_ca, "127.0.0.1", "localhost")

    def record_sni(sock: Any, name: str | None, ctx: ssl.SSLContext) -> None:
        server.server_names.append(name)

    context.sni_callback = record_sni
    with _run_foreign("127.0.0.1", socket.AF_INET, context) as server:
        yield server


@pytest.fixture
def tls_server_other_name(tls_ca: trustme.CA) -> Iterator[ForeignServer]:
    """A trusted certificate, but for a name that is not 127.0.0.1."""
    context = server_ssl_context(tls_ca, "elsewhere.example")
    with _run_foreign("127.0.0.1", socket.AF_INET, context) as server:
        yield server


# -- scripted servers: anyio listener + h11 ------------------------------------------


class Peer:
    """The server side of one scripted connection."""

    def __init__(self, stream: anyio.abc.SocketStream, number: int) -> None:
        self.stream = stream
        self.number = number  # 1 for the first connection the server accepted
        self.h11 = h11.Connection(h11.SERVER)

    async def request(self) -> tuple[h11.Request, bytes] | None:
        """The next whole request, or None when the client closed the connection."""
        request = None
        body = bytearray()
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                try:
                    data = await self.stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    data = b""
                self.h11.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert request is not None
                return request, bytes(body)
            elif isinstance(event, h11.ConnectionClosed):
                return None

    async def request_head(self) -> h11.Request | None:
        """Only the head of the next request (its body is left unread)."""
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                try:
                    data = await self.stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    data = b""
                self.h11.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                return event
            return None

    async def respond(
        self, status: int = 200, body: bytes = b"", headers: list[tuple[str, str]] | None = None
    ) -> None:
        """A complete response with Content-Length; the connection stays usable."""
        all_headers = [("content-length", str(len(body))), *(headers or [])]
        data = self.h11.send(h11.Response(status_code=status, headers=all_headers))
        data += self.h11.send(h11.Data(data=body)) + self.h11.send(h11.EndOfMessage())
        await self.stream.send(data)
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.h11.start_next_cycle()

    async def send(self, data: bytes) -> None:
        await self.stream.send(data)

    async def wait_closed(self) -> None:
        """Read until the client closes or resets the connection (discarding data)."""
        with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
            while True:
                await self.stream.receive()


Script = Callable[[Peer], Awaitable[None]]


@dataclass
class ScriptedServer:
    port: int
    connections: int = 0  # accepted so far
    finished: int = 0  # scripts that have returned (their connection closed)
    peers: list[Peer] = field(default_factory=list)
    changed: anyio.Event = field(default_factory=anyio.Event)

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def note_finished(self) -> None:
        self.finished += 1
        self.changed.set()
        self.changed = anyio.Event()

    async def wait_finished(self, count: int) -> None:
        """Wait until ``count`` connections have ended on the server side."""
        while self.finished < count:
            await self.changed.wait()


@contextlib.asynccontextmanager
async def _run_scripted(script: Script) -> AsyncIterator[ScriptedServer]:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    server = ScriptedServer(port=listener.extra(anyio.abc.SocketAttribute.local_port))

    async def handle(stream: anyio.abc.SocketStream) -> None:
        server.connections += 1
        peer = Peer(stream, server.connections)
        server.peers.append(peer)
        async with stream:
            with contextlib.suppress(
                anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream
            ):
                await script(peer)
        server.note_finished()

    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        yield server
        tg.cancel_scope.cancel()


@pytest.fixture
def scripted() -> Callable[[Script], contextlib.AbstractAsyncContextManager[ScriptedServer]]:
    """``async with scripted(script) as server``: run ``script(peer)`` for each connection."""
    return _run_scripted
