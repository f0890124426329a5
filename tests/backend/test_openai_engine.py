"""The ``openai`` engine against a scripted OpenAI-compatible server on real loopback sockets."""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, aclosing, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from inferno_backend.engines.base import (
    EngineError,
    EngineStats,
    GenerationRequest,
    TokenChunk,
)
from inferno_backend.engines.openai import OpenAIEngine, encode_request, model_ids
from inferno_backend.engines.openaistream import MAX_EVENT_BYTES

from inferno.errors import HTTPError
from inferno.http.client import HTTPClient, Timeouts
from inferno.http.headers import Headers
from inferno.http.server import Request, Response, serve

pytestmark = pytest.mark.anyio

METRICS = Path(__file__).parent / "fixtures" / "metrics"
#: Generous bound on any wait in these tests: a hang fails the test instead of the run.
WAIT = 10.0
#: Background polls never fire on their own in tests that call them by hand.
NEVER = 3600.0


def sse(document: Any) -> bytes:
    return b"data: " + json.dumps(document).encode() + b"\n\n"


class EngineServer:
    """A scripted OpenAI-compatible engine server (what vLLM or llama.cpp would be)."""

    def __init__(self, tokens: tuple[str, ...] = ("Hel", "lo", " world")) -> None:
        self.tokens = tokens
        self.models: list[str] | None = ["tiny-model"]  # None: /v1/models answers 404
        self.raw_models: bytes | None = None  # answered by /v1/models instead of a list
        self.health_status = 200
        self.metrics: str | None = None  # None: /metrics answers 404
        self.error: tuple[int, str, bytes] | None = None  # status, content type, body
        self.error_event: dict[str, Any] | None = None  # streamed after the first token
        self.gated = False  # each token after the first waits for release()
        self.hang = False  # after the tokens, send keep-alive comments until disconnected
        self.cut = False  # end the body after the tokens, without finish or [DONE]
        self.whole = False  # ignore ``stream`` and answer one JSON document
        self.raw: bytes | None = None  # stream these bytes instead of chunks
        self.bodies: list[dict[str, Any]] = []
        self.seen: list[tuple[str, Headers]] = []  # path and headers of every request
        self.produced = 0
        self.disconnected = anyio.Event()
        self.models_polls = 0
        self._allowed = 1
        self._changed = anyio.Event()
        self._polled = anyio.Event()
        self.port = 0

    @asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        """Serve until the block ends (on the same port as the last run, if any)."""
        async with anyio.create_task_group() as tg:
            shutdown = anyio.Event()
            start = functools.partial(
                serve, self.handle, port=self.port, shutdown=shutdown, shutdown_timeout=0.1
            )
            info = await tg.start(start)
            self.port = info.port
            try:
                yield info.url
            finally:
                shutdown.set()

    def release(self) -> None:
        """Let the next gated token be produced."""
        self._allowed += 1
        self._changed.set()

    async def wait_models_polls(self, count: int) -> None:
        target = self.models_polls + count
        while self.models_polls < target:
            self._polled = anyio.Event()
            await self._polled.wait()

    async def handle(self, request: Request) -> Response:
        self.seen.append((request.path, request.headers))
        path = request.path
        if path == "/v1/models":
            self.models_polls += 1
            self._polled.set()
            if self.raw_models is not None:
                return Response(200, [("content-type", "text/html")], self.raw_models)
            if self.models is None:
                raise HTTPError(404, "no such route")
            data = [{"id": m, "object": "model", "owned_by": "test"} for m in self.models]
            return Response.json({"object": "list", "data": data})
        if path == "/health":
            return Response(self.health_status)
        if path == "/metrics":
            if self.metrics is None:
                raise HTTPError(404, "Not Found")
            return Response.text(self.metrics, content_type="text/plain; version=0.0.4")
        if path in ("/v1/chat/completions", "/v1/completions") and request.method == "POST":
            body = await request.json()
            self.bodies.append(body)
            if self.error is not None:
                status, content_type, payload = self.error
                return Response(status, [("content-type", content_type)], payload)
            kind = "chat" if path == "/v1/chat/completions" else "completion"
            if self.raw is not None:
                return Response(200, [("content-type", "text/event-stream")], self.raw)
            if self.whole:
                text = "".join(self.tokens)
                choice = {"index": 0, "text": text, "finish_reason": "stop"}
                if kind == "chat":
                    choice = {"index": 0, "message": {"content": text}, "finish_reason": "stop"}
                usage = {"prompt_tokens": 5, "completion_tokens": len(self.tokens)}
                return Response.json({"choices": [choice], "usage": usage})
            return Response(200, [("content-type", "text/event-stream")], self.stream(kind, body))
        raise HTTPError(404, f"no route {path}")

    def chunk(self, kind: str, text: str | None, finish: str | None) -> dict[str, Any]:
        if kind == "chat":
            choice: dict[str, Any] = {"index": 0, "delta": {}, "finish_reason": finish}
            if text is not None:
                choice["delta"] = {"content": text}
            return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": [choice]}
        choice = {"index": 0, "text": text or "", "finish_reason": finish}
        return {"id": "cmpl-1", "object": "text_completion", "choices": [choice]}

    async def stream(self, kind: str, body: dict[str, Any]) -> AsyncIterator[bytes]:
        finished = False
        try:
            if kind == "chat":
                first = {"choices": [{"index": 0, "delta": {"role": "assistant"}}]}
                yield sse(first)
            for index, token in enumerate(self.tokens):
                if self.gated:
                    while self._allowed <= index:
                        self._changed = anyio.Event()
                        await self._changed.wait()
                self.produced += 1
                yield sse(self.chunk(kind, token, None))
                if self.error_event is not None:
                    yield sse(self.error_event)
                    finished = True
                    return
            while self.hang:  # a long generation: the engine server keeps writing
                await anyio.sleep(0.005)
                yield b": keep-alive\n\n"
            if self.cut:
                finished = True
                return
            yield sse(self.chunk(kind, None, "length"))
            if body.get("stream_options", {}).get("include_usage"):
                usage = {"prompt_tokens": 7, "completion_tokens": len(self.tokens)}
                yield sse({"id": "x", "choices": [], "usage": usage})
            yield b"data: [DONE]\n\n"
            finished = True
        finally:
            if not finished:
                self.disconnected.set()


