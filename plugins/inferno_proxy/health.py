"""Per-node health: a state machine fed by active checks and by live traffic.

Active checks (every ``interval``, run by the health checkers) and passive
signals (a connect failure, reset or timeout on a real request, or a stalled
node) feed one :class:`HealthTracker` per node.  The tracker counts
consecutive outcomes, classifies each observation into a :class:`HealthEvent`
and moves through :data:`HEALTH_TABLE`:

* ``failure_threshold`` consecutive failures take a healthy node out
  (``HEALTHY -> UNHEALTHY``); fewer leave it in rotation.
* ``recovery_threshold`` consecutive passes bring it back
  (``UNHEALTHY -> HEALTHY``); one pass is enough for a node never checked
  before (``UNKNOWN -> HEALTHY``), so a static backend joins on its first check.
* ``removal_threshold`` consecutive failures of a *removable* (registered)
  node end it (``REMOVED``, terminal): the pool forgets it, and it comes back
  only by registering again.  Static nodes are not removable: they stay
  ``UNHEALTHY`` and keep being checked.
* A check that reaches the node but finds ``ready: false`` takes it out at
  once (``NOT_READY``) without counting as a failure: a starting or draining
  node is alive and must never be removed for it.  Its first ready answer puts
  it back at once (the pool's slow start then ramps its share).

A passive failure counts exactly like a failed check, at the moment it
happens, so a dead node leaves rotation without waiting for the next check.
A passive *success* is not counted here: health is the active checks' verdict,
while live-traffic successes feed the circuit breaker.

Everything is synchronous and clock-free: each observation passes ``now``
(monotonic seconds).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Final

from inferno_proxy.fsm import Table, Transition, check_table, next_state

__all__ = [
    "HEALTH_TABLE",
    "HealthEvent",
    "HealthSettings",
    "HealthState",
    "HealthTracker",
    "HealthTransition",
]


class HealthState(Enum):
    """Where a node stands with respect to health checks."""

    UNKNOWN = "unknown"  # never checked (a static node at start): out of rotation
    HEALTHY = "healthy"  # in rotation
    UNHEALTHY = "unhealthy"  # failed failure_threshold times in a row: out
    NOT_READY = "not_ready"  # answered, but says ready=false (starting, draining): out
    REMOVED = "removed"  # registered node failed removal_threshold times: forgotten


class HealthEvent(Enum):
    """What an observation amounts to, once counted (see :meth:`HealthTracker.transition`)."""

    PASS = "pass"  # a check passed (below the recovery threshold, or nothing to recover)
    RECOVER = "recover"  # the pass that reaches recovery_threshold in a row
    FAIL = "fail"  # a failure below the thresholds
    TRIP = "trip"  # the failure that reaches failure_threshold in a row
    EXPIRE = "expire"  # the failure that reaches removal_threshold (removable nodes only)
    NOT_READY = "not_ready"  # the node answered ready=false


_S = HealthState
_E = HealthEvent

#: Every legal move.  A missing pair raises :class:`~inferno_proxy.fsm.IllegalTransition`.
HEALTH_TABLE: Final[Table[HealthState, HealthEvent]] = {
    _S.UNKNOWN: {
        _E.PASS: _S.HEALTHY,  # a new node needs one good check, not recovery_threshold
        _E.FAIL: _S.UNHEALTHY,  # never seen working: do not trust it until it recovers
        _E.EXPIRE: _S.REMOVED,
        _E.NOT_READY: _S.NOT_READY,
    },
    _S.HEALTHY: {
        _E.PASS: _S.HEALTHY,
        _E.FAIL: _S.HEALTHY,  # one blip is not an outage
        _E.TRIP: _S.UNHEALTHY,
        _E.EXPIRE: _S.REMOVED,  # only when removal_threshold <= failure_threshold
        _E.NOT_READY: _S.NOT_READY,
    },
    _S.UNHEALTHY: {
        _E.PASS: _S.UNHEALTHY,
        _E.RECOVER: _S.HEALTHY,
        _E.FAIL: _S.UNHEALTHY,
        _E.EXPIRE: _S.REMOVED,
        _E.NOT_READY: _S.NOT_READY,  # it restarted and is warming up
    },
    _S.NOT_READY: {
        _E.PASS: _S.HEALTHY,  # the node itself says it is ready again
        _E.FAIL: _S.NOT_READY,
        _E.TRIP: _S.UNHEALTHY,  # it stopped answering altogether
        _E.EXPIRE: _S.REMOVED,
        _E.NOT_READY: _S.NOT_READY,
    },
    _S.REMOVED: {},  # terminal
}
check_table(HEALTH_TABLE, HealthState, HealthEvent)


HealthTransition = Transition[HealthState, HealthEvent]


@dataclass(frozen=True, slots=True)
class HealthSettings:
    """Thresholds of the health state machine (DESIGN.md defaults).

    :ivar failure_threshold: consecutive failures that take a healthy node out.
    :ivar recovery_threshold: consecutive passes that bring an unhealthy node back.
    :ivar removal_threshold: consecutive failures after which a registered node
        is forgotten.
    :raises ValueError: when a threshold is below 1.
    """

    failure_threshold: int = 3
    recovery_threshold: int = 2
    removal_threshold: int = 10

    def __post_init__(self) -> None:
        for name in ("failure_threshold", "recovery_threshold", "removal_threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


class HealthTracker:
    """The health state of one node, advanced by observations.

    Create one per node; feed it with :meth:`check_passed`,
    :meth:`check_failed`, :meth:`not_ready` and :meth:`passive_failure`.  Each
    returns the :data:`HealthTransition` when the state changed, else ``None``.

    :param settings: the thresholds; replaceable later through :attr:`settings`
        (a configuration reload), taking effect from the next observation.
    :param removable: whether ``removal_threshold`` failures remove the node
        (registered nodes) or it stays ``UNHEALTHY`` forever (static nodes).
    :param now: creation time, the first :attr:`since`.
    :param state: the starting state: ``HEALTHY`` for a node that just
        registered (it announced itself once its engine was ready),
        ``UNKNOWN`` for a static node nobody has checked yet.
    """

    __slots__ = (
        "consecutive_failures",
        "consecutive_successes",
        "last_failure",
        "last_failure_at",
        "removable",
        "settings",
        "since",
        "state",
    )

    def __init__(
        self,
        settings: HealthSettings,
        *,
        removable: bool,
        now: float,
        state: HealthState = HealthState.UNKNOWN,
    ) -> None:
        self.settings = settings
        self.removable = removable
        self.state = state
        #: When the current state was entered (monotonic seconds).
        self.since = now
        self.consecutive_failures = 0
        self.consecutive_successes = 0
        #: Why the latest failure happened ("timeout", "passive: connection reset"), or None.
        self.last_failure: str | None = None
        self.last_failure_at: float | None = None

    @property
    def in_rotation(self) -> bool:
        """Whether health allows routing to the node (only ``HEALTHY`` does)."""
        return self.state is HealthState.HEALTHY

    def check_passed(self, now: float) -> HealthTransition | None:
        """An active check reached the node and it is ready.

        :raises IllegalTransition: when the node was already ``REMOVED``.
        """
        self.consecutive_failures = 0
        self.consecutive_successes += 1
        recovering = self.state is HealthState.UNHEALTHY
        if recovering and self.consecutive_successes >= self.settings.recovery_threshold:
            return self.transition(HealthEvent.RECOVER, now, "recovered")
        return self.transition(HealthEvent.PASS, now, "check passed")

    def not_ready(self, now: float) -> HealthTransition | None:
        """An active check reached the node and it answered ``ready: false``.

        Resets both streaks: the node is alive (no failure) but did not pass.

        :raises IllegalTransition: when the node was already ``REMOVED``.
        """
        self.consecutive_failures = 0
        self.consecutive_successes = 0
        return self.transition(HealthEvent.NOT_READY, now, "node reports ready=false")

    def check_failed(self, now: float, reason: str) -> HealthTransition | None:
        """An active check failed (timeout, refused, bad status, bad body).

        :param reason: what went wrong, kept in :attr:`last_failure` for ``GET /backends``.
        :raises IllegalTransition: when the node was already ``REMOVED``.
        """
        return self._failed(now, reason)

    def passive_failure(self, now: float, reason: str) -> HealthTransition | None:
        """Live traffic found the node unreachable (connect failure, reset, timeout, stall).

        Counts as one failure at once, exactly like a failed check.

        :raises IllegalTransition: when the node was already ``REMOVED``.
        """
        return self._failed(now, f"passive: {reason}")

    def _failed(self, now: float, reason: str) -> HealthTransition | None:
        self.consecutive_successes = 0
        self.consecutive_failures += 1
        self.last_failure = reason
        self.last_failure_at = now
        streak = self.consecutive_failures
        if self.removable and streak >= self.settings.removal_threshold:
            return self.transition(HealthEvent.EXPIRE, now, f"{streak} consecutive failures")
        can_trip = self.state in (HealthState.HEALTHY, HealthState.NOT_READY)
        if can_trip and streak >= self.settings.failure_threshold:
            return self.transition(HealthEvent.TRIP, now, f"{streak} consecutive failures")
        return self.transition(HealthEvent.FAIL, now, reason)

    def transition(
        self, event: HealthEvent, now: float, reason: str = ""
    ) -> HealthTransition | None:
        """Apply *event*: the one mutator of :attr:`state`.

        The observation methods call it after counting; call it directly only
        to drive the table itself (tests, replays).

        :returns: the transition when the state changed, ``None`` for a self-loop.
        :raises IllegalTransition: when :data:`HEALTH_TABLE` has no such move,
            naming the state and the event.
        """
        old = self.state
        new = next_state("health", HEALTH_TABLE, old, event)
        if new is old:
            return None
        self.state = new
        self.since = now
        return Transition(old, new, event, now, reason)

    def __repr__(self) -> str:
        return (
            f"HealthTracker({self.state.name}, failures={self.consecutive_failures}, "
            f"successes={self.consecutive_successes})"
        )
