"""The ``sim`` engine end to end on its virtual clock: timing, limits, text, stops, stats."""

from __future__ import annotations

import dataclasses
from typing import Any

import anyio
import pytest
from inferno_backend.engines.base import Engine, EngineError, GenerationRequest, TokenChunk
from inferno_backend.engines.sim import RealClock, SimEngine, VirtualClock
from inferno_backend.engines.simtext import (
    count_tokens,
    natural_length,
    render_chat,
    text_seed,
    tokenize,
)
from inferno_backend.profiles import SimProfile, load_profile

pytestmark = pytest.mark.anyio

# 10 ms per step, 1 ms per decoding sequence, 2 ms per 1,000 context tokens,
# 10,000 prefill tokens/s: expected times can be written down.
PROFILE = dataclasses.replace(
    load_profile("cpu-tiny"),
    prefill_tokens_per_second=10_000.0,
    decode_base_ms=10.0,
    decode_per_seq_ms=1.0,
    decode_per_1k_kv_tokens_ms=2.0,
    max_num_seqs=64,
    max_num_batched_tokens=4096,
    kv_cache_tokens=65536,
    max_model_len=4096,
)
MODEL = PROFILE.model


def profile(**changes: Any) -> SimProfile:
    return dataclasses.replace(PROFILE, **changes)


def request(prompt: str = "Tell me a story.", **fields: Any) -> GenerationRequest:
    return GenerationRequest(
        request_id="r", model=MODEL, kind="completion", prompt=prompt, **fields
    )


def words(n: int) -> str:
    """A prompt of exactly ``n`` tokens."""
    text = " word" * n
    assert count_tokens(text) == n
    return text


async def collect(
    engine: SimEngine, req: GenerationRequest, times: list[float] | None = None
) -> list[TokenChunk]:
    chunks = []
    async for chunk in engine.generate(req):
        chunks.append(chunk)
        if times is not None:
            times.append(engine.clock.now())
    return chunks


def joined(chunks: list[TokenChunk]) -> str:
    return "".join(c.text for c in chunks)


async def first_token_time(prompt_tokens: int) -> float:
    async with SimEngine(PROFILE, clock=VirtualClock()) as engine:
        times: list[float] = []
        await collect(engine, request(words(prompt_tokens), max_tokens=2), times)
        return times[0]


async def test_time_to_first_token_grows_with_prompt_length_as_the_profile_says() -> None:
    for n in (10, 500, 3000):
        assert await first_token_time(n) == pytest.approx(0.010 + n / 10_000)
    # Beyond the 4,096-token step budget the prompt is prefilled in two chunks.
    profile_small_budget = profile(max_num_batched_tokens=1024)
    async with SimEngine(profile_small_budget, clock=VirtualClock()) as engine:
        times: list[float] = []
        await collect(engine, request(words(2000), max_tokens=1), times)
        assert times[0] == pytest.approx(2 * 0.010 + 2000 / 10_000)


async def inter_token_latency(batch: int) -> float:
    """Mean gap between tokens of the first of ``batch`` concurrent identical-size requests."""
    times: list[list[float]] = [[] for _ in range(batch)]
    async with SimEngine(PROFILE, clock=VirtualClock()) as engine, anyio.create_task_group() as tg:
        for i in range(batch):
            # Same prompt size, different seeds; natural lengths are >= 24, so all get 10.
            tg.start_soon(collect, engine, request(words(16), max_tokens=10, seed=i), times[i])
    assert all(len(t) == 10 for t in times)
    assert times[0] == times[-1]  # they advance in lockstep, one batch
    return (times[0][-1] - times[0][0]) / 9


async def test_inter_token_latency_grows_with_batch_size_as_the_profile_says() -> None:
    for batch in (1, 8, 32):
        # Tokens 2..10 each cost one decode step; context grows from 17 to 25 tokens.
        mean_context = sum(range(17, 26)) / 9
        expected = 0.010 + batch * 0.001 + 0.002 * batch * mean_context / 1000
        assert await inter_token_latency(batch) == pytest.approx(expected)


