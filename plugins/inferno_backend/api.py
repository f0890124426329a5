"""The OpenAI-compatible inference API of the service port.

Routes::

    GET  /v1/models                 {"object": "list", "data": [{"id", "object": "model", ...}]}
    GET  /v1/models/{model}         one model object, or 404 model_not_found
    POST /v1/chat/completions       chat.completion, or an SSE stream of chat.completion.chunk
    POST /v1/completions            text_completion, or an SSE stream of text_completion chunks
    GET  /v1/ws                     WebSocket: the same requests and chunks (wsapi.py)
    GET  /health                    200 {"status": "ready"} or 503 {"status": why not}

Every error is ``{"error": {"message", "type", "param", "code"}}`` with the
status OpenAI uses: 400 for a bad field (``param`` names it), 404
``model_not_found``, 413 for a body over ``max_body_size``, 429 with
``Retry-After`` when the queue is full, 503 with ``Retry-After`` while the
node drains or its engine is unavailable (so a proxy retries elsewhere), and
the engine's own status when the engine fails.

**Streaming.**  A request is admitted (:mod:`~inferno_backend.admission`) and
its first token awaited *before* the response head is sent, so every failure
up to the first token still has its proper status and a proxy may retry it;
from then on each engine chunk is written as soon as it is produced
(``data: {...}\\n\\n``, then ``data: [DONE]``).  An engine failure mid-stream
becomes an error event (``data: {"error": {..., "code": <status>}}``) and ends
the stream without ``[DONE]``.

**Disconnects.**  The HTTP server cancels the handler of a client that closed
or reset its connection, whatever the request is doing (queued, generating,
streaming); the cancellation closes the engine's generation and gives the
admission slot, or the queue place, back at once (``finally`` blocks and
:meth:`InferenceAPI.finish_generation`, shielded).  A client whose
connection dies silently is noticed only when writing to it fails or stalls.

**Drain deadline.**  When the drain time runs out, :meth:`InferenceAPI.cut_generations`
stops every generation at once: engine reads that may be cut run in a cancel
scope of their own, the only way to interrupt a read already waiting.  (Only
reads begun once the drain started, and first reads, pay for one; a
generation whose engine has been silent since before the drain began is left
to the server's shutdown: see :class:`_Cutter`.)  A stream then ends with
an error event (``{"error": {..., "type": "server_error", "code":
"draining"}}``) and no ``[DONE]``; a request with nothing sent yet is
answered 503 ``draining`` with Retry-After, which a proxy may retry
elsewhere.  Both count as failed responses.

**WebSocket** (``/v1/ws``): the same requests and chunks over one socket; the
protocol is documented in :mod:`inferno_backend.wsapi`.
"""

from __future__ import annotations

import functools
import json
import logging
import time
import weakref
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Final
from urllib.parse import unquote

import anyio

from inferno.errors import HTTPError
from inferno.http import Request, Response, WebSocketAccept
from inferno.metrics import Registry
from inferno_backend.admission import Admission, AdmissionRejected, Lease
from inferno_backend.engines.base import Engine, EngineError, TokenChunk
from inferno_backend.oaischema import (
    ChunkEncoder,
    Kind,
    OpenAIError,
    ParsedRequest,
    completion_id,
    model_object,
    models_list,
    parse_request,
    whole_response,
)

__all__ = [
    "RETRY_AFTER_SECONDS",
    "Generation",
    "GenerationCut",
    "InferenceAPI",
    "cut_failure",
    "engine_failure",
    "health_response",
]

logger = logging.getLogger("inferno_backend.api")

#: ``Retry-After`` of a 429 or 503: long enough for a slot to free up under a
#: steady load, short enough that a client does not idle.
RETRY_AFTER_SECONDS: Final = 1
#: Longest wait for an engine stream to close (a fronted server's connection).
CLOSE_TIMEOUT: Final = 5.0

_SSE_HEADERS: Final = [
    ("content-type", "text/event-stream; charset=utf-8"),
    ("cache-control", "no-cache"),
    ("x-accel-buffering", "no"),  # nginx and friends: do not buffer the stream
]
_DONE: Final = b"data: [DONE]\n\n"
_DRAINING: Final = "draining"  # error code of the 503 answered while the node drains
_GENERATION_ROUTES: Final[dict[str, Kind]] = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completion",
}
#: Routes that only probe the node: their 503s say "not ready", they are not failures.
_PROBE_ROUTES: Final = frozenset({"/health"})
_KNOWN_ROUTES: Final = frozenset(
    {"/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/ws", "/health"}
)


