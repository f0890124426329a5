"""Inferno's HTTP/1.1 server: :func:`serve` a handler on anyio + h11.

Structure: one listener task per bound socket accepts connections and starts
one task per connection in a task group; each connection runs a
:class:`~inferno.http._serverconn.ServerConnection` over a byte transport from
:mod:`inferno.http._wire` (TLS through anyio's ``TLSStream``).  Shutdown, when
the ``shutdown`` event is set: stop accepting, close idle connections at once,
let in-flight requests finish for ``shutdown_timeout`` seconds (their responses
carry ``Connection: close``), cancel the rest.

A client that goes away while its handler runs cancels its connection (see
:mod:`inferno.http._serverconn`).  The wire learns of it without reading: on
asyncio from the transport's callbacks (for TLS, those of the TCP connection
below it), elsewhere through a read-ahead task per connection.

Usage::

    async with anyio.create_task_group() as tg:
        info = await tg.start(functools.partial(serve, handler, port=0))
        ...  # info.port is the bound port
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import os
import socket
import ssl
from dataclasses import dataclass
from typing import Any, cast

import anyio
import anyio.abc
from anyio.abc import SocketAttribute
from anyio.streams.stapled import MultiListener
from anyio.streams.tls import TLSStream

from inferno.errors import HTTPError, InfernoError, ListenError
from inferno.http._messages import (
    Handler,
    Request,
    Response,
    ServerLimits,
    WebSocketAccept,
    dump_json,
)
from inferno.http._readahead import ReadAheadWire
from inferno.http._responses import http_date
from inferno.http._serverconn import ConnectionContext, ServerConnection
from inferno.http._wire import (
    AsyncioWire,
    PeerWatch,
    StreamWire,
    Wire,
    WireByteStream,
    close_gracefully,
)

__all__ = [
    "Handler",
    "Request",
    "Response",
    "ServerInfo",
    "ServerLimits",
    "TLSConfigError",
    "WebSocketAccept",
    "serve",
    "server_ssl_context",
    "start_server",
]

logger = logging.getLogger("inferno.http")

ACCEPT_BACKOFF = 0.1  # seconds to pause accepting when out of file descriptors or memory
MAX_PENDING_REJECTIONS = 64  # connections being told 503 at once; beyond that, closed unanswered
# accept() errors that mean "this one connection failed", not "the listener is broken"
_TRANSIENT_ACCEPT_ERRORS = frozenset(
    (errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ENETDOWN, errno.EHOSTUNREACH)
)
_RESOURCE_ACCEPT_ERRORS = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))

# What a failed TLS handshake raises (the client's fault, logged at debug level)
_TLS_FAILURES = (
    ssl.SSLError,
    OSError,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    anyio.EndOfStream,
)

# Use the asyncio fast path (AsyncioWire) when running on asyncio.  Tests turn it
# off to exercise the portable anyio-stream path on asyncio too.
USE_ASYNCIO_WIRE = True


class TLSConfigError(InfernoError, ValueError):
    """Raised when a TLS certificate or key cannot be loaded."""


def server_ssl_context(
    cert_file: str | os.PathLike[str],
    key_file: str | os.PathLike[str] | None = None,
    *,
    password: str | None = None,
) -> ssl.SSLContext:
    """A server-side TLS context from PEM files (TLS 1.2+, ALPN ``http/1.1``).

    ``key_file`` may be omitted when ``cert_file`` holds the key too.

    :raises TLSConfigError: naming the files when they cannot be loaded.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # Client-initiated renegotiation (TLS 1.2) costs us handshakes for nothing, and
    # on the read-ahead path it would make the reading task write as well.
    context.options |= ssl.OP_NO_RENEGOTIATION
    context.set_alpn_protocols(["http/1.1"])
    try:
        context.load_cert_chain(cert_file, key_file, password)
    except (OSError, ssl.SSLError) as exc:
        files = f"{cert_file}" + (f" and {key_file}" if key_file else "")
        raise TLSConfigError(f"cannot load TLS certificate from {files}: {exc}") from exc
    return context


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """Where a started server listens (reported through ``task_status``)."""

    host: str
    port: int
    scheme: str = "http"
    name: str = "http"
    addresses: tuple[tuple[str, int], ...] = ()

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:8080``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def _overloaded_response() -> bytes:
    body = dump_json(
        HTTPError(503, "server is at its connection limit", code="too_many_connections").body()
    )
    return (
        b"HTTP/1.1 503 Service Unavailable\r\n"
        b"content-type: application/json\r\n"
        b"content-length: %d\r\n"
        b"retry-after: 1\r\n"
        b"date: %s\r\n"
        b"connection: close\r\n\r\n%s" % (len(body), http_date(), body)
    )


