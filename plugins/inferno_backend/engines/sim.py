"""The ``sim`` engine: a simulated LLM server, so the whole system runs on a laptop.

A simulator, not a model: it generates deterministic pseudo-text
(:mod:`~inferno_backend.engines.simtext`) at the pace a real server would,
according to a profile (:mod:`inferno_backend.profiles`) and a vLLM-like
scheduler (:mod:`~inferno_backend.engines.simmodel`).

**Design.**  One scheduler task steps the batch: it asks the model for the
next step, sleeps the step's duration on the engine's clock, applies the step
and wakes the consumers whose sequence got a token.  Each generation is a
:class:`SimStream`; its consumer waits on a per-sequence :class:`anyio.Event`
created only while it waits, and on waking turns *all* tokens produced since
its last chunk into one chunk (a slow consumer gets bigger chunks, it does not
slow the batch).  Stop strings are checked on the text, in the consumer; when
one matches, the sequence leaves the batch.

**Structured concurrency.**  The engine owns a task group that runs the
scheduler.  ``async with SimEngine(...) as engine:`` is the way to use it in
tests and tools.  The backend role uses the :class:`~.base.Engine` protocol's
``start()`` and ``aclose()``, which are the two halves of that same context
manager: call them from the same task, with every cancel scope opened in
between closed again (the role calls them around its serve loop).  A crash of
the scheduler cancels that task, and ``aclose()`` re-raises it.

**Cancellation.**  Closing a stream (``aclose()``), cancelling the task
waiting in it, or dropping it takes its sequence out of the batch and frees
its KV blocks at once (a dropped stream at the next scheduler step).

**Clocks.**  :class:`RealClock` sleeps for real, ``speed`` times faster than
the profile says; :class:`VirtualClock` advances only when the scheduler
steps, for deterministic tests.  Times (and ``tokens_per_second``) are in the
clock's *simulated* seconds, so the vitals of a sped-up engine still read like
the profile's hardware.
"""

from __future__ import annotations

import logging
import os
import random
import sys
import time
from contextlib import AsyncExitStack, suppress
from types import TracebackType
from typing import Final, Protocol

import anyio
from anyio.lowlevel import checkpoint

from inferno_backend.engines.base import EngineError, EngineStats, GenerationRequest, TokenChunk
from inferno_backend.engines.simmodel import (
    FINISHED,
    RateWindow,
    SimFaults,
    SimScheduler,
    SimSequence,
)
from inferno_backend.engines.simtext import (
    PseudoText,
    count_tokens,
    natural_length,
    render_chat,
    text_seed,
)
from inferno_backend.profiles import SimProfile

__all__ = [
    "CRASH_EXIT_STATUS",
    "Clock",
    "RealClock",
    "SimEngine",
    "SimFaults",
    "SimStream",
    "VirtualClock",
]

logger = logging.getLogger("inferno_backend.sim")

#: Exit status of a crash injected by ``SimFaults.crash_after_requests``
#: (EX_SOFTWARE in sysexits.h), distinct from a clean exit (0) and bad config (2).
CRASH_EXIT_STATUS: Final = 70
#: Tokens per second are averaged over this many (simulated) seconds.
RATE_WINDOW_SECONDS: Final = 10.0

_NEW, _RUNNING, _CLOSED = "new", "running", "closed"


class Clock(Protocol):
    """Simulated time: the scheduler is its only sleeper."""

    def now(self) -> float:
        """Current simulated time, in seconds."""

    async def sleep_until(self, deadline: float) -> None:
        """Return once :meth:`now` has reached ``deadline`` (let other tasks run first)."""


class RealClock:
    """Wall-clock time sped up by ``speed`` (``speed=10``: a 10 ms step sleeps 1 ms)."""

    def __init__(self, speed: float = 1.0) -> None:
        if not speed > 0:
            raise ValueError(f"speed must be > 0, got {speed!r}")
        self.speed = speed
        self._origin = time.monotonic()

    def now(self) -> float:
        return (time.monotonic() - self._origin) * self.speed

    async def sleep_until(self, deadline: float) -> None:
        await checkpoint()
        while True:  # a timer may fire a hair early: never return before the deadline
            left = deadline - self.now()
            if left <= 0:
                return
            await anyio.sleep(left / self.speed)