def chat(**fields: Any) -> GenerationRequest:
    fields.setdefault("messages", ({"role": "user", "content": "hi"},))
    return GenerationRequest(request_id="req-1", model="tiny-model", kind="chat", **fields)


def completion(**fields: Any) -> GenerationRequest:
    fields.setdefault("prompt", "Once upon")
    return GenerationRequest(request_id="req-2", model="tiny-model", kind="completion", **fields)


async def collect(engine: OpenAIEngine, request: GenerationRequest) -> list[TokenChunk]:
    async with aclosing(engine.generate(request)) as stream:
        return [chunk async for chunk in stream]


@pytest.fixture
async def server() -> EngineServer:
    return EngineServer()  # built in the test's event loop (it holds anyio events)


# -- generation -----------------------------------------------------------------------------


async def test_chat_streams_each_token_before_the_next_is_produced(server: EngineServer) -> None:
    server.gated = True
    async with server.running() as url, OpenAIEngine(url, poll_interval=NEVER) as engine:
        chunks = []
        with anyio.fail_after(WAIT):  # a buffering engine would wait forever for token 2
            async with aclosing(engine.generate(chat())) as stream:
                async for chunk in stream:
                    chunks.append(chunk)
                    if len(chunks) <= len(server.tokens):
                        assert server.produced == len(chunks)  # nothing produced ahead
                    server.release()
    assert chunks == [
        TokenChunk("Hel", 0, 1),
        TokenChunk("lo", 0, 2),
        TokenChunk(" world", 0, 3),
        TokenChunk("", 7, 3, "length"),  # the engine server's own usage
    ]


async def test_completion_streams_through(server: EngineServer) -> None:
    async with server.running() as url, OpenAIEngine(url, poll_interval=NEVER) as engine:
        chunks = await collect(engine, completion(prompt="Once"))
    assert "".join(c.text for c in chunks) == "Hello world"
    assert chunks[-1] == TokenChunk("", 7, 3, "length")
    assert server.bodies[0]["prompt"] == "Once"
    assert "messages" not in server.bodies[0]
    assert server.seen[-1][0] == "/v1/completions"


