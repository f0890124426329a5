"""Per-node circuit breaker, fed by the outcomes of live requests.

Health checks ask "does the node answer?"; the circuit asks "do *requests*
to it work?".  A node whose checks pass but whose requests fail or hang (a
wedged GPU, a dead generation loop behind a live ``/health``) is caught here:

* ``CLOSED``: traffic flows; ``failure_threshold`` consecutive failures trip it.
* ``OPEN``: no traffic for a cooldown of ``base_cooldown * 2**(opens-1)``
  seconds, capped at ``max_cooldown`` -- a node that keeps failing is retried
  ever more rarely.  The count of opens is forgiven once the circuit has
  stayed closed for ``max_cooldown``.
* ``HALF_OPEN`` (entered by :meth:`CircuitBreaker.poll` once the cooldown is
  over): at most ``half_open_probes`` requests at a time are admitted as
  probes.  A probe that succeeds closes the circuit; one that fails reopens
  it with the next, longer cooldown.

Results of requests admitted *before* the circuit opened ("late" results)
never move an open or half-open circuit: only probes of the current
half-open episode do, which :class:`Admission` tickets make explicit.

A successful active health check does not close the circuit: the failure
mode it exists for is exactly "the check says 200 but generation is dead".
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Final

from inferno_proxy.fsm import Table, Transition, check_table, next_state

__all__ = [
    "CIRCUIT_TABLE",
    "NOT_PROBE",
    "Admission",
    "CircuitBreaker",
    "CircuitEvent",
    "CircuitSettings",
    "CircuitState",
    "CircuitTransition",
]


class CircuitState(Enum):
    """The breaker's position."""

    CLOSED = "closed"  # traffic flows
    OPEN = "open"  # no traffic until the cooldown is over
    HALF_OPEN = "half_open"  # a few probe requests decide


class CircuitEvent(Enum):
    """What a request outcome or the clock amounts to (see :meth:`CircuitBreaker.transition`)."""

    SUCCESS = "success"  # a request succeeded (not a probe of the current episode)
    FAILURE = "failure"  # a request failed, below the threshold or late
    TRIP = "trip"  # the failure that reaches failure_threshold in a row
    COOLDOWN_ELAPSED = "cooldown_elapsed"  # the open period is over
    PROBE_SUCCESS = "probe_success"  # a probe of the current half-open episode succeeded
    PROBE_FAILURE = "probe_failure"  # ... failed, or the node stalled while half-open


_S = CircuitState
_E = CircuitEvent

#: Every legal move.  A missing pair raises :class:`~inferno_proxy.fsm.IllegalTransition`.
CIRCUIT_TABLE: Final[Table[CircuitState, CircuitEvent]] = {
    _S.CLOSED: {
        _E.SUCCESS: _S.CLOSED,
        _E.FAILURE: _S.CLOSED,
        _E.TRIP: _S.OPEN,
    },
    _S.OPEN: {
        _E.SUCCESS: _S.OPEN,  # late results change nothing
        _E.FAILURE: _S.OPEN,
        _E.COOLDOWN_ELAPSED: _S.HALF_OPEN,
    },
    _S.HALF_OPEN: {
        _E.SUCCESS: _S.HALF_OPEN,
        _E.FAILURE: _S.HALF_OPEN,
        _E.PROBE_SUCCESS: _S.CLOSED,
        _E.PROBE_FAILURE: _S.OPEN,
    },
}
check_table(CIRCUIT_TABLE, CircuitState, CircuitEvent)

CircuitTransition = Transition[CircuitState, CircuitEvent]

MAX_DOUBLINGS: Final = 60  # 2**60 times any sane base exceeds any cap; keeps the float finite