async def test_kv_budget_limits_admission_and_usage_stays_within_one() -> None:
    # 4,096 tokens of KV; each request needs 1,000 + up to 8 tokens: at most 4 at once.
    engine = SimEngine(profile(kv_cache_tokens=4096, max_model_len=2048), clock=VirtualClock())
    seen: list[tuple[int, int, float]] = []
    first_times: list[float] = []

    async def client(i: int) -> None:
        times: list[float] = []
        async for _ in engine.generate(request(words(1000), max_tokens=8, seed=i)):
            times.append(engine.clock.now())
            stats = engine.stats()
            assert stats.running is not None
            assert stats.waiting is not None
            assert stats.kv_cache_usage is not None
            seen.append((stats.running, stats.waiting, stats.kv_cache_usage))
        first_times.append(times[0])

    async with engine, anyio.create_task_group() as tg:
        for i in range(6):
            tg.start_soon(client, i)
    assert max(running for running, _, _ in seen) == 4
    assert max(waiting for _, waiting, _ in seen) == 2
    assert all(0.0 <= usage <= 1.0 for _, _, usage in seen)
    assert max(usage for _, _, usage in seen) == pytest.approx(4 * 63 / 256)
    assert sorted(first_times)[4] > sorted(first_times)[3]  # two had to wait for room
    assert engine.stats().kv_cache_usage == 0.0


async def test_tokens_per_second_is_measured_on_the_simulated_clock() -> None:
    async with SimEngine(PROFILE, clock=VirtualClock()) as engine:
        assert engine.stats().tokens_per_second == 0.0
        produced: list[int] = []

        async def client(i: int) -> None:
            chunks = await collect(engine, request(words(16), max_tokens=50, seed=i))
            produced.append(chunks[-1].completion_tokens)

        async with anyio.create_task_group() as tg:
            for i in range(16):
                tg.start_soon(client, i)
        elapsed = engine.clock.now()
        assert 1.0 < elapsed < 10.0  # inside one averaging window
        stats = engine.stats()
        assert stats.tokens_per_second == pytest.approx(sum(produced) / elapsed)
        # Plausible: below what 16 sequences could do with no per-sequence cost at all.
        assert stats.tokens_per_second is not None
        assert 0 < stats.tokens_per_second < 16 / 0.010
        assert (stats.running, stats.waiting) == (0, 0)


async def test_max_tokens_ends_with_length_and_counts_are_honest() -> None:
    async with SimEngine(PROFILE, clock=VirtualClock()) as engine:
        chunks = await collect(engine, request("Count these tokens, please.", max_tokens=7))
    assert [c.completion_tokens for c in chunks] == list(range(1, 8))
    assert [c.finish_reason for c in chunks] == [None] * 6 + ["length"]
    assert all(c.prompt_tokens == count_tokens("Count these tokens, please.") for c in chunks)
    assert count_tokens(joined(chunks)) == 7


async def test_a_generation_ends_by_itself_at_its_natural_length() -> None:
    prompt = "Tell me a story."
    async with SimEngine(PROFILE, clock=VirtualClock()) as engine:
        chunks = await collect(engine, request(prompt))
    last = chunks[-1]
    assert last.finish_reason == "stop"
    assert last.completion_tokens == natural_length(text_seed(prompt, None))
    assert count_tokens(joined(chunks)) == last.completion_tokens
    assert joined(chunks).startswith(" ")  # a completion continues the prompt
    assert joined(chunks).endswith(".")


async def test_ignore_eos_runs_to_the_limit_as_in_vllm_benchmarks() -> None:
    prompt = "Tell me a story."
    assert natural_length(text_seed(prompt, None)) < 300
    async with SimEngine(PROFILE, clock=VirtualClock()) as engine:
        chunks = await collect(engine, request(max_tokens=300, extra={"ignore_eos": True}))
    assert chunks[-1].completion_tokens == 300
    assert chunks[-1].finish_reason == "length"
    assert count_tokens(joined(chunks)) == 300


async def test_max_model_len_bounds_the_generation() -> None:
    async with SimEngine(profile(max_model_len=50), clock=VirtualClock()) as engine:
        chunks = await collect(engine, request(words(40)))
    assert chunks[-1].completion_tokens == 10
    assert chunks[-1].finish_reason == "length"


async def test_stop_strings_cut_the_text_before_them() -> None:
    async with SimEngine(PROFILE, clock=VirtualClock()) as engine:
        full = joined(await collect(engine, request(max_tokens=60)))
        # A stop that spans two tokens (the end of a word and the next one).
        start = full.index(" ", 20)
        stop = full[start - 2 : start + 4]
        chunks = await collect(engine, request(max_tokens=60, stop=("zzz", stop)))
        text = joined(chunks)
        assert text == full[: full.index(stop)]
        assert chunks[-1].finish_reason == "stop"
        # The token that completed the stop string counts, as in vLLM.
        pieces = tokenize(full)
        completing = next(k for k in range(1, 61) if stop in "".join(pieces[:k]))
        assert chunks[-1].completion_tokens == completing
        assert all(stop not in c.text for c in chunks)
        assert engine.stats().running == 0  # the sequence left the batch at once