async def test_request_fields_and_extras_are_forwarded(server: EngineServer) -> None:
    request = chat(
        max_tokens=12,
        stop=("\n", "END"),
        temperature=0.2,
        seed=42,
        extra={"top_p": 0.9, "stream": False, "stream_options": {"include_usage": False}},
    )
    async with server.running() as url, OpenAIEngine(url, poll_interval=NEVER) as engine:
        await collect(engine, request)
    assert server.bodies == [
        {
            "top_p": 0.9,
            "model": "tiny-model",
            "stream": True,  # always streamed, always with usage, whatever the extras say
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 12,
            "stop": ["\n", "END"],
            "temperature": 0.2,
            "seed": 42,
        }
    ]
    path, headers = server.seen[-1]
    assert path == "/v1/chat/completions"
    assert headers.get("x-request-id") == "req-1"
    assert headers.get("authorization") is None


def test_encode_request_leaves_out_what_is_unset() -> None:
    body = json.loads(encode_request(completion(extra={"messages": ["stray"]})))
    assert body == {
        "model": "tiny-model",
        "stream": True,
        "stream_options": {"include_usage": True},
        "prompt": "Once upon",
    }


async def test_api_key_is_sent_and_never_logged(
    server: EngineServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    server.metrics = (METRICS / "vllm.txt").read_text()
    secret = "sk-very-secret-key"
    async with (
        server.running() as url,
        OpenAIEngine(url, api_key=secret, poll_interval=NEVER) as engine,
    ):
        await collect(engine, chat())
    for path in ("/v1/models", "/metrics", "/v1/chat/completions"):
        sent = [h.get("authorization") for p, h in server.seen if p == path]
        assert sent, path
        assert set(sent) == {f"Bearer {secret}"}
    assert caplog.records  # the engine did log, just not the key
    assert all(secret not in record.getMessage() for record in caplog.records)


async def test_connections_are_reused_after_a_complete_stream(server: EngineServer) -> None:
    async with (
        server.running() as url,
        HTTPClient() as client,
        OpenAIEngine(url, client=client, poll_interval=NEVER) as engine,
    ):
        await collect(engine, chat())
        opened = client.pool_stats().opened
        await collect(engine, chat())
        await collect(engine, completion())
        assert client.pool_stats().opened == opened


async def test_generations_have_max_connections_and_polls_a_client_of_their_own(
    server: EngineServer,
) -> None:
    server.gated = True  # each stream sends its first token, then holds its connection
    limit = 3
    short_pool_wait = Timeouts(connect=5.0, read=WAIT, write=5.0, pool=0.05)
    async with (
        server.running() as url,
        OpenAIEngine(
            url, max_connections=limit, timeouts=short_pool_wait, poll_interval=0.01
        ) as engine,
        AsyncExitStack() as streams,
    ):
        for _ in range(limit):
            stream = await streams.enter_async_context(aclosing(engine.generate(chat())))
            with anyio.fail_after(WAIT):
                assert (await stream.__anext__()).text == "Hel"
        # Every generation connection is taken: one more waits for the pool and gives up ...
        with pytest.raises(EngineError, match="no connection") as caught:
            await collect(engine, chat())
        assert caught.value.status == 503
        # ... while the health polls still reach the server, and the node stays ready.
        with anyio.fail_after(WAIT):
            await server.wait_models_polls(2)
        assert engine.ready()
        assert engine.max_connections == limit


async def test_a_server_that_ignores_stream_still_works(server: EngineServer) -> None:
    server.whole = True
    async with server.running() as url, OpenAIEngine(url, poll_interval=NEVER) as engine:
        assert await collect(engine, chat()) == [TokenChunk("Hello world", 5, 3, "stop")]
        assert await collect(engine, completion()) == [TokenChunk("Hello world", 5, 3, "stop")]


# -- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "content_type", "body", "message", "temporary"),
    [
        (
            400,
            "application/json",
            b'{"error": {"message": "maximum context length is 8192 tokens", "code": 400}}',
            "maximum context length is 8192 tokens",
            False,
        ),
        (
            404,
            "application/json",
            b'{"object": "error", "message": "The model `x` does not exist.", "code": 404}',
            "The model `x` does not exist.",
            False,
        ),
        (
            422,
            "application/json",
            b'{"error": "Input validation error"}',
            "Input validation",
            False,
        ),
        (500, "application/json", b'{"error": {"message": "CUDA error"}}', "CUDA error", True),
        (503, "text/plain", b"Loading model", "Loading model", True),
        (502, "text/html", b"", "Bad Gateway", True),
    ],
)
async def test_error_answers_become_engine_errors(
    server: EngineServer,
    status: int,
    content_type: str,
    body: bytes,
    message: str,
    temporary: bool,
) -> None:
    server.error = (status, content_type, body)
    async with server.running() as url, OpenAIEngine(url, poll_interval=NEVER) as engine:
        with pytest.raises(EngineError, match=message) as caught:
            await collect(engine, chat())
        assert engine.ready()  # an error answer is an answer: the engine is up
    assert (caught.value.status, caught.value.temporary) == (status, temporary)


