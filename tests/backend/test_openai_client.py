"""The backend's OpenAI API through the official ``openai`` client, on the sim engine.

A backend runs in process (``serve_backend`` on 127.0.0.1, port 0) over a real
:class:`SimEngine`; every request goes over a loopback socket, and every
answer is read by the client applications use, so a format slip shows up as
the client's own parse error or typed exception.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import openai
import pytest
from anyio.lowlevel import checkpoint
from inferno_backend.engines.base import Engine, EngineError, GenerationRequest, TokenChunk
from inferno_backend.engines.sim import SimEngine, SimFaults
from inferno_backend.gpu import GPUSampler
from inferno_backend.profiles import load_profile
from inferno_backend.role import BackendInfo, serve_backend
from inferno_backend.settings import BackendSettings
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam

from inferno.metrics import Registry

pytestmark = pytest.mark.anyio

#: Bound on every wait: a hang fails the test instead of the run.
WAIT = 10.0
#: Sim speed factor: cpu-tiny steps take 2 ms of simulated time, 40 µs at this speed.
FAST = 50.0
MODEL = "sim-tiny"  # the cpu-tiny profile's model
HELLO: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "Say hello to the simulator."}
]


def no_nvml() -> Any:
    raise ImportError("no nvidia-ml-py in this test")


class StepClock:
    """A sim clock that advances one engine step per permit the test grants.

    With no permit left the scheduler waits, so no further token can be
    generated: whatever the client has received by then was sent before the
    rest of the generation existed.
    """

    def __init__(self) -> None:
        self._now = 0.0
        self._permits = 0
        self._granted: anyio.Event | None = None
        self.steps = 0

    def now(self) -> float:
        return self._now

    async def sleep_until(self, deadline: float) -> None:
        await checkpoint()
        if deadline <= self._now:
            return
        while self._permits == 0:
            self._granted = anyio.Event()
            await self._granted.wait()
        self._permits -= 1
        self.steps += 1
        self._now = deadline

    def allow(self, steps: int) -> None:
        self._permits += steps
        if self._granted is not None:
            self._granted.set()


@dataclass
class Node:
    info: BackendInfo
    registry: Registry
    stopping: anyio.Event

    @property
    def base_url(self) -> str:
        return f"{self.info.service.url}/v1"

    def client(self) -> AsyncOpenAI:
        return AsyncOpenAI(base_url=self.base_url, api_key="x", max_retries=0, timeout=WAIT)


@asynccontextmanager
async def backend(engine: Engine | None = None, **options: Any) -> AsyncIterator[Node]:
    """A backend on the sim engine (cpu-tiny, fast) until the block ends."""
    if engine is None:
        engine = SimEngine(load_profile("cpu-tiny"), speed=FAST)
    settings = BackendSettings(**{"port": 0, "ops_port": 0, "drain_timeout": 1.0, **options})
    registry = Registry()
    stopping = anyio.Event()
    async with anyio.create_task_group() as tg:
        start = functools.partial(
            serve_backend,
            settings,
            engine,
            registry=registry,
            stopping=stopping,
            shutdown_timeout=WAIT,
            gpu=GPUSampler(load_nvml=no_nvml),
        )
        info = await tg.start(start)
        try:
            yield Node(info, registry, stopping)
        finally:
            tg.cancel_scope.cancel()


# -- non-streaming -------------------------------------------------------------------------


async def test_models_are_listed_and_retrieved() -> None:
    async with backend() as node, node.client() as client:
        models = await client.models.list()
        assert [m.id for m in models.data] == [MODEL]
        assert (await client.models.retrieve(MODEL)).id == MODEL
        with pytest.raises(openai.NotFoundError) as caught:
            await client.models.retrieve("no-such-model")
        assert caught.value.code == "model_not_found"


async def test_chat_completion_with_usage_and_max_tokens() -> None:
    async with backend() as node, node.client() as client:
        answer = await client.chat.completions.create(
            model=MODEL, messages=HELLO, max_tokens=7, extra_body={"ignore_eos": True}
        )
        choice = answer.choices[0]
        assert answer.object == "chat.completion"
        assert answer.model == MODEL
        assert choice.message.role == "assistant"
        assert choice.message.content
        assert choice.finish_reason == "length"
        assert answer.usage is not None
        assert answer.usage.completion_tokens == 7
        assert answer.usage.prompt_tokens > 0
        assert answer.usage.total_tokens == answer.usage.prompt_tokens + 7


async def test_max_completion_tokens_wins_for_chat() -> None:
    async with backend() as node, node.client() as client:
        answer = await client.chat.completions.create(
            model=MODEL,
            messages=HELLO,
            max_tokens=9,
            max_completion_tokens=3,
            extra_body={"ignore_eos": True},
        )
        assert answer.usage is not None
        assert answer.usage.completion_tokens == 3


async def test_completion_text_is_deterministic_and_seeded() -> None:
    async with backend() as node, node.client() as client:
        first = await client.completions.create(
            model=MODEL, prompt="Once upon a time", max_tokens=12
        )
        again = await client.completions.create(
            model=MODEL, prompt="Once upon a time", max_tokens=12
        )
        other = await client.completions.create(
            model=MODEL, prompt="Once upon a time", max_tokens=12, seed=7, temperature=0.3
        )
        assert first.object == "text_completion"
        assert first.choices[0].text
        assert first.choices[0].text == again.choices[0].text
        assert other.choices[0].text != first.choices[0].text  # the seed reaches the engine
        assert first.usage is not None
        assert 0 < first.usage.completion_tokens <= 12


async def test_stop_string_cuts_the_text() -> None:
    async with backend() as node, node.client() as client:
        full = await client.completions.create(
            model=MODEL, prompt="Tell a story", max_tokens=30, extra_body={"ignore_eos": True}
        )
        text = full.choices[0].text
        word = text.split()[3]
        cut = await client.completions.create(
            model=MODEL,
            prompt="Tell a story",
            max_tokens=30,
            stop=[word, "never-appears"],
            extra_body={"ignore_eos": True},
        )
        assert cut.choices[0].text == text[: text.index(word)]
        assert cut.choices[0].finish_reason == "stop"


# -- streaming -------------------------------------------------------------------------------


async def test_chat_stream_matches_the_whole_answer_and_ends_with_usage() -> None:
    async with backend() as node, node.client() as client:
        whole = await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=20)
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=HELLO,
            max_tokens=20,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
        content = [c.choices[0].delta.content or "" for c in chunks if c.choices]
        assert len(content) > 1
        assert "".join(content) == whole.choices[0].message.content
        assert chunks[0].choices[0].delta.role == "assistant"
        assert {c.id for c in chunks} == {chunks[0].id}
        finishing = [c.choices[0].finish_reason for c in chunks if c.choices]
        assert finishing[-1] == whole.choices[0].finish_reason
        assert all(reason is None for reason in finishing[:-1])
        assert chunks[-1].choices == []
        assert chunks[-1].usage is not None
        assert whole.usage is not None
        assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


async def test_completion_stream_without_usage() -> None:
    async with backend() as node, node.client() as client:
        whole = await client.completions.create(model=MODEL, prompt="The sea", max_tokens=15)
        stream = await client.completions.create(
            model=MODEL, prompt="The sea", max_tokens=15, stream=True
        )
        chunks = [chunk async for chunk in stream]
        assert all(c.usage is None and len(c.choices) == 1 for c in chunks)
        assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
        assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


async def test_first_chunk_arrives_before_the_rest_is_generated() -> None:
    clock = StepClock()
    engine = SimEngine(load_profile("cpu-tiny"), clock=clock)
    async with backend(engine) as node, node.client() as client:
        with anyio.fail_after(WAIT):
            clock.allow(1)  # the prefill step: it produces the first token, and no more
            stream = await client.chat.completions.create(
                model=MODEL,
                messages=HELLO,
                max_tokens=6,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            iterator = stream.__aiter__()
            first = await iterator.__anext__()
            assert first.choices[0].delta.content
            assert clock.steps == 1  # tokens 2..6 do not exist yet
            clock.allow(100)
            rest = [chunk async for chunk in iterator]
        assert rest[-1].choices[0].finish_reason == "length"
        assert clock.steps == 6


# -- errors ------------------------------------------------------------------------------------


async def test_bad_fields_are_400_naming_the_field() -> None:
    async with backend() as node, node.client() as client:
        cases: list[tuple[dict[str, Any], str]] = [
            ({"max_tokens": "ten"}, "max_tokens"),
            ({"max_tokens": 0}, "max_tokens"),
            ({"n": 2}, "n"),
            ({"temperature": 9}, "temperature"),
            ({"stop": [1]}, "stop[0]"),
            ({"stream_options": {"include_usage": True}}, "stream_options"),
            ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
            ({"messages": [{"role": "user"}]}, "messages[0].content"),
            ({"messages": []}, "messages"),
        ]
        for fields, param in cases:
            body = {"messages": HELLO, **fields}
            with pytest.raises(openai.BadRequestError) as caught:
                await client.chat.completions.create(
                    model=MODEL,
                    messages=body.pop("messages"),
                    extra_body=body,
                )
            assert caught.value.param == param, fields
            assert param in caught.value.message
        with pytest.raises(openai.BadRequestError) as caught:
            await client.completions.create(model=MODEL, prompt=None)
        assert caught.value.param == "prompt"


async def test_unknown_model_is_404_model_not_found() -> None:
    async with backend() as node, node.client() as client:
        with pytest.raises(openai.NotFoundError) as caught:
            await client.chat.completions.create(model="gpt-9", messages=HELLO)
        assert caught.value.code == "model_not_found"
        assert caught.value.param == "model"


async def test_body_over_the_limit_is_413() -> None:
    async with backend(max_body_size=4096) as node, node.client() as client:
        long: list[ChatCompletionMessageParam] = [{"role": "user", "content": "word " * 2000}]
        with pytest.raises(openai.APIStatusError) as caught:
            await client.chat.completions.create(model=MODEL, messages=long)
        assert caught.value.status_code == 413


async def test_engine_failure_keeps_its_status_and_asks_for_a_retry() -> None:
    engine = SimEngine(
        load_profile("cpu-tiny"), speed=FAST, faults=SimFaults(failure_rate=1.0, failure_status=503)
    )
    async with backend(engine) as node, node.client() as client:
        with pytest.raises(openai.InternalServerError) as caught:
            await client.chat.completions.create(model=MODEL, messages=HELLO)
        assert caught.value.status_code == 503
        assert caught.value.response.headers["retry-after"] == "1"
        with pytest.raises(openai.InternalServerError):
            await client.completions.create(model=MODEL, prompt="x", stream=True)


class FailingAfter:
    """An engine (the plugin interface) that streams ``good`` chunks from the sim, then fails."""

    name = "failing"

    def __init__(self, inner: SimEngine, good: int) -> None:
        self.inner = inner
        self.good = good

    async def start(self) -> None:
        await self.inner.start()

    async def aclose(self) -> None:
        await self.inner.aclose()

    def models(self) -> list[str]:
        return self.inner.models()

    def ready(self) -> bool:
        return self.inner.ready()

    def stats(self) -> Any:
        return self.inner.stats()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenChunk]:
        produced = 0
        async for chunk in self.inner.generate(request):
            if produced == self.good:
                raise EngineError("the engine server went away", status=502)
            produced += 1
            yield chunk


async def test_failure_mid_stream_reaches_the_client_as_an_error() -> None:
    engine = FailingAfter(SimEngine(load_profile("cpu-tiny"), speed=FAST), good=2)
    async with backend(engine) as node, node.client() as client:
        stream = await client.chat.completions.create(
            model=MODEL, messages=HELLO, max_tokens=50, stream=True, extra_body={"ignore_eos": True}
        )
        received: list[Any] = []

        async def read_all() -> None:
            async for chunk in stream:
                received.append(chunk)

        with pytest.raises(openai.APIError, match="went away"):
            await read_all()
        assert len(received) == 2