def _retry_later(status: int, message: str, code: str) -> OpenAIError:
    return OpenAIError(
        status, message, code=code, headers=[("retry-after", str(RETRY_AFTER_SECONDS))]
    )


def cut_failure() -> OpenAIError:
    """The answer, or the stream's last event, for a generation cut by the drain deadline."""
    return _retry_later(
        503, "the node stopped before the answer was complete (drain timeout)", _DRAINING
    )


def engine_failure(exc: EngineError) -> OpenAIError:
    """The answer for an engine failure: its status (5xx temporary ones with Retry-After)."""
    status = exc.status if 400 <= exc.status <= 599 else 502
    headers = [("retry-after", str(RETRY_AFTER_SECONDS))] if status in (429, 503) else None
    code = "model_not_found" if status == 404 else "engine_error"
    return OpenAIError(status, str(exc), code=code, headers=headers)


class _Metrics:
    """The API's series in the role's registry (``/telemetry``)."""

    def __init__(self, registry: Registry) -> None:
        self.requests = registry.counter(
            "inferno_backend_requests_total",
            "Requests answered, by route and status.",
            ("route", "status"),
        )
        self.duration = registry.histogram(
            "inferno_backend_request_duration_seconds",
            "Time from request to the last byte of its answer.",
            ("route",),
        )
        self.ttft = registry.histogram(
            "inferno_backend_time_to_first_token_seconds",
            "Time from request to the first generated token (queueing included).",
            ("route",),
        )
        self.prompt_tokens = registry.counter(
            "inferno_backend_prompt_tokens_total", "Prompt tokens of answered requests."
        )
        self.completion_tokens = registry.counter(
            "inferno_backend_completion_tokens_total", "Tokens generated."
        )
        self.failed = registry.counter(
            "inferno_backend_failed_responses_total",
            "Answers that failed (5xx or a broken stream).",
        )
        self.backoff = registry.counter(
            "inferno_backend_backoff_requests_total",
            "Requests turned away with Retry-After (queue full: 429, draining: 503).",
            ("reason",),
        )


class GenerationCut(Exception):
    """Raised by an engine read of a generation cut by the drain deadline."""


class _Drain:
    """Whether the node drains, shared by the API and every :class:`_Cutter`."""

    __slots__ = ("started",)

    def __init__(self) -> None:
        self.started = False


class _Cutter:
    """Reads one generation's engine stream so that :meth:`cut` stops it at once.

    A read that :meth:`cut` may have to interrupt runs in a fresh cancel scope
    (a scope cannot be re-entered, and none may stay open across the caller's
    ``yield``), so cutting cancels only a read in progress, never the code
    writing a chunk to the client.  A scope costs microseconds, a sizeable
    share of a token's cost in the backend, and cuts come only at the end of
    a drain: so only the first read of a generation and those that begin
    once the drain has started get one.  The price is a stream whose engine
    has been silent since before the drain began: it is left to the
    server's shutdown, after its write grace, without an error event.
    """

    __slots__ = ("__weakref__", "_drain", "_scope", "cut_requested", "reading_unscoped")

    def __init__(self, drain: _Drain) -> None:
        self.cut_requested = False
        #: In a read that :meth:`cut` cannot interrupt (begun before the drain).
        self.reading_unscoped = False
        self._drain = drain
        self._scope: anyio.CancelScope | None = None

    def cut(self) -> None:
        """Stop the read in progress, if any, and fail every later one."""
        self.cut_requested = True
        if self._scope is not None:
            self._scope.cancel()

    async def read(
        self, stream: AsyncIterator[TokenChunk], *, cuttable: bool = False
    ) -> TokenChunk | None:
        """The stream's next chunk, or ``None`` at its end.

        :param cuttable: in a cancel scope even before the drain started.
        :raises GenerationCut: when :meth:`cut` was called before or during the read.
        """
        if self.cut_requested:
            raise GenerationCut
        if not (cuttable or self._drain.started):
            self.reading_unscoped = True
            try:
                return await stream.__anext__()
            except StopAsyncIteration:
                return None
            finally:
                self.reading_unscoped = False
        with anyio.CancelScope() as scope:
            self._scope = scope
            try:
                return await stream.__anext__()
            except StopAsyncIteration:
                return None
            finally:
                self._scope = None
        raise GenerationCut  # reached only when this scope caught the cut's cancellation