async def test_an_error_event_mid_stream(server: EngineServer) -> None:
    server.error_event = {"error": {"message": "engine died", "code": 500}}
    async with (
        server.running() as url,
        OpenAIEngine(url, poll_interval=NEVER) as engine,
        aclosing(engine.generate(chat())) as stream,
    ):
        assert await stream.__anext__() == TokenChunk("Hel", 0, 1)
        with pytest.raises(EngineError, match="engine died") as caught:
            await stream.__anext__()
    assert (caught.value.status, caught.value.temporary) == (500, True)


async def test_a_stream_cut_short_is_a_temporary_bad_gateway(server: EngineServer) -> None:
    server.cut = True
    async with server.running() as url, OpenAIEngine(url, poll_interval=NEVER) as engine:
        with pytest.raises(EngineError, match="ended before") as caught:
            await collect(engine, completion())
    assert (caught.value.status, caught.value.temporary) == (502, True)


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"data: {not json\n\n", "unreadable event"),
        (b"data: " + b"x" * (MAX_EVENT_BYTES + 1), "event stream is broken"),
    ],
)
async def test_a_broken_event_stream_is_a_bad_gateway(
    server: EngineServer, raw: bytes, problem: str
) -> None:
    server.raw = raw
    async with server.running() as url, OpenAIEngine(url, poll_interval=NEVER) as engine:
        with pytest.raises(EngineError, match=problem) as caught:
            await collect(engine, chat())
    assert caught.value.status == 502


# -- cancellation ---------------------------------------------------------------------------


async def test_closing_the_stream_disconnects_the_engine_server(server: EngineServer) -> None:
    server.tokens = ("first",)
    server.hang = True  # a long generation still running upstream
    async with server.running() as url, OpenAIEngine(url, poll_interval=NEVER) as engine:
        stream = engine.generate(chat())
        with anyio.fail_after(WAIT):
            assert (await stream.__anext__()).text == "first"
            await stream.aclose()
            await server.disconnected.wait()  # the engine server saw the client go


async def test_cancelling_the_consumer_disconnects_the_engine_server(server: EngineServer) -> None:
    server.tokens = ("first",)
    server.hang = True
    got_first = anyio.Event()

    async def consume(engine: OpenAIEngine) -> None:
        async with aclosing(engine.generate(chat())) as stream:
            async for _ in stream:
                got_first.set()

    async with server.running() as url, OpenAIEngine(url, poll_interval=NEVER) as engine:
        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as tg:
                tg.start_soon(consume, engine)
                await got_first.wait()
                tg.cancel_scope.cancel()
            await server.disconnected.wait()


async def test_closing_the_engine_fails_its_generations(server: EngineServer) -> None:
    server.tokens = ("first",)
    server.hang = True
    async with server.running() as url:
        engine = OpenAIEngine(url, poll_interval=NEVER)
        await engine.start()
        async with aclosing(engine.generate(chat())) as stream:
            with anyio.fail_after(WAIT):
                assert (await stream.__anext__()).text == "first"
            # start() and aclose() from the same task, no cancel scope left open between
            await engine.aclose()
            assert not engine.ready()
            with anyio.fail_after(WAIT):
                with pytest.raises(EngineError, match="shutting down") as caught:
                    await stream.__anext__()  # at the next keep-alive from upstream
                await server.disconnected.wait()
        assert caught.value.status == 503


# -- readiness and models ---------------------------------------------------------------------


