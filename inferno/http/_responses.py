"""The server's protocol decisions that need no I/O: head checks and error answers.

h11 parses and frames; these functions add what h11 leaves to its user, as
plain functions over h11 events and bytes so they can be tested without a
socket:

* :func:`inspect_head`: size limit on a complete head, HTTP version, framing
  conflicts, announced body size (each breach an :class:`HTTPError`);
* :func:`has_obs_fold`: the one leniency of h11's parser we refuse;
* :func:`protocol_error`: the one map from h11's verdicts to our statuses;
* :func:`render_error`: an error answer, only when h11's state allows one;
* :func:`judge_eof`: what a client's EOF means while its handler runs;
* :func:`websocket_refusal`, :func:`upgrade_headers`: the answer to a
  WebSocket handshake.
"""

from __future__ import annotations

import base64
import binascii
import re
import time
from collections.abc import Iterable
from email.utils import formatdate
from http import HTTPStatus

import h11

from inferno.errors import HTTPError
from inferno.http._messages import HeaderPair, Request, ServerLimits, dump_json

__all__ = [
    "EOF_GONE",
    "EOF_HALF_CLOSED",
    "EOF_PIPELINED",
    "EOF_TOO_EARLY",
    "NO_BODY_STATUSES",
    "REASONS",
    "body_too_large",
    "client_gone",
    "date_head_end",
    "encode_headers",
    "has_obs_fold",
    "head_too_large",
    "http_date",
    "inspect_head",
    "internal_error",
    "judge_eof",
    "protocol_error",
    "render_error",
    "upgrade_headers",
    "valid_websocket_key",
    "websocket_refusal",
]

REASONS = {status.value: status.phrase.encode("ascii") for status in HTTPStatus}
NO_BODY_STATUSES = frozenset((204, 304))  # never carry content (RFC 9110 §15.3.5, §15.4.5)
REQUEST_LINE_OVERHEAD = 14  # two spaces, "HTTP/1.1", CRLF around method and target
FIELD_OVERHEAD = 4  # ": " and CRLF around each field's name and value

_HEAD_END = re.compile(rb"\n\r?\n")

# What a client's EOF means while its handler runs (see judge_eof)
EOF_TOO_EARLY = 0  # mid-request: the handler reading the body learns of it; judged again after
EOF_PIPELINED = 1  # requests were pipelined before it: they are all answered
EOF_HALF_CLOSED = 2  # after the last request, cancel_on_client_eof off: answered
EOF_GONE = 3  # after the last request: the client has gone, its handler is cancelled

# h11 states of the client once its whole request was read (MUST_CLOSE: it was
# the last one on the connection, e.g. ``Connection: close``)
_REQUEST_READ = frozenset((h11.DONE, h11.MUST_CLOSE, h11.CLOSED))


def inspect_head(
    event: h11.Request, limits: ServerLimits
) -> tuple[list[tuple[bytes, bytes]], int | None, bool]:
    """The head's fields, its ``Content-Length`` (if any) and whether it is chunked.

    :raises HTTPError: 431 for a head over ``max_header_bytes`` (h11 bounds only
        a head still incomplete; one that arrived whole in a single read is
        measured here), 505 for an HTTP version other than 1.0/1.1, 400 for
        both ``Content-Length`` and ``Transfer-Encoding`` (RFC 9112 §6.3: a
        smuggling attempt more often than not), 413 for an announced body over
        ``max_body_bytes`` (answered before reading it).
    """
    raw = list(event.headers)
    length: int | None = None
    chunked = False
    size = len(event.method) + len(event.target) + REQUEST_LINE_OVERHEAD
    for name, value in raw:
        size += len(name) + len(value) + FIELD_OVERHEAD
        if name == b"content-length":
            length = int(value)  # h11 checked: digits, one value
        elif name == b"transfer-encoding":
            chunked = True  # h11 checked: "chunked" and nothing else
    if size > limits.max_header_bytes:
        raise head_too_large()
    version = event.http_version
    if version != b"1.1" and version != b"1.0":
        raise HTTPError(
            505,
            f"HTTP/{version.decode('ascii')} is not supported",
            code="http_version_not_supported",
        )
    if chunked and length is not None:
        raise HTTPError(
            400, "request has both Content-Length and Transfer-Encoding", code="bad_request"
        )
    if length is not None and length > limits.max_body_bytes:
        raise body_too_large(limits)
    return raw, length, chunked


def has_obs_fold(buffered: bytes) -> bool:
    """Whether the request head at the start of ``buffered`` folds a header line.

    h11 unfolds obs-fold silently, which RFC 9112 §5.2 allows, but a proxy in
    front of a server that does otherwise is a request-smuggling risk; we take
    the other option the RFC gives and answer 400.
    """
    end = _HEAD_END.search(buffered)
    head = buffered if end is None else buffered[: end.start()]
    return b"\n " in head or b"\n\t" in head


# Errors are built fresh for every use: a shared instance that is raised again
# and again would grow its __traceback__ and keep old frames alive.


def internal_error() -> HTTPError:
    return HTTPError(500, "internal server error", code="internal_error")


def head_too_large() -> HTTPError:
    return HTTPError(
        431, "request head exceeds the size limit", code="request_header_fields_too_large"
    )


