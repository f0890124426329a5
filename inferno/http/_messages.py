"""What a handler sees and returns: :class:`Request`, :class:`Response`, limits.

These are plain values with no I/O of their own: a :class:`Request` reads its
body through a :class:`BodySource` (the server connection, or memory for a
request built in a test), so every part that takes a request can be exercised
without a socket.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias
from urllib.parse import urlsplit

from inferno.errors import HTTPError
from inferno.http.headers import Headers

if TYPE_CHECKING:
    from inferno.http.websocket import WebSocket

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "BodySource",
    "Handler",
    "HeaderPair",
    "Request",
    "Response",
    "ServerLimits",
    "WebSocketAccept",
    "dump_json",
]

DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # largest WebSocket message accepted; 1009 beyond

HeaderPair: TypeAlias = tuple[str | bytes, str | bytes]  # names and values, str is ISO-8859-1

# One encoder built once: json.dumps() with options builds a new encoder per call.
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def dump_json(obj: Any) -> bytes:
    """Compact UTF-8 JSON; NaN and infinities are refused (they are not JSON)."""
    return _ENCODER.encode(obj).encode("utf-8")


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """Per-connection protections of the server; each breach has its own answer."""

    max_header_bytes: int = 16 * 1024  # request head larger than this: 431
    max_body_bytes: int = 8 * 1024 * 1024  # request body larger than this: 413
    header_timeout: float = 10.0  # seconds for a request head to arrive once begun: 408, close
    keepalive_timeout: float = 60.0  # seconds an idle keep-alive connection waits: close
    max_connections: int = 4096  # connections served at once; the next gets 503, close
    # longest stall (seconds) reading a request body (408), or waiting for a
    # client to read our response (the connection is dropped)
    body_timeout: float = 60.0
    # A client that closes its side of the connection (EOF) after sending a whole
    # request has gone: its handler is cancelled, as nginx aborts a proxied
    # request (proxy_ignore_client_abort off).  RFC 9112 §9.6 lets a client
    # half-close and still read the answer; set False to serve such clients (a
    # reset or lost connection still cancels; Request.disconnected still tells).
    cancel_on_client_eof: bool = True

    def __post_init__(self) -> None:
        for name in ("max_header_bytes", "max_body_bytes", "max_connections"):
            if getattr(self, name) < 1:
                raise ValueError(f"ServerLimits.{name} must be at least 1")
        for name in ("header_timeout", "keepalive_timeout", "body_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ServerLimits.{name} must be positive seconds")


class BodySource(Protocol):
    """Where a :class:`Request` gets its body from, and learns whether its client is still there."""

    async def read_body_chunk(self, cycle: int) -> bytes | None:
        """The next piece of the body of request number ``cycle``; ``None`` once complete.

        :raises HTTPError: 400 (malformed), 408 (too slow), 413 (too large).
        """
        ...

    def client_disconnected(self) -> bool:
        """Whether the client reset the connection or closed it after its whole request."""
        ...


class _MemoryBody:
    """A body already in memory, for requests built directly (tests, internal calls)."""

    __slots__ = ("_body",)

    def __init__(self, body: bytes) -> None:
        self._body: bytes | None = body

    async def read_body_chunk(self, cycle: int) -> bytes | None:
        body, self._body = self._body, None
        return body or None

    def client_disconnected(self) -> bool:
        return False


class Request:
    """An HTTP request as a handler receives it.

    ``target`` is the request-target as sent; ``path`` and ``query`` are split
    from it without percent-decoding (so a proxy forwards exactly what it got).
    The body is read on demand: :meth:`stream` yields it as it arrives,
    :meth:`read` collects it, :meth:`json` parses it.  A body the handler leaves
    unread is discarded by the server after the response.
    """

    __slots__ = (
        "_body",
        "_cycle",
        "_source",
        "_started",
        "client",
        "headers",
        "http_version",
        "method",
        "path",
        "query",
        "scheme",
        "target",
    )

    def __init__(
        self,
        method: str,
        target: str,
        headers: Headers | Iterable[HeaderPair] = (),
        *,
        body: bytes = b"",
        client: tuple[str, int] | None = None,
        scheme: str = "http",
        http_version: str = "1.1",
    ) -> None:
        """Build a request by hand (the server builds its own through ``_received``)."""
        self.method = method
        self.target = target
        self.path, self.query = _split_target(target)
        self.headers = headers if isinstance(headers, Headers) else Headers.from_pairs(headers)
        self.client = client
        self.scheme = scheme
        self.http_version = http_version
        self._source: BodySource = _MemoryBody(body)
        self._cycle = 0
        self._body: bytes | None = None
        self._started = False

    @classmethod
    def _received(
        cls,
        method: str,
        target: str,
        headers: Headers,
        client: tuple[str, int] | None,
        scheme: str,
        http_version: str,
        source: BodySource,
        cycle: int,
    ) -> Request:
        """The server's constructor: the body comes from the connection."""
        self = cls.__new__(cls)
        self.method = method
        self.target = target
        self.path, self.query = _split_target(target)
        self.headers = headers
        self.client = client
        self.scheme = scheme
        self.http_version = http_version
        self._source = source
        self._cycle = cycle
        self._body = None
        self._started = False
        return self

    async def read(self) -> bytes:
        """The whole body (at most ``ServerLimits.max_body_bytes``).

        :raises HTTPError: 413 when the body is too large, 400 when malformed,
            408 when the client stalls.
        """
        if self._body is not None:
            return self._body
        if self._started:
            raise RuntimeError("the request body was already consumed through stream()")
        self._started = True
        source, cycle = self._source, self._cycle
        first = await source.read_body_chunk(cycle)
        if first is None:
            self._body = b""
            return b""
        chunks = [first]
        while (chunk := await source.read_body_chunk(cycle)) is not None:
            chunks.append(chunk)
        self._body = first if len(chunks) == 1 else b"".join(chunks)
        return self._body

    async def json(self) -> Any:
        """The body parsed as JSON.

        :raises HTTPError: 400 when the body is not valid UTF-8 JSON (and what
            :meth:`read` raises).
        """
        body = await self.read()
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise HTTPError(
                400, f"request body is not valid JSON: {exc}", code="invalid_json"
            ) from None

    def stream(self) -> AsyncIterator[bytes]:
        """The body piece by piece as it arrives (a ``100 Continue`` goes out first if asked)."""
        if self._started or self._body is not None:
            raise RuntimeError("the request body was already consumed")
        self._started = True
        return _BodyIterator(self._source, self._cycle)

    @property
    def disconnected(self) -> bool:
        """Whether the client has gone: it reset the connection, or closed it after this request.

        For handlers that poll (between steps of work, or in shielded code).
        The server cancels a handler whose client has gone, so most need not
        look.  With ``ServerLimits.cancel_on_client_eof`` off, a client that
        closes its side after its whole request is not cancelled but does count
        here, and the handler decides.  An EOF after pipelined requests does not
        count (the client waits for their answers); nor does one that cuts the
        body short before the handler has read it (reading it raises a 400).
        """
        return self._source.client_disconnected()

    def is_websocket_upgrade(self) -> bool:
        """Whether this is a WebSocket opening handshake (RFC 6455 §4.2.1)."""
        headers = self.headers
        return (
            self.method == "GET"
            and self.http_version == "1.1"
            and headers.has_token("upgrade", "websocket")
            and headers.has_token("connection", "upgrade")
            and "sec-websocket-key" in headers
        )

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.target} from {self.client}>"


