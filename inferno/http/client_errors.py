"""Errors raised by Inferno's HTTP client, grouped by what a caller does about them.

Two questions decide what a caller (the proxy, above all) does with a failed
request, and every error answers both:

``temporary``
    Can the same request succeed if tried again, here or on another node?
    A refused connection or a reset is temporary; a certificate that does not
    match or a URL we cannot parse is not.
``request_sent``
    Did any byte of the request leave this process?  A request that never
    went out can be retried anywhere, even a non-idempotent ``POST``; one that
    may have reached the server can only be retried if the caller knows that
    is safe.  When the client cannot tell, it says ``True``.

The classes form two overlapping groups: the *phase* that failed
(:class:`ConnectError` before anything was sent, :class:`ReadError` and
:class:`WriteError` on an established connection, the protocol errors) and
:class:`ClientTimeout` for every deadline.  :class:`ConnectTimeout` belongs
to both.  Foreign exceptions (``OSError``, ``ssl.SSLError``, ``h11`` and
``anyio`` errors) are translated at the boundary with ``raise ... from exc``
so the original stays on ``__cause__``.
"""

from __future__ import annotations

from inferno.errors import InfernoError

__all__ = [
    "ClientError",
    "ClientTimeout",
    "ConnectError",
    "ConnectTimeout",
    "DecodeError",
    "InvalidURL",
    "LocalProtocolError",
    "PoolTimeout",
    "ReadError",
    "ReadTimeout",
    "RemoteProtocolError",
    "ResponseTooLarge",
    "TLSError",
    "TotalTimeout",
    "WriteError",
    "WriteTimeout",
]


class ClientError(InfernoError):
    """Raised (as one of the subclasses below) when an HTTP client request fails;
    the base of every error the client raises on purpose.

    ``request_sent`` is ``True`` when any byte of the request may have reached
    the network; a caller retries a request whose ``request_sent`` is ``False``
    freely and one whose ``request_sent`` is ``True`` only if it is idempotent.
    """

    temporary = False
    request_sent = False

    def __init__(self, message: str, *, request_sent: bool | None = None) -> None:
        super().__init__(message)
        if request_sent is not None:
            self.request_sent = request_sent


class ClientTimeout(ClientError):
    """Raised when one of the deadlines of :class:`~inferno.http.client.Timeouts` passes.

    Catch this to handle every timeout at once; the subclasses say which one.
    """

    temporary = True


class ConnectError(ClientError):
    """Raised when no connection to the origin could be established.

    The name did not resolve, the port refused, the network was unreachable,
    or the server closed the connection during the TLS handshake.  Nothing was
    sent, so the request can be retried anywhere.
    """

    temporary = True
    request_sent = False


class ConnectTimeout(ConnectError, ClientTimeout):
    """Raised when connecting (TCP and the TLS handshake) took longer than ``Timeouts.connect``."""


class ReadTimeout(ClientTimeout):
    """Raised when the server sent nothing for ``Timeouts.read`` while a response was awaited.

    The request went out (``request_sent`` is ``True``), so the server may be
    working on it.
    """

    request_sent = True


class WriteTimeout(ClientTimeout):
    """Raised when sending part of the request blocked for longer than ``Timeouts.write``.

    The server stopped reading.  Part of the request may have gone out.
    """

    request_sent = True


class PoolTimeout(ClientTimeout):
    """Raised when no connection to the origin became free within ``Timeouts.pool``.

    The origin already had ``max_connections_per_origin`` requests in flight;
    nothing was sent.
    """

    request_sent = False


class TotalTimeout(ClientTimeout):
    """Raised when the whole request, from the pool wait to the last body byte,
    outlived ``Timeouts.total``.  ``request_sent`` says how far it got.
    """

    request_sent = True


class ReadError(ClientError):
    """Raised when receiving on an established connection failed (reset, broken pipe)."""

    temporary = True
    request_sent = True


class WriteError(ClientError):
    """Raised when sending on an established connection failed (reset, broken pipe)."""

    temporary = True
    request_sent = True


class RemoteProtocolError(ClientError):
    """Raised when the server broke HTTP/1.1: a malformed or oversized response head,
    a body cut short, or a connection closed before any response.

    Temporary: a restarting or overloaded server does this, and another try
    (or another node) usually works.
    """

    temporary = True
    request_sent = True


class LocalProtocolError(ClientError):
    """Raised when the request itself cannot be sent as valid HTTP/1.1.

    An invalid method or header, a body that does not match its declared
    ``Content-Length``, a body chunk that is not bytes.  Retrying the same
    request fails the same way.
    """


class TLSError(ClientError):
    """Raised when the TLS handshake failed: untrusted certificate, wrong host name,
    no common protocol version or cipher.

    Permanent: the same server presents the same certificate next time.
    """

    request_sent = False


class InvalidURL(ClientError, ValueError):
    """Raised when a URL cannot be used: not ``http``/``https``, no host, a bad port,
    or characters that may not appear in a request line.
    """

    request_sent = False


class DecodeError(ClientError, ValueError):
    """Raised when a response body is not what the caller asked to decode it as
    (:meth:`~inferno.http.client.ClientResponse.json` on a body that is not JSON).
    """

    request_sent = True


class ResponseTooLarge(ClientError):
    """Raised when a response body is longer than the ``max_bytes`` its reader allowed."""

    request_sent = True