class Generation:
    """One admitted generation: its lease, its engine stream and the chunks so far."""

    __slots__ = ("cutter", "first", "last", "lease", "parsed", "route", "started", "stream")

    def __init__(
        self,
        parsed: ParsedRequest,
        route: str,
        started: float,
        lease: Lease,
        stream: AsyncIterator[TokenChunk],
        first: TokenChunk,
        cutter: _Cutter,
    ) -> None:
        self.parsed = parsed
        self.route = route
        self.started = started
        self.lease = lease
        self.stream = stream
        self.first = first
        self.last = first
        self.cutter = cutter

    async def next_chunk(self) -> TokenChunk | None:
        """The next chunk after those so far; ``None`` after the one with a ``finish_reason``.

        :raises EngineError: the engine failed.
        :raises GenerationCut: the drain deadline cut the generation.
        """
        if self.last.finish_reason is not None:
            return None
        chunk = await self.cutter.read(self.stream)
        if chunk is not None:
            self.last = chunk
        return chunk


class _Body:
    """A streamed answer's body: the SSE generator, plus a safety net for its generation.

    The server closes a body it has started iterating; one it never iterates
    (the response head could not be sent: the client was already gone) is just
    dropped, and a generator that never started runs no ``finally``.  Then
    :meth:`__del__` gives the admission slot back (the engine stream frees
    itself when dropped), so a slot cannot leak.
    """

    __slots__ = ("_generation", "_iterator")

    def __init__(self, iterator: AsyncGenerator[bytes, None], generation: Generation) -> None:
        self._iterator = iterator
        self._generation = generation

    def __aiter__(self) -> _Body:
        return self

    async def __anext__(self) -> bytes:
        return await self._iterator.__anext__()

    async def aclose(self) -> None:
        await self._iterator.aclose()
        self._generation.lease.release()  # already released by the generator's finally

    def __del__(self) -> None:
        self._generation.lease.release()