def client_gone() -> HTTPError:
    """What a handler reading the body sees when the client vanished (never a 500)."""
    return HTTPError(400, "client disconnected", code="client_disconnected")


def body_too_large(limits: ServerLimits) -> HTTPError:
    return HTTPError(
        413,
        f"request body exceeds the limit of {limits.max_body_bytes} bytes",
        code="request_too_large",
    )


def protocol_error(exc: h11.RemoteProtocolError) -> HTTPError:
    """Map h11's verdict on a request head to our answer (its status hint: 400, 431, 501)."""
    status = exc.error_status_hint
    if status == 431:
        return head_too_large()
    if status == 501:  # a transfer coding other than chunked (RFC 9112 §6.1)
        return HTTPError(501, f"not implemented: {exc}", code="not_implemented")
    return HTTPError(400, f"malformed request: {exc}", code="bad_request")


_date_second = -1
_date_value = b""
_date_end = b""


def http_date() -> bytes:
    """The ``Date`` header value (RFC 9110 §6.6.1), formatted once per second."""
    global _date_second, _date_value, _date_end
    now = int(time.time())
    if now != _date_second:
        _date_value = formatdate(now, usegmt=True).encode("ascii")
        _date_end = b"date: %s\r\n\r\n" % _date_value
        _date_second = now
    return _date_value


def date_head_end() -> bytes:
    """The ``Date`` field line and the empty line that ends a head, for the current second."""
    http_date()
    return _date_end


def encode_headers(pairs: Iterable[HeaderPair]) -> list[tuple[bytes, bytes]]:
    """Header pairs as bytes (``str`` is encoded ISO-8859-1; h11 validates them)."""
    return [
        (
            name.encode("latin-1") if isinstance(name, str) else name,
            value.encode("latin-1") if isinstance(value, str) else value,
        )
        for name, value in pairs
    ]


def render_error(conn: h11.Connection, exc: HTTPError) -> bytes | None:
    """The bytes of the JSON error answer for ``exc``, ending the connection.

    ``None`` when h11's state allows no response any more (one was already
    started): the caller then just closes (STYLE principle 4).
    """
    if conn.our_state is not h11.IDLE and conn.our_state is not h11.SEND_RESPONSE:
        return None
    body = dump_json(exc.body())
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", b"%d" % len(body)),
        (b"date", http_date()),
        (b"connection", b"close"),
        *encode_headers(exc.headers),
    ]
    try:
        return (
            conn.send(
                h11.Response(
                    status_code=exc.status, headers=headers, reason=REASONS.get(exc.status, b"")
                )
            )
            + conn.send(h11.Data(data=body))
            + conn.send(h11.EndOfMessage())
        )
    except h11.LocalProtocolError:
        return None


def judge_eof(conn: h11.Connection, unread: int, cancel_on_eof: bool) -> int:
    """What the client's EOF means, seen while a handler runs: one of the ``EOF_*`` values.

    ``unread`` counts request bytes received but not yet given to ``conn``.  A
    client may half-close after its request and still read the answer (RFC
    9112 §9.6), but most that close have gone, and nginx treats a closed
    client as an abort; ``cancel_on_eof`` (``ServerLimits.cancel_on_client_eof``)
    picks.  Bytes after the request are pipelined requests, whose answers the
    client does want; a request not yet read whole cannot be judged (the EOF
    may cut its body, which its handler learns when reading it).
    """
    if conn.their_state not in _REQUEST_READ:
        return EOF_TOO_EARLY
    if unread or conn.trailing_data[0]:
        return EOF_PIPELINED
    return EOF_GONE if cancel_on_eof else EOF_HALF_CLOSED


def websocket_refusal(request: Request) -> HTTPError | None:
    """Why ``request`` cannot be accepted as a WebSocket (RFC 6455 §4.2.1), or ``None``."""
    if not request.is_websocket_upgrade():
        return HTTPError(
            426,
            "this endpoint expects a WebSocket upgrade",
            code="upgrade_required",
            headers=[("upgrade", "websocket"), ("connection", "Upgrade")],
        )
    if request.headers.get("sec-websocket-version") != "13":
        return HTTPError(
            426,
            "unsupported WebSocket version (13 is supported)",
            code="upgrade_required",
            headers=[("sec-websocket-version", "13")],
        )
    if not valid_websocket_key(request.headers.get("sec-websocket-key", "")):
        return HTTPError(400, "invalid Sec-WebSocket-Key")
    return None


def valid_websocket_key(key: str) -> bool:
    """RFC 6455 §4.2.1: the key is 16 random bytes, base64-encoded."""
    try:
        return len(base64.b64decode(key.encode("latin-1"), validate=True)) == 16
    except (binascii.Error, ValueError):
        return False


def upgrade_headers(
    accept_token: bytes, subprotocol: str | None, extra: Iterable[HeaderPair]
) -> list[tuple[bytes, bytes]]:
    """The fields of a ``101 Switching Protocols`` accepting a WebSocket (RFC 6455 §4.2.2)."""
    headers = [
        (b"upgrade", b"websocket"),
        (b"connection", b"Upgrade"),
        (b"sec-websocket-accept", accept_token),
    ]
    if subprotocol:
        headers.append((b"sec-websocket-protocol", subprotocol.encode("latin-1")))
    headers.extend(encode_headers(extra))
    return headers
