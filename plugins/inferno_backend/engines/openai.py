"""The ``openai`` engine: a backend in front of any OpenAI-compatible server.

vLLM, SGLang, llama.cpp server, TGI and Ollama all speak the OpenAI API;
this engine forwards each generation to such a server (the *engine server*)
through Inferno's pooled HTTP client and turns its SSE stream into
:class:`~.base.TokenChunk` values as the bytes arrive, never buffering a
token.  It always asks for a stream with usage
(``stream_options.include_usage``), so the final chunk carries the engine's
own token counts.

**Cancellation.**  Closing the ``generate`` iterator, or cancelling the task
iterating it, closes the upstream connection at once: every one of those
servers aborts a generation whose client went away, so its batch slot and
KV cache are freed too.

**Readiness** is ``GET /v1/models`` (``/health`` for a server without that
route) every ``poll_interval`` seconds, which also discovers the served
models when none are configured.  Configured models must be in that list
when the server gives one: a backend registered under a name its engine
server does not serve would only collect 404s.  A connect error on live
traffic marks the engine not ready at once, until the next successful poll.

**Connections.**  Generations hold one pooled connection each for as long
as they stream, so the generation pool has ``max_connections`` per origin
(the role sizes it from ``max_concurrency``).  Health polls and metrics
scrapes have a small client of their own: a node whose every generation
connection is busy must still see that its engine server answers, or it
would take itself out of rotation exactly when it is fullest.

**Load** comes from the engine server's Prometheus metrics, scraped on the
same interval in the background (never on the request path) and read by
:mod:`~inferno_backend.engines.enginemetrics`; a server without metrics works
and reports unknown (``None``) load.

**Structured concurrency** as in :class:`~.sim.SimEngine`: ``async with
OpenAIEngine(...) as engine:`` owns a task group running the two pollers;
``start()`` and ``aclose()`` are the two halves of that context manager, to be
called from the same task.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Any, Final

import anyio

from inferno.http.client import URL, ClientResponse, HTTPClient, Timeouts, parse_url
from inferno.http.client_errors import ClientError, ClientTimeout, ConnectError, PoolTimeout
from inferno.metrics import parse_prometheus
from inferno_backend.engines.base import EngineError, EngineStats, GenerationRequest, TokenChunk
from inferno_backend.engines.enginemetrics import EngineMetricsReader
from inferno_backend.engines.openaistream import (
    ChunkTranslator,
    SSEError,
    SSEParser,
    error_message,
    failure_from_answer,
)

__all__ = ["DEFAULT_MAX_CONNECTIONS", "GENERATE_TIMEOUTS", "POLL_TIMEOUTS", "OpenAIEngine"]

logger = logging.getLogger("inferno_backend.openai")

#: Deadlines of a generation.  ``read`` is the longest silence allowed: a busy
#: server may queue a request for minutes before its first token.
GENERATE_TIMEOUTS: Final = Timeouts(connect=5.0, read=300.0, write=30.0, pool=10.0)
#: Deadlines of a health poll or metrics scrape: a server slower than this is
#: not "answering" for readiness purposes.
POLL_TIMEOUTS: Final = Timeouts(connect=2.0, read=5.0, write=5.0, pool=5.0, total=10.0)
#: Connections to the engine server for generations, by default: one per
#: generation in flight, so well above any engine server's batch size.  The
#: role passes ``max_concurrency`` plus a little headroom instead.
DEFAULT_MAX_CONNECTIONS: Final = 1024
#: Connections of the poll client per origin: the health poll and the metrics
#: scrape, which may run at the same moment (both at start).
POLL_CONNECTIONS: Final = 2
#: Largest error answer read for its message; the rest is not worth waiting for.
MAX_ERROR_BODY_BYTES: Final = 64 * 1024
#: Largest ``/v1/models`` answer (thousands of Ollama models fit).
MAX_MODELS_BODY_BYTES: Final = 1024 * 1024
#: Largest metrics text; vLLM with many LoRA adapters publishes some hundreds of KiB.
MAX_METRICS_BYTES: Final = 8 * 1024 * 1024
#: Largest non-streaming answer (a server that ignored ``stream: true``).
MAX_WHOLE_BODY_BYTES: Final = 16 * 1024 * 1024
#: After ``[DONE]``, how long the end of the chunked body is awaited so the
#: connection can be reused; a server that dawdles longer just gets it closed.
END_OF_BODY_GRACE: Final = 1.0
#: Prefer the classic text format: every exporter speaks it.
_METRICS_ACCEPT: Final = "text/plain;version=0.0.4;q=1.0,*/*;q=0.1"

_NEW, _RUNNING, _CLOSED = "new", "running", "closed"


def _base_url(engine_url: str) -> str:
    """``engine_url`` without a trailing ``/`` or ``/v1`` (both spellings are common)."""
    parse_url(engine_url)  # raises InvalidURL (a ValueError) naming what is wrong
    base = engine_url.split("#", 1)[0].split("?", 1)[0].rstrip("/")
    if base.endswith("/v1"):
        base = base[: -len("/v1")]
    return base


class OpenAIEngine:
    """An engine that forwards generations to an OpenAI-compatible server.

    :param engine_url: the server's base URL (``http://127.0.0.1:8000``; a
        trailing ``/v1`` is accepted).
    :param models: the model names served; ``None`` discovers them with
        ``GET /v1/models`` on every poll.  Named models must be in that list
        (when the server answers one) for the engine to be ready.
    :param metrics_url: the server's Prometheus metrics (default
        ``<engine_url>/metrics``).
    :param api_key: sent to the engine server as ``Authorization: Bearer``
        (to the metrics URL only when it is on the same origin); never logged.
    :param client: the HTTP client for generations (the caller keeps closing
        it); by default the engine owns one with ``max_connections`` per origin.
        Polls always use a small client of the engine's own.
    :param max_connections: connections to the engine server for generations,
        at most: one per generation in flight (more wait up to ``timeouts.pool``).
    :param poll_interval: seconds between health polls and metrics scrapes.
    :param timeouts: deadlines of a generation request.
    :param poll_timeouts: deadlines of a health poll or metrics scrape.
    :raises ValueError: for an unusable URL, a non-positive ``poll_interval``
        or ``max_connections``.
    """

    name = "openai"

    def __init__(
        self,
        engine_url: str,
        *,
        models: list[str] | None = None,
        metrics_url: str | None = None,
        api_key: str | None = None,
        client: HTTPClient | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        poll_interval: float = 2.0,
        timeouts: Timeouts = GENERATE_TIMEOUTS,
        poll_timeouts: Timeouts = POLL_TIMEOUTS,
    ) -> None:
        if not poll_interval > 0:
            raise ValueError(f"poll_interval must be > 0 seconds, got {poll_interval!r}")
        if max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, got {max_connections!r}")
        if models is not None and not (models and all(isinstance(m, str) and m for m in models)):
            raise ValueError(f"models must be non-empty names (None: discover), got {models!r}")
        base = _base_url(engine_url)
        self.engine_url = base
        self._chat_url = parse_url(base + "/v1/chat/completions")
        self._completions_url = parse_url(base + "/v1/completions")
        self._models_url = parse_url(base + "/v1/models")
        self._health_url = parse_url(base + "/health")
        self._metrics_url = parse_url(metrics_url or base + "/metrics")
        self.metrics_url = str(self._metrics_url)
        self.poll_interval = poll_interval
        self._timeouts = timeouts
        self._poll_timeouts = poll_timeouts
        self._auth: list[tuple[str, str]] = []
        if api_key:
            self._auth.append(("authorization", f"Bearer {api_key}"))
        same_origin = self._metrics_url.origin == self._models_url.origin
        self._metrics_headers = [("accept", _METRICS_ACCEPT), *(self._auth if same_origin else [])]
        self._discover = models is None
        self._models: list[str] = list(models or [])
        self.max_connections = max_connections
        self._own_client = client is None
        self._client = (
            client
            if client is not None
            else HTTPClient(timeouts=timeouts, max_connections_per_origin=max_connections)
        )
        self._poll_client = HTTPClient(
            timeouts=poll_timeouts, max_connections_per_origin=POLL_CONNECTIONS
        )
        self._reachable = False
        self._stats = EngineStats()
        self._reader = EngineMetricsReader()
        self._health_note: str | None = "not polled yet"  # last readiness problem logged
        self._metrics_note: str | None = None  # last metrics problem logged
        self._state = _NEW
        self._stack: AsyncExitStack | None = None

    def __repr__(self) -> str:
        return f"<OpenAIEngine {self.engine_url} {self._state}>"

    # -- lifecycle ---------------------------------------------------------------------

    async def __aenter__(self) -> OpenAIEngine:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Poll the server once (health and metrics), then keep polling in the background.

        An engine server that is down does not fail ``start()``: the engine
        is just not :meth:`ready` until the server answers.  Takes at most
        about ``poll_timeouts.total`` seconds.
        """
        if self._state != _NEW:
            raise RuntimeError(f"OpenAIEngine.start() on an engine that is {self._state}")
        stack = AsyncExitStack()
        if self._own_client:
            stack.push_async_callback(self._client.aclose)  # after the pollers have stopped
        stack.push_async_callback(self._poll_client.aclose)
        try:
            async with anyio.create_task_group() as first:
                first.start_soon(self.poll_health)
                first.start_soon(self.scrape_metrics)
            task_group = await stack.enter_async_context(anyio.create_task_group())
        except BaseException:
            with anyio.CancelScope(shield=True):
                await stack.aclose()
            raise
        task_group.start_soon(self._every_interval, self.poll_health, name="openai-health")
        task_group.start_soon(self._every_interval, self.scrape_metrics, name="openai-metrics")
        stack.callback(task_group.cancel_scope.cancel)  # runs before the group exits
        self._stack = stack
        self._state = _RUNNING
        logger.info(
            "openai engine: %s (%s), models %s, metrics %s",
            self.engine_url,
            "ready" if self._reachable else "not ready yet",
            ", ".join(self._models) or "(none discovered yet)",
            self.metrics_url,
        )

    async def aclose(self) -> None:
        """Stop polling and close the engine's own client.

        A generation still streaming fails (503) at its next piece of data
        and closes its upstream connection; one whose engine server stays
        silent ends at ``timeouts.read``.  (Interrupting a read in progress
        would need a cancel scope around every read, a cost on every token.)
        """
        if self._state == _CLOSED:
            return
        never_started = self._state == _NEW
        self._state = _CLOSED
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.aclose()
        elif never_started:
            await self._poll_client.aclose()
            if self._own_client:
                await self._client.aclose()

    async def _every_interval(self, poll: Callable[[], Awaitable[None]]) -> None:
        while True:
            await anyio.sleep(self.poll_interval)
            await poll()

    # -- the Engine protocol -------------------------------------------------------------

    def models(self) -> list[str]:
        return list(self._models)

    def ready(self) -> bool:
        return self._state == _RUNNING and self._reachable and bool(self._models)

    def stats(self) -> EngineStats:
        return self._stats

    def generate(self, request: GenerationRequest) -> AsyncGenerator[TokenChunk, None]:
        """Forward ``request``; chunks are yielded as the server streams them.

        :raises EngineError: the server's own status and message for an error
            answer (4xx permanent, 5xx temporary); 503 when it cannot be
            reached, 502 when the connection breaks, 504 when it stays silent
            longer than ``timeouts.read``.
        """
        return self._generate(request)

    # -- generation ----------------------------------------------------------------------

    async def _generate(self, request: GenerationRequest) -> AsyncGenerator[TokenChunk, None]:
        if self._state != _RUNNING:
            raise EngineError(f"the openai engine is {self._state}", status=503)
        url = self._chat_url if request.kind == "chat" else self._completions_url
        headers = [("content-type", "application/json"), ("accept", "text/event-stream")]
        request_id = request.request_id
        if request_id.isascii() and request_id.isprintable() and len(request_id) <= 256:
            headers.append(("x-request-id", request_id))  # vLLM and SGLang log it
        headers.extend(self._auth)
        body = encode_request(request)
        translator = ChunkTranslator(request.kind)
        try:
            async with self._client.stream(
                "POST", url, headers=headers, body=body, timeouts=self._timeouts
            ) as response:
                if response.status != 200:
                    raise await _answer_failure(response)
                content_type = (response.headers.get("content-type") or "").lower()
                if not content_type.startswith("text/event-stream"):
                    # A server that ignored ``stream: true`` answers one JSON document.
                    document = await _read_json(response, MAX_WHOLE_BODY_BYTES)
                    yield translator.on_whole(document)
                    return
                parser = SSEParser()
                async for data in response.iter_bytes():
                    if self._state != _RUNNING:
                        raise EngineError("the openai engine is shutting down", status=503)
                    for event in parser.feed(data):
                        chunk = translator.on_event(event)
                        if chunk is not None:
                            yield chunk
                        if translator.done:
                            break
                    if translator.done:
                        await _finish_body(response)
                        return
                final = translator.on_end()
                if final is not None:
                    yield final
        except ClientError as exc:
            raise self._failure(exc, url) from exc
        except SSEError as exc:
            raise EngineError(f"the engine server's event stream is broken: {exc}") from exc

    def _failure(self, exc: ClientError, url: URL) -> EngineError:
        """Map a client error to the status the backend answers with."""
        if isinstance(exc, (ConnectError, PoolTimeout)):
            if isinstance(exc, ConnectError) and self._reachable:
                self._reachable = False
                self._health_note = "unreachable"
                logger.warning(
                    "openai engine: %s unreachable (%s); not ready until it answers a poll",
                    self.engine_url,
                    exc,
                )
            return EngineError(f"cannot reach the engine server: {exc}", status=503)
        if isinstance(exc, ClientTimeout):
            return EngineError(f"the engine server did not answer in time: {exc}", status=504)
        return EngineError(
            f"the engine server connection failed ({url.origin}): {exc}",
            status=502,
            temporary=exc.temporary,
        )

    # -- background polls ----------------------------------------------------------------

    async def poll_health(self) -> None:
        """Ask the server whether it answers (and which models it serves) once."""
        problem: str | None = None
        try:
            problem = await self._probe()
        except (ClientError, EngineError) as exc:
            problem = str(exc)
        if problem is None and not self._models:
            problem = "it serves no model (GET /v1/models listed none)"
        if problem != self._health_note:  # log changes, not every poll
            if problem is None:
                logger.info("openai engine: %s answers", self.engine_url)
            else:
                logger.warning("openai engine: %s not ready: %s", self.engine_url, problem)
        self._health_note = problem
        self._reachable = problem is None

    async def _probe(self) -> str | None:
        """``None`` when the server answers well, else what is wrong."""
        client, timeouts = self._poll_client, self._poll_timeouts
        async with client.stream(
            "GET", self._models_url, headers=self._auth, timeouts=timeouts
        ) as response:
            status = response.status
            if status == 200:
                if not self._discover:
                    return _missing_models(
                        self._models, await response.read(max_bytes=MAX_MODELS_BODY_BYTES)
                    )
                found = model_ids(await _read_json(response, MAX_MODELS_BODY_BYTES))
                if found is None:
                    return "GET /v1/models answered something that is not a model list"
                if found != self._models:
                    logger.info("openai engine: serves %s", ", ".join(found) or "nothing")
                self._models = found
                return None
        if status == 404 and self._discover:
            return "GET /v1/models answered 404, so the models cannot be discovered: configure them"
        if status != 404:
            return f"GET /v1/models answered {status}"
        async with client.stream(
            "GET", self._health_url, headers=self._auth, timeouts=timeouts
        ) as response:
            if 200 <= response.status < 300:
                return None
            return f"GET /health answered {response.status}"

    async def scrape_metrics(self) -> None:
        """Read the server's Prometheus metrics once into :meth:`stats`."""
        try:
            async with self._poll_client.stream(
                "GET",
                self._metrics_url,
                headers=self._metrics_headers,
                timeouts=self._poll_timeouts,
            ) as response:
                if response.status != 200:
                    self._no_metrics(f"it answered {response.status}")
                    return
                text = (await response.read(max_bytes=MAX_METRICS_BYTES)).decode("utf-8", "replace")
        except ClientError as exc:
            self._no_metrics(str(exc))
            return
        self._stats = self._reader.update(parse_prometheus(text), anyio.current_time())
        family = self._reader.family
        self._note_metrics(
            None if family is not None else "no metric name of vLLM, SGLang, llama.cpp or TGI",
            f"reading {family} metrics from {self.metrics_url}",
        )

    def _no_metrics(self, why: str) -> None:
        self._stats = EngineStats()
        self._reader.reset()
        self._note_metrics(why, "")

    def _note_metrics(self, problem: str | None, success: str) -> None:
        """Log when the metrics situation changes (a missing endpoint is logged once)."""
        note = problem if problem is not None else success
        if note == self._metrics_note:
            return
        self._metrics_note = note
        if problem is None:
            logger.info("openai engine: %s", success)
        else:
            logger.info(
                "openai engine: no load figures from %s (%s); stats unknown",
                self.metrics_url,
                problem,
            )