class InferenceAPI:
    """The service port's handler (``handle``) over one engine and one admission control.

    :param engine: the engine that generates.
    :param admission: the concurrency limit and queue.
    :param registry: where request metrics go.
    :param max_message_bytes: largest WebSocket request message (like the HTTP body limit).
    """

    def __init__(
        self,
        engine: Engine,
        admission: Admission,
        registry: Registry,
        *,
        max_message_bytes: int = 8 * 1024 * 1024,
    ) -> None:
        self.engine = engine
        self.admission = admission
        self.max_message_bytes = max_message_bytes
        self.created = int(time.time())
        #: Answers that failed (5xx but health probes', broken streams) since start:
        #: ``failed_responses``.
        self.failed_responses = 0
        #: Requests turned away with Retry-After since start: ``backoff_requests``.
        self.backoff_requests = 0
        self._metrics = _Metrics(registry)
        self._drain = _Drain()
        #: Cancel scopes of WebSocket sessions waiting for a request (closed on drain).
        self.idle_sockets: set[anyio.CancelScope] = set()
        #: Generations admitted and not finished (cut when the drain deadline passes).
        #: Weak: a stream whose body the server never iterated is just dropped (_Body).
        self._cutters: weakref.WeakSet[_Cutter] = weakref.WeakSet()
        self._cutting = False  # the drain deadline passed: cut what is admitted from now on

    # -- state -------------------------------------------------------------------------

    @property
    def draining(self) -> bool:
        return self._drain.started

    def start_draining(self) -> None:
        """Refuse new requests (503), let admitted and queued ones finish, close idle sockets."""
        self._drain.started = True
        self.admission.close()
        for scope in list(self.idle_sockets):
            scope.cancel()

    def cut_generations(self) -> tuple[int, int]:
        """Stop every admitted generation now (the drain deadline passed).

        Streams end with a ``draining`` error event, answers not yet started
        are 503 ``draining``; each frees its slot as it ends.  Requests still
        queued are cut as soon as they are admitted, so they are answered 503
        ``draining`` at once too instead of starting to generate.  A
        generation whose engine has said nothing since before the drain
        began cannot be interrupted (see :class:`_Cutter`): the server's
        shutdown ends it.

        :returns: how many generations were cut, and how many of them only
            at their engine's next chunk.
        """
        self._cutting = True
        cutters = list(self._cutters)
        for cutter in cutters:
            cutter.cut()
        return len(cutters), sum(cutter.reading_unscoped for cutter in cutters)

    def not_ready_reason(self) -> str | None:
        """Why the node should not get traffic now, or ``None`` when it is ready."""
        if self._drain.started:
            return "draining"
        if not self.engine.ready():
            return "engine not ready"
        return None

    # -- HTTP --------------------------------------------------------------------------

    async def handle(self, request: Request) -> Response:
        """Answer one request (the server renders a raised HTTPError)."""
        path = request.path
        route = path if path in _KNOWN_ROUTES else "other"
        started = time.monotonic()
        try:
            response = await self._dispatch(request, path, route, started)
        except HTTPError as exc:
            self.count_answer(route, exc.status, started, exc.code)
            raise
        except Exception:
            self.count_answer(route, 500, started)
            raise
        if isinstance(response.body, bytes):
            self.count_answer(route, response.status, started)
        else:  # a stream: its duration is observed when it ends
            self.count_stream(route)
        return response

    def count_stream(self, route: str) -> None:
        """Count a streamed answer that started (its duration is observed at its end)."""
        self._metrics.requests.labels(route=route, status="200").inc()

    def count_answer(self, route: str, status: int, started: float, code: object = None) -> None:
        """Count an answer given in one piece (an error, or a whole response)."""
        self._metrics.requests.labels(route=route, status=str(status)).inc()
        self._metrics.duration.labels(route=route).observe(time.monotonic() - started)
        # Turning away while draining is a back-off; a health probe's 503 is an answer.
        if status >= 500 and code != _DRAINING and route not in _PROBE_ROUTES:
            self.count_failure()

    def count_failure(self) -> None:
        """Count a failed answer (``failed_responses``): a 5xx, or a stream broken mid-way."""
        self.failed_responses += 1
        self._metrics.failed.inc()

    async def _dispatch(self, request: Request, path: str, route: str, started: float) -> Response:
        kind = _GENERATION_ROUTES.get(path)
        if kind is not None:
            _allow(request, "POST")
            parsed = parse_request(kind, await request.json(), _request_id(request, kind))
            generation = await self.start_generation(parsed, route, started)
            if parsed.stream:
                return Response(200, _SSE_HEADERS, _Body(self._sse(generation), generation))
            return await self._whole(generation)
        if path == "/v1/models":
            _allow(request, "GET")
            return Response.json(models_list(self.engine.models(), self.created))
        if path.startswith("/v1/models/"):
            _allow(request, "GET")
            model = unquote(path[len("/v1/models/") :])  # ids like org/name arrive encoded
            self._check_model(model)
            return Response.json(model_object(model, self.created))
        if path == "/v1/ws":
            from inferno_backend.wsapi import serve_session

            session = functools.partial(serve_session, self)
            return WebSocketAccept(session, max_message_bytes=self.max_message_bytes)
        if path == "/health":
            _allow(request, "GET")
            return health_response(self.not_ready_reason())
        raise OpenAIError(404, f"no route {request.method} {path}", code="not_found")

    def _check_model(self, model: str) -> None:
        if model not in self.engine.models():
            raise OpenAIError(
                404,
                f"the model {model!r} does not exist (served here: "
                f"{', '.join(self.engine.models()) or 'none yet'})",
                param="model",
                code="model_not_found",
            )

    # -- generation ----------------------------------------------------------------------

    async def start_generation(
        self, parsed: ParsedRequest, route: str, started: float
    ) -> Generation:
        """Admit ``parsed`` and wait for its first chunk.

        :raises HTTPError: 404 unknown model, 429/503 turned away, the engine's failure.
        """
        self._check_model(parsed.model)
        if self._drain.started:
            self._backoff("draining")
            raise _retry_later(503, "the node is draining for shutdown", _DRAINING)
        if not self.engine.ready():
            raise _retry_later(503, "the engine is not ready", "engine_unavailable")
        try:
            lease = await self.admission.acquire()
        except AdmissionRejected as exc:
            self._backoff(exc.reason)
            if exc.reason == "full":
                raise _retry_later(
                    429, "the node is at capacity; retry later", "queue_full"
                ) from None
            raise _retry_later(503, "the node is draining for shutdown", _DRAINING) from None
        stream: AsyncIterator[TokenChunk] | None = None
        cutter = _Cutter(self._drain)
        cutter.cut_requested = self._cutting
        self._cutters.add(cutter)
        try:
            stream = self.engine.generate(parsed.generation)
            first = await cutter.read(stream, cuttable=True)  # once per request: cheap
            if first is None:
                raise OpenAIError(502, "the engine produced nothing", code="engine_error")
        except BaseException as exc:
            self._cutters.discard(cutter)
            if stream is not None:
                await _close(stream)
            lease.release()
            if isinstance(exc, EngineError):
                raise engine_failure(exc) from None
            if isinstance(exc, GenerationCut):
                self.count_failure()  # the answer's 503 "draining" is not counted again
                raise cut_failure() from None
            raise
        self._metrics.ttft.labels(route=route).observe(time.monotonic() - started)
        return Generation(parsed, route, started, lease, stream, first, cutter)

    def _backoff(self, reason: str) -> None:
        self.backoff_requests += 1
        self._metrics.backoff.labels(reason=reason).inc()

    async def finish_generation(self, generation: Generation, *, observe: bool = True) -> None:
        """Close the engine stream, free the slot, count tokens; never raises, bounded."""
        self._cutters.discard(generation.cutter)
        await _close(generation.stream)
        generation.lease.release()
        last = generation.last
        self._metrics.prompt_tokens.inc(last.prompt_tokens)
        self._metrics.completion_tokens.inc(last.completion_tokens)
        if observe:
            elapsed = time.monotonic() - generation.started
            self._metrics.duration.labels(route=generation.route).observe(elapsed)

    async def _whole(self, generation: Generation) -> Response:
        pieces = [generation.first.text]
        try:
            while (chunk := await generation.next_chunk()) is not None:
                pieces.append(chunk.text)
        except EngineError as exc:
            raise engine_failure(exc) from None
        except GenerationCut:
            self.count_failure()  # the answer's 503 "draining" is not counted again
            raise cut_failure() from None
        finally:
            await self.finish_generation(generation, observe=False)
        parsed, last = generation.parsed, generation.last
        document = whole_response(
            parsed.kind,
            completion_id(parsed.kind),
            int(time.time()),
            parsed.model,
            "".join(pieces),
            last.finish_reason,
            last.prompt_tokens,
            last.completion_tokens,
        )
        return Response.json(document)

    async def _sse(self, generation: Generation) -> AsyncGenerator[bytes, None]:
        parsed = generation.parsed
        encoder = ChunkEncoder(
            parsed.kind,
            completion_id(parsed.kind),
            int(time.time()),
            parsed.model,
            parsed.include_usage,
        )
        first = generation.first
        try:
            yield b"data: " + encoder.chunk(first.text, first.finish_reason) + b"\n\n"
            try:
                while (chunk := await generation.next_chunk()) is not None:
                    if chunk.text or chunk.finish_reason is not None:
                        yield b"data: " + encoder.chunk(chunk.text, chunk.finish_reason) + b"\n\n"
            except EngineError as exc:
                self.count_failure()
                logger.warning("stream %s failed mid-way: %s", parsed.generation.request_id, exc)
                yield b"data: " + _error_event(engine_failure(exc)) + b"\n\n"
                return
            except GenerationCut:
                self.count_failure()
                yield b"data: " + _json(cut_failure().body()) + b"\n\n"
                return
            last = generation.last
            if encoder.include_usage:
                usage_chunk = encoder.usage_chunk(last.prompt_tokens, last.completion_tokens)
                yield b"data: " + usage_chunk + b"\n\n"
            yield _DONE
        finally:
            await self.finish_generation(generation)


