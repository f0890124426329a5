"""Requests waiting for a node: a bounded queue per model, woken by pool changes.

When no node can take a request (every node of its model is starting,
unhealthy or its circuit is open), failing at once turns a five-second gap
into a burst of client errors.  Instead the request waits here for up to
``max_wait`` seconds; whenever the pool changes (a node registers, passes a
check, its circuit closes) every waiter looks again.  A waiter that still
finds nothing after ``max_wait`` gets 503; a request that finds its model's
queue full gets 429 at once.  Both carry ``Retry-After``.

Waking is one shared :class:`anyio.Event` per generation: :meth:`WaitQueue.wake`
sets it and starts the next, so a pool change costs O(1) however many wait,
and waiters resume in the order they started waiting (asyncio wakes a
future's callbacks in order).  Waiters of other models wake too and simply
look again: pool changes are rare, looking is cheap.

Nothing here touches the pool: the caller passes ``find``, which returns what
it was looking for or ``None``.

With ``--workers`` each process has its own queue, and the bound is the
proxy's: each worker reports its depths (:meth:`WaitQueue.depths`) and is
told the others' (:attr:`WaitQueue.peer_depths`), which count against the
bound too.  They are as fresh as the last exchange with the parent (a few
hundred milliseconds at most), so a sudden flood may pass the bound by what
arrives meanwhile, never by a factor of the workers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Final, TypeVar

import anyio

from inferno.errors import HTTPError
from inferno_proxy.budget import retry_after_header

__all__ = [
    "FULL_RETRY_AFTER",
    "TIMEOUT_RETRY_AFTER",
    "QueueFull",
    "QueueTimeout",
    "WaitQueue",
]

FULL_RETRY_AFTER: Final = 1.0  # seconds a client told "queue full" waits: the queue moves fast
TIMEOUT_RETRY_AFTER: Final = 5.0  # seconds after a queue timeout: one default health interval

T = TypeVar("T")


class QueueFull(HTTPError):
    """Raised when a request would wait but its model's queue is full (answer 429)."""

    def __init__(self, model: str | None, limit: int) -> None:
        what = f"model {model!r}" if model else "this request"
        super().__init__(
            429,
            f"too many requests are waiting for a node for {what} ({limit}); retry later",
            code="queue_full",
            headers=[("retry-after", retry_after_header(FULL_RETRY_AFTER))],
        )


class QueueTimeout(HTTPError):
    """Raised when no node became available within the queue timeout (answer 503)."""

    def __init__(self, model: str | None, waited: float) -> None:
        what = f"model {model!r}" if model else "this request"
        message = (
            f"no node is available for {what}"
            if waited <= 0.0
            else f"no node became available for {what} within {waited:g} s"
        )
        super().__init__(
            503,
            message,
            code="no_healthy_upstream",
            headers=[("retry-after", retry_after_header(TIMEOUT_RETRY_AFTER))],
        )


class WaitQueue:
    """Bounded per-model waiting rooms for requests that found no node.

    :param max_per_model: requests that may wait at once for one model
        (``None`` counts as a model: requests naming none); 0 disables waiting
        (no node means 503 at once).
    :raises ValueError: on a negative bound.
    """

    __slots__ = ("_changed", "_depth", "_total", "max_per_model", "peer_depths")

    def __init__(self, max_per_model: int) -> None:
        if max_per_model < 0:
            raise ValueError(f"max_per_model must be >= 0, got {max_per_model!r}")
        self.max_per_model = max_per_model
        self._depth: dict[str | None, int] = {}
        self._total = 0
        #: Requests other processes of this proxy hold waiting, per model.
        self.peer_depths: Mapping[str | None, int] = {}
        # Created on first wait: anyio.Event needs a running event loop.
        self._changed: anyio.Event | None = None

    def depth(self, model: str | None) -> int:
        """Requests waiting for *model* now."""
        return self._depth.get(model, 0)

    def depths(self) -> dict[str | None, int]:
        """Requests waiting now per model (models with none left out): a copy."""
        return dict(self._depth)

    def total(self) -> int:
        """Requests waiting now, all models together (a gauge reads this)."""
        return self._total

    def wake(self) -> None:
        """The pool changed: every waiter looks again (call from the event loop)."""
        changed = self._changed
        if changed is not None:
            self._changed = None
            changed.set()

    async def wait_for(self, model: str | None, find: Callable[[], T | None], max_wait: float) -> T:
        """Wait until ``find()`` returns something, looking again after every :meth:`wake`.

        Call it after a first ``find()`` failed; it does not look before waiting.

        :param model: the queue to wait in.
        :param find: what to look for; returns ``None`` while there is nothing.
        :param max_wait: seconds to wait at most (0: do not wait).
        :returns: the first non-``None`` result of ``find``.
        :raises QueueTimeout: when *max_wait* passes first (or waiting is disabled).
        :raises QueueFull: when *model*'s queue already holds ``max_per_model`` requests.
        """
        if max_wait <= 0.0 or self.max_per_model == 0:
            raise QueueTimeout(model, 0.0)
        depth = self._depth.get(model, 0)
        peers = self.peer_depths
        if depth + (peers.get(model, 0) if peers else 0) >= self.max_per_model:
            raise QueueFull(model, self.max_per_model)
        self._depth[model] = depth + 1
        self._total += 1
        try:
            with anyio.move_on_after(max_wait):
                while True:
                    changed = self._changed
                    if changed is None:
                        changed = self._changed = anyio.Event()
                    await changed.wait()
                    found = find()
                    if found is not None:
                        return found
            raise QueueTimeout(model, max_wait)
        finally:
            self._total -= 1
            left = self._depth[model] - 1
            if left:
                self._depth[model] = left
            else:
                del self._depth[model]