# -- helpers (pure where possible) --------------------------------------------------------


def encode_request(request: GenerationRequest) -> bytes:
    """The JSON body sent to the server: ``extra`` fields, then ours over them."""
    body: dict[str, Any] = dict(request.extra)
    options = body.get("stream_options")
    body["model"] = request.model
    body["stream"] = True
    body["stream_options"] = {
        **(options if isinstance(options, Mapping) else {}),
        "include_usage": True,
    }
    if request.kind == "chat":
        body.pop("prompt", None)
        body["messages"] = [dict(message) for message in request.messages]
    else:
        body.pop("messages", None)
        body["prompt"] = request.prompt
    if request.max_tokens is not None:
        body["max_tokens"] = request.max_tokens
    if request.stop:
        body["stop"] = list(request.stop)
    if request.temperature is not None:
        body["temperature"] = request.temperature
    if request.seed is not None:
        body["seed"] = request.seed
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def model_ids(document: Any) -> list[str] | None:
    """Model names in a ``/v1/models`` answer (``{"data": [{"id": ...}]}``), or ``None``.

    Also takes the single model object some TGI versions answer with.
    """
    if not isinstance(document, Mapping):
        return None
    data = document.get("data")
    if isinstance(data, list):
        ids = [item.get("id") for item in data if isinstance(item, Mapping)]
        return [i for i in ids if isinstance(i, str) and i]
    single = document.get("id")
    if isinstance(single, str) and single:
        return [single]
    return None