class VirtualClock:
    """Time that moves only when the scheduler sleeps: deterministic tests, no waiting.

    Before advancing, :meth:`sleep_until` yields ``settle_rounds`` times so that
    every task woken by the previous step (a consumer reading its chunk and
    asking for the next) runs at the time of that step.
    """

    def __init__(self, start: float = 0.0, *, settle_rounds: int = 8) -> None:
        self._now = start
        self._settle_rounds = settle_rounds

    def now(self) -> float:
        return self._now

    async def sleep_until(self, deadline: float) -> None:
        for _ in range(self._settle_rounds):
            await checkpoint()
        if deadline > self._now:
            self._now = deadline


class _Seq(SimSequence):
    """A sequence plus what the engine needs to wake its consumer."""

    __slots__ = ("error", "waiter")

    def __init__(
        self, prompt_tokens: int, max_new_tokens: int, finish_reason: str, stall_at: int | None
    ) -> None:
        super().__init__(prompt_tokens, max_new_tokens, finish_reason, stall_at=stall_at)
        self.waiter: anyio.Event | None = None
        self.error: EngineError | None = None


class SimEngine:
    """A simulated inference engine implementing :class:`~.base.Engine`.

    :param profile: the hardware/model profile that sets every cost and limit.
    :param model: the model name served (default: the profile's ``model``).
    :param speed: run the real clock this many times faster (ignored with ``clock``).
    :param clock: a clock to run on instead (a :class:`VirtualClock` in tests).
    :param faults: faults to inject (none by default).

    The text depends on the prompt and the request's ``seed`` only
    (``temperature`` is ignored); vLLM's ``ignore_eos`` extra is honoured.
    """

    name = "sim"

    def __init__(
        self,
        profile: SimProfile,
        *,
        model: str | None = None,
        speed: float = 1.0,
        clock: Clock | None = None,
        faults: SimFaults | None = None,
    ) -> None:
        self.profile = profile
        self.model = model or profile.model
        self.clock: Clock = clock if clock is not None else RealClock(speed)
        self.faults = faults or SimFaults()
        self._scheduler: SimScheduler[_Seq] = SimScheduler(profile)
        self._rates = RateWindow(self.clock.now(), RATE_WINDOW_SECONDS)
        self._fault_rng = random.Random(self.faults.seed)
        self._requests = 0
        self._state = _NEW
        self._idle: anyio.Event | None = None
        self._dropped: list[_Seq] = []
        self._stack: AsyncExitStack | None = None

    async def __aenter__(self) -> SimEngine:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # The body's exception is not the task group's business: it propagates as it
        # is (not wrapped in an ExceptionGroup); a crash of the scheduler surfaces here.
        await self.aclose()

    async def start(self) -> None:
        """Start the scheduler task in a task group owned by the engine."""
        if self._state != _NEW:
            raise RuntimeError(f"SimEngine.start() on an engine that is {self._state}")
        stack = AsyncExitStack()
        task_group = await stack.enter_async_context(anyio.create_task_group())
        task_group.start_soon(self._run, name="sim-scheduler")
        stack.callback(task_group.cancel_scope.cancel)  # runs before the group exits
        self._stack = stack
        self._state = _RUNNING
        logger.info(
            "sim engine: profile %s (%s), model %s, %s%s",
            self.profile.name,
            "synthetic" if self.profile.synthetic else self.profile.hardware,
            self.model,
            type(self.clock).__name__,
            f" x{self.clock.speed:g}" if isinstance(self.clock, RealClock) else "",
        )

    async def aclose(self) -> None:
        """Fail every generation still in flight (503), then stop the scheduler.

        :raises BaseExceptionGroup: with the scheduler's exception if it crashed.
        """
        if self._state == _CLOSED:
            return
        self._state = _CLOSED
        scheduler = self._scheduler
        for seq in [*scheduler.running, *scheduler.waiting]:
            scheduler.abort(seq)
            seq.error = EngineError("the sim engine is shutting down", status=503)
            self._wake(seq)
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.aclose()

    def models(self) -> list[str]:
        return [self.model]

    def ready(self) -> bool:
        return self._state == _RUNNING

    def stats(self) -> EngineStats:
        scheduler = self._scheduler
        return EngineStats(
            running=len(scheduler.running),
            waiting=len(scheduler.waiting),
            kv_cache_usage=scheduler.kv_cache_usage,
            tokens_per_second=self._rates.rate(self.clock.now()),
        )

    def generate(self, request: GenerationRequest) -> SimStream:
        """A stream of chunks for ``request``; it joins the queue on the first ``__anext__``."""
        return SimStream(self, request)

    # -- the scheduler task -------------------------------------------------------------

    async def _run(self) -> None:
        scheduler = self._scheduler
        clock = self.clock
        step_end = clock.now()
        while True:
            self._release_dropped()
            step = scheduler.schedule()
            if step is None:
                self._idle = idle = anyio.Event()
                await idle.wait()
                await clock.sleep_until(clock.now())  # let requests arriving together gather
                step_end = clock.now()
                continue
            # Aim at the planned end so timer overshoot is made up in the next step,
            # but never run ahead to repay a backlog (a CPU-bound sim just runs slower).
            step_end = max(step_end + step.duration, clock.now())
            await clock.sleep_until(step_end)
            produced = scheduler.complete(step, step_end)
            self._rates.add(step_end, len(produced))
            for seq in produced:
                waiter = seq.waiter
                if waiter is not None:
                    seq.waiter = None
                    waiter.set()

    def _kick(self) -> None:
        """Wake the scheduler if it idles: the batch or the queue changed."""
        idle = self._idle
        if idle is not None:
            self._idle = None
            idle.set()

    def _wake(self, seq: _Seq) -> None:
        waiter = seq.waiter
        if waiter is not None:
            seq.waiter = None
            waiter.set()

    def _release(self, seq: _Seq) -> None:
        """Take ``seq`` out of the batch or queue now and free its KV blocks."""
        if seq.state != FINISHED:
            self._scheduler.abort(seq)
            self._kick()

    def _release_dropped(self) -> None:
        while self._dropped:
            self._scheduler.abort(self._dropped.pop())

    # -- arrivals -----------------------------------------------------------------------

    def _admit(self, request: GenerationRequest) -> tuple[_Seq, PseudoText]:
        """Validate ``request``, apply faults and queue its sequence.

        :raises EngineError: 503 when not running, 404 for another model, 400
            for a request that cannot fit, or the injected failure.
        """
        if self._state != _RUNNING:
            raise EngineError("the sim engine is not running", status=503)
        if request.model != self.model:
            message = (
                f"model {request.model!r} is not served here (this engine serves {self.model!r})"
            )
            raise EngineError(message, status=404, temporary=False)
        if request.max_tokens is not None and request.max_tokens < 1:
            raise EngineError("max_tokens must be at least 1", status=400, temporary=False)
        prompt = request.prompt if request.kind == "completion" else render_chat(request.messages)
        prompt_tokens = count_tokens(prompt)
        if prompt_tokens < 1:
            raise EngineError("the prompt is empty", status=400, temporary=False)
        room = self.profile.max_model_len - prompt_tokens
        if room < (request.max_tokens or 1):
            message = self._too_long(prompt_tokens, request.max_tokens)
            raise EngineError(message, status=400, temporary=False)
        seed = text_seed(prompt, request.seed)
        natural = natural_length(seed)
        limit = room if request.max_tokens is None else min(room, request.max_tokens)
        # vLLM's ``ignore_eos`` (benchmarks use it): no natural end, only the limit.
        ends_by_itself = natural <= limit and request.extra.get("ignore_eos") is not True
        finish_reason = "stop" if ends_by_itself else "length"
        stall_at = self._arrival_faults(request)
        seq = _Seq(prompt_tokens, natural if ends_by_itself else limit, finish_reason, stall_at)
        try:
            self._scheduler.add(seq)
        except ValueError as exc:  # only with a profile that skipped validation
            raise EngineError(str(exc), status=400, temporary=False) from exc
        self._kick()
        text = PseudoText(seed, natural, prompt=prompt, leading_space=request.kind == "completion")
        return seq, text

    def _too_long(self, prompt_tokens: int, max_tokens: int | None) -> str:
        wanted = f"{prompt_tokens} prompt tokens"
        if max_tokens is not None:
            wanted += f" + {max_tokens} max_tokens"
        limit = self.profile.max_model_len
        return f"this model's context is {limit} tokens; the request needs {wanted}"

    def _arrival_faults(self, request: GenerationRequest) -> int | None:
        """Count the request, crash or fail it as configured; return its stall point."""
        faults = self.faults
        self._requests += 1
        if faults.crash_after_requests is not None and self._requests > faults.crash_after_requests:
            _crash(faults.crash_after_requests, request.request_id)
        fail_draw = self._fault_rng.random()
        stall_draw = self._fault_rng.random()
        if fail_draw < faults.failure_rate:
            message = f"simulated failure (sim fault injection, request #{self._requests})"
            raise EngineError(message, status=faults.failure_status, temporary=True)
        if faults.stall_after_tokens is not None and stall_draw < faults.stall_rate:
            return faults.stall_after_tokens
        return None


