"""The ``openai`` engine fronting a second backend: the sim engine behind Inferno's own API.

A real OpenAI-compatible server on a loopback socket, so the engine's reading
of streams, usage, errors and model discovery is checked against a server it
was not written alongside, and the text must match the sim's own output.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from typing import Any

import anyio
import pytest
from inferno_backend.admission import Admission
from inferno_backend.api import InferenceAPI
from inferno_backend.engines.base import EngineError, EngineStats, GenerationRequest, TokenChunk
from inferno_backend.engines.openai import OpenAIEngine
from inferno_backend.engines.sim import SimEngine, VirtualClock
from inferno_backend.profiles import load_profile

from inferno.http.server import serve
from inferno.metrics import Registry

pytestmark = pytest.mark.anyio

PROFILE = load_profile("cpu-tiny")
NEVER = 3600.0  # background polls stay out of the way; the tests poll by hand


@asynccontextmanager
async def sim_backend(port: int = 0) -> AsyncIterator[tuple[str, SimEngine]]:
    """A sim engine served by the backend's inference API on a loopback port."""
    async with SimEngine(PROFILE, clock=VirtualClock()) as sim, anyio.create_task_group() as tg:
        api = InferenceAPI(sim, Admission(8, 8), Registry())
        shutdown = anyio.Event()
        info = await tg.start(functools.partial(serve, api.handle, port=port, shutdown=shutdown))
        try:
            yield info.url, sim
        finally:
            shutdown.set()


async def collect(engine: Any, request: GenerationRequest) -> list[TokenChunk]:
    async with aclosing(engine.generate(request)) as stream:
        return [chunk async for chunk in stream]


def requests() -> list[GenerationRequest]:
    chat = GenerationRequest(
        request_id="chat-1",
        model=PROFILE.model,
        kind="chat",
        messages=({"role": "user", "content": "Tell me about the sea."},),
        max_tokens=24,
        seed=3,
    )
    completion = GenerationRequest(
        request_id="cmpl-1",
        model=PROFILE.model,
        kind="completion",
        prompt="Once upon a time",
        max_tokens=400,
    )
    return [chat, completion]


@pytest.mark.parametrize("request_", requests(), ids=["chat", "completion"])
async def test_text_and_usage_match_the_sim_itself(request_: GenerationRequest) -> None:
    async with SimEngine(PROFILE, clock=VirtualClock()) as direct:
        expected = await collect(direct, request_)
    async with sim_backend() as (url, _), OpenAIEngine(url, poll_interval=NEVER) as engine:
        assert engine.ready()
        assert engine.models() == [PROFILE.model]  # discovered from the backend's /v1/models
        chunks = await collect(engine, request_)
        assert engine.stats() == EngineStats()  # the service port publishes no engine metrics
    assert "".join(c.text for c in chunks) == "".join(c.text for c in expected)
    final, last = chunks[-1], expected[-1]
    assert final.finish_reason == last.finish_reason
    assert (final.prompt_tokens, final.completion_tokens) == (
        last.prompt_tokens,
        last.completion_tokens,
    )
    assert len(chunks) > 2  # streamed, not one piece
    assert all(c.finish_reason is None for c in chunks[:-1])


async def test_the_backends_errors_keep_their_status() -> None:
    unknown = GenerationRequest(
        request_id="r", model="no-such-model", kind="completion", prompt="hi"
    )
    async with sim_backend() as (url, _), OpenAIEngine(url, poll_interval=NEVER) as engine:
        with pytest.raises(EngineError, match="no-such-model") as caught:
            await collect(engine, unknown)
    assert (caught.value.status, caught.value.temporary) == (404, False)


async def test_readiness_follows_the_backend() -> None:
    async with sim_backend() as (url, _):
        pass  # a port with nothing behind it
    async with OpenAIEngine(url, poll_interval=NEVER) as engine:
        assert not engine.ready()
        async with sim_backend(port=int(url.rsplit(":", 1)[1])):
            await engine.poll_health()
            assert engine.ready()
            assert len(await collect(engine, requests()[0])) > 1
