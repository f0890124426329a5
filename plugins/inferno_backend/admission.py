"""Admission control: at most ``max_concurrency`` requests in the engine, ``max_queue`` waiting.

A request :meth:`~Admission.acquire`\\ s a :class:`Lease` before it reaches the
engine and releases it when its answer is complete (or it is cancelled):

* a free slot and nobody waiting: the lease is granted at once;
* every slot taken: the request waits in a FIFO queue of at most
  ``max_queue``; a released slot goes straight to the head of the queue, so a
  newcomer never overtakes a waiting request;
* the queue full: :class:`AdmissionRejected` (``reason="full"``), which the API
  answers with 429 and ``Retry-After``;
* after :meth:`~Admission.close` (the node drains): new requests are refused
  (``reason="draining"``, answered 503 so a proxy retries elsewhere) while
  those already queued still get their turn.

A waiter that is cancelled (its client went away) leaves the queue at once;
one cancelled just after it was handed a slot passes the slot on.  Nothing
here awaits except the wait itself, so the bookkeeping cannot be cut short by
cancellation.  Not thread-safe: one event loop, like every Inferno role.
"""

from __future__ import annotations

from collections import deque
from typing import Final, Literal

import anyio

__all__ = ["Admission", "AdmissionRejected", "Lease"]

RejectReason = Literal["full", "draining"]


class AdmissionRejected(Exception):
    """Raised by :meth:`Admission.acquire` when a request may not even wait.

    ``reason`` is ``"full"`` (queue at its limit: answer 429) or
    ``"draining"`` (the node is stopping: answer 503).
    """

    def __init__(self, reason: RejectReason) -> None:
        super().__init__(
            "the queue is full" if reason == "full" else "the node is draining for shutdown"
        )
        self.reason: Final = reason


class _Waiter:
    __slots__ = ("event", "granted")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.granted = False


class Lease:
    """One admitted request's slot; :meth:`release` it exactly once (more calls do nothing)."""

    __slots__ = ("_admission",)

    def __init__(self, admission: Admission) -> None:
        self._admission: Admission | None = admission

    def release(self) -> None:
        """Give the slot back (to the head of the queue, if anyone waits)."""
        admission, self._admission = self._admission, None
        if admission is not None:
            admission._release()

    @property
    def released(self) -> bool:
        """Whether :meth:`release` was called."""
        return self._admission is None

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


class Admission:
    """The concurrency limit and queue of one node (see the module docstring).

    :param max_concurrency: slots: requests in the engine at once, >= 1.
    :param max_queue: requests that may wait for a slot, >= 0.
    """

    def __init__(self, max_concurrency: int, max_queue: int) -> None:
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {max_concurrency}")
        if max_queue < 0:
            raise ValueError(f"max_queue must be at least 0, got {max_queue}")
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self._running = 0
        self._waiters: deque[_Waiter] = deque()
        self._closed = False
        self._idle: anyio.Event | None = None

    @property
    def running(self) -> int:
        """Requests holding a slot now."""
        return self._running

    @property
    def queued(self) -> int:
        """Requests waiting for a slot now."""
        return len(self._waiters)

    @property
    def closed(self) -> bool:
        """Whether new requests are refused (the node drains)."""
        return self._closed

    @property
    def idle(self) -> bool:
        """No request holds a slot or waits for one."""
        return self._running == 0 and not self._waiters

    async def acquire(self) -> Lease:
        """A slot for one request, waiting in the queue if needed.

        :raises AdmissionRejected: the queue is full, or the node drains.
        """
        if self._closed:
            raise AdmissionRejected("draining")
        if self._running < self.max_concurrency and not self._waiters:
            self._running += 1
            return Lease(self)
        if len(self._waiters) >= self.max_queue:
            raise AdmissionRejected("full")
        waiter = _Waiter()
        self._waiters.append(waiter)
        try:
            await waiter.event.wait()
        except BaseException:
            if waiter.granted:
                self._release()  # handed a slot while being cancelled: pass it on
            else:
                self._waiters.remove(waiter)
                self._note_idle()
            raise
        return Lease(self)

    def close(self) -> None:
        """Refuse new requests from now on; queued ones keep their place."""
        self._closed = True

    async def wait_idle(self) -> None:
        """Return once no request holds a slot or waits for one."""
        while not self.idle:
            if self._idle is None:
                self._idle = anyio.Event()
            await self._idle.wait()

    def _release(self) -> None:
        if self._waiters:
            waiter = self._waiters.popleft()  # the slot moves on; running stays the same
            waiter.granted = True
            waiter.event.set()
            return
        self._running -= 1
        self._note_idle()

    def _note_idle(self) -> None:
        if self._idle is not None and self.idle:
            self._idle.set()
            self._idle = None
