"""Which models the fleet served lately, so a model whose nodes all left waits, not 404s.

A request naming a model no node in the pool serves is answered 404
``model_not_found`` only when that is news the client can act on: the model is
unknown to a fleet that has nodes *and* no node served it lately.  Otherwise
the model's nodes are probably on their way back (a backend restarting
deregisters, reloads its model and registers again; a node removed after
failing its checks comes back when it re-announces) and the request waits in
the model's queue like one that found every node busy or down: up to
``queue_timeout``, then 503 with ``Retry-After``.

:class:`ModelMemory` keeps that recollection for the data path (one per
:class:`~inferno_proxy.forward.ServiceApp`, so each worker process has its
own, fed by the same pool changes): the data path shows it the models the
pool's backends serve after every pool change (:meth:`ModelMemory.observe`),
and it notes when each model lost its last node.  Memory is bounded in time
(:data:`MODEL_MEMORY_SECONDS`) and in size (:data:`MAX_REMEMBERED_MODELS`).
"""

from __future__ import annotations

from collections.abc import Set
from typing import Final

__all__ = ["MAX_REMEMBERED_MODELS", "MODEL_MEMORY_SECONDS", "ModelMemory"]

#: Seconds a model stays expected after its last node left the pool.  Ten
#: minutes covers a backend restart (deregistration, loading a large model,
#: registering again) and a registered node removed after ``removal_threshold``
#: failed checks (50 s at the defaults) coming back with its next announcement
#: (every 30 s), with room for a slow model load; past it a client asking for
#: the model more likely has the name wrong than the fleet a gap.
MODEL_MEMORY_SECONDS: Final = 600.0
#: Models remembered at most after their nodes left, the oldest forgotten
#: first: registrations choose the names, so their number is bounded here.
MAX_REMEMBERED_MODELS: Final = 10_000


class ModelMemory:
    """The models served now and those that lost their last node lately.

    :param window: seconds a model is remembered after its last node left.
    :param limit: models remembered at most after they left (oldest dropped first).
    :raises ValueError: on a negative window or limit.
    """

    __slots__ = ("_left", "_served", "limit", "window")

    def __init__(
        self, window: float = MODEL_MEMORY_SECONDS, limit: int = MAX_REMEMBERED_MODELS
    ) -> None:
        if not window >= 0.0 or limit < 0:
            raise ValueError(f"window and limit must be >= 0, got {window!r} and {limit!r}")
        self.window = window
        self.limit = limit
        self._served: frozenset[str] = frozenset()
        #: model -> when its last node left (monotonic seconds), oldest first.
        self._left: dict[str, float] = {}

    def observe(self, served: Set[str], now: float) -> None:
        """The models the pool's backends (in any state) serve at *now*.

        Call after every change of the pool: a model seen before and missing now
        has just lost its last node.
        """
        current = frozenset(served)
        if current != self._served:
            left = self._left
            for model in self._served - current:
                left.pop(model, None)  # re-inserted last: the dict stays in time order
                left[model] = now
            for model in current - self._served:
                left.pop(model, None)
            self._served = current
        self._forget(now)

    def remembers(self, model: str, now: float) -> bool:
        """Whether *model* was served at the latest :meth:`observe`, or lost its
        last node less than :attr:`window` seconds before *now*."""
        if model in self._served:
            return True
        left = self._left.get(model)
        return left is not None and now - left < self.window

    def departed(self) -> int:
        """Models remembered after their nodes left (bounded by :attr:`limit`)."""
        return len(self._left)

    def _forget(self, now: float) -> None:
        left = self._left
        while left:
            model, when = next(iter(left.items()))
            if now - when < self.window and len(left) <= self.limit:
                return
            del left[model]