def _missing_models(configured: list[str], body: bytes) -> str | None:
    """What is wrong when the ``/v1/models`` answer ``body`` lacks a configured model.

    ``None`` when every configured model is listed, and also when the answer is
    no model list at all: then the server answering is all that can be checked.
    """
    try:
        found = model_ids(json.loads(body))
    except ValueError:
        return None
    if found is None:
        return None
    missing = [model for model in configured if model not in found]
    if not missing:
        return None
    return (
        f"the engine server serves {', '.join(found) or 'no model'}, not the configured "
        f"model {', '.join(missing)} (set --model to a name it lists, or leave it out)"
    )


async def _read_json(response: ClientResponse, max_bytes: int) -> Any:
    try:
        return json.loads(await response.read(max_bytes=max_bytes))
    except ValueError as exc:
        raise EngineError(f"the engine server answered invalid JSON: {exc}") from None


async def _answer_failure(response: ClientResponse) -> EngineError:
    """The :class:`EngineError` for an error answer, with the server's own message."""
    try:
        body = await response.read(max_bytes=MAX_ERROR_BODY_BYTES)
    except ClientError:
        body = b""
    try:
        message = error_message(json.loads(body))
    except ValueError:
        message = body.decode("utf-8", "replace").strip()[:500] or None
    fallback = response.reason or f"the engine server answered {response.status}"
    return failure_from_answer(response.status, message or fallback)


async def _finish_body(response: ClientResponse) -> None:
    """Read what follows ``[DONE]`` (normally just the end of the body), briefly.

    A body read to its end returns the connection to the pool; one left
    unread closes it.
    """
    if response.is_closed:
        return
    with anyio.move_on_after(END_OF_BODY_GRACE):
        async for _ in response.iter_bytes():
            pass
