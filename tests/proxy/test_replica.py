"""One pool across processes, in memory: the parent's pool, its publisher and ledger,
and workers' replicas, passing records and reports as the channel would (pickled)."""

from __future__ import annotations

import pickle
from typing import Any

from inferno_proxy.circuit import CircuitSettings, CircuitState
from inferno_proxy.health import HealthSettings, HealthState
from inferno_proxy.nodes import ChangeKind, Node, NodeChange, Outcome, PoolSettings
from inferno_proxy.pool import Pool
from inferno_proxy.replica import ReplicaPool, Report, StatePublisher, TrafficLedger

from inferno.protocol import NodeInfo, NodeVitals

SETTINGS = PoolSettings(
    health=HealthSettings(failure_threshold=2, recovery_threshold=1, removal_threshold=10),
    circuit=CircuitSettings(failure_threshold=3, base_cooldown=5.0, max_cooldown=60.0),
    slow_start=0.0,
    stall_timeout=10.0,
)


def info(node_id: str, port: int) -> NodeInfo:
    return NodeInfo(
        id=node_id,
        address=f"127.0.0.1:{port}",
        metrics_port=port,
        node_type="backend",
        models=("tiny",),
    )


def state(node: Node) -> str:
    """A node's circuit state (read through a call: the test changes it between reads)."""
    return node.circuit.state.value


def wire(value: Any) -> Any:
    """What crosses the channel."""
    return pickle.loads(pickle.dumps(value))


class Proxy:
    """A parent pool and two workers' replicas, synchronised by hand."""

    def __init__(self) -> None:
        self.pool = Pool(SETTINGS)
        self.publisher = StatePublisher(self.pool)
        self.ledger = TrafficLedger(self.pool)
        self.workers = [ReplicaPool(SETTINGS), ReplicaPool(SETTINGS)]
        self.urgent = [0, 0]
        for index, worker in enumerate(self.workers):
            worker.on_urgent = lambda i=index: self._note_urgent(i)
            worker.apply(wire(self.publisher.snapshot()), [], full=True)

    def _note_urgent(self, index: int) -> None:
        self.urgent[index] += 1

    def publish(self) -> None:
        changed, removed = wire(self.publisher.delta())
        for worker in self.workers:
            worker.apply(changed, removed, full=False)
        for index, worker in enumerate(self.workers):
            worker.set_peer_load(wire(self.ledger.others(index)))

    def report(self, index: int, now: float, load: tuple[int, int] = (0, 0)) -> list[NodeChange]:
        report = self.workers[index].take_report(load)
        if report is None:
            return []
        return list(self.ledger.apply(index, wire(report), now))


def test_a_worker_routes_on_what_the_parent_knows() -> None:
    proxy = Proxy()
    proxy.pool.register(info("a", 1001), 0.0)
    proxy.pool.register(info("b", 1002), 0.0)
    proxy.publish()
    for worker in proxy.workers:
        assert [n.id for n in worker.eligible("tiny").candidates] == ["a", "b"]
        assert worker.models() == ["tiny"]
    vitals = NodeVitals(
        ready=False,
        requests_in_progress=0,
        requests_queued=0,
        cpu_usage=0.0,
        memory_usage=0.0,
        uptime_seconds=1.0,
        version="x",
    )
    proxy.pool.check_passed("b", 1.0, vitals)
    proxy.publish()
    for worker in proxy.workers:
        assert [n.id for n in worker.eligible("tiny").candidates] == ["a"]
        b = worker.get("b")
        assert b is not None
        assert b.health.state is HealthState.NOT_READY
    proxy.pool.deregister("b", 2.0)  # idle: removed at once
    proxy.publish()
    assert all("b" not in worker for worker in proxy.workers)


def test_a_restarted_worker_gets_everything_from_a_snapshot() -> None:
    proxy = Proxy()
    proxy.pool.register(info("a", 1001), 0.0)
    proxy.publish()
    late = ReplicaPool(SETTINGS)
    late.apply(wire(proxy.publisher.snapshot()), [], full=True)
    assert [n.id for n in late.nodes()] == ["a"]
    proxy.pool.remove("a", 1.0)
    late.apply(wire(proxy.publisher.snapshot()), [], full=True)
    assert late.nodes() == []


