"""WebSockets on wsproto, server and client side sharing one :class:`WebSocket`.

The server hands a :class:`WebSocket` to the session of a ``WebSocketAccept``
after completing the opening handshake itself (the request was parsed by h11;
whatever bytes followed it are fed to wsproto).  :func:`connect_websocket`
opens one as a client (the proxy relays with it).  One task may receive while
another sends; control frames (ping, close) are answered from within
:meth:`WebSocket.receive`.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterable
from typing import Protocol
from urllib.parse import urlsplit

import anyio
import anyio.abc
from anyio.streams.tls import TLSStream
from wsproto import ConnectionType, WSConnection
from wsproto.connection import Connection, ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    RejectConnection,
    RejectData,
    TextMessage,
)
from wsproto.events import Request as WSRequest
from wsproto.utilities import ProtocolError, generate_accept_token

from inferno.errors import InfernoError
from inferno.http._messages import DEFAULT_MAX_MESSAGE_BYTES
from inferno.http._wire import StreamWire, Wire
from inferno.http.headers import Headers

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "WebSocket",
    "WebSocketClosed",
    "WebSocketError",
    "WebSocketHandshakeError",
    "WebSocketTimeout",
    "accept_token",
    "connect_websocket",
    "run_server_session",
]

logger = logging.getLogger("inferno.http")

CLOSE_TIMEOUT = 5.0  # seconds to wait for the peer's answer to our close frame (RFC 6455 §7.1.1)
SHUTDOWN_CLOSE_TIMEOUT = 1.0  # seconds spent saying 1001 "going away" when cancelled
MAX_HANDSHAKE_REJECT_BYTES = 64 * 1024  # body of a refused upgrade kept for the error

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_ABNORMAL = 1006  # never sent: the connection ended without a close frame
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL_ERROR = 1011


class WebSocketError(InfernoError):
    """Raised when a WebSocket cannot be opened (``temporary``: worth retrying)."""

    def __init__(self, message: str, *, temporary: bool = False) -> None:
        super().__init__(message)
        self.temporary = temporary


class WebSocketClosed(WebSocketError):
    """Raised by receive and send once the WebSocket is closed; ``code`` per RFC 6455 §7.4."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(f"WebSocket closed ({code}{': ' + reason if reason else ''})")
        self.code = code
        self.reason = reason