def health_response(reason: str | None) -> Response:
    """``/health``: 200 when ready, else 503 saying why (with Retry-After)."""
    if reason is None:
        return Response.json({"status": "ready"})
    return Response.json(
        {"status": reason}, status=503, headers=[("retry-after", str(RETRY_AFTER_SECONDS))]
    )


def _allow(request: Request, method: str) -> None:
    if request.method != method:
        raise OpenAIError(
            405,
            f"{request.path} takes {method}, not {request.method}",
            code="method_not_allowed",
            headers=[("allow", method)],
        )


def _request_id(request: Request, kind: Kind) -> str:
    """The caller's ``X-Request-Id`` when it is sane (it appears in logs), else a new id."""
    given = request.headers.get("x-request-id")
    if given and len(given) <= 128 and given.isascii() and given.isprintable():
        return given
    return completion_id(kind)


def _error_event(exc: HTTPError) -> bytes:
    """An error chunk; ``code`` is the status, as vLLM sends it, so proxies can read it."""
    body = exc.body()
    body["error"]["code"] = exc.status
    return _json(body)


def _json(document: object) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode("utf-8")


async def _close(stream: AsyncIterator[TokenChunk]) -> None:
    """Close an engine stream, even from a cancelled task (bounded)."""
    aclose = getattr(stream, "aclose", None)
    if aclose is None:
        return
    with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_TIMEOUT):
        try:
            await aclose()
        except Exception:
            logger.exception("closing an engine stream failed")