class _Server:
    """State of one running server: its connections and their shutdown."""

    def __init__(
        self, handler: Handler, limits: ServerLimits, ssl_context: ssl.SSLContext | None, name: str
    ) -> None:
        self.ctx = ConnectionContext(handler, limits, "https" if ssl_context else "http")
        self.limits = limits
        self.ssl_context = ssl_context
        self.name = name
        self.connections: set[ServerConnection] = set()
        self.active = 0  # connections being served (counted against max_connections)
        self.rejecting = 0  # connections being answered 503
        self.all_closed = anyio.Event()
        self.limit_warned = False
        try:
            asyncio.get_running_loop()
            self.on_asyncio = USE_ASYNCIO_WIRE
        except RuntimeError:
            self.on_asyncio = False

    # -- accepting ----------------------------------------------------------------

    async def accept(self, listener: anyio.abc.SocketListener, tg: anyio.abc.TaskGroup) -> None:
        """Accept connections forever, one task each."""
        if self.on_asyncio:
            await self._accept_raw(listener.extra(SocketAttribute.raw_socket), tg)
            return
        while True:  # portable path: anyio's listener
            try:
                stream = await listener.accept()
            except OSError as exc:
                await self._accept_failed(exc)
                continue
            stream.extra(SocketAttribute.raw_socket).setsockopt(
                socket.IPPROTO_TCP, socket.TCP_NODELAY, 1
            )
            self._dispatch(stream, _address(stream.extra(SocketAttribute.remote_address)), tg)

    async def _accept_raw(self, sock: socket.socket, tg: anyio.abc.TaskGroup) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                client, address = await loop.sock_accept(sock)
            except asyncio.CancelledError:
                loop.remove_reader(sock)  # older asyncio leaves the reader registered
                raise
            except OSError as exc:
                await self._accept_failed(exc)
                continue
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._dispatch(client, _address(address), tg)

    async def _accept_failed(self, exc: OSError) -> None:
        if exc.errno in _TRANSIENT_ACCEPT_ERRORS:
            logger.debug("%s: accept failed: %s", self.name, exc)
            return
        if exc.errno in _RESOURCE_ACCEPT_ERRORS:
            logger.warning("%s: cannot accept connections (%s); retrying", self.name, exc)
            await anyio.sleep(ACCEPT_BACKOFF)
            return
        raise exc

    def _dispatch(
        self,
        accepted: socket.socket | anyio.abc.SocketStream,
        client: tuple[str, int] | None,
        tg: anyio.abc.TaskGroup,
    ) -> None:
        if self.active >= self.limits.max_connections:
            if not self.limit_warned:
                self.limit_warned = True
                logger.warning(
                    "%s: at the connection limit (%d); answering 503",
                    self.name,
                    self.limits.max_connections,
                )
            if self.rejecting >= MAX_PENDING_REJECTIONS:
                if isinstance(accepted, socket.socket):
                    accepted.close()
                else:  # closing an anyio stream awaits; a task is affordable here
                    tg.start_soon(_close_accepted, accepted)
                return
            self.rejecting += 1
            tg.start_soon(self._reject, accepted, client)
            return
        self.active += 1
        tg.start_soon(self._serve, accepted, client)

    # -- connections --------------------------------------------------------------

    async def _open(
        self, accepted: socket.socket | anyio.abc.SocketStream, read_ahead: bool = False
    ) -> tuple[Wire, PeerWatch | None] | None:
        """The connection's transport, TLS completed, and what watches its peer.

        ``None`` when TLS failed.  On asyncio the watch is the raw
        :class:`AsyncioWire` (below TLS, if any); elsewhere, with
        ``read_ahead``, a :class:`ReadAheadWire` whose :meth:`~ReadAheadWire.pump`
        the caller runs.
        """
        send_timeout = self.limits.body_timeout
        if isinstance(accepted, socket.socket):
            raw: Wire = await AsyncioWire.from_socket(accepted, send_timeout)
        elif read_ahead and self.ssl_context is None:
            raw = ReadAheadWire(accepted, send_timeout=send_timeout)
        else:
            raw = StreamWire(accepted, send_timeout=send_timeout)
        if self.ssl_context is None:
            return raw, raw if isinstance(raw, (AsyncioWire, ReadAheadWire)) else None
        below = WireByteStream(raw) if isinstance(raw, AsyncioWire) else accepted
        assert isinstance(below, anyio.abc.ByteStream)
        try:
            with anyio.move_on_after(self.limits.header_timeout):
                try:
                    tls = await TLSStream.wrap(
                        below,
                        server_side=True,
                        ssl_context=self.ssl_context,
                        standard_compatible=False,
                    )
                except _TLS_FAILURES as exc:
                    logger.debug("%s: TLS handshake failed: %s", self.name, exc)
                else:
                    if isinstance(raw, AsyncioWire):
                        return StreamWire(tls, eof_stream=below, send_timeout=send_timeout), raw
                    if read_ahead:
                        wire = ReadAheadWire(tls, eof_stream=below, send_timeout=send_timeout)
                        return wire, wire
                    return StreamWire(tls, eof_stream=below, send_timeout=send_timeout), None
        except BaseException:
            with anyio.CancelScope(shield=True):
                await raw.aclose()
            raise
        await raw.aclose()
        return None

    async def _serve(
        self, accepted: socket.socket | anyio.abc.SocketStream, client: tuple[str, int] | None
    ) -> None:
        connection: ServerConnection | None = None
        wire: Wire | None = None
        try:
            with anyio.CancelScope() as scope:
                opened = await self._open(accepted, read_ahead=True)
                if opened is None:
                    return
                wire, watch = opened
                connection = ServerConnection(wire, self.ctx, client, watch)
                connection.scope = scope
                self.connections.add(connection)
                if isinstance(wire, ReadAheadWire):
                    await _run_reading_ahead(connection, wire)
                else:
                    await connection.run()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, ConnectionError) as exc:
            logger.debug("%s: connection from %s lost: %r", self.name, client, exc)
        except Exception:
            logger.exception("%s: connection from %s failed", self.name, client)
        finally:
            if wire is not None:
                with anyio.CancelScope(shield=True):
                    await wire.aclose()
            else:
                await _close_accepted(accepted)
            if connection is not None:
                self.connections.discard(connection)
            self.active -= 1
            if self.active < self.limits.max_connections:
                self.limit_warned = False
            self._note_closed()

    async def _reject(
        self, accepted: socket.socket | anyio.abc.SocketStream, client: tuple[str, int] | None
    ) -> None:
        """Tell one connection over the limit 503, then close it cleanly."""
        wire: Wire | None = None
        try:
            opened = await self._open(accepted)
            if opened is not None:
                wire = opened[0]
                await wire.send_all(_overloaded_response())
                await close_gracefully(wire)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            logger.debug("%s: rejecting %s failed: %r", self.name, client, exc)
        finally:
            if wire is None:
                await _close_accepted(accepted)
            else:
                with anyio.CancelScope(shield=True):
                    await wire.aclose()
            self.rejecting -= 1
            self._note_closed()

    def _note_closed(self) -> None:
        if self.ctx.shutting_down and self.active == 0 and self.rejecting == 0:
            self.all_closed.set()

    async def drain(self, grace: float) -> None:
        """Shutdown: close idle connections now, wait ``grace`` seconds for the others."""
        self.ctx.shutting_down = True
        busy = 0
        for connection in list(self.connections):
            if connection.idle and connection.scope is not None:
                connection.scope.cancel()
            else:
                busy += 1
        logger.info("%s: shutting down, %d requests in flight", self.name, busy)
        self._note_closed()
        with anyio.move_on_after(grace):
            await self.all_closed.wait()
        if not self.all_closed.is_set():
            logger.warning(
                "%s: cancelling %d connections still busy after %g s",
                self.name,
                self.active + self.rejecting,
                grace,
            )


