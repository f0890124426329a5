"""The simulator's scheduler and cost model: pure bookkeeping, no I/O, no clock of its own.

This is a model of how a vLLM-style server (vLLM v1's scheduler, in spirit)
serves many requests on one device.  It is a simulator: it decides *when*
tokens would be produced, not *what* they are (that is
:mod:`~inferno_backend.engines.simtext`), and its timing comes from a
:class:`~inferno_backend.profiles.SimProfile`.  The driver
(:mod:`~inferno_backend.engines.sim`) calls :meth:`SimScheduler.schedule`,
waits the returned step's duration on its clock, then calls
:meth:`SimScheduler.complete`; tests drive it the same way with plain numbers.

**Continuous batching with chunked prefill.**  Each sequence has ``tokens``
(prompt plus generated) and ``computed`` (tokens whose KV is in the cache).
One step schedules, within a budget of ``max_num_batched_tokens``:

1. every running sequence, in admission order: ``tokens - computed`` of them,
   which is 1 for a decoding sequence and up to the rest of the budget for one
   still in prefill (so a long prompt is prefilled in chunks, mixed with the
   decodes of the others);
2. then waiting sequences, first come first served, while the batch has fewer
   than ``max_num_seqs`` sequences, budget is left and the KV cache has free
   blocks for the waiting sequence's whole prompt (the head of the queue
   blocks the rest, as in vLLM).

A sequence whose ``computed`` reaches ``tokens`` at the end of a step samples
one token: the step that finishes a prompt produces the first token, each later
step one more.  The step lasts :meth:`SimProfile.step_seconds` of its prefill
tokens, decoding sequences and their context length, so time to first token
grows with prompt length and queueing, and inter-token latency with batch size
and context.

**KV cache.**  Blocks of ``block_size`` tokens.  Admission takes the blocks of
the prompt; decoding takes one more block each time a sequence crosses a block
boundary.  When no block is free, the most recently admitted running sequence
is **preempted by recomputation** (vLLM's default): its blocks are freed, it
goes back to the head of the queue and, when readmitted, recomputes its prompt
and the tokens it had generated (a pause in its stream, no lost tokens).  No
new sequence is admitted in a step that preempted.  A finished or aborted
sequence frees its blocks at once.

**Faults.**  :class:`SimFaults` says which to inject (the engine draws
them per request).  A sequence with ``stall_at`` stops being scheduled once it has
generated that many tokens but keeps its batch slot and its KV blocks until
aborted: a hung request, as seen from outside.
"""

from __future__ import annotations

from collections import deque
from contextlib import suppress
from dataclasses import dataclass
from typing import Final, Generic, TypeVar

from inferno_backend.profiles import SimProfile

__all__ = [
    "FINISHED",
    "RUNNING",
    "WAITING",
    "RateWindow",
    "SimFaults",
    "SimScheduler",
    "SimSequence",
    "Step",
]

#: Sequence states (plain ints: compared once per sequence per step).
WAITING: Final = 0
RUNNING: Final = 1
FINISHED: Final = 2


class SimSequence:
    """One request's place in the scheduler.  The driver may subclass it to add fields.

    :param max_new_tokens: the generation ends after this many tokens, with
        ``finish_reason`` (``"stop"`` for a natural end, ``"length"`` for a limit).
    :param stall_at: stop producing tokens after this many (fault injection).
    """

    __slots__ = (
        "blocks",
        "computed",
        "finish_reason",
        "first_token_time",
        "generated",
        "last_token_time",
        "max_new_tokens",
        "preemptions",
        "prompt_tokens",
        "scheduled",
        "stall_at",
        "stalled",
        "state",
    )

    def __init__(
        self,
        prompt_tokens: int,
        max_new_tokens: int,
        finish_reason: str = "length",
        *,
        stall_at: int | None = None,
    ) -> None:
        self.prompt_tokens = prompt_tokens
        self.max_new_tokens = max_new_tokens
        self.finish_reason = finish_reason
        self.stall_at = stall_at
        self.stalled = False
        self.generated = 0
        self.computed = 0
        self.scheduled = 0
        self.blocks = 0
        self.state: int = WAITING
        self.preemptions = 0
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None


S = TypeVar("S", bound=SimSequence)


class Step(Generic[S]):
    """What one engine step computes, and how long it takes (seconds)."""

    __slots__ = ("decode_kv_tokens", "decode_seqs", "duration", "prefill_tokens", "seqs")

    def __init__(
        self,
        seqs: list[S],
        prefill_tokens: int,
        decode_seqs: int,
        decode_kv_tokens: int,
        duration: float,
    ) -> None:
        self.seqs = seqs
        self.prefill_tokens = prefill_tokens
        self.decode_seqs = decode_seqs
        self.decode_kv_tokens = decode_kv_tokens
        self.duration = duration


