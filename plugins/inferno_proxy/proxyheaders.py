"""Which headers cross the proxy, and which it adds: the rules of RFC 9110 §7.6.

* **Hop-by-hop** fields describe one connection, not the message, and never
  cross: ``Connection``, ``Keep-Alive``, ``Proxy-*``, ``TE``, ``Trailer``,
  ``Transfer-Encoding``, ``Upgrade``, and every field that ``Connection``
  names (RFC 9110 §7.6.1).  The proxy re-frames bodies itself.
* **Forwarding**: ``X-Forwarded-For`` gets the client's address,
  ``X-Forwarded-Proto`` the scheme it used, and ``X-Request-Id`` the
  client's id when it sent a sane one, else a fresh one; the response
  carries the same id, so a client can quote it in a bug report and an
  operator find it in every node's logs.  Without a trusted proxy in front,
  a client's own ``X-Forwarded-*`` are dropped: it could claim any address.
* **Security headers** (``nosniff`` and friends) are set on every response,
  replacing a node's own values.

The rules are computed once per configuration (:class:`HeaderRules`); per
request each header list is one pass over the fields.  Field names from h11
are already lower-case bytes, and stay bytes: nothing is decoded to forward it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Final

from inferno.http import Request, Response

if TYPE_CHECKING:
    from inferno_proxy.requestinfo import Exchange

__all__ = ["HOP_BY_HOP", "HeaderRules", "connection_tokens", "new_request_id"]

HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",  # not standard, still sent by old clients
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Request fields the proxy sets itself (framing, host, forwarding, 100-continue it handled).
_REBUILT_REQUEST: Final = frozenset(
    {
        b"host",
        b"content-length",
        b"expect",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-request-id",
    }
)
_REQUEST_ID_RE: Final = re.compile(r"[!-~]{1,200}")  # printable ASCII, bounded: safe in logs
_NOTHING: Final[frozenset[bytes]] = frozenset()
MAX_FORWARDED_FOR_BYTES: Final = 4096  # a longer chain is truncated to its last entries


def new_request_id() -> bytes:
    """A fresh request id: 128 random bits in hex."""
    return os.urandom(16).hex().encode("ascii")


def connection_tokens(raw: Sequence[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """The field names a message's ``Connection`` header lists (lower-cased)."""
    names: set[bytes] | None = None
    for name, value in raw:
        if name == b"connection":
            if names is None:
                names = set()
            names.update(part.strip().lower() for part in value.split(b","))
    if names is None:
        return _NOTHING
    names.discard(b"")
    return frozenset(names)


def _passes(
    raw: Iterable[tuple[bytes, bytes]], drop: frozenset[bytes], named: frozenset[bytes]
) -> list[tuple[bytes, bytes]]:
    return [
        (name, value)
        for name, value in raw
        if name not in drop and not name.startswith(b"proxy-") and name not in named
    ]


class HeaderRules:
    """The header rules of one configuration.

    :param security_headers: ``(name, value)`` pairs set on every response.
    :param trust_forwarded: whether ``X-Forwarded-For``/``-Proto`` from the
        peer are believed (a trusted proxy in front) or replaced.
    """

    __slots__ = ("_drop_request", "_drop_request_auth", "_drop_response", "_security", "trust")

    def __init__(self, security_headers: Iterable[tuple[str, str]], trust_forwarded: bool) -> None:
        self._security = [
            (name.lower().encode("latin-1"), value.encode("latin-1"))
            for name, value in security_headers
        ]
        self.trust = trust_forwarded
        self._drop_request = HOP_BY_HOP | _REBUILT_REQUEST
        self._drop_request_auth = self._drop_request | {b"authorization"}
        self._drop_response = HOP_BY_HOP | {b"x-request-id"} | {n for n, _ in self._security}

    def request_id(self, given: str | None) -> bytes:
        """The client's ``X-Request-Id`` when it is printable ASCII of sane length, else new."""
        if given is not None and _REQUEST_ID_RE.fullmatch(given):
            return given.encode("ascii")
        return new_request_id()

    def client_ip(self, request: Request) -> str:
        """The client's address: the peer, or (trusting a proxy in front) its last
        ``X-Forwarded-For`` entry, the one that proxy added."""
        if self.trust:
            forwarded = request.headers.get_all("x-forwarded-for")
            if forwarded:
                last = forwarded[-1].rpartition(",")[2].strip()
                if last:
                    return last
        client = request.client
        return client[0] if client is not None else "unknown"

    def upstream(
        self, exchange: Exchange, *, strip_authorization: bool
    ) -> list[tuple[bytes, bytes]]:
        """The fields to send a node: the client's, less hop-by-hop, plus forwarding ones.

        :param strip_authorization: drop the client's ``Authorization`` (it
            carried a key for this proxy, not for the node).
        """
        request = exchange.request
        raw = request.headers.raw
        named = connection_tokens(raw)
        drop = self._drop_request_auth if strip_authorization else self._drop_request
        out = _passes(raw, drop, named)
        peer = (request.client[0] if request.client is not None else "unknown").encode("latin-1")
        proto = request.scheme.encode("ascii")
        if self.trust:
            chain = b", ".join(v for n, v in raw if n == b"x-forwarded-for")
            if chain:
                peer = chain[-MAX_FORWARDED_FOR_BYTES:] + b", " + peer
            given = [v for n, v in raw if n == b"x-forwarded-proto"]
            if given:
                proto = given[0]
        out.append((b"x-forwarded-for", peer))
        out.append((b"x-forwarded-proto", proto))
        out.append((b"x-request-id", exchange.request_id))
        return out

    def websocket(self, exchange: Exchange, *, strip_authorization: bool) -> list[tuple[str, str]]:
        """Fields for a WebSocket handshake to a node (the WebSocket ones are its own)."""
        return [
            (name.decode("latin-1"), value.decode("latin-1"))
            for name, value in self.upstream(exchange, strip_authorization=strip_authorization)
            if not name.startswith(b"sec-websocket-")
        ]

    def downstream(
        self, raw: Sequence[tuple[bytes, bytes]], request_id: bytes
    ) -> list[tuple[str | bytes, str | bytes]]:
        """The fields of a node's response as the client gets them."""
        named = connection_tokens(raw)
        out: list[tuple[str | bytes, str | bytes]] = list(_passes(raw, self._drop_response, named))
        out.extend(self._security)
        out.append((b"x-request-id", request_id))
        return out

    def decorate(self, response: Response, request_id: bytes) -> Response:
        """Add the security headers and the request id to a response the proxy made."""
        response.headers.extend(self._security)
        response.headers.append((b"x-request-id", request_id))
        return response
