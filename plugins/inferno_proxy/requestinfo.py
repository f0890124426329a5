"""What the proxy reads of a client request: its body, its model, its affinity key.

Parse only what routing needs.  A body is read whole (within
``max_body_bytes``) because a request must be sendable to a second node if
the first fails; it is parsed as JSON only for a ``POST`` that says it is
JSON (or, with no ``Content-Type`` at all, looks like a JSON object), and
then only ``model`` and, for the affinity policy, ``user`` or the prompt's
first characters are looked at.  The body is forwarded as the bytes that
arrived, never re-encoded.
"""

from __future__ import annotations

import json
from typing import Final

from inferno.errors import HTTPError
from inferno.http import Request
from inferno_proxy.policies import affinity_key

__all__ = ["ROUTES", "Exchange", "inspect_body", "model_not_found", "read_body"]

#: Routes counted by name in the metrics; any other path counts as "other".
ROUTES: Final = frozenset(
    {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/models",
        "/v1/responses",
        "/v1/ws",
        "/health",
    }
)
JSON_SNIFF_BYTES: Final = 64  # leading bytes looked at to guess JSON without a Content-Type


class Exchange:
    """One client request on its way through the proxy: what every step needs.

    :ivar route: the metrics label of its path (bounded: see :data:`ROUTES`).
    :ivar model: the metrics label of its model: one the pool knows or
        knew lately, ``"unknown"`` (answered 404, or waiting for a node while
        the pool had none), or ``""`` (none named).
    """

    __slots__ = ("client_ip", "model", "request", "request_id", "route", "started")

    def __init__(self, request: Request, started: float, client_ip: str, request_id: bytes) -> None:
        self.request = request
        self.started = started
        self.client_ip = client_ip
        self.request_id = request_id
        path = request.path
        if path in ROUTES:
            self.route = path
        elif path.startswith("/v1/models/"):
            self.route = "/v1/models"
        else:
            self.route = "other"
        self.model = ""

    @property
    def target(self) -> str:
        """The request-target to send a node (origin form, as the client wrote it)."""
        request = self.request
        if request.target.startswith("/"):
            return request.target
        return request.path + ("?" + request.query if request.query else "")


def model_not_found(model: str) -> HTTPError:
    """The 404 for a model no node serves, as OpenAI words it."""
    return HTTPError(
        404,
        f"the model {model!r} does not exist or no node serves it",
        type_="invalid_request_error",
        code="model_not_found",
    )


def _too_large(limit: int) -> HTTPError:
    return HTTPError(413, f"request body is larger than {limit} bytes", code="request_too_large")


async def read_body(request: Request, limit: int) -> bytes | None:
    """The whole request body, or ``None`` when the request has none.

    :raises HTTPError: 413 beyond *limit* bytes (and what reading raises).
    """
    headers = request.headers
    length = headers.get("content-length")
    if length is None:
        if "transfer-encoding" not in headers:
            return None
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
        return b"".join(chunks)
    if int(length) > limit:  # h11 checked that it is digits
        raise _too_large(limit)
    return await request.read()


def inspect_body(
    request: Request, body: bytes | None, *, wants_key: bool, prefix_chars: int
) -> tuple[str | None, str | None]:
    """``(model, affinity key)`` of a request; ``None`` for what it does not name.

    :param wants_key: whether the routing policy uses affinity keys (they cost
        a scan of the prompt).
    :raises HTTPError: 400 for a body that says it is JSON and is not, or a
        ``model`` that is not a string.
    """
    session = request.headers.get("x-session-id") if wants_key else None
    if not body or request.method != "POST":
        return None, affinity_key(session, None) if session else None
    content_type = request.headers.get("content-type")
    if content_type is None:
        if body[:JSON_SNIFF_BYTES].lstrip()[:1] != b"{":
            return None, affinity_key(session, None) if session else None
    elif "json" not in content_type.lower():
        return None, affinity_key(session, None) if session else None
    try:
        document = json.loads(body)
    except ValueError as exc:  # UnicodeDecodeError included
        if content_type is None:  # only guessed: let the node judge it
            return None, affinity_key(session, None) if session else None
        raise HTTPError(
            400, f"request body is not valid JSON: {exc}", code="invalid_json"
        ) from None
    if not isinstance(document, dict):
        return None, affinity_key(session, None) if session else None
    model = document.get("model")
    if model is not None and not isinstance(model, str):
        raise HTTPError(400, "'model' must be a string", code="invalid_type")
    if not wants_key:
        return model, None
    return model, affinity_key(session, document, prefix_chars=prefix_chars)