class SimScheduler(Generic[S]):
    """The batch, the queue and the KV-cache blocks of one simulated device."""

    def __init__(self, profile: SimProfile) -> None:
        self.profile = profile
        self.running: list[S] = []
        self.waiting: deque[S] = deque()
        self.total_blocks = profile.kv_cache_blocks
        self.free_blocks = self.total_blocks
        self._block_size = profile.block_size
        self._max_seqs = profile.max_num_seqs
        self._token_budget = profile.max_num_batched_tokens

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of KV blocks held by sequences, 0..1."""
        return (self.total_blocks - self.free_blocks) / self.total_blocks

    def add(self, seq: S) -> None:
        """Queue ``seq``.

        :raises ValueError: when it can never run: an empty prompt, or prompt
            plus ``max_new_tokens`` beyond the profile's ``max_model_len`` or
            the KV cache.
        """
        if seq.prompt_tokens < 1:
            raise ValueError("the prompt is empty")
        if seq.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        limit = self.profile.max_model_len
        if seq.prompt_tokens + seq.max_new_tokens > limit:
            raise ValueError(
                f"the model's context is {limit} tokens, this request needs "
                f"{seq.prompt_tokens} for the prompt and {seq.max_new_tokens} to generate"
            )
        if seq.prompt_tokens + seq.max_new_tokens > self.total_blocks * self._block_size:
            # Only for a profile built without validation: it could never be admitted.
            raise ValueError("the sequence needs more KV cache than the device has")
        seq.state = WAITING
        self.waiting.append(seq)

    def abort(self, seq: S) -> None:
        """Take ``seq`` out of the queue or the batch and free its KV blocks now.

        Safe at any time, also while a step that includes it is in flight
        (:meth:`complete` skips it) and for a sequence already finished.
        """
        if seq.state == RUNNING:
            self.running.remove(seq)
        elif seq.state == WAITING:
            with suppress(ValueError):  # never added
                self.waiting.remove(seq)
        self._release(seq)

    def _release(self, seq: S) -> None:
        self.free_blocks += seq.blocks
        seq.blocks = 0
        seq.state = FINISHED

    def _preempt(self, seq: S) -> S:
        """Preempt the most recently admitted sequence that is not stalled; return it."""
        running = self.running
        for index in range(len(running) - 1, -1, -1):
            victim = running[index]
            if not victim.stalled:
                del running[index]
                self.free_blocks += victim.blocks
                victim.blocks = 0
                victim.computed = 0
                victim.state = WAITING
                victim.preemptions += 1
                self.waiting.appendleft(victim)
                return victim
        return seq  # unreachable: seq itself is running and not stalled

    def schedule(self) -> Step[S] | None:
        """Plan the next step; ``None`` when there is nothing to compute."""
        budget = self._token_budget
        block_size = self._block_size
        seqs: list[S] = []
        prefill = decode_seqs = decode_kv = 0
        preempted = False
        running = self.running
        index = 0
        while index < len(running) and budget > 0:
            seq = running[index]
            if seq.stalled:
                index += 1
                continue
            n = seq.prompt_tokens + seq.generated - seq.computed
            if n > budget:
                n = budget
            need = (seq.computed + n + block_size - 1) // block_size - seq.blocks
            if need > 0:
                while need > self.free_blocks:
                    preempted = True
                    if self._preempt(seq) is seq:
                        break
                if seq.state != RUNNING:
                    break  # it preempted itself: nothing after it can run either
                self.free_blocks -= need
                seq.blocks += need
            seq.scheduled = n
            seqs.append(seq)
            budget -= n
            if n == 1 and seq.generated > 0:
                decode_seqs += 1
                decode_kv += seq.computed + 1
            else:
                prefill += n
            index += 1
        if not preempted:
            waiting = self.waiting
            while waiting and budget > 0 and len(running) < self._max_seqs:
                seq = waiting[0]
                tokens = seq.prompt_tokens + seq.generated
                need = (tokens + block_size - 1) // block_size
                if need > self.free_blocks:
                    break
                waiting.popleft()
                self.free_blocks -= need
                seq.blocks = need
                seq.state = RUNNING
                running.append(seq)
                n = tokens if tokens < budget else budget
                seq.scheduled = n
                seqs.append(seq)
                budget -= n
                prefill += n
        if not seqs:
            return None
        duration = self.profile.step_seconds(prefill, decode_seqs, decode_kv)
        return Step(seqs, prefill, decode_seqs, decode_kv, duration)

    def complete(self, step: Step[S], now: float) -> list[S]:
        """Apply ``step``, which ended at ``now``; return the sequences that got a token.

        A returned sequence whose ``state`` is :data:`FINISHED` has produced
        its last token (``generated == max_new_tokens``) and holds no blocks.
        """
        produced: list[S] = []
        finished = False
        for seq in step.seqs:
            if seq.state != RUNNING:
                continue  # aborted or preempted while the step was in flight
            seq.computed += seq.scheduled
            if seq.computed < seq.prompt_tokens + seq.generated:
                continue  # a prefill chunk: no token yet
            if seq.stall_at is not None and seq.generated >= seq.stall_at:
                seq.stalled = True  # hangs here, holding its slot and blocks
                continue
            seq.generated += 1
            if seq.first_token_time is None:
                seq.first_token_time = now
            seq.last_token_time = now
            if seq.generated >= seq.max_new_tokens:
                self._release(seq)
                finished = True
            produced.append(seq)
        if finished:
            self.running = [seq for seq in self.running if seq.state == RUNNING]
        return produced

    def step(self, now: float) -> tuple[float, list[S]] | None:
        """Schedule and complete one step starting at ``now`` (no waiting).

        Returns the step's end time and the sequences that got a token, or
        ``None`` when idle.  For tests and benchmarks that need no clock.
        """
        planned = self.schedule()
        if planned is None:
            return None
        end = now + planned.duration
        return end, self.complete(planned, end)


@dataclass(frozen=True, slots=True)
class SimFaults:
    """Faults to inject, for chaos tests.  Deterministic: draws come from ``seed``.

    :param failure_rate: fraction of requests that fail on arrival with an
        :class:`~inferno_backend.engines.base.EngineError` of ``failure_status`` (temporary).
    :param stall_after_tokens: a stalling request produces this many tokens,
        then none, and never ends; it keeps its batch slot and KV blocks (a hung
        node).  ``0`` stalls before the first token.
    :param stall_rate: fraction of requests that stall (when ``stall_after_tokens`` is set).
    :param crash_after_requests: the process exits (``os._exit`` with
        :data:`~inferno_backend.engines.sim.CRASH_EXIT_STATUS`, after a critical
        log line) when request number ``N + 1`` arrives; the first ``N`` are served.
    """

    failure_rate: float = 0.0
    failure_status: int = 500
    stall_after_tokens: int | None = None
    stall_rate: float = 1.0
    crash_after_requests: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("failure_rate", "stall_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be within 0..1, got {value!r}")
        if not 400 <= self.failure_status <= 599:
            raise ValueError(
                f"failure_status must be an HTTP error status, got {self.failure_status}"
            )
        for name in ("stall_after_tokens", "crash_after_requests"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value!r}")

    @classmethod
    def parse(cls, spec: str) -> SimFaults:
        """Faults from a one-line option, ``"failure_rate=0.1,stall_after_tokens=5"``.

        An empty spec means no faults.

        :raises ValueError: naming the unknown key or the bad value.
        """
        values: dict[str, float | int] = {}
        for item in filter(None, (part.strip() for part in spec.split(","))):
            key, sep, raw = (text.strip() for text in item.partition("="))
            if not sep or key not in _FAULT_TYPES:
                known = ", ".join(_FAULT_TYPES)
                raise ValueError(f"sim faults: {item!r} is not key=value with a key among {known}")
            try:
                values[key] = _FAULT_TYPES[key](raw)
            except ValueError:
                kind = _FAULT_TYPES[key].__name__
                raise ValueError(f"sim faults: {key} must be {kind}, got {raw!r}") from None
        try:
            return cls(**values)  # type: ignore[arg-type]
        except ValueError as exc:
            raise ValueError(f"sim faults: {exc}") from None


_FAULT_TYPES: dict[str, type[float] | type[int]] = {
    "failure_rate": float,
    "failure_status": int,
    "stall_after_tokens": int,
    "stall_rate": float,
    "crash_after_requests": int,
    "seed": int,
}


class RateWindow:
    """Events per second over the last ``window`` seconds, in O(1) per update.

    Counts go into ``buckets`` slots of ``window / buckets`` seconds each; the
    rate is the sum of the slots still inside the window divided by the time
    they cover (never more than the time since ``start``).
    """

    __slots__ = ("_counts", "_ids", "_start", "_width")

    def __init__(self, start: float, window: float = 10.0, buckets: int = 10) -> None:
        self._start = start
        self._width = window / buckets
        self._counts = [0] * buckets
        self._ids = [-(2**62)] * buckets

    def add(self, now: float, count: int) -> None:
        """Record ``count`` events at time ``now``."""
        bucket = int(now // self._width)
        slot = bucket % len(self._counts)
        if self._ids[slot] != bucket:
            self._ids[slot] = bucket
            self._counts[slot] = 0
        self._counts[slot] += count

    def rate(self, now: float) -> float:
        """Events per second over the window ending at ``now``."""
        size = len(self._counts)
        current = int(now // self._width)
        oldest = current - size + 1
        total = sum(
            c for c, b in zip(self._counts, self._ids, strict=True) if oldest <= b <= current
        )
        span = now - max(oldest * self._width, self._start)
        return total / span if span > 0 else 0.0