async def test_readiness_follows_the_engine_server(server: EngineServer) -> None:
    async with server.running() as url:
        pass  # learn a port, then leave it closed
    async with OpenAIEngine(url, poll_interval=NEVER) as engine:
        assert not engine.ready()  # a server that is down does not fail start()
        assert engine.models() == []
        async with server.running():
            await engine.poll_health()
            assert engine.ready()
            assert engine.models() == ["tiny-model"]
        # gone: the next request fails at once and marks the engine not ready, no poll needed
        with pytest.raises(EngineError, match="cannot reach") as caught:
            await collect(engine, chat())
        assert (caught.value.status, caught.value.temporary) == (503, True)
        assert not engine.ready()
        async with server.running():
            await engine.poll_health()
            assert engine.ready()
            assert len(await collect(engine, chat())) == 4
        await engine.poll_health()
        assert not engine.ready()


async def test_background_polls_follow_the_models(server: EngineServer) -> None:
    async with server.running() as url, OpenAIEngine(url, poll_interval=0.01) as engine:
        assert engine.models() == ["tiny-model"]
        server.models = ["tiny-model", "tiny-model-lora"]
        with anyio.fail_after(WAIT):
            # polls run one after another: once the second after the change has
            # reached the server, the first one's answer has been taken in
            await server.wait_models_polls(2)
        assert engine.models() == ["tiny-model", "tiny-model-lora"]
        server.models = []
        with anyio.fail_after(WAIT):
            await server.wait_models_polls(2)
        assert not engine.ready()  # nothing to serve


async def test_configured_models_and_a_server_with_only_health(server: EngineServer) -> None:
    server.models = None  # e.g. an older TGI: no /v1/models
    async with (
        server.running() as url,
        OpenAIEngine(url + "/v1/", models=["my-alias"], poll_interval=NEVER) as engine,
    ):
        assert engine.ready()
        assert engine.models() == ["my-alias"]
        server.health_status = 503  # llama.cpp while it loads the model
        await engine.poll_health()
        assert not engine.ready()
    polled = [p for p, _ in server.seen if p != "/metrics"]
    assert polled == ["/v1/models", "/health", "/v1/models", "/health"]


async def test_a_configured_model_the_server_does_not_list_is_not_ready(
    server: EngineServer, caplog: pytest.LogCaptureFixture
) -> None:
    async with (
        server.running() as url,
        OpenAIEngine(url, models=["llama3"], poll_interval=0.01) as engine,
    ):
        assert not engine.ready()
        assert engine.models() == ["llama3"]
        with anyio.fail_after(WAIT):
            await server.wait_models_polls(2)
        assert not engine.ready()
        server.models = ["tiny-model", "llama3"]  # the operator fixed the engine server
        with anyio.fail_after(WAIT):
            while not engine.ready():
                await server.wait_models_polls(1)
    wrong = "serves tiny-model, not the configured model llama3"
    assert [r.levelname for r in caplog.records if wrong in r.getMessage()] == ["WARNING"]


async def test_a_configured_model_and_a_models_answer_that_is_no_list(
    server: EngineServer,
) -> None:
    server.raw_models = b"<html>models</html>"  # nothing to check the name against
    async with (
        server.running() as url,
        OpenAIEngine(url, models=["llama3"], poll_interval=NEVER) as engine,
    ):
        assert engine.ready()


async def test_without_configured_models_a_server_without_a_model_list_is_not_ready(
    server: EngineServer, caplog: pytest.LogCaptureFixture
) -> None:
    server.models = None
    async with server.running() as url, OpenAIEngine(url, poll_interval=NEVER) as engine:
        assert not engine.ready()
    assert "cannot be discovered: configure them" in caplog.text  # the operator's next step


async def test_generate_needs_a_started_engine() -> None:
    engine = OpenAIEngine("http://127.0.0.1:9")
    with pytest.raises(EngineError, match="new") as caught:
        await collect(engine, chat())
    assert caught.value.status == 503
    await engine.aclose()


@pytest.mark.parametrize(
    ("url", "kwargs", "problem"),
    [
        ("127.0.0.1:8000", {}, "absolute http"),
        ("ftp://host/", {}, "absolute http"),
        ("http://host:99999", {}, "port"),
        ("http://host", {"poll_interval": 0}, "poll_interval"),
        ("http://host", {"max_connections": 0}, "max_connections"),
        ("http://host", {"models": [""]}, "models"),
        ("http://host", {"models": []}, "None: discover"),
        ("http://host", {"metrics_url": "nope"}, "absolute http"),
    ],
)
def test_bad_configuration_is_a_clear_value_error(
    url: str, kwargs: dict[str, Any], problem: str
) -> None:
    with pytest.raises(ValueError, match=problem):
        OpenAIEngine(url, **kwargs)


