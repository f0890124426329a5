"""The inference API over a WebSocket: ``GET /v1/ws`` on the service port.

Each text message from the client is one request: the JSON body of a chat or
completions request plus an ``"endpoint"`` field, ``"chat/completions"`` or
``"completions"`` (a leading ``/v1/`` is accepted); without it, ``"messages"``
means chat and ``"prompt"`` completions::

    {"endpoint": "chat/completions", "model": "sim-tiny",
     "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 64}

The answer is always streamed (``"stream"`` is ignored): one text message per
chunk, in exactly the JSON of the SSE stream's ``data:`` lines
(``chat.completion.chunk`` or ``text_completion``; with
``stream_options.include_usage``, ``"usage": null`` in each and the usage
chunk at the end, as over SSE), then one terminal message::

    {"done": true, "id": "chatcmpl-…", "finish_reason": "stop",
     "usage": {"prompt_tokens": 12, "completion_tokens": 30, "total_tokens": 42}}

or, when the request fails at any point, instead of it::

    {"error": {"message", "type", "param", "code"}, "status": 429}

with the status the HTTP API would answer (400 bad field, 404 unknown model,
429 queue full, 503 draining, the engine's own status).  Every request ends
with exactly one terminal message; the socket stays open for the next.

Requests on one socket are served one after another (send the next after the
terminal message, or earlier: it waits its turn); admission control applies
to each as to an HTTP request.  Closing the socket stops a generation at its
next token.  While the node drains, an idle socket is closed with 1001
(going away), a busy one after its terminal message; when the drain time
runs out, a generation still running is stopped and its terminal message is
the error ``{"error": {..., "code": "draining"}, "status": 503}``.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any, Final

import anyio

from inferno.errors import HTTPError
from inferno.http import WebSocket, WebSocketClosed
from inferno_backend.api import GenerationCut, cut_failure, engine_failure
from inferno_backend.engines.base import EngineError
from inferno_backend.oaischema import (
    ChunkEncoder,
    Kind,
    OpenAIError,
    ParsedRequest,
    completion_id,
    parse_request,
    usage,
)

if TYPE_CHECKING:
    from inferno_backend.api import InferenceAPI

__all__ = ["ROUTE", "WS_GOING_AWAY", "parse_message", "serve_session"]

#: The route, also its label in metrics.
ROUTE: Final = "/v1/ws"
#: Close code sent to idle sockets when the node drains (RFC 6455 §7.4.1).
WS_GOING_AWAY: Final = 1001

_ENDPOINTS: Final[dict[str, Kind]] = {
    "chat/completions": "chat",
    "/v1/chat/completions": "chat",
    "completions": "completion",
    "/v1/completions": "completion",
}


async def serve_session(api: InferenceAPI, ws: WebSocket) -> None:
    """Serve requests on ``ws`` until the client closes it or the node drains."""
    while not api.draining:
        with anyio.CancelScope() as waiting:
            api.idle_sockets.add(waiting)
            try:
                message = await ws.receive()
            except WebSocketClosed:
                return
            finally:
                api.idle_sockets.discard(waiting)
        if waiting.cancelled_caught:
            break
        await _serve_request(api, ws, message)
    await ws.close(WS_GOING_AWAY, "the node is draining")


async def _serve_request(api: InferenceAPI, ws: WebSocket, message: str | bytes) -> None:
    started = time.monotonic()
    try:
        parsed = parse_message(message)
        generation = await api.start_generation(parsed, ROUTE, started)
    except HTTPError as exc:
        api.count_answer(ROUTE, exc.status, started, exc.code)
        await ws.send(_error_message(exc))
        return
    api.count_stream(ROUTE)
    id_ = completion_id(parsed.kind)
    # The very chunks of the SSE stream: "usage": null only with include_usage.
    encoder = ChunkEncoder(parsed.kind, id_, int(time.time()), parsed.model, parsed.include_usage)
    try:
        first = generation.first
        await ws.send(encoder.chunk(first.text, first.finish_reason).decode())
        try:
            while (chunk := await generation.next_chunk()) is not None:
                if chunk.text or chunk.finish_reason is not None:
                    await ws.send(encoder.chunk(chunk.text, chunk.finish_reason).decode())
        except EngineError as exc:
            api.count_failure()
            await ws.send(_error_message(engine_failure(exc)))
            return
        except GenerationCut:
            api.count_failure()
            await ws.send(_error_message(cut_failure()))
            return
        last = generation.last
        if parsed.include_usage:
            usage_chunk = encoder.usage_chunk(last.prompt_tokens, last.completion_tokens)
            await ws.send(usage_chunk.decode())
        done = {
            "done": True,
            "id": id_,
            "finish_reason": last.finish_reason,
            "usage": usage(last.prompt_tokens, last.completion_tokens),
        }
        await ws.send(json.dumps(done, separators=(",", ":")))
    finally:
        await api.finish_generation(generation)


def parse_message(message: str | bytes) -> ParsedRequest:
    """One request message, validated like the HTTP body (see the module docstring).

    :raises OpenAIError: 400 for a message that is not a JSON object, names an
        unknown endpoint, or has a bad field.
    """
    try:
        document: Any = json.loads(message)
    except (ValueError, UnicodeDecodeError) as exc:
        raise OpenAIError(
            400, f"the message is not valid JSON: {exc}", code="invalid_json"
        ) from None
    if not isinstance(document, dict):
        raise OpenAIError(400, "the message must be a JSON object")
    endpoint = document.pop("endpoint", None)
    if endpoint is None:
        kind: Kind | None = "chat" if "messages" in document else "completion"
    elif isinstance(endpoint, str):
        kind = _ENDPOINTS.get(endpoint)
    else:
        kind = None
    if kind is None:
        raise OpenAIError(
            400,
            f"endpoint: {endpoint!r} is not 'chat/completions' or 'completions'",
            param="endpoint",
            code="invalid_value",
        )
    document["stream"] = True  # always streamed here; stream_options is then allowed
    return parse_request(kind, document, completion_id(kind))


def _error_message(exc: HTTPError) -> str:
    return json.dumps({**exc.body(), "status": exc.status}, separators=(",", ":"))