class WebSocketTimeout(WebSocketError):
    """Raised when a server took the connection but did not answer the upgrade in time.

    Distinct from failing to connect at all (a plain temporary
    :class:`WebSocketError`): a proxy waits for an unreachable node to come
    back, not for one that is reachable but stalled.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, temporary=True)


class WebSocketHandshakeError(WebSocketError):
    """Raised when the server answers the upgrade with an HTTP response instead of 101."""

    def __init__(self, status: int, headers: Headers, body: bytes) -> None:
        super().__init__(
            f"WebSocket upgrade refused with HTTP {status}",
            temporary=status in (408, 429) or status >= 500,
        )
        self.status = status
        self.headers = headers
        self.body = body


class _FrameProtocol(Protocol):
    """What :class:`WebSocket` uses of wsproto (``WSConnection`` and ``Connection`` both fit)."""

    @property
    def state(self) -> ConnectionState: ...

    def send(self, event: Event) -> bytes: ...

    def receive_data(self, data: bytes | None) -> None: ...

    def events(self) -> Generator[Event, None, None]: ...


def accept_token(key: bytes) -> bytes:
    """``Sec-WebSocket-Accept`` for a ``Sec-WebSocket-Key`` (RFC 6455 §4.2.2)."""
    return generate_accept_token(key)


class WebSocket:
    """One open WebSocket; ``async for message in ws`` reads until it closes."""

    __slots__ = (
        "_closed",
        "_closed_event",
        "_conn",
        "_parts",
        "_pending",
        "_receiving",
        "_send_lock",
        "_size",
        "_wire",
        "max_message_bytes",
        "subprotocol",
    )

    def __init__(
        self,
        wire: Wire,
        connection: _FrameProtocol,
        *,
        subprotocol: str | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        pending: Iterable[Event] = (),
    ) -> None:
        self._wire = wire
        self._conn = connection
        self._pending: deque[Event] = deque(pending)
        self._parts: list[str | bytes | bytearray] = []
        self._size = 0
        self._receiving = False
        self._send_lock = anyio.Lock()
        self._closed: WebSocketClosed | None = None
        self._closed_event = anyio.Event()
        self.subprotocol = subprotocol
        self.max_message_bytes = max_message_bytes

    @classmethod
    def _accepted(
        cls,
        wire: Wire,
        trailing: bytes,
        *,
        subprotocol: str | None,
        max_message_bytes: int,
    ) -> WebSocket:
        """Server side, after the 101 went out; ``trailing`` is what followed the request."""
        connection = Connection(ConnectionType.SERVER)
        ws = cls(wire, connection, subprotocol=subprotocol, max_message_bytes=max_message_bytes)
        if trailing:
            connection.receive_data(trailing)
            ws._pending.extend(connection.events())
        return ws

    @property
    def closed(self) -> bool:
        """Whether the WebSocket has closed (either side, or the connection was lost)."""
        return self._closed is not None

    @property
    def close_code(self) -> int | None:
        """The close code once closed (1006: the connection ended without a close frame)."""
        return None if self._closed is None else self._closed.code

    @property
    def close_reason(self) -> str | None:
        return None if self._closed is None else self._closed.reason

    async def receive(self) -> str | bytes:
        """The next message: ``str`` for text, ``bytes`` for binary.

        :raises WebSocketClosed: once closed (by either side, or the connection
            was lost: 1006; a message over ``max_message_bytes``: 1009).
        """
        if self._closed is not None:
            raise WebSocketClosed(self._closed.code, self._closed.reason)
        if self._receiving:
            raise anyio.BusyResourceError("receiving from")
        self._receiving = True
        try:
            return await self._receive()
        except WebSocketClosed:
            # Both close frames exchanged, or the connection is gone: nothing more
            # will travel on it (RFC 6455 §7.1.1 lets either side close TCP now).
            await self._wire.aclose()
            raise
        finally:
            self._receiving = False

    async def _receive(self) -> str | bytes:
        pending = self._pending
        while True:
            while pending:
                message = await self._handle(pending.popleft())
                if message is not None:
                    return message
            try:
                data = await self._wire.receive_some()
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                data = b""
            if not data:
                raise self._mark_closed(CLOSE_ABNORMAL, "connection lost")
            self._conn.receive_data(data)
            pending.extend(self._conn.events())

    async def _handle(self, event: Event) -> str | bytes | None:
        if isinstance(event, (TextMessage, BytesMessage)):
            self._size += len(event.data)
            if self._size > self.max_message_bytes:
                await self._close_frame(CLOSE_TOO_BIG, "message too big")
                raise self._mark_closed(
                    CLOSE_TOO_BIG, f"message over {self.max_message_bytes} bytes"
                )
            self._parts.append(event.data)
            if not event.message_finished:
                return None
            parts, self._parts, self._size = self._parts, [], 0
            if isinstance(event, TextMessage):
                return "".join(parts)  # type: ignore[arg-type]
            return bytes(parts[0]) if len(parts) == 1 else b"".join(parts)  # type: ignore[arg-type]
        if isinstance(event, Ping):
            if self._conn.state is ConnectionState.OPEN:
                await self._send_event(event.response())
            return None
        if isinstance(event, CloseConnection):
            code, reason = event.code, event.reason or ""
            # REMOTE_CLOSING: the peer started closing, answer it.  OPEN: wsproto
            # reports a protocol violation this way; close with its code.
            if self._conn.state in (ConnectionState.REMOTE_CLOSING, ConnectionState.OPEN):
                await self._close_frame(code, reason)
            raise self._mark_closed(code, reason)
        return None  # Pong, or events of no interest

    async def send(self, message: str | bytes) -> None:
        """Send one message (text for ``str``, binary for ``bytes``).

        :raises WebSocketClosed: when the WebSocket is closed or closing.
        """
        if self._closed is not None:
            raise WebSocketClosed(self._closed.code, self._closed.reason)
        if self._conn.state is not ConnectionState.OPEN:
            raise WebSocketClosed(CLOSE_NORMAL, "closing")
        if isinstance(message, str):
            await self._send_event(TextMessage(data=message))
        else:
            await self._send_event(BytesMessage(data=message))

    async def ping(self, payload: bytes = b"") -> None:
        """Send a ping (the answer is consumed by :meth:`receive`)."""
        if self._closed is not None:
            raise WebSocketClosed(self._closed.code, self._closed.reason)
        await self._send_event(Ping(payload=payload))

    async def close(self, code: int = CLOSE_NORMAL, reason: str = "") -> None:
        """Close: send a close frame, await the peer's (bounded), close the connection."""
        await self._close_frame(code, reason)
        if self._closed is None:
            with anyio.move_on_after(CLOSE_TIMEOUT):
                if self._receiving:  # another task reads; it will see the peer's answer
                    await self._closed_event.wait()
                else:
                    try:
                        while True:
                            await self.receive()  # messages after our close frame are dropped
                    except WebSocketClosed:
                        pass
            if self._closed is None:
                self._mark_closed(code, reason)
        await self._wire.aclose()

    async def _close_frame(self, code: int, reason: str) -> None:
        """Send a close frame if wsproto's state allows one; lost connections are ignored."""
        if self._conn.state in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING):
            with contextlib.suppress(WebSocketClosed):
                await self._send_event(CloseConnection(code=code, reason=reason))

    async def _send_event(self, event: Event) -> None:
        async with self._send_lock:
            try:
                data = self._conn.send(event)
                await self._wire.send_all(data)
            except ProtocolError as exc:
                raise WebSocketClosed(CLOSE_NORMAL, f"closing ({exc})") from None
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                raise self._mark_closed(CLOSE_ABNORMAL, "connection lost") from None

    def _mark_closed(self, code: int, reason: str) -> WebSocketClosed:
        if self._closed is None:
            self._closed = WebSocketClosed(code, reason)
            self._closed_event.set()
        # A fresh instance per raise: re-raising one would grow its traceback.
        return WebSocketClosed(self._closed.code, self._closed.reason)

    def __aiter__(self) -> AsyncIterator[str | bytes]:
        return self

    async def __anext__(self) -> str | bytes:
        try:
            return await self.receive()
        except WebSocketClosed:
            raise StopAsyncIteration from None

    def __repr__(self) -> str:
        state = "open" if self._closed is None else f"closed {self._closed.code}"
        return f"<WebSocket {state}>"