class _BodyIterator:
    __slots__ = ("_cycle", "_source")

    def __init__(self, source: BodySource, cycle: int) -> None:
        self._source = source
        self._cycle = cycle

    def __aiter__(self) -> _BodyIterator:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self._source.read_body_chunk(self._cycle)
        if chunk is None:
            raise StopAsyncIteration
        return chunk


def _split_target(target: str) -> tuple[str, str]:
    if target.startswith("/"):
        path, _, query = target.partition("?")
        return path, query
    if target == "*":  # asterisk-form, OPTIONS only (RFC 9112 §3.2.4)
        return "*", ""
    # absolute-form (RFC 9112 §3.2.2) or authority-form (CONNECT)
    parts = urlsplit(target)
    return parts.path or "/", parts.query


class Response:
    """What a handler returns.

    ``body`` is bytes (sent with a ``Content-Length``) or an async iterable of
    bytes (sent chunked unless ``headers`` carry a ``Content-Length``), each
    piece written to the socket as soon as the iterable produces it.  Header
    names and values may be ``str`` (ISO-8859-1) or ``bytes``.
    """

    __slots__ = ("body", "headers", "status")

    def __init__(
        self,
        status: int = 200,
        headers: Iterable[HeaderPair] | None = None,
        body: bytes | AsyncIterable[bytes] = b"",
    ) -> None:
        self.status = status
        self.headers: list[HeaderPair] = list(headers) if headers else []
        self.body = body

    @classmethod
    def json(
        cls, obj: Any, status: int = 200, headers: Iterable[HeaderPair] | None = None
    ) -> Response:
        """A JSON document (``application/json``, compact UTF-8)."""
        all_headers: list[HeaderPair] = [("content-type", "application/json")]
        if headers:
            all_headers.extend(headers)
        return cls(status, all_headers, dump_json(obj))

    @classmethod
    def text(
        cls,
        text: str,
        status: int = 200,
        headers: Iterable[HeaderPair] | None = None,
        content_type: str = "text/plain; charset=utf-8",
    ) -> Response:
        """A text document, UTF-8 encoded."""
        all_headers: list[HeaderPair] = [("content-type", content_type)]
        if headers:
            all_headers.extend(headers)
        return cls(status, all_headers, text.encode("utf-8"))

    @classmethod
    def error(cls, exc: HTTPError) -> Response:
        """The JSON error answer for ``exc`` (OpenAI shape), with its extra headers."""
        return cls.json(exc.body(), exc.status, exc.headers)

    def __repr__(self) -> str:
        return f"<Response {self.status}>"


class WebSocketAccept(Response):
    """Returned by a handler to accept a WebSocket upgrade.

    The server answers ``101 Switching Protocols`` (with ``subprotocol`` and
    ``extra_headers``), then runs ``await session(ws)``; when the session
    returns the WebSocket is closed with 1000 (1011 if it raised).
    """

    __slots__ = ("max_message_bytes", "session", "subprotocol")

    def __init__(
        self,
        session: Callable[[WebSocket], Awaitable[None]],
        subprotocol: str | None = None,
        extra_headers: Iterable[HeaderPair] | None = None,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        super().__init__(101, extra_headers, b"")
        self.session = session
        self.subprotocol = subprotocol
        self.max_message_bytes = max_message_bytes


Handler = Callable[[Request], Awaitable[Response]]
