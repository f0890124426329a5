"""One pool across processes: what a worker's copy holds, and how the copies stay true.

A proxy started with ``--workers N`` serves its data path from N worker
processes (:mod:`inferno_proxy.workers`).  The parent process keeps the one
authoritative :class:`~inferno_proxy.pool.Pool` (registrations, health checks,
the clock); every worker routes on a :class:`ReplicaPool`, a copy it never
judges on its own.  This module is the pure part of keeping them together
(no I/O, no clock), in both directions::

    parent                                          worker
    StatePublisher.snapshot() / .delta()  ------->  ReplicaPool.apply(records, removed)
      a NodeRecord per node whose state changed       state replaced, own counts kept
    TrafficLedger.others(worker)          ------->  ReplicaPool.set_peer_load(others)
      the other workers' in-flight, per node          feeds Node.peer_in_flight (least_requests)
    TrafficLedger.apply(worker, report)   <-------  ReplicaPool.take_report(...)
      in-flight sums, outcomes, probes                what its own traffic saw

**Authority.**  A worker's lease methods count its own requests and note
their outcomes; they never move a node's health, circuit or stall mark.  The
parent feeds the outcomes to its pool exactly as one process would
(:meth:`Pool.record_outcome`), and the resulting changes come back as
records, so every worker sees the same states.  Failures are worth a report
at once (:attr:`ReplicaPool.on_urgent`); runs of successes collapse into one
entry per node, since only their order relative to failures matters to a
breaker counting failures in a row.

**Probes.**  A half-open circuit admits ``half_open_probes`` requests at a
time across the whole proxy: a worker that admits a probe says so at once;
the parent asks its own breaker (:meth:`Pool.admit`) and keeps the ticket.
Two workers racing for the last slot both send their request, and the one
the parent refused counts as an ordinary request, deciding nothing.

**In flight.**  The parent's count for a node is the sum of the workers'
reports (``GET /backends``, stall detection, draining); each worker adds the
others' sum to its own live count when it compares loads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final, NamedTuple

from inferno.protocol import NodeInfo, NodeVitals
from inferno_proxy.circuit import Admission, CircuitState
from inferno_proxy.health import HealthState
from inferno_proxy.nodes import Lease, Node, NodeChange, NodeSource, Outcome, PoolSettings
from inferno_proxy.pool import Pool

__all__ = [
    "NodeRecord",
    "ReplicaPool",
    "Report",
    "StatePublisher",
    "TrafficLedger",
    "apply_record",
    "node_record",
]

_NO_CHANGES: Final[tuple[NodeChange, ...]] = ()
_SUCCESS: Final = Outcome.SUCCESS.value


class NodeRecord(NamedTuple):
    """One node's routing state, as the parent sends it (times: monotonic seconds,
    which Linux's ``CLOCK_MONOTONIC`` shares between the processes of one machine)."""

    info: dict[str, Any]  # NodeInfo.to_json()
    source: str  # NodeSource value
    models: tuple[str, ...]
    vitals: dict[str, Any] | None  # NodeVitals.to_json()
    vitals_at: float | None
    added_at: float
    draining_since: float | None
    stalled_since: float | None
    joined_at: float | None
    noted_in_rotation: bool
    health: tuple[str, float, bool]  # state, since, removable
    circuit: tuple[
        str, float, int, float, int, int
    ]  # state, since, opens, retry_at, episode, probes


class Report(NamedTuple):
    """What one worker's traffic saw since its previous report.

    :ivar traffic: ``node id -> (in flight, last byte)`` for nodes whose
        figures changed; ``(0, 0.0)`` for a node the worker no longer knows.
    :ivar outcomes: ``(node id, Outcome value, reason)`` of ordinary requests,
        in order; a run of successes is one entry.
    :ivar probes: ``(probe number, node id)`` of probes started.
    :ivar probe_ends: ``(probe number, Outcome value, reason)`` of probes ended.
    :ivar load: the worker's requests in flight and waiting in its queue.
    """

    traffic: dict[str, tuple[int, float]]
    outcomes: list[tuple[str, str, str]]
    probes: list[tuple[int, str]]
    probe_ends: list[tuple[int, str, str]]
    load: tuple[int, int]


