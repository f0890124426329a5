"""The simulator's scheduler and cost model, driven by hand with plain numbers (no clock)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from inferno_backend.engines.simmodel import (
    FINISHED,
    RUNNING,
    WAITING,
    RateWindow,
    SimScheduler,
    SimSequence,
)
from inferno_backend.profiles import SimProfile

# Round numbers so expected times can be written down: 10 ms per step, 1 ms per
# decoding sequence, 2 ms per 1,000 context tokens, 10,000 prefill tokens/s.
PROFILE = SimProfile(
    name="test",
    model="m",
    hardware="h",
    prefill_tokens_per_second=10_000.0,
    decode_base_ms=10.0,
    decode_per_seq_ms=1.0,
    decode_per_1k_kv_tokens_ms=2.0,
    max_num_seqs=8,
    max_num_batched_tokens=512,
    kv_cache_tokens=4096,
    block_size=16,
    max_model_len=2048,
    synthetic=True,
)


def profile(**changes: Any) -> SimProfile:
    return dataclasses.replace(PROFILE, **changes)


def run(scheduler: SimScheduler[SimSequence], now: float = 0.0) -> float:
    """Step until idle; return the time it ends."""
    while (result := scheduler.step(now)) is not None:
        now, _ = result
        assert 0.0 <= scheduler.kv_cache_usage <= 1.0
    return now


def ttft(prompt_tokens: int) -> float:
    scheduler: SimScheduler[SimSequence] = SimScheduler(PROFILE)
    seq = SimSequence(prompt_tokens, 5)
    scheduler.add(seq)
    run(scheduler)
    assert seq.first_token_time is not None
    return seq.first_token_time


def test_time_to_first_token_follows_the_prefill_rate_and_chunking() -> None:
    assert ttft(100) == pytest.approx(0.010 + 100 / 10_000)
    assert ttft(400) == pytest.approx(0.010 + 400 / 10_000)
    # 1,000 tokens exceed the 512-token step budget: two chunks, two step overheads.
    assert ttft(1000) == pytest.approx(2 * 0.010 + 1000 / 10_000)
    assert ttft(100) < ttft(400) < ttft(1000) < ttft(2000)


def inter_token_latency(batch: int) -> float:
    scheduler: SimScheduler[SimSequence] = SimScheduler(PROFILE)
    seqs = [SimSequence(16, 10) for _ in range(batch)]
    for seq in seqs:
        scheduler.add(seq)
    now, produced = scheduler.step(0.0) or (0.0, [])
    assert produced == seqs  # one step prefills all of them
    now, produced = scheduler.step(now) or (0.0, [])
    assert produced == seqs
    first, second = seqs[0].first_token_time, seqs[0].last_token_time
    assert first is not None
    assert second is not None
    return second - first


def test_inter_token_latency_grows_with_batch_size_and_context() -> None:
    for batch in (1, 4, 8):
        # Each decoding sequence reads 17 tokens of context (16 prompt + 1 generated).
        expected = 0.010 + batch * 0.001 + 0.002 * batch * 17 / 1000
        assert inter_token_latency(batch) == pytest.approx(expected)
    assert inter_token_latency(1) < inter_token_latency(4) < inter_token_latency(8)


def test_chunked_prefill_mixes_with_decodes() -> None:
    scheduler: SimScheduler[SimSequence] = SimScheduler(PROFILE)
    decoding = SimSequence(16, 100)
    scheduler.add(decoding)
    now = scheduler.step(0.0)[0]  # type: ignore[index]
    long = SimSequence(1200, 5)
    scheduler.add(long)
    step = scheduler.schedule()
    assert step is not None
    assert step.decode_seqs == 1
    assert step.prefill_tokens == 511  # the budget left after one decode token
    now, produced = step.duration + now, scheduler.complete(step, now + step.duration)
    assert produced == [decoding]  # the long prompt is not done: no token for it yet
    assert long.computed == 511
    assert long.state == RUNNING


def test_max_num_seqs_bounds_the_batch() -> None:
    scheduler: SimScheduler[SimSequence] = SimScheduler(profile(max_num_seqs=3))
    seqs = [SimSequence(10, 4) for _ in range(5)]
    for seq in seqs:
        scheduler.add(seq)
    scheduler.step(0.0)
    assert [s.state for s in seqs] == [RUNNING] * 3 + [WAITING] * 2
    run(scheduler)
    assert all(s.state == FINISHED and s.generated == 4 for s in seqs)
    assert scheduler.free_blocks == scheduler.total_blocks


def test_kv_budget_limits_admission() -> None:
    # 4,096 tokens = 256 blocks; a 1,000-token prompt takes 63 blocks: 4 fit, 2 wait.
    scheduler: SimScheduler[SimSequence] = SimScheduler(profile(max_num_batched_tokens=8192))
    seqs = [SimSequence(1000, 8) for _ in range(6)]
    for seq in seqs:
        scheduler.add(seq)
    scheduler.step(0.0)
    assert len(scheduler.running) == 4
    assert len(scheduler.waiting) == 2
    assert scheduler.kv_cache_usage == pytest.approx(252 / 256)
    run(scheduler)
    assert all(s.generated == 8 for s in seqs)
    assert seqs[4].first_token_time is not None
    assert seqs[3].last_token_time is not None
    assert seqs[4].first_token_time > seqs[3].last_token_time  # it waited for room
    assert scheduler.kv_cache_usage == 0.0


def test_growing_sequences_are_preempted_and_recomputed_without_losing_tokens() -> None:
    # Four sequences that would need 4 x (200 + 900) tokens of KV on a 4,096-token device.
    scheduler: SimScheduler[SimSequence] = SimScheduler(profile(max_num_batched_tokens=8192))
    seqs = [SimSequence(200, 900) for _ in range(4)]
    for seq in seqs:
        scheduler.add(seq)
    run(scheduler)
    assert all(s.generated == 900 and s.state == FINISHED for s in seqs)
    assert sum(s.preemptions for s in seqs) > 0
    assert seqs[0].preemptions == 0  # the oldest is never the victim
    assert scheduler.free_blocks == scheduler.total_blocks


def test_abort_frees_the_slot_and_blocks_at_once_even_mid_step() -> None:
    scheduler: SimScheduler[SimSequence] = SimScheduler(profile(max_num_seqs=1))
    first, second = SimSequence(100, 50), SimSequence(100, 50)
    scheduler.add(first)
    scheduler.add(second)
    step = scheduler.schedule()
    assert step is not None
    assert scheduler.kv_cache_usage > 0
    scheduler.abort(first)  # while its step is in flight
    assert scheduler.kv_cache_usage == 0.0
    assert scheduler.running == []
    assert scheduler.complete(step, step.duration) == []
    scheduler.step(step.duration)
    assert second.state == RUNNING
    scheduler.abort(second)
    scheduler.abort(second)  # idempotent
    waiting = SimSequence(10, 1)
    scheduler.abort(waiting)  # never added
    assert scheduler.free_blocks == scheduler.total_blocks


def test_a_stalled_sequence_keeps_its_slot_and_blocks_until_aborted() -> None:
    scheduler: SimScheduler[SimSequence] = SimScheduler(PROFILE)
    stalled, other = SimSequence(40, 100, stall_at=3), SimSequence(40, 20)
    scheduler.add(stalled)
    scheduler.add(other)
    run(scheduler)
    assert stalled.generated == 3
    assert stalled.state == RUNNING
    assert other.generated == 20
    assert scheduler.running == [stalled]
    assert scheduler.kv_cache_usage > 0
    scheduler.abort(stalled)
    assert scheduler.kv_cache_usage == 0.0
    assert scheduler.schedule() is None


def test_a_sequence_that_cannot_fit_is_refused() -> None:
    scheduler: SimScheduler[SimSequence] = SimScheduler(PROFILE)
    with pytest.raises(ValueError, match="context is 2048 tokens"):
        scheduler.add(SimSequence(2000, 100))
    with pytest.raises(ValueError, match="empty"):
        scheduler.add(SimSequence(0, 100))
    with pytest.raises(ValueError, match="at least 1"):
        scheduler.add(SimSequence(10, 0))
    assert scheduler.schedule() is None


def test_rate_window_counts_recent_events_only() -> None:
    window = RateWindow(start=0.0, window=10.0, buckets=10)
    assert window.rate(0.0) == 0.0
    for second in range(5):
        window.add(second + 0.5, 100)
    assert window.rate(5.0) == pytest.approx(500 / 5.0)  # never more than the time since start
    assert window.rate(14.0) == pytest.approx(0.0)  # all of it has aged out
    window.add(20.5, 30)
    assert window.rate(21.0) == pytest.approx(30 / 9.0)  # the window spans 12.0 .. 21.0
