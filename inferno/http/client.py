"""Inferno's HTTP/1.1 client: a per-origin keep-alive pool on anyio + h11.

The proxy sends every request through this client, so it is built for that
job: connections to each origin (scheme, host, port) are kept alive and
reused when HTTP/1.1 allows it, bodies stream in both directions without
buffering, every phase has its own deadline, and every failure is one of
:mod:`inferno.http.client_errors`, which says whether retrying can help and
whether any byte of the request went out.

Usage::

    async with HTTPClient() as client:
        response = await client.request("GET", "http://127.0.0.1:8000/v1/models")
        models = await response.json()

        async with client.stream("POST", url, body=payload) as response:
            async for chunk in response.iter_bytes():
                ...

Scheduling (which connection serves which request) is the pure
:class:`~inferno.http.pool.PoolScheduler`; the socket work of one connection
is in :mod:`inferno.http._clientconn`; this module ties them together and
keeps the pool consistent whatever happens, cancellation included: any
request that ends in an unknown protocol state closes its connection and
gives its slot back, synchronously (no await, so no cancellation can cut the
cleanup short).
"""

from __future__ import annotations

import contextlib
import json
import math
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import anyio
import h11
from typing_extensions import Self

from inferno.http._clientconn import (
    Budget,
    ClientConnection,
    HeadersInput,
    RequestBody,
    build_request,
    check_body,
    open_connection,
)
from inferno.http._url import URL, parse_url
from inferno.http.client_errors import (
    ClientError,
    DecodeError,
    PoolTimeout,
    ResponseTooLarge,
)
from inferno.http.headers import Headers
from inferno.http.pool import Entry, Origin, PoolScheduler, PoolStats, Waiter

__all__ = [
    "MAX_RESPONSE_HEADER_BYTES",
    "URL",
    "ClientResponse",
    "HTTPClient",
    "HeadersInput",
    "Timeouts",
    "parse_url",
]