def test_model_ids_shapes() -> None:
    assert model_ids({"object": "list", "data": [{"id": "a"}, {"id": ""}, "x", {"id": "b"}]}) == [
        "a",
        "b",
    ]
    assert model_ids({"id": "tgi", "object": "model"}) == ["tgi"]
    assert model_ids({"models": []}) is None
    assert model_ids([]) is None


# -- load from the engine server's metrics ------------------------------------------------------


@pytest.mark.parametrize(
    ("fixture", "expected"),
    [
        ("vllm.txt", EngineStats(5, 1, pytest.approx(0.30), None)),  # type: ignore[arg-type]
        ("vllm_v0.txt", EngineStats(12, 7, 0.8734, 431.7)),
        ("sglang.txt", EngineStats(24, 9, 0.62, 1487.35)),
        ("llamacpp.txt", EngineStats(2, 4, 0.125, 39.42)),
        ("tgi.txt", EngineStats(17, 6, None, None)),
        ("generic.txt", EngineStats()),
    ],
)
async def test_metrics_of_each_server_family_over_http(
    server: EngineServer, fixture: str, expected: EngineStats
) -> None:
    server.metrics = (METRICS / fixture).read_text()
    async with server.running() as url, OpenAIEngine(url, poll_interval=NEVER) as engine:
        assert engine.stats() == expected  # read by start(), before any request


async def test_tokens_per_second_from_the_counter_between_scrapes(server: EngineServer) -> None:
    text = (METRICS / "llamacpp.txt").read_text()
    server.metrics = text
    async with server.running() as url, OpenAIEngine(url, poll_interval=NEVER) as engine:
        assert engine.stats().tokens_per_second == 39.42  # one scrape: the server's gauge
        server.metrics = text.replace("tokens_predicted_total 9342", "tokens_predicted_total 99342")
        await engine.scrape_metrics()
        rate = engine.stats().tokens_per_second
        assert rate is not None
        assert rate > 39.42  # 90000 tokens over the few moments between the scrapes


async def test_background_scrapes_follow_the_metrics(server: EngineServer) -> None:
    text = (METRICS / "sglang.txt").read_text()
    server.metrics = text
    async with server.running() as url, OpenAIEngine(url, poll_interval=0.01) as engine:
        assert engine.stats().waiting == 9
        server.metrics = text.replace("sglang:num_queue_reqs{", "sglang:num_queue_reqs_old{")
        with anyio.fail_after(WAIT):
            # metrics are scraped right after each health poll interval; two polls
            # after the change, at least one scrape has seen it (same interval)
            while engine.stats().waiting is not None:
                await server.wait_models_polls(1)
        assert engine.stats().running == 24


async def test_an_engine_server_without_metrics_still_works(server: EngineServer) -> None:
    async with server.running() as url, OpenAIEngine(url, poll_interval=NEVER) as engine:
        assert engine.ready()
        assert engine.stats() == EngineStats()
        assert len(await collect(engine, chat())) == 4
        server.metrics = (METRICS / "vllm_v0.txt").read_text()
        await engine.scrape_metrics()
        assert engine.stats().running == 12
        server.metrics = None  # metrics gone: unknown, not stale
        await engine.scrape_metrics()
        assert engine.stats() == EngineStats()


async def test_metrics_url_elsewhere_gets_no_api_key(server: EngineServer) -> None:
    exporter = EngineServer()
    exporter.metrics = (METRICS / "tgi.txt").read_text()
    async with server.running() as url, exporter.running() as exporter_url:
        metrics_url = exporter_url.replace("127.0.0.1", "localhost") + "/metrics"
        async with OpenAIEngine(
            url, metrics_url=metrics_url, api_key="sk-x", poll_interval=NEVER
        ) as engine:
            assert engine.stats().waiting == 6
    assert [h.get("authorization") for _, h in exporter.seen] == [None]


async def test_metrics_url_that_refuses_connections(server: EngineServer) -> None:
    closed = EngineServer()
    async with closed.running() as closed_url:
        pass
    async with (
        server.running() as url,
        OpenAIEngine(url, metrics_url=closed_url + "/metrics", poll_interval=NEVER) as engine,
    ):
        assert engine.ready()
        assert engine.stats() == EngineStats()