def test_failures_in_two_workers_count_together_and_open_the_circuit_everywhere() -> None:
    proxy = Proxy()
    proxy.pool.register(info("a", 1001), 0.0)
    proxy.pool.register(info("b", 1002), 0.0)
    proxy.publish()
    now = 1.0
    changes: list[NodeChange] = []
    for attempt in range(3):  # the circuit's threshold, spread over both workers
        worker = proxy.workers[attempt % 2]
        node = worker.get("a")
        assert node is not None
        lease = worker.start(node, now)
        assert worker.finish(lease, Outcome.SERVER_ERROR, now, "500") == ()
        changes += proxy.report(attempt % 2, now)
    assert proxy.urgent == [2, 1]  # every failure asks for a report at once
    assert any(c.kind is ChangeKind.CIRCUIT and c.new == "open" for c in changes)
    proxy.publish()
    for worker in proxy.workers:
        a = worker.get("a")
        assert a is not None
        assert a.circuit.state is CircuitState.OPEN
        assert [n.id for n in worker.eligible("tiny").candidates] == ["b"]


def test_successes_between_failures_keep_the_circuit_closed() -> None:
    proxy = Proxy()
    proxy.pool.register(info("a", 1001), 0.0)
    proxy.publish()
    worker = proxy.workers[0]
    node = worker.get("a")
    assert node is not None
    for outcome in [Outcome.SERVER_ERROR, Outcome.SERVER_ERROR] + [Outcome.SUCCESS] * 50:
        worker.finish(worker.start(node, 1.0), outcome, 1.0)
    report = worker.take_report((0, 0))
    assert report is not None
    assert [o[1] for o in report.outcomes] == ["server_error", "server_error", "success"]
    proxy.ledger.apply(0, report, 1.0)
    worker.finish(worker.start(node, 1.0), Outcome.SERVER_ERROR, 1.0)
    proxy.report(0, 1.0)
    parent = proxy.pool.get("a")
    assert parent is not None
    assert parent.circuit.state is CircuitState.CLOSED


def test_transport_failures_take_the_node_out_of_every_worker() -> None:
    proxy = Proxy()
    proxy.pool.register(info("a", 1001), 0.0)
    proxy.publish()
    for index in (0, 1):  # failure_threshold 2: one in each worker
        worker = proxy.workers[index]
        node = worker.get("a")
        assert node is not None
        worker.finish(worker.start(node, 1.0), Outcome.TRANSPORT_FAILURE, 1.0, "refused")
        proxy.report(index, 1.0)
    proxy.publish()
    for worker in proxy.workers:
        a = worker.get("a")
        assert a is not None
        assert a.health.state is HealthState.UNHEALTHY


def test_in_flight_is_summed_for_the_parent_and_shared_between_workers() -> None:
    proxy = Proxy()
    proxy.pool.register(info("a", 1001), 0.0)
    proxy.pool.register(info("b", 1002), 0.0)
    proxy.publish()
    first, second = proxy.workers
    node = first.get("a")
    assert node is not None
    leases = [first.start(node, 1.0) for _ in range(3)]
    other = second.get("a")
    assert other is not None
    second.start(other, 1.0)
    proxy.report(0, 1.0, load=(3, 0))
    proxy.report(1, 1.0, load=(1, 0))
    parent = proxy.pool.get("a")
    assert parent is not None
    assert parent.in_flight == 4
    assert proxy.pool.describe(1.0)[0]["in_flight"] == 4
    assert proxy.ledger.load() == (4, 0)
    proxy.publish()
    # Worker 2 sees its own request plus worker 1's three: least_requests avoids "a".
    assert other.load == 4
    assert other.peer_in_flight == 3
    b = second.get("b")
    assert b is not None
    assert b.load == 0
    for lease in leases:
        first.finish(lease, Outcome.SUCCESS, 2.0)
    proxy.report(0, 2.0)
    proxy.publish()
    assert parent.in_flight == 1
    assert other.peer_in_flight == 0
    assert proxy.ledger.forget(1, 3.0) == ()
    assert parent.in_flight == 0


