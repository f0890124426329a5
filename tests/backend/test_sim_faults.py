"""The ``sim`` engine's injected faults, and cancellation freeing slots and KV at once."""

from __future__ import annotations

import dataclasses
import gc
import subprocess
import sys
import textwrap
from typing import Any

import anyio
import pytest
from inferno_backend.engines.base import EngineError, GenerationRequest, TokenChunk
from inferno_backend.engines.sim import CRASH_EXIT_STATUS, SimEngine, SimFaults, VirtualClock
from inferno_backend.profiles import load_profile

pytestmark = pytest.mark.anyio

PROFILE = load_profile("cpu-tiny")


def request(seed: int = 0, max_tokens: int | None = 200) -> GenerationRequest:
    return GenerationRequest(
        request_id=f"r{seed}",
        model=PROFILE.model,
        kind="completion",
        prompt="Write a long essay about rivers." * 20,
        max_tokens=max_tokens,
        seed=seed,
    )


def engine_with(faults: SimFaults | None = None, **profile_changes: Any) -> SimEngine:
    profile = dataclasses.replace(PROFILE, **profile_changes)
    return SimEngine(profile, clock=VirtualClock(), faults=faults)


async def outcome(engine: SimEngine, seed: int) -> str:
    """``"ok"`` or the status of the error a request ends with."""
    try:
        async for _ in engine.generate(request(seed, max_tokens=3)):
            pass
    except EngineError as exc:
        error = exc
    else:
        return "ok"
    assert error.temporary
    assert "simulated failure" in str(error)
    return str(error.status)


async def outcomes(faults: SimFaults, n: int) -> list[str]:
    async with engine_with(faults) as engine:
        return [await outcome(engine, i) for i in range(n)]


def test_faults_are_validated() -> None:
    with pytest.raises(ValueError, match="failure_rate"):
        SimFaults(failure_rate=1.5)
    with pytest.raises(ValueError, match="stall_rate"):
        SimFaults(stall_rate=-0.1)
    with pytest.raises(ValueError, match="failure_status"):
        SimFaults(failure_status=200)
    with pytest.raises(ValueError, match="crash_after_requests"):
        SimFaults(crash_after_requests=-1)


def test_faults_parse_from_a_one_line_option() -> None:
    assert SimFaults.parse("") == SimFaults()
    assert SimFaults.parse(" failure_rate=0.25, stall_after_tokens = 5,seed=3 ") == SimFaults(
        failure_rate=0.25, stall_after_tokens=5, seed=3
    )
    with pytest.raises(ValueError, match="'fail=1' is not key=value with a key among"):
        SimFaults.parse("fail=1")
    with pytest.raises(ValueError, match="stall_after_tokens must be int, got 'x'"):
        SimFaults.parse("stall_after_tokens=x")
    with pytest.raises(ValueError, match=r"sim faults: failure_rate must be within 0\.\.1"):
        SimFaults.parse("failure_rate=2")


async def test_failure_rate_fails_a_deterministic_share_of_requests() -> None:
    faults = SimFaults(failure_rate=0.3, failure_status=503, seed=7)
    first = await outcomes(faults, 60)
    assert first == await outcomes(faults, 60)  # same seed, same requests fail
    assert set(first) == {"ok", "503"}
    assert 8 <= first.count("503") <= 28
    assert first != await outcomes(SimFaults(failure_rate=0.3, failure_status=503, seed=8), 60)
    assert set(await outcomes(SimFaults(failure_rate=1.0), 5)) == {"500"}
    assert set(await outcomes(SimFaults(failure_rate=0.0), 5)) == {"ok"}


async def test_stall_after_n_tokens_hangs_the_request_holding_its_slot_and_kv() -> None:
    received: list[TokenChunk] = []
    async with engine_with(SimFaults(stall_after_tokens=3)) as engine:
        async with anyio.create_task_group() as tg:

            async def consume() -> None:
                async for chunk in engine.generate(request()):
                    received.append(chunk)

            tg.start_soon(consume)
            await anyio.wait_all_tasks_blocked()  # the scheduler idles: nothing left to do
            assert [c.completion_tokens for c in received] == [1, 2, 3]
            assert received[-1].finish_reason is None  # never ends
            stats = engine.stats()
            assert stats.running == 1
            assert stats.kv_cache_usage is not None
            assert stats.kv_cache_usage > 0
            tg.cancel_scope.cancel()  # the client gives up
        assert engine.stats().running == 0
        assert engine.stats().kv_cache_usage == 0.0


