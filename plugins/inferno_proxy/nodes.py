"""A node as the proxy sees it, and the values the pool trades in.

:class:`Node` holds one node's routing state: its description, health
tracker, circuit breaker, requests in flight, reported queue depth and
readiness, draining and stall marks, and when it joined rotation.  The
:class:`~inferno_proxy.pool.Pool` creates and changes nodes; routing policies
and handlers read them.  The small value types here (:class:`Outcome`,
:class:`NodeChange`, :class:`Lease`, :class:`Selection`, ...) are what the
pool's drivers pass in and get back.

Safety valves, after Envoy's: the pool never ejects more than
``max_ejection_percent`` of the nodes serving a model -- past that it panics
and offers all of them, healthy or not, since spreading load over a partly
broken fleet beats piling it onto the few survivors; and a node that (re)joins
rotation gets its share ramped up over ``slow_start`` seconds
(:meth:`Node.effective_weight`, which every policy uses).  Both are applied
by :meth:`inferno_proxy.pool.Pool.eligible` and the policies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Final

from inferno.errors import InfernoError
from inferno.protocol import NodeInfo, NodeType, NodeVitals
from inferno_proxy.circuit import Admission, CircuitBreaker, CircuitSettings, CircuitState
from inferno_proxy.health import HealthSettings, HealthState, HealthTracker

__all__ = [
    "MIN_SLOW_START_FRACTION",
    "TICK_INTERVAL",
    "ChangeKind",
    "Lease",
    "Node",
    "NodeChange",
    "NodeSource",
    "OutReason",
    "Outcome",
    "PoolFull",
    "PoolSettings",
    "Selection",
    "Why",
]

TICK_INTERVAL: Final = 1.0  # seconds between Pool.tick calls: the precision of cooldowns and stalls
MIN_SLOW_START_FRACTION: Final = 0.1  # a joining node gets at least a trickle, so it warms up


class NodeSource(Enum):
    """How a node entered the pool."""

    STATIC = "static"  # --backends: never removed, stays unhealthy while down
    REGISTERED = "registered"  # POST /register: forgotten after removal_threshold failures


class Outcome(Enum):
    """How a request to a node ended, as the forwarding driver classifies it."""

    SUCCESS = "success"  # the response arrived in full
    SERVER_ERROR = "server_error"  # the node answered 500/502/504: circuit failure only
    TRANSPORT_FAILURE = "transport_failure"  # connect failure, reset, timeout: health + circuit
    NEUTRAL = "neutral"  # 4xx, 429/503 backpressure, client went away: says nothing


class Why:
    """Reasons a node is out of rotation, as ``GET /backends`` names them."""

    DRAINING: Final = "draining"  # deregistered; finishing its requests
    UNCHECKED: Final = "unchecked"  # never checked yet
    NOT_READY: Final = "not_ready"  # reports ready=false
    FAILED_CHECKS: Final = "failed_checks"  # health checks (or live traffic) failed
    CIRCUIT_OPEN: Final = "circuit_open"  # requests failed; cooling down
    CIRCUIT_PROBING: Final = "circuit_probing"  # half-open, all probe slots busy
    STALLED: Final = "stalled"  # requests in flight but no byte for stall_timeout


@dataclass(frozen=True, slots=True)
class OutReason:
    """One reason a node is out: *reason* (a :class:`Why` value) since *since*, with *detail*."""

    reason: str
    since: float
    detail: str = ""


class ChangeKind(Enum):
    """What a :class:`NodeChange` reports."""

    ADDED = "added"
    UPDATED = "updated"  # a re-registration changed something
    REMOVED = "removed"
    HEALTH = "health"  # old/new are HealthState values
    CIRCUIT = "circuit"  # old/new are CircuitState values
    STALL = "stall"  # "flowing" <-> "stalled"
    DRAINING = "draining"
    ROTATION = "rotation"  # "out" <-> "in": fully in rotation (healthy, closed, not stalled)


@dataclass(frozen=True, slots=True)
class NodeChange:
    """One notable change of one node, for logs, metrics and the other workers."""

    node_id: str
    kind: ChangeKind
    old: str
    new: str
    at: float
    reason: str = ""


@dataclass(frozen=True, slots=True)
class PoolSettings:
    """Everything that tunes the pool; replace it whole with :meth:`Pool.reconfigure`.

    :ivar max_ejection_percent: at most this share of the nodes serving a
        model is kept out of rotation; past it the pool panics (0-100).
    :ivar slow_start: seconds over which a (re)joining node's weight ramps
        linearly from :data:`MIN_SLOW_START_FRACTION` to full; 0 disables.
    :ivar stall_timeout: seconds without a byte from a node that has requests
        in flight before it counts as hung; 0 disables.
    :ivar max_nodes: the most nodes the pool holds (bounds what registrations
        can make us store).
    :raises ValueError: on an out-of-range value.
    """

    health: HealthSettings = field(default_factory=HealthSettings)
    circuit: CircuitSettings = field(default_factory=CircuitSettings)
    max_ejection_percent: float = 50.0  # Envoy's default panic threshold
    slow_start: float = 30.0
    stall_timeout: float = 30.0  # well above a long prompt's prefill on a busy node
    max_nodes: int = 10_000

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_ejection_percent <= 100.0:
            raise ValueError(f"max_ejection_percent must be 0-100, got {self.max_ejection_percent}")
        for name in ("slow_start", "stall_timeout"):
            if not getattr(self, name) >= 0.0:
                raise ValueError(f"{name} must be >= 0 seconds, got {getattr(self, name)!r}")
        if self.max_nodes < 1:
            raise ValueError(f"max_nodes must be >= 1, got {self.max_nodes}")


class PoolFull(InfernoError):
    """Raised when a registration would take the pool past ``max_nodes`` (answer 503)."""

    temporary = True


class Node:
    """One node the proxy knows, and everything routing needs to know about it.

    Nodes are created and changed by the :class:`Pool`; drivers and policies
    read them.  Attributes a policy uses: :attr:`id`, :attr:`load`,
    :meth:`effective_weight`.

    :ivar info: the node's description (from its registration, or built for
        a static backend); ``info.id`` keys the pool.
    :ivar source: static or registered.
    :ivar health: its :class:`~inferno_proxy.health.HealthTracker`.
    :ivar circuit: its :class:`~inferno_proxy.circuit.CircuitBreaker`.
    :ivar models: the models it serves now (its vitals' list when they report
        one, else its registration's; for a static node, its configured list
        or the one its ``GET /v1/models`` gave); empty means "unknown: any model".
    :ivar in_flight: requests this proxy has sent it and not yet finished (in a
        worker process of a multi-process proxy: this process's own).
    :ivar peer_in_flight: requests the other worker processes of this proxy
        have in flight at it, as last reported (always 0 with one process).
    :ivar vitals: its latest vitals, or ``None``; :attr:`vitals_at` when read.
    :ivar added_at: when it entered the pool.
    :ivar joined_at: when it last became fully in rotation (slow start runs
        from here), or ``None`` if it never was.
    :ivar draining_since: when it deregistered, or ``None``.
    :ivar stalled_since: when it was found stalled, or ``None``.
    :ivar last_progress: when it last sent a byte (or got its first request
        after being idle).
    :ivar noted_in_rotation: whether the pool last noted it fully in rotation
        (the pool's bookkeeping, to report entering and leaving once).
    """

    __slots__ = (
        "_model_set",
        "added_at",
        "circuit",
        "draining_since",
        "health",
        "in_flight",
        "info",
        "joined_at",
        "last_progress",
        "models",
        "noted_in_rotation",
        "peer_in_flight",
        "settings",
        "source",
        "stalled_since",
        "vitals",
        "vitals_at",
    )

    def __init__(
        self, info: NodeInfo, source: NodeSource, settings: PoolSettings, now: float
    ) -> None:
        self.info = info
        self.source = source
        self.settings = settings
        self.models: tuple[str, ...] = ()
        self._model_set: frozenset[str] = frozenset()
        self.set_models(info.models)
        self.in_flight = 0
        self.peer_in_flight = 0
        self.vitals: NodeVitals | None = None
        self.vitals_at: float | None = None
        self.added_at = now
        self.draining_since: float | None = None
        self.stalled_since: float | None = None
        self.last_progress = now
        self.reset(now)

    def reset(self, now: float) -> None:
        """Start health and circuit afresh (a new node, or one that moved address)."""
        registered = self.source is NodeSource.REGISTERED
        self.health = HealthTracker(
            self.settings.health,
            removable=registered,
            now=now,
            # It registered once its engine was ready; a static node is unknown until checked.
            state=HealthState.HEALTHY if registered else HealthState.UNKNOWN,
        )
        self.circuit = CircuitBreaker(self.settings.circuit, now=now)
        self.stalled_since = None
        # The pool's next settle notes it entering rotation and starts its slow start.
        self.noted_in_rotation = False
        self.joined_at: float | None = None

    # --- what policies and handlers read ----------------------------------------------------

    @property
    def id(self) -> str:
        return self.info.id

    @property
    def address(self) -> str:
        """``host:port`` of its service port."""
        return self.info.address

    @property
    def weight(self) -> float:
        """Its configured or registered weight (> 0), before slow start."""
        return self.info.weight

    @property
    def routable(self) -> bool:
        """Whether it serves requests at all (backends do; proxies, governators do not)."""
        return self.info.node_type == NodeType.BACKEND

    @property
    def queue_depth(self) -> int:
        """Requests waiting at the node, as its latest vitals reported (0 without vitals)."""
        return self.vitals.requests_queued if self.vitals is not None else 0

    @property
    def load(self) -> int:
        """What load-aware policies compare: this proxy's in-flight (all its processes')
        plus the node's queue."""
        return self.in_flight + self.peer_in_flight + self.queue_depth

    def serves(self, model: str | None) -> bool:
        """Whether it can serve *model* (``None``: any request; no known models: any model)."""
        return model is None or not self._model_set or model in self._model_set

    def set_models(self, models: tuple[str, ...]) -> None:
        self.models = models
        self._model_set = frozenset(models)

    def slow_start_factor(self, now: float) -> float:
        """Its share of full weight while ramping: linear over ``slow_start`` seconds since joining.

        Never below :data:`MIN_SLOW_START_FRACTION`; 1.0 when slow start is
        off, over, or the node never joined (reachable only in panic).
        """
        window = self.settings.slow_start
        if window <= 0.0 or self.joined_at is None:
            return 1.0
        elapsed = now - self.joined_at
        if elapsed >= window:
            return 1.0
        return max(MIN_SLOW_START_FRACTION, elapsed / window)

    def effective_weight(self, now: float) -> float:
        """The weight every policy uses: :attr:`weight` times :meth:`slow_start_factor`."""
        return self.info.weight * self.slow_start_factor(now)

    def in_rotation(self) -> bool:
        """Whether a new request may go to it outside panic mode."""
        return (
            self.draining_since is None
            and self.stalled_since is None
            and self.health.in_rotation
            and self.circuit.admits()
        )

    def out_reasons(self) -> tuple[OutReason, ...]:
        """Why it is out of rotation, each with since when; empty when it is in."""
        reasons: list[OutReason] = []
        if self.draining_since is not None:
            reasons.append(OutReason(Why.DRAINING, self.draining_since))
        health = self.health
        if health.state is HealthState.UNKNOWN:
            reasons.append(OutReason(Why.UNCHECKED, health.since))
        elif health.state is HealthState.NOT_READY:
            reasons.append(OutReason(Why.NOT_READY, health.since))
        elif health.state is not HealthState.HEALTHY:
            detail = f"{health.consecutive_failures} consecutive failures"
            if health.last_failure:
                detail += f", last: {health.last_failure}"
            reasons.append(OutReason(Why.FAILED_CHECKS, health.since, detail))
        circuit = self.circuit
        if circuit.state is CircuitState.OPEN:
            detail = f"cooldown {circuit.retry_at - circuit.since:g}s (opening {circuit.opens})"
            reasons.append(OutReason(Why.CIRCUIT_OPEN, circuit.since, detail))
        elif not circuit.admits():
            detail = f"{circuit.probes_in_flight} probe(s) in flight"
            reasons.append(OutReason(Why.CIRCUIT_PROBING, circuit.since, detail))
        if self.stalled_since is not None:
            # last_progress stays put while stalled (a byte ends the stall): this
            # is the silence the pool found, as its log line said.
            silent = max(0.0, self.stalled_since - self.last_progress)
            detail = f"no byte for {silent:.0f}s with {self.in_flight} request(s) in flight"
            reasons.append(OutReason(Why.STALLED, self.stalled_since, detail))
        return tuple(reasons)

    def describe(self, now: float) -> dict[str, Any]:
        """Its ``GET /backends`` entry (JSON-ready); times are ages in seconds before *now*."""
        return {
            "id": self.id,
            "address": self.address,
            "node_type": self.info.node_type,
            "source": self.source.value,
            "models": list(self.models),
            "weight": self.weight,
            "effective_weight": self.effective_weight(now),
            "healthy": self.in_rotation(),
            "health": self.health.state.value,
            "circuit": self.circuit.state.value,
            "in_flight": self.in_flight,
            "queue_depth": self.queue_depth,
            "ready": self.health.state is not HealthState.NOT_READY,
            "draining": self.draining_since is not None,
            "consecutive_failures": self.health.consecutive_failures,
            "last_failure": self.health.last_failure,
            "out": [
                {"reason": r.reason, "for_seconds": now - r.since, "detail": r.detail}
                for r in self.out_reasons()
            ],
            "vitals": self.vitals.to_json() if self.vitals is not None else None,
            "vitals_age_seconds": None if self.vitals_at is None else now - self.vitals_at,
        }

    def fully_in_rotation(self) -> bool:
        """In rotation with nothing pending: healthy, circuit closed, not stalled, not draining.

        Stricter than :meth:`in_rotation` (a half-open circuit admits probes
        but is not fully in); entering this is what starts slow start.
        """
        return (
            self.draining_since is None
            and self.stalled_since is None
            and self.health.state is HealthState.HEALTHY
            and self.circuit.state is CircuitState.CLOSED
        )

    def __repr__(self) -> str:
        return f"Node({self.id!r}, {self.address}, {self.health!r}, {self.circuit!r})"


@dataclass(slots=True, eq=False)
class Lease:
    """One request sent to one node, from :meth:`Pool.start` to :meth:`Pool.finish`.

    :ivar node: the node serving it.
    :ivar started_at: when it started.
    :ivar admission: the circuit breaker's ticket (was it a probe).
    :ivar done: set by the first :meth:`Pool.finish`; later calls do nothing.
    """

    node: Node
    started_at: float
    admission: Admission
    done: bool = False


@dataclass(frozen=True, slots=True)
class Selection:
    """What :meth:`Pool.eligible` found for one model.

    :ivar candidates: the nodes a policy may choose from (pool order).
    :ivar panic: whether too many were out and the valve opened.
    :ivar serving: backends that serve the model in any state; 0 means no
        node knows it (answer 404), while empty candidates with ``serving > 0``
        means "wait for one" (queue, then 503).
    """

    candidates: tuple[Node, ...]
    panic: bool
    serving: int