def node_record(node: Node) -> NodeRecord:
    """The state of *node* a worker needs to route as the parent would."""
    health, circuit = node.health, node.circuit
    return NodeRecord(
        node.info.to_json(),
        node.source.value,
        node.models,
        None if node.vitals is None else node.vitals.to_json(),
        node.vitals_at,
        node.added_at,
        node.draining_since,
        node.stalled_since,
        node.joined_at,
        node.noted_in_rotation,
        (health.state.value, health.since, health.removable),
        (
            circuit.state.value,
            circuit.since,
            circuit.opens,
            circuit.retry_at,
            circuit.episode,
            circuit.probes_in_flight,
        ),
    )


def apply_record(node: Node, record: NodeRecord) -> None:
    """Copy *record* onto *node*, keeping what is the process's own: its requests in
    flight, their latest byte, and the others' load.

    The trackers' fields are written directly: this copies a decision the
    parent's state machines already made, it does not make one.
    """
    node.info = NodeInfo.from_json(record.info)
    node.source = NodeSource(record.source)
    node.set_models(tuple(record.models))
    node.vitals = None if record.vitals is None else NodeVitals.from_json(record.vitals)
    node.vitals_at = record.vitals_at
    node.added_at = record.added_at
    node.draining_since = record.draining_since
    node.stalled_since = record.stalled_since
    node.joined_at = record.joined_at
    node.noted_in_rotation = record.noted_in_rotation
    health, circuit = node.health, node.circuit
    state, health.since, health.removable = record.health
    health.state = HealthState(state)
    state, circuit.since, circuit.opens, circuit.retry_at, circuit.episode, probes = record.circuit
    circuit.state = CircuitState(state)
    circuit.probes_in_flight = probes


# --- the parent's side -------------------------------------------------------------------------


class StatePublisher:
    """Finds what changed in the authoritative pool since the last :meth:`delta`."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self._sent: dict[str, NodeRecord] = {}

    def snapshot(self) -> list[NodeRecord]:
        """Every node's record, in pool order (for a worker that starts)."""
        return [node_record(node) for node in self.pool.nodes()]

    def delta(self) -> tuple[list[NodeRecord], list[str]]:
        """Records of the nodes that changed or arrived, and the ids of those gone.

        Records are whole states, so sending one twice, or to a worker whose
        snapshot already held it, is harmless.
        """
        changed: list[NodeRecord] = []
        current: dict[str, NodeRecord] = {}
        for node in self.pool.nodes():
            record = current[node.id] = node_record(node)
            if self._sent.get(node.id) != record:
                changed.append(record)
        removed = [node_id for node_id in self._sent if node_id not in current]
        self._sent = current
        return changed, removed