def _only_closed(exc: BaseException) -> bool:
    """Whether ``exc`` (maybe a group, as task groups raise) is only WebSocketClosed."""
    inner = getattr(exc, "exceptions", None)
    if inner is not None:
        return all(_only_closed(e) for e in inner)
    return isinstance(exc, WebSocketClosed)


async def run_server_session(
    websocket: WebSocket, session: Callable[[WebSocket], Awaitable[None]]
) -> None:
    """Run a handler's session, then close: 1000 on return, 1011 on error, 1001 when cancelled."""
    try:
        await session(websocket)
    except anyio.get_cancelled_exc_class():
        with anyio.move_on_after(SHUTDOWN_CLOSE_TIMEOUT, shield=True):
            await _close_quietly(websocket, CLOSE_GOING_AWAY, "server shutting down")
        raise
    except Exception as exc:
        if _only_closed(exc):
            logger.debug("WebSocket session ended by a close: %s", exc)
            await _close_quietly(websocket, CLOSE_NORMAL, "")
        else:
            logger.exception("WebSocket session failed")
            await _close_quietly(websocket, CLOSE_INTERNAL_ERROR, "internal error")
    else:
        await _close_quietly(websocket, CLOSE_NORMAL, "")


async def _close_quietly(websocket: WebSocket, code: int, reason: str) -> None:
    with contextlib.suppress(
        WebSocketError, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError
    ):
        await websocket.close(code, reason)