def _crash(after: int, request_id: str) -> None:
    logger.critical(
        "sim engine: crashing on purpose (fault injection: crash_after_requests=%d, "
        "request %s); exiting with status %d",
        after,
        request_id,
        CRASH_EXIT_STATUS,
    )
    with suppress(Exception):
        logging.shutdown()  # flush every handler: os._exit skips all clean-up
    for stream in (sys.stdout, sys.stderr):
        with suppress(OSError, ValueError):
            stream.flush()
    os._exit(CRASH_EXIT_STATUS)


class SimStream:
    """The chunks of one generation (an async iterator; see :meth:`SimEngine.generate`)."""

    __slots__ = (
        "_done",
        "_engine",
        "_held",
        "_max_stop",
        "_request",
        "_seq",
        "_stops",
        "_text",
        "_tokens",
    )

    def __init__(self, engine: SimEngine, request: GenerationRequest) -> None:
        self._engine = engine
        self._request = request
        self._seq: _Seq | None = None
        self._text: PseudoText | None = None
        self._tokens = 0  # tokens turned into text so far
        self._held = ""  # text withheld because it may be the start of a stop string
        self._stops = tuple(s for s in request.stop if s)
        self._max_stop = max((len(s) for s in self._stops), default=0)
        self._done = False

    def __aiter__(self) -> SimStream:
        return self

    async def __anext__(self) -> TokenChunk:
        seq = self._seq
        if seq is None:
            if self._done:
                raise StopAsyncIteration
            try:
                seq, self._text = self._engine._admit(self._request)
            except BaseException:
                self._done = True
                raise
            self._seq = seq
        while not self._done:
            if seq.error is not None:
                self._done = True
                raise seq.error
            if seq.generated > self._tokens:
                chunk = self._advance(seq)
                if chunk is not None:
                    return chunk
                continue
            waiter = seq.waiter = anyio.Event()
            try:
                await waiter.wait()
            except BaseException:
                self._abandon()
                raise
        raise StopAsyncIteration

    def _advance(self, seq: _Seq) -> TokenChunk | None:
        """Turn the tokens produced since the last chunk into one chunk (or hold it back)."""
        text = self._text
        assert text is not None
        buffer = self._held
        stops = self._stops
        end = seq.generated
        while self._tokens < end:
            piece = text.next_piece()
            self._tokens += 1
            buffer += piece
            if stops:
                cut = self._find_stop(buffer, len(piece))
                if cut >= 0:
                    return self._finish(buffer[:cut], "stop")
            if self._tokens >= seq.max_new_tokens:
                return self._finish(buffer, seq.finish_reason)
        if stops:
            keep = self._stop_prefix_length(buffer)
            if keep:
                self._held = buffer[-keep:]
                buffer = buffer[:-keep]
            else:
                self._held = ""
        if not buffer:
            return None
        return TokenChunk(buffer, seq.prompt_tokens, self._tokens)

    def _find_stop(self, buffer: str, added: int) -> int:
        """Index of the earliest stop string completed by the last ``added`` characters."""
        start = max(0, len(buffer) - added - self._max_stop + 1)
        found = [i for i in (buffer.find(s, start) for s in self._stops) if i >= 0]
        return min(found) if found else -1

    def _stop_prefix_length(self, buffer: str) -> int:
        """Length of the longest end of ``buffer`` that begins some stop string."""
        for length in range(min(len(buffer), self._max_stop - 1), 0, -1):
            tail = buffer[-length:]
            if any(s.startswith(tail) for s in self._stops):
                return length
        return 0

    def _finish(self, text: str, reason: str) -> TokenChunk:
        seq = self._seq
        assert seq is not None
        self._done = True
        self._held = ""
        self._engine._release(seq)  # a stop string ends it before the scheduler does
        return TokenChunk(text, seq.prompt_tokens, self._tokens, reason)

    def _abandon(self) -> None:
        if not self._done:
            self._done = True
            if self._seq is not None:
                self._engine._release(self._seq)

    async def aclose(self) -> None:
        """Stop the generation: its sequence leaves the batch and frees its KV now."""
        self._abandon()

    def __del__(self) -> None:
        # May run inside the garbage collector, even in the middle of a scheduler
        # step: only hand the sequence over; the scheduler frees it before its next step.
        if not self._done and self._seq is not None:
            self._done = True
            self._engine._dropped.append(self._seq)
            with suppress(Exception):  # the event loop may be gone at interpreter exit
                self._engine._kick()