def test_a_draining_node_leaves_when_the_workers_last_request_ends() -> None:
    proxy = Proxy()
    proxy.pool.register(info("a", 1001), 0.0)
    proxy.publish()
    worker = proxy.workers[0]
    node = worker.get("a")
    assert node is not None
    lease = worker.start(node, 1.0)
    proxy.report(0, 1.0)
    proxy.pool.deregister("a", 2.0)
    assert "a" in proxy.pool  # one request still in flight
    proxy.publish()
    assert worker.eligible("tiny").candidates == ()
    worker.finish(lease, Outcome.SUCCESS, 3.0)
    changes = proxy.report(0, 3.0)
    assert [c.kind for c in changes][-1] is ChangeKind.REMOVED
    proxy.publish()
    assert "a" not in worker


def test_a_stall_found_by_the_parent_ends_with_a_byte_in_a_worker() -> None:
    proxy = Proxy()
    proxy.pool.register(info("a", 1001), 0.0)
    proxy.publish()
    worker = proxy.workers[0]
    node = worker.get("a")
    assert node is not None
    lease = worker.start(node, 1.0)
    proxy.report(0, 1.0)
    assert worker.tick(20.0) == ()  # the worker never judges
    stalled = proxy.pool.tick(20.0)
    assert any(c.kind is ChangeKind.STALL and c.new == "stalled" for c in stalled)
    proxy.publish()
    assert node.stalled_since == 20.0
    assert worker.progress(lease, 21.0) == ()
    assert proxy.urgent[0] == 1
    changes = proxy.report(0, 21.0)
    assert any(c.kind is ChangeKind.STALL and c.new == "flowing" for c in changes)
    proxy.publish()
    assert node.stalled_since is None


def test_one_probe_at_a_time_across_workers() -> None:
    proxy = Proxy()
    proxy.pool.register(info("a", 1001), 0.0)
    parent = proxy.pool.get("a")
    assert parent is not None
    for _ in range(3):
        proxy.pool.record_outcome("a", Outcome.SERVER_ERROR, 0.0, "500")
    assert state(parent) == "open"
    proxy.pool.tick(10.0)  # the cooldown is over: half-open
    proxy.publish()
    first, second = proxy.workers
    a1, a2 = first.get("a"), second.get("a")
    assert a1 is not None
    assert a2 is not None
    probe = first.start(a1, 10.0)
    assert probe.admission.probe
    assert not a1.circuit.admits()  # this worker's slot is taken at once
    proxy.report(0, 10.0)
    proxy.publish()
    assert not a2.circuit.admits()  # and the other's once the parent has it
    first.finish(probe, Outcome.SUCCESS, 11.0)
    proxy.report(0, 11.0)
    assert state(parent) == "closed"
    proxy.publish()
    assert state(a1) == state(a2) == "closed"


def test_a_probe_of_a_worker_that_died_decides_nothing() -> None:
    proxy = Proxy()
    proxy.pool.register(info("a", 1001), 0.0)
    for _ in range(3):
        proxy.pool.record_outcome("a", Outcome.SERVER_ERROR, 0.0, "500")
    proxy.pool.tick(10.0)
    proxy.publish()
    worker = proxy.workers[0]
    node = worker.get("a")
    assert node is not None
    worker.start(node, 10.0)
    proxy.report(0, 10.0)
    parent = proxy.pool.get("a")
    assert parent is not None
    assert parent.circuit.probes_in_flight == 1
    proxy.ledger.forget(0, 11.0)
    assert parent.circuit.probes_in_flight == 0
    assert parent.circuit.state is CircuitState.HALF_OPEN


def test_an_idle_worker_reports_nothing() -> None:
    proxy = Proxy()
    proxy.pool.register(info("a", 1001), 0.0)
    proxy.publish()
    worker = proxy.workers[0]
    assert worker.take_report((0, 0)) is None
    node = worker.get("a")
    assert node is not None
    worker.finish(worker.start(node, 1.0), Outcome.NEUTRAL, 1.0)
    assert worker.take_report((0, 0)) is None  # nothing in flight before or after
    assert isinstance(worker.take_report((0, 1)), Report)  # its queue changed