async def stalled_requests(faults: SimFaults, n: int) -> list[int]:
    """Indices of the ``n`` concurrent requests that stalled."""
    done: set[int] = set()
    async with engine_with(faults) as engine, anyio.create_task_group() as tg:

        async def consume(i: int) -> None:
            async for _ in engine.generate(request(i, max_tokens=30)):
                pass
            done.add(i)

        for i in range(n):
            tg.start_soon(consume, i)
        await anyio.wait_all_tasks_blocked()
        stalled = [i for i in range(n) if i not in done]
        assert engine.stats().running == len(stalled)
        tg.cancel_scope.cancel()
    return stalled


async def test_stall_rate_picks_a_deterministic_share_of_requests() -> None:
    faults = SimFaults(stall_after_tokens=2, stall_rate=0.5, seed=3)
    stalled = await stalled_requests(faults, 20)
    assert 3 <= len(stalled) <= 17
    assert stalled == await stalled_requests(faults, 20)
    assert await stalled_requests(SimFaults(stall_after_tokens=0, stall_rate=0.0), 4) == []


CRASH_SCRIPT = """
import anyio
from inferno_backend.engines.base import GenerationRequest
from inferno_backend.engines.sim import SimEngine, SimFaults, VirtualClock
from inferno_backend.profiles import load_profile

async def main():
    profile = load_profile()
    faults = SimFaults(crash_after_requests=2)
    async with SimEngine(profile, clock=VirtualClock(), faults=faults) as engine:
        for i in range(1, 4):
            request = GenerationRequest(f"req-{i}", profile.model, "completion", prompt="hi")
            async for _ in engine.generate(request):
                pass
            print(f"served {i}", flush=True)

anyio.run(main)
"""


def test_crash_after_n_requests_exits_the_process_with_a_log_line() -> None:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CRASH_SCRIPT)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == CRASH_EXIT_STATUS, result.stderr
    assert result.stdout.splitlines() == ["served 1", "served 2"]
    assert "crashing on purpose" in result.stderr
    assert "crash_after_requests=2" in result.stderr
    assert "req-3" in result.stderr


async def test_closing_a_stream_frees_its_slot_and_kv_at_once() -> None:
    # Requests hang after 5 tokens, so the first one never gives its slot up by itself.
    async with engine_with(SimFaults(stall_after_tokens=5), max_num_seqs=1) as engine:
        first = engine.generate(request(1))
        assert (await first.__anext__()).completion_tokens == 1
        second = engine.generate(request(2))
        received: list[TokenChunk] = []
        async with anyio.create_task_group() as tg:

            async def consume() -> None:
                received.append(await second.__anext__())

            tg.start_soon(consume)
            await anyio.wait_all_tasks_blocked()
            assert engine.stats().waiting == 1  # the only slot is taken
            assert received == []
            await first.aclose()
            stats = engine.stats()  # no scheduler step has run since
            assert (stats.running, stats.waiting) == (0, 1)
        assert received[0].completion_tokens == 1  # the waiting one got the slot
        await second.aclose()
        assert engine.stats().kv_cache_usage == 0.0
        with pytest.raises(StopAsyncIteration):
            await first.__anext__()


async def test_cancelling_the_consuming_task_frees_its_slot_and_kv_at_once() -> None:
    async with engine_with() as engine:
        got_first = anyio.Event()
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:

                async def consume() -> None:
                    async for _ in engine.generate(request(max_tokens=None)):
                        got_first.set()

                tg.start_soon(consume)
                await got_first.wait()
                assert engine.stats().running == 1
                scope.cancel()
        assert scope.cancelled_caught
        stats = engine.stats()
        assert (stats.running, stats.waiting, stats.kv_cache_usage) == (0, 0, 0.0)


async def test_a_dropped_stream_is_freed_before_the_next_step() -> None:
    async with engine_with() as engine:
        stream = engine.generate(request(1))
        await stream.__anext__()
        assert engine.stats().running == 1
        del stream
        gc.collect()
        chunks = [chunk async for chunk in engine.generate(request(2, max_tokens=2))]
        assert chunks[-1].completion_tokens == 2
        assert engine.stats().running == 0
        assert engine.stats().kv_cache_usage == 0.0
