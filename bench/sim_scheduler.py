"""CPU cost of one ``sim`` engine step at batch 1, 32 and 256.

Run by hand (not a test): ``.venv/bin/python bench/sim_scheduler.py [--quick]``.

Two figures per batch size, both in microseconds of CPU per decode step:

* **scheduler**: :class:`SimScheduler` alone (``schedule`` + ``complete``),
  every sequence decoding, driven with plain numbers; the pure bookkeeping.
* **engine**: the whole :class:`SimEngine` on a real clock sped up a million
  times (so it never sleeps and is CPU-bound): scheduler task, waking one
  consumer per token through its event, pseudo-text, one chunk per token.
  This is what the simulator costs a backend process per step; a step on the
  ``h100-llama3-8b`` profile lasts 6–30 ms of simulated time, so the ratio says
  how much faster than real time one process can simulate that batch.

Each figure is the best of several repeats (the least disturbed run).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import anyio
from inferno_backend.engines.base import GenerationRequest
from inferno_backend.engines.sim import SimEngine
from inferno_backend.engines.simmodel import SimScheduler, SimSequence
from inferno_backend.profiles import load_profile

PROFILE = load_profile("h100-llama3-8b")  # max_num_seqs 256, room for 256 long sequences
BATCHES = (1, 32, 256)
PROMPT_TOKENS = 128
REPEATS = 5


def scheduler_step_us(batch: int, steps: int) -> tuple[float, float]:
    """Best-of-REPEATS CPU microseconds per step with ``batch`` decoding sequences,
    and the mean simulated duration of those steps in milliseconds."""
    best = float("inf")
    simulated = 0.0
    for _ in range(REPEATS):
        scheduler: SimScheduler[SimSequence] = SimScheduler(PROFILE)
        seqs = [SimSequence(PROMPT_TOKENS, steps + 10) for _ in range(batch)]
        for seq in seqs:
            scheduler.add(seq)
        now = 0.0
        while any(seq.generated == 0 for seq in seqs):  # prefill steps, not measured
            result = scheduler.step(now)
            assert result is not None
            now = result[0]
        start = now
        started = time.process_time()
        for _ in range(steps):
            result = scheduler.step(now)
            assert result is not None
            now = result[0]
        elapsed = time.process_time() - started
        assert len(result[1]) == batch
        best = min(best, elapsed)
        simulated = (now - start) / steps
    return best / steps * 1e6, simulated * 1e3


def engine_step_us(batch: int, steps: int) -> float:
    """Best-of-REPEATS CPU microseconds per decode step of the whole engine.

    Timed from the moment every sequence has its first token to the last one,
    so start-up and prefill are left out, as in :func:`scheduler_step_us`.
    """
    best = float("inf")

    async def run() -> float:
        engine = SimEngine(PROFILE, speed=1e6)
        prompt = " word" * PROMPT_TOKENS
        tokens = [0] * batch
        marks: list[float] = []

        async def consume(i: int) -> None:
            request = GenerationRequest(
                f"r{i}", PROFILE.model, "completion", prompt=prompt, max_tokens=steps, seed=i,
                extra={"ignore_eos": True},  # every sequence runs all the steps
            )  # fmt: skip
            async for chunk in engine.generate(request):
                if tokens[i] == 0 and chunk.completion_tokens == 1 and tokens.count(0) == 1:
                    marks.append(time.process_time())  # the last first token
                tokens[i] = chunk.completion_tokens

        async with engine, anyio.create_task_group() as tg:
            for i in range(batch):
                tg.start_soon(consume, i)
        assert tokens == [steps] * batch
        return time.process_time() - marks[0]

    for _ in range(REPEATS):
        best = min(best, anyio.run(run))
    return best / (steps - 1) * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps (a smoke run)")
    args = parser.parse_args(argv)
    steps = 30 if args.quick else 300

    machine = platform.processor() or platform.platform()
    print(
        f"python {platform.python_version()} ({platform.python_implementation()}), "
        f"{platform.machine()}, {os.cpu_count()} cpus, {machine}"
    )
    print(f"profile {PROFILE.name}, prompt {PROMPT_TOKENS} tokens, {steps} decode steps per run")
    print(f"{'batch':>5}  {'scheduler us/step':>17}  {'engine us/step':>14}  {'us/token':>8}"
          f"  {'sim step ms':>11}")  # fmt: skip
    for batch in BATCHES:
        model_us, step_ms = scheduler_step_us(batch, steps)
        engine_us = engine_step_us(batch, steps)
        print(
            f"{batch:>5}  {model_us:>17.1f}  {engine_us:>14.1f}  {engine_us / batch:>8.2f}"
            f"  {step_ms:>11.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