async def connect_websocket(
    url: str,
    *,
    headers: Iterable[tuple[str, str]] | None = None,
    ssl_context: ssl.SSLContext | None = None,
    timeout: float = 10.0,  # noqa: ASYNC109  # one bound over connect, TLS and handshake
    connect_timeout: float | None = None,
    subprotocols: Iterable[str] = (),
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> WebSocket:
    """Open a WebSocket to ``url`` (``ws://``, ``wss://``; ``http(s)://`` also accepted).

    ``timeout`` bounds connecting, TLS and the opening handshake together;
    ``connect_timeout``, when given, bounds the TCP connect alone as well.

    :raises WebSocketHandshakeError: when the server answers with an HTTP status.
    :raises WebSocketTimeout: when the server took the connection but the
        handshake did not finish within ``timeout``.
    :raises WebSocketError: when the connection or handshake fails otherwise
        (``temporary`` for network errors and a connect timeout, not for TLS or
        protocol errors).
    :raises ValueError: for a URL that is not a WebSocket URL.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("ws", "wss", "http", "https") or not parts.hostname:
        raise ValueError(f"not a WebSocket URL: {url!r}")
    secure = scheme in ("wss", "https")
    host = parts.hostname
    port = parts.port or (443 if secure else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    authority = parts.netloc.rpartition("@")[2]
    extra = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers or ()]
    connected = False
    try:
        with anyio.fail_after(timeout):
            with anyio.fail_after(connect_timeout):  # None: no bound of its own
                tcp = await anyio.connect_tcp(host, port)
            connected = True
            try:
                tcp.extra(anyio.abc.SocketAttribute.raw_socket).setsockopt(
                    socket.IPPROTO_TCP, socket.TCP_NODELAY, 1
                )
                wire: StreamWire
                if secure:
                    tls = await TLSStream.wrap(
                        tcp,
                        hostname=host,
                        ssl_context=ssl_context or ssl.create_default_context(),
                        standard_compatible=False,
                    )
                    wire = StreamWire(tls, eof_stream=tcp)
                else:
                    wire = StreamWire(tcp)
                return await _client_handshake(
                    wire, authority, target, extra, list(subprotocols), max_message_bytes
                )
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await tcp.aclose()
                raise
    except TimeoutError:
        if not connected:
            raise WebSocketError(f"timed out connecting to {url}", temporary=True) from None
        raise WebSocketTimeout(f"timed out opening {url}") from None
    except ssl.SSLError as exc:
        raise WebSocketError(f"TLS failed with {url}: {exc}") from exc
    except (OSError, anyio.BrokenResourceError, anyio.EndOfStream) as exc:
        raise WebSocketError(f"cannot connect to {url}: {exc}", temporary=True) from exc


async def _client_handshake(
    wire: StreamWire,
    authority: str,
    target: str,
    extra_headers: list[tuple[bytes, bytes]],
    subprotocols: list[str],
    max_message_bytes: int,
) -> WebSocket:
    ws = WSConnection(ConnectionType.CLIENT)
    await wire.send_all(
        ws.send(
            WSRequest(
                host=authority,
                target=target,
                extra_headers=extra_headers,
                subprotocols=subprotocols,
            )
        )
    )
    pending: list[Event] = []
    accepted: AcceptConnection | None = None
    refused: RejectConnection | None = None
    refused_body = bytearray()
    while True:
        data = await wire.receive_some()
        if not data:
            raise WebSocketError(
                "server closed the connection during the handshake", temporary=True
            )
        try:
            ws.receive_data(data)
            events = list(ws.events())
        except ProtocolError as exc:
            raise WebSocketError(f"invalid WebSocket handshake response: {exc}") from exc
        for event in events:
            if accepted is not None:
                pending.append(event)
            elif isinstance(event, AcceptConnection):
                accepted = event
            elif isinstance(event, RejectConnection):
                refused = event
                if not event.has_body:
                    raise WebSocketHandshakeError(event.status_code, Headers(event.headers), b"")
            elif isinstance(event, RejectData) and refused is not None:
                refused_body += event.data[: MAX_HANDSHAKE_REJECT_BYTES - len(refused_body)]
                if event.body_finished or len(refused_body) >= MAX_HANDSHAKE_REJECT_BYTES:
                    raise WebSocketHandshakeError(
                        refused.status_code, Headers(refused.headers), bytes(refused_body)
                    )
        if accepted is not None:
            return WebSocket(
                wire,
                ws,
                subprotocol=accepted.subprotocol,
                max_message_bytes=max_message_bytes,
                pending=pending,
            )