@dataclass(frozen=True, slots=True)
class CircuitSettings:
    """Thresholds and cooldowns of the circuit breaker.

    :ivar failure_threshold: consecutive failed requests that open the circuit
        (Envoy's outlier detection uses 5 consecutive errors).
    :ivar base_cooldown: seconds the first opening lasts.
    :ivar max_cooldown: cap on the doubling cooldown, in seconds; also how long
        the circuit must stay closed before earlier openings are forgiven.
    :ivar half_open_probes: requests admitted at once while half-open.
    :raises ValueError: on a threshold or probe count below 1, a cooldown that
        is not positive, or ``max_cooldown < base_cooldown``.
    """

    failure_threshold: int = 5
    base_cooldown: float = 5.0  # one health interval: a dead node is retried soon, once
    max_cooldown: float = 300.0  # a node failing for hours is probed every 5 minutes
    half_open_probes: int = 1

    def __post_init__(self) -> None:
        for name in ("failure_threshold", "half_open_probes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not self.base_cooldown > 0:
            raise ValueError(f"base_cooldown must be > 0 seconds, got {self.base_cooldown!r}")
        if not self.max_cooldown >= self.base_cooldown:
            raise ValueError(
                f"max_cooldown ({self.max_cooldown!r}) must be >= base_cooldown "
                f"({self.base_cooldown!r})"
            )

    def cooldown(self, opens: int) -> float:
        """Seconds the *opens*-th consecutive opening lasts (1-based)."""
        doublings = min(max(opens - 1, 0), MAX_DOUBLINGS)
        return min(self.base_cooldown * 2.0**doublings, self.max_cooldown)


@dataclass(frozen=True, slots=True)
class Admission:
    """The circuit's ticket for one request: was it a probe, and of which episode.

    Hand it back with the request's outcome; only a probe of the current
    half-open episode can close or reopen the circuit.
    """

    probe: bool
    episode: int


#: The ticket of every ordinary (non-probe) request.
NOT_PROBE: Final = Admission(probe=False, episode=0)


class CircuitBreaker:
    """One node's circuit breaker.

    Drive it with :meth:`admit` when a request starts, then exactly one of
    :meth:`record_success`, :meth:`record_failure` or :meth:`release` when it
    ends, and :meth:`poll` from a periodic tick.  Each mutator returns the
    :data:`CircuitTransition` when the state changed, else ``None``.

    :param settings: thresholds and cooldowns; replaceable through
        :attr:`settings`, taking effect from the next event.
    :param now: creation time (monotonic seconds).
    """

    __slots__ = (
        "closed_at",
        "consecutive_failures",
        "episode",
        "opens",
        "probes_in_flight",
        "retry_at",
        "settings",
        "since",
        "state",
    )

    def __init__(self, settings: CircuitSettings, *, now: float) -> None:
        self.settings = settings
        self.state = CircuitState.CLOSED
        #: When the current state was entered (monotonic seconds).
        self.since = now
        self.consecutive_failures = 0
        #: Consecutive openings not yet forgiven; sets the cooldown length.
        self.opens = 0
        #: When an open circuit may go half-open (meaningful while ``OPEN``).
        self.retry_at = now
        #: Numbers the half-open episodes, so a stale probe cannot decide a new one.
        self.episode = 0
        self.probes_in_flight = 0
        self.closed_at = now

    def admits(self) -> bool:
        """Whether a new request may go to the node now (a pure query).

        ``CLOSED`` admits; ``HALF_OPEN`` admits while a probe slot is free;
        ``OPEN`` does not (until :meth:`poll` sees the cooldown is over).
        """
        if self.state is CircuitState.CLOSED:
            return True
        return (
            self.state is CircuitState.HALF_OPEN
            and self.probes_in_flight < self.settings.half_open_probes
        )

    def admit(self) -> Admission:
        """Record that a request starts; returns its ticket.

        Never refuses: in panic mode the pool sends requests to nodes whose
        circuit is open.  While ``HALF_OPEN`` with a free slot the request
        becomes a probe; otherwise it is an ordinary request.
        """
        if (
            self.state is CircuitState.HALF_OPEN
            and self.probes_in_flight < self.settings.half_open_probes
        ):
            self.probes_in_flight += 1
            return Admission(probe=True, episode=self.episode)
        return NOT_PROBE

    def poll(self, now: float) -> CircuitTransition | None:
        """Apply the clock: an open circuit whose cooldown is over goes half-open."""
        if self.state is CircuitState.OPEN and now >= self.retry_at:
            return self.transition(CircuitEvent.COOLDOWN_ELAPSED, now, "cooldown over")
        return None

    def record_success(self, admission: Admission, now: float) -> CircuitTransition | None:
        """The request admitted with *admission* succeeded."""
        if self._current_probe(admission):
            self.probes_in_flight -= 1
            return self.transition(CircuitEvent.PROBE_SUCCESS, now, "probe succeeded")
        if self.state is CircuitState.CLOSED:
            self.consecutive_failures = 0
        return self.transition(CircuitEvent.SUCCESS, now)

    def record_failure(
        self, admission: Admission | None, now: float, reason: str
    ) -> CircuitTransition | None:
        """A request failed, or (*admission* ``None``) the node as a whole did.

        ``None`` stands for a failure not tied to one request: a node that
        stalled with requests in flight.  While half-open that reopens the
        circuit, since the probes are what stalled.

        :param reason: what went wrong, for the transition's explanation.
        """
        if self._current_probe(admission) or (
            admission is None and self.state is CircuitState.HALF_OPEN
        ):
            if admission is not None:
                self.probes_in_flight -= 1
            return self.transition(CircuitEvent.PROBE_FAILURE, now, f"probe failed: {reason}")
        if self.state is CircuitState.CLOSED:
            self.consecutive_failures += 1
            if self.consecutive_failures >= self.settings.failure_threshold:
                streak = self.consecutive_failures
                return self.transition(
                    CircuitEvent.TRIP, now, f"{streak} consecutive failures, last: {reason}"
                )
        return self.transition(CircuitEvent.FAILURE, now, reason)

    def release(self, admission: Admission) -> None:
        """The request ended with a neutral outcome (client went away, 4xx, backpressure).

        Frees its probe slot, if it held one, without deciding anything.
        """
        if self._current_probe(admission):
            self.probes_in_flight -= 1

    def _current_probe(self, admission: Admission | None) -> bool:
        return (
            admission is not None
            and admission.probe
            and admission.episode == self.episode
            and self.state is CircuitState.HALF_OPEN
        )

    def transition(
        self, event: CircuitEvent, now: float, reason: str = ""
    ) -> CircuitTransition | None:
        """Apply *event*: the one mutator of :attr:`state`.

        The ``record_*`` methods and :meth:`poll` call it after classifying;
        call it directly only to drive the table itself (tests, replays).

        :returns: the transition when the state changed, ``None`` for a self-loop.
        :raises IllegalTransition: when :data:`CIRCUIT_TABLE` has no such move,
            naming the state and the event.
        """
        old = self.state
        new = next_state("circuit", CIRCUIT_TABLE, old, event)
        if new is old:
            return None
        self.state = new
        self.since = now
        if new is CircuitState.OPEN:
            if old is CircuitState.CLOSED and now - self.closed_at >= self.settings.max_cooldown:
                self.opens = 0  # it behaved for a long while: start from the base cooldown
            self.opens += 1
            self.retry_at = now + self.settings.cooldown(self.opens)
            self.consecutive_failures = 0
        elif new is CircuitState.HALF_OPEN:
            self.episode += 1
            self.probes_in_flight = 0
        else:
            self.consecutive_failures = 0
            self.closed_at = now
        return Transition(old, new, event, now, reason)

    def __repr__(self) -> str:
        return (
            f"CircuitBreaker({self.state.name}, failures={self.consecutive_failures}, "
            f"opens={self.opens})"
        )