MAX_RESPONSE_HEADER_BYTES = 64 * 1024  # generous for upstream cookies; a larger head is refused


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Deadlines of one request, in seconds; ``None`` means no limit.

    ``connect`` covers TCP and the TLS handshake, ``read`` the longest silence
    while a response is awaited or streamed, ``write`` the longest a send may
    block, ``pool`` the wait for a free connection of a full origin, and
    ``total`` everything from the pool wait to the last body byte.
    """

    connect: float | None = 5.0
    read: float | None = 30.0
    write: float | None = 30.0
    pool: float | None = 10.0
    total: float | None = None

    def __post_init__(self) -> None:
        for name in ("connect", "read", "write", "pool", "total"):
            value = getattr(self, name)
            if value is not None and not (
                isinstance(value, (int, float)) and value >= 0 and not math.isnan(value)
            ):
                raise ValueError(f"Timeouts.{name} must be a number >= 0 or None, not {value!r}")


class ClientResponse:
    """A response whose head has arrived; its body is read, streamed or closed.

    From :meth:`HTTPClient.request` the body has already been read and the
    connection is back in the pool.  From :meth:`HTTPClient.stream` the body
    arrives through :meth:`iter_bytes` (chunks as the server sends them) or
    :meth:`read`, and the connection returns to the pool once the body ends;
    leaving the ``async with`` block earlier closes the connection.
    """

    __slots__ = (
        "_budget",
        "_client",
        "_conn",
        "_content",
        "_entry",
        "_streamed",
        "headers",
        "http_version",
        "reason",
        "status",
        "url",
    )

    def __init__(
        self,
        client: HTTPClient,
        entry: Entry[ClientConnection],
        conn: ClientConnection,
        budget: Budget,
        head: h11.Response,
        url: URL,
    ) -> None:
        self.status: int = head.status_code
        self.reason: str = head.reason.decode("latin-1")
        self.http_version: str = head.http_version.decode("ascii")
        self.headers = Headers(head.headers)
        self.url = url
        self._client = client
        self._entry = entry
        self._conn: ClientConnection | None = conn  # None once the connection is released
        self._budget = budget
        self._content: bytes | None = None
        self._streamed = False

    def __repr__(self) -> str:
        return f"<ClientResponse {self.status} {self.reason!r} from {self.url}>"

    @property
    def is_closed(self) -> bool:
        """Whether the connection has been given back (body complete, or closed early)."""
        return self._conn is None

    async def read(self, *, max_bytes: int | None = None) -> bytes:
        """The whole body.  Over ``max_bytes`` raises :class:`ResponseTooLarge` and closes."""
        if self._content is not None:
            return self._content
        self._ensure_readable()
        if self._streamed:
            raise RuntimeError("the body is already being consumed with iter_bytes()")
        chunks: list[bytes] = []
        size = 0
        while (chunk := await self._next_chunk()) is not None:
            size += len(chunk)
            if max_bytes is not None and size > max_bytes:
                await self.aclose()
                raise ResponseTooLarge(f"response from {self.url} is longer than {max_bytes} bytes")
            chunks.append(chunk)
        self._content = b"".join(chunks)
        return self._content

    async def json(self) -> Any:
        """The body decoded as JSON; anything else raises :class:`DecodeError`."""
        body = await self.read()
        try:
            return json.loads(body)
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
            raise DecodeError(f"response from {self.url} is not valid JSON: {exc}") from exc

    def iter_bytes(self) -> AsyncIterator[bytes]:
        """Body chunks as they arrive from the server, without buffering."""
        if self._content is not None:
            return _BodyIterator(self, self._content)
        self._ensure_readable()
        self._streamed = True
        return _BodyIterator(self, None)

    async def aclose(self) -> None:
        """Give the connection back: reused if the whole body has already arrived,
        closed otherwise (an unread body is never drained from the network).
        """
        conn = self._conn
        if conn is None:
            return
        self._conn = None
        self._client._release(self._entry, reusable=conn.drain_buffered())

    def _ensure_readable(self) -> None:
        if self._conn is None and self._content is None:
            raise RuntimeError("the response was closed before its body was read")

    async def _next_chunk(self) -> bytes | None:
        conn = self._conn
        if conn is None:
            self._ensure_readable()
            return None
        try:
            chunk = await conn.receive_data(self._budget)
        except BaseException:
            self._conn = None
            self._client._release(self._entry, reusable=False)
            raise
        if chunk is None:
            self._conn = None
            self._client._release(self._entry, reusable=conn.finish())
        return chunk


class _BodyIterator:
    """Async iterator over a body; a class, not a generator, so leaving a loop
    early needs no generator finalisation (the response owns the cleanup).
    """

    __slots__ = ("_pending", "_response")

    def __init__(self, response: ClientResponse, content: bytes | None) -> None:
        self._response = response
        self._pending = content  # an already-read body, yielded once

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> bytes:
        pending = self._pending
        if pending is not None:
            self._pending = None
            if pending:
                return pending
            raise StopAsyncIteration
        if self._response._content is not None:
            raise StopAsyncIteration
        chunk = await self._response._next_chunk()
        if chunk is None:
            raise StopAsyncIteration
        return chunk


class _StreamContext(contextlib.AbstractAsyncContextManager["ClientResponse"]):
    __slots__ = ("_args", "_client", "_response")

    def __init__(self, client: HTTPClient, args: tuple[Any, ...]) -> None:
        self._client = client
        self._args = args
        self._response: ClientResponse | None = None

    async def __aenter__(self) -> ClientResponse:
        self._response = await self._client._send(*self._args)
        return self._response

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._response is not None:
            await self._response.aclose()


class HTTPClient:
    """HTTP/1.1 client with a keep-alive pool per origin; use as ``async with``.

    :param timeouts: default deadlines, overridable per request.
    :param max_connections_per_origin: requests beyond this many in flight to
        one origin wait up to ``Timeouts.pool`` for a connection.
    :param idle_timeout: seconds an unused connection stays open.
    :param ssl_context: for ``https`` URLs; by default the system's trust store
        with host name checking (``ssl.create_default_context()``).
    :param max_response_header_bytes: a larger response head raises
        :class:`~inferno.http.client_errors.RemoteProtocolError`.
    """

    def __init__(
        self,
        *,
        timeouts: Timeouts = Timeouts(),
        max_connections_per_origin: int = 100,
        idle_timeout: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
        max_response_header_bytes: int = MAX_RESPONSE_HEADER_BYTES,
    ) -> None:
        if max_response_header_bytes < 1:
            raise ValueError("max_response_header_bytes must be positive")
        self._timeouts = timeouts
        self._pool: PoolScheduler[ClientConnection] = PoolScheduler(
            max_connections_per_origin, idle_timeout
        )
        self._ssl_context = ssl_context
        self._max_header_bytes = max_response_header_bytes

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def request(
        self,
        method: str,
        url: str | URL,
        *,
        headers: HeadersInput = None,
        body: RequestBody = None,
        timeouts: Timeouts | None = None,
    ) -> ClientResponse:
        """Send a request and read the whole response body.

        ``body`` is bytes (sent with ``Content-Length``) or an async iterable of
        bytes (sent chunked unless ``headers`` give a ``Content-Length``).

        :raises ClientError: a subclass saying what failed, see
            :mod:`inferno.http.client_errors`.
        """
        response = await self._send(method, url, headers, body, timeouts)
        try:
            await response.read()
        except BaseException:
            await response.aclose()
            raise
        return response

    def stream(
        self,
        method: str,
        url: str | URL,
        *,
        headers: HeadersInput = None,
        body: RequestBody = None,
        timeouts: Timeouts | None = None,
    ) -> contextlib.AbstractAsyncContextManager[ClientResponse]:
        """Send a request; the response body streams inside ``async with``.

        Same arguments as :meth:`request`.
        """
        return _StreamContext(self, (method, url, headers, body, timeouts))

    def pool_stats(self) -> PoolStats:
        """Idle, active and waiting counts per origin, and connections opened/closed."""
        return self._pool.stats()

    async def aclose(self) -> None:
        """Close idle connections and refuse new requests; active ones close on release."""
        released = self._pool.close()
        for waiter in released.wake:
            waiter.wake()
        _close_all(released.close)

    # -- the request path ----------------------------------------------------

    async def _send(
        self,
        method: str,
        url: str | URL,
        headers: HeadersInput,
        body: RequestBody,
        timeouts: Timeouts | None,
    ) -> ClientResponse:
        target = url if isinstance(url, URL) else parse_url(url)
        budget = Budget(timeouts or self._timeouts)
        body = check_body(body)
        request = build_request(method, target.target, target.host_header, headers, body)
        origin = target.origin
        entry = await self._acquire(origin, budget)
        retried = False
        while True:
            conn = entry.connection
            reused = conn is not None
            try:
                if conn is None:
                    conn = await open_connection(
                        origin, self._ssl_for(origin), budget, self._max_header_bytes
                    )
                    self._pool.connected(entry, conn)
                await conn.send_request(request, body, budget)
                head = await conn.receive_head(budget)
            except ClientError as exc:
                if reused and not retried and exc.temporary and not exc.request_sent:
                    # Nothing left this process: the same request on a fresh
                    # connection is safe whatever its method.
                    retried = True
                    entry, dead = self._pool.replace(entry)
                    dead.close()
                    continue
                self._release(entry, reusable=False)
                raise
            except BaseException:
                self._release(entry, reusable=False)
                raise
            return ClientResponse(self, entry, conn, budget, head, target)

    async def _acquire(self, origin: Origin, budget: Budget) -> Entry[ClientConnection]:
        pool = self._pool
        if pool.is_closed:
            raise RuntimeError("the HTTPClient is closed")
        expired = pool.expire(_now())
        if expired:
            _close_all(expired)
        entry = pool.checkout(origin)
        if entry is None:
            entry = await self._wait_for_slot(origin, budget)
        conn = entry.connection
        if conn is not None and not conn.is_idle_alive():
            # The server closed it while idle (or sent something unasked):
            # take a fresh connection in the same slot, nothing was sent.
            entry, dead = pool.replace(entry)
            dead.close()
        return entry

    async def _wait_for_slot(self, origin: Origin, budget: Budget) -> Entry[ClientConnection]:
        event = anyio.Event()
        waiter: Waiter[ClientConnection] = self._pool.wait(origin, event.set)
        delay, by_total = budget.limit(budget.timeouts.pool)
        try:
            with anyio.move_on_after(delay):
                await event.wait()
        except BaseException:
            self._withdraw(waiter)
            raise
        entry = waiter.entry
        if entry is not None:  # granted, even if the deadline passed at the same moment
            return entry
        self._withdraw(waiter)
        if self._pool.is_closed:
            raise RuntimeError("the HTTPClient was closed while a request waited for a connection")
        raise budget.expired(
            PoolTimeout,
            by_total,
            f"no connection to {origin} became free within {delay}s",
            request_sent=False,
        )

    def _withdraw(self, waiter: Waiter[ClientConnection]) -> None:
        for other in self._pool.cancel(waiter, _now()).wake:
            other.wake()

    def _release(self, entry: Entry[ClientConnection], *, reusable: bool) -> None:
        """Give a slot back; a connection in an unknown state is closed.

        Synchronous on purpose: with no await, no cancellation can interrupt
        the cleanup halfway (stronger than a shielded cancel scope).
        """
        released = self._pool.release(entry, reusable=reusable, now=_now())
        for waiter in released.wake:
            waiter.wake()
        if released.close:
            _close_all(released.close)

    def _ssl_for(self, origin: Origin) -> ssl.SSLContext | None:
        if origin.scheme != "https":
            return None
        if self._ssl_context is None:
            context = ssl.create_default_context()
            context.set_alpn_protocols(["http/1.1"])
            self._ssl_context = context
        return self._ssl_context


def _now() -> float:
    """The pool's clock: monotonic seconds (asyncio's loop clock is the same one).

    The pool compares only its own timestamps, so it need not ask the running
    loop, which on Python 3.11 costs a ``getpid()`` system call per lookup
    (asyncio checks that the loop belongs to this process); this runs twice
    per request.
    """
    return time.monotonic()


def _close_all(connections: list[ClientConnection]) -> None:
    for conn in connections:
        conn.close()