class TrafficLedger:
    """The workers' reports, summed into the authoritative pool.

    :param pool: the parent's pool.
    """

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        #: worker -> node id -> (in flight, last byte)
        self._traffic: dict[int, dict[str, tuple[int, float]]] = {}
        #: (worker, probe number) -> (node id, the parent's ticket)
        self._probes: dict[tuple[int, int], tuple[str, Admission]] = {}
        self._load: dict[int, tuple[int, int]] = {}

    def apply(self, worker: int, report: Report, now: float) -> tuple[NodeChange, ...]:
        """Feed one report of *worker* to the pool; returns the changes it caused."""
        pool = self.pool
        changes: list[NodeChange] = []
        for number, node_id in report.probes:
            admission = pool.admit(node_id)
            if admission is not None and admission.probe:
                self._probes[(worker, number)] = (node_id, admission)
        for node_id, outcome, reason in report.outcomes:
            changes.extend(pool.record_outcome(node_id, Outcome(outcome), now, reason))
        for number, outcome, reason in report.probe_ends:
            node_id_admission = self._probes.pop((worker, number), None)
            if node_id_admission is not None:
                node_id, admission = node_id_admission
                changes.extend(
                    pool.record_outcome(node_id, Outcome(outcome), now, reason, admission)
                )
        own = self._traffic.setdefault(worker, {})
        for node_id, figures in report.traffic.items():
            if figures[0] > 0:
                own[node_id] = figures
            else:
                own.pop(node_id, None)
        changes.extend(self._sum(report.traffic, now))
        self._load[worker] = report.load
        return tuple(changes)

    def forget(self, worker: int, now: float) -> tuple[NodeChange, ...]:
        """*worker* exited: its requests ended with it, its probes decide nothing."""
        changes: list[NodeChange] = []
        for key in [key for key in self._probes if key[0] == worker]:
            node_id, admission = self._probes.pop(key)
            changes.extend(self.pool.record_outcome(node_id, Outcome.NEUTRAL, now, "", admission))
        gone = self._traffic.pop(worker, {})
        self._load.pop(worker, None)
        changes.extend(self._sum(gone, now))
        return tuple(changes)

    def others(self, worker: int) -> dict[str, int]:
        """``node id -> requests in flight`` of every worker but *worker* (non-zero only)."""
        totals: dict[str, int] = {}
        for other, traffic in self._traffic.items():
            if other == worker:
                continue
            for node_id, (in_flight, _) in traffic.items():
                totals[node_id] = totals.get(node_id, 0) + in_flight
        return totals

    def load(self) -> tuple[int, int]:
        """Requests in flight and queued, all workers together, as last reported."""
        return sum(v[0] for v in self._load.values()), sum(v[1] for v in self._load.values())

    def _sum(self, node_ids: Iterable[str], now: float) -> list[NodeChange]:
        changes: list[NodeChange] = []
        for node_id in node_ids:
            in_flight, progress = 0, 0.0
            for traffic in self._traffic.values():
                figures = traffic.get(node_id)
                if figures is not None:
                    in_flight += figures[0]
                    progress = max(progress, figures[1])
            changes.extend(self.pool.set_traffic(node_id, in_flight, progress, now))
        return changes


# --- the worker's side -------------------------------------------------------------------------