async def test_chat_prompts_are_rendered_and_counted() -> None:
    messages = ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"})
    chat = GenerationRequest(
        request_id="c", model=MODEL, kind="chat", messages=messages, max_tokens=5
    )
    async with SimEngine(PROFILE, clock=VirtualClock()) as engine:
        chunks = await collect(engine, chat)
    assert chunks[0].prompt_tokens == count_tokens(render_chat(messages))
    assert joined(chunks)[0].isupper()  # an answer starts a sentence


async def test_text_is_deterministic_per_prompt_and_seed() -> None:
    async def text_of(prompt: str, seed: int | None) -> str:
        async with SimEngine(PROFILE, clock=VirtualClock()) as engine:
            return joined(await collect(engine, request(prompt, seed=seed, max_tokens=40)))

    assert await text_of("alpha", None) == await text_of("alpha", None)
    assert await text_of("alpha", 3) == await text_of("alpha", 3)
    assert await text_of("alpha", None) != await text_of("beta", None)
    assert await text_of("alpha", 3) != await text_of("alpha", 4)


async def test_requests_that_cannot_be_served_are_refused_with_statuses() -> None:
    engine = SimEngine(profile(max_model_len=64), clock=VirtualClock())
    with pytest.raises(EngineError) as not_started:
        await collect(engine, request())
    assert not_started.value.status == 503
    async with engine:
        cases = [
            (request(words(60), max_tokens=10), 400, "context is 64 tokens"),
            (request(words(64)), 400, "context is 64 tokens"),
            (request(""), 400, "empty"),
            (request(max_tokens=0), 400, "at least 1"),
            (dataclasses.replace(request(), model="other"), 404, "not served"),
        ]
        for req, status, text in cases:
            with pytest.raises(EngineError, match=text) as caught:
                await collect(engine, req)
            assert caught.value.status == status
            assert not caught.value.temporary
        assert engine.stats().running == 0


async def test_lifecycle_through_start_and_aclose_as_the_backend_role_uses_it() -> None:
    engine: Engine = SimEngine(PROFILE, model="my-model", clock=VirtualClock())
    assert engine.name == "sim"
    assert engine.models() == ["my-model"]
    assert not engine.ready()
    await engine.start()
    assert engine.ready()
    with pytest.raises(RuntimeError):
        await engine.start()
    stream = engine.generate(dataclasses.replace(request(), model="my-model", max_tokens=1000))
    first = await stream.__anext__()
    assert first.completion_tokens == 1
    await engine.aclose()
    assert not engine.ready()
    with pytest.raises(EngineError, match="shutting down") as caught:
        async for _ in stream:
            pass
    assert caught.value.status == 503
    assert caught.value.temporary
    await engine.aclose()  # idempotent


async def test_the_speed_factor_runs_the_real_clock_faster() -> None:
    """Counts and order only: a sped-up engine on the real clock serves everything."""
    with pytest.raises(ValueError, match="speed"):
        SimEngine(PROFILE, speed=0)
    engine = SimEngine(load_profile("cpu-tiny"), speed=1000)
    assert isinstance(engine.clock, RealClock)
    assert engine.clock.speed == 1000
    results: list[list[TokenChunk]] = [[] for _ in range(3)]
    times: list[list[float]] = [[] for _ in range(3)]

    async def client(i: int) -> None:
        results[i] = await collect(engine, request(words(100), max_tokens=20, seed=i), times[i])

    async with engine, anyio.create_task_group() as tg:
        for i in range(3):
            tg.start_soon(client, i)
    for chunks, stamps in zip(results, times, strict=True):
        counts = [c.completion_tokens for c in chunks]
        assert counts == sorted(set(counts))  # cumulative, increasing
        assert counts[-1] == 20
        assert chunks[-1].finish_reason == "length"
        assert stamps == sorted(stamps)
        # Simulated time never runs short of what the model says the first token takes.
        profile_tiny = load_profile("cpu-tiny")
        assert stamps[0] >= profile_tiny.step_seconds(100, 0, 0)