def _address(address: object) -> tuple[str, int] | None:
    if isinstance(address, tuple) and len(address) >= 2:
        return str(address[0]), int(address[1])
    return None


async def _run_reading_ahead(connection: ServerConnection, wire: ReadAheadWire) -> None:
    """Run ``connection`` with ``wire``'s pump beside it (the portable path)."""
    failure: Exception | None = None
    async with anyio.create_task_group() as tg:
        tg.start_soon(wire.pump)
        try:
            await connection.run()
        except Exception as exc:  # raised as itself below, not in an exception group
            failure = exc
        finally:
            tg.cancel_scope.cancel()
    if failure is not None:
        raise failure


async def _close_accepted(accepted: socket.socket | anyio.abc.SocketStream) -> None:
    if isinstance(accepted, socket.socket):
        accepted.close()
    else:
        with anyio.CancelScope(shield=True):
            await accepted.aclose()


async def serve(
    handler: Handler,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    limits: ServerLimits = ServerLimits(),  # noqa: B008  # frozen, so a shared default is safe
    ssl_context: ssl.SSLContext | None = None,
    shutdown: anyio.Event | None = None,
    shutdown_timeout: float = 30.0,
    name: str = "http",
    reuse_port: bool = False,
    task_status: anyio.abc.TaskStatus[ServerInfo] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``handler`` on ``host:port`` until cancelled or ``shutdown`` is set.

    Reports a :class:`ServerInfo` (the bound port when ``port`` is 0) through
    ``task_status`` once listening.  With ``shutdown`` set: stop accepting,
    close idle connections, give in-flight requests ``shutdown_timeout`` seconds,
    cancel what remains, return.

    With ``reuse_port`` the socket is bound with ``SO_REUSEPORT``: several
    processes (a proxy's workers) listen on one port, and the kernel spreads
    new connections over them.

    :raises OSError: when the address cannot be bound.
    """
    multi = await anyio.create_tcp_listener(local_host=host, local_port=port, reuse_port=reuse_port)
    listeners = cast(
        "list[anyio.abc.SocketListener]",
        list(multi.listeners) if isinstance(multi, MultiListener) else [multi],
    )
    addresses = tuple(
        _address(listener.extra(SocketAttribute.local_address)) or (host, port)
        for listener in listeners
    )
    server = _Server(handler, limits, ssl_context, name)
    info = ServerInfo(
        host=addresses[0][0],
        port=addresses[0][1],
        scheme=server.ctx.scheme,
        name=name,
        addresses=addresses,
    )
    try:
        async with anyio.create_task_group() as connections:
            async with anyio.create_task_group() as acceptors:
                for listener in listeners:
                    acceptors.start_soon(server.accept, listener, connections)
                logger.info("%s: listening on %s", name, info.url)
                task_status.started(info)
                if shutdown is not None:
                    await shutdown.wait()
                    acceptors.cancel_scope.cancel()
            await multi.aclose()  # new connections are refused from here on
            await server.drain(shutdown_timeout)
            connections.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await multi.aclose()
    logger.info("%s: stopped", name)


async def start_server(
    group: anyio.abc.TaskGroup, handler: Handler, *, setting: str, **options: Any
) -> ServerInfo:
    """Start :func:`serve` in ``group`` and return where it listens.

    ``setting`` names the configuration key that chose the address (for
    example ``"proxy.port"``): a port that cannot be bound becomes a
    :class:`~inferno.errors.ListenError` naming the address and that key.
    """
    try:
        info: ServerInfo = await group.start(functools.partial(serve, handler, **options))
    except OSError as exc:
        host, port = options.get("host", "127.0.0.1"), options.get("port", 0)
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        raise ListenError(f"cannot listen on {where} ({setting}): {exc.strerror or exc}") from None
    return info