class ReplicaPool(Pool):
    """A worker's copy of the parent's pool (see the module docstring).

    The data path uses it like any :class:`Pool`; :meth:`start`,
    :meth:`progress` and :meth:`finish` count and note, and return no
    changes: those come from the parent, through :meth:`apply`.

    :ivar on_urgent: called (it must not block) when something happened
        that the parent should hear now rather than at the next report: a
        failure, a probe, a byte from or the end of a stalled node's requests.
    """

    def __init__(
        self, settings: PoolSettings | None = None, on_urgent: Callable[[], None] | None = None
    ) -> None:
        super().__init__(settings)
        self.on_urgent = on_urgent
        self._reported: dict[str, tuple[int, float]] = {}
        self._outcomes: list[tuple[str, str, str]] = []
        self._last_ok: set[str] = set()  # nodes whose latest noted outcome is a success
        self._probes: list[tuple[int, str]] = []
        self._probe_ends: list[tuple[int, str, str]] = []
        self._probe_numbers: dict[Lease, int] = {}
        self._next_probe = 0
        self._last_load = (0, 0)

    # --- from the parent --------------------------------------------------------------------

    def apply(self, records: Iterable[NodeRecord], removed: Iterable[str], *, full: bool) -> None:
        """Take the parent's states: *full* for a snapshot (nodes not in it are gone)."""
        nodes = self._nodes
        seen: dict[str, Node] = {}
        for record in records:
            node_id = record.info["id"]
            node = nodes.get(node_id)
            if node is None:
                node = Node(
                    NodeInfo.from_json(record.info),
                    NodeSource(record.source),
                    self.settings,
                    record.added_at,
                )
                nodes[node_id] = node
            apply_record(node, record)
            self._keep_own_probes(node)
            if full:
                seen[node_id] = node
        for node_id in removed:
            nodes.pop(node_id, None)
        if full:
            self._nodes = seen  # the parent's order

    def set_peer_load(self, others: Mapping[str, int]) -> None:
        """The other workers' requests in flight, per node (absent: none)."""
        for node in self._nodes.values():
            node.peer_in_flight = others.get(node.id, 0)

    def _keep_own_probes(self, node: Node) -> None:
        """A probe this process sent may not have reached the parent's count yet."""
        circuit = node.circuit
        own = sum(
            1
            for lease in self._probe_numbers
            if lease.node is node and lease.admission.episode == circuit.episode
        )
        if circuit.state is CircuitState.HALF_OPEN and own > circuit.probes_in_flight:
            circuit.probes_in_flight = own

    # --- the data path ----------------------------------------------------------------------

    def start(self, node: Node, now: float) -> Lease:
        if node.in_flight == 0:
            node.last_progress = now
        node.in_flight += 1
        admission = node.circuit.admit()  # a probe takes this copy's slot at once
        lease = Lease(node, now, admission)
        if admission.probe:
            self._next_probe += 1
            self._probe_numbers[lease] = self._next_probe
            self._probes.append((self._next_probe, node.id))
            self._urgent()
        return lease

    def progress(self, lease: Lease, now: float) -> tuple[NodeChange, ...]:
        node = lease.node
        node.last_progress = now
        if node.stalled_since is not None:
            self._urgent()  # the parent ends the stall, for every worker
        return _NO_CHANGES

    def finish(
        self, lease: Lease, outcome: Outcome, now: float, reason: str = ""
    ) -> tuple[NodeChange, ...]:
        if lease.done:
            return _NO_CHANGES
        lease.done = True
        node = lease.node
        node.in_flight -= 1
        number = self._probe_numbers.pop(lease, None)
        if number is not None:
            circuit = node.circuit
            if circuit.episode == lease.admission.episode and circuit.probes_in_flight > 0:
                circuit.probes_in_flight -= 1
            self._probe_ends.append((number, outcome.value, reason))
            self._urgent()
        elif outcome is Outcome.SUCCESS:
            if node.id not in self._last_ok:
                self._last_ok.add(node.id)
                self._outcomes.append((node.id, _SUCCESS, ""))
        elif outcome is not Outcome.NEUTRAL:
            self._last_ok.discard(node.id)
            self._outcomes.append((node.id, outcome.value, reason))
            self._urgent()
        if node.in_flight == 0 and node.stalled_since is not None:
            self._urgent()
        return _NO_CHANGES

    def tick(self, now: float) -> tuple[NodeChange, ...]:
        """Nothing: cooldowns and stalls are the parent's to find."""
        return _NO_CHANGES

    def take_report(self, load: tuple[int, int]) -> Report | None:
        """What happened since the previous report, or ``None`` when nothing did."""
        traffic: dict[str, tuple[int, float]] = {}
        current: dict[str, tuple[int, float]] = {}
        for node in self._nodes.values():
            figures = (node.in_flight, node.last_progress)
            if node.in_flight > 0:
                current[node.id] = figures
            if self._reported.get(node.id, (0, figures[1])) != figures:
                traffic[node.id] = figures
        for node_id in self._reported:
            if node_id not in current and node_id not in traffic:
                traffic[node_id] = (0, 0.0)  # finished, or no longer known
        self._reported = current
        report = Report(traffic, self._outcomes, self._probes, self._probe_ends, load)
        self._outcomes, self._probes, self._probe_ends = [], [], []
        self._last_ok.clear()
        if load == self._last_load and not (
            traffic or report.outcomes or report.probes or report.probe_ends
        ):
            return None
        self._last_load = load
        return report

    def _urgent(self) -> None:
        if self.on_urgent is not None:
            self.on_urgent()
