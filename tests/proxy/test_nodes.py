"""The node pool: discovery, eligibility (models, health, circuit, panic), slow start, stalls."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from inferno_proxy.circuit import CircuitSettings, CircuitState
from inferno_proxy.health import HealthSettings, HealthState
from inferno_proxy.nodes import (
    MIN_SLOW_START_FRACTION,
    ChangeKind,
    NodeChange,
    NodeSource,
    Outcome,
    PoolFull,
    PoolSettings,
    Why,
)
from inferno_proxy.pool import PEER_EXPIRED, PEER_TTL, Pool

from inferno.errors import ValidationError
from inferno.protocol import NodeVitals, Registration

PORTS = iter(range(20000, 60000))


def registration(node_id: str, **fields: Any) -> Registration:
    fields.setdefault("address", f"127.0.0.1:{next(PORTS)}")
    fields.setdefault("metrics_port", 9000)
    fields.setdefault("node_type", "backend")
    return Registration(id=node_id, **fields)


def vitals(*, ready: bool = True, queued: int = 0, models: tuple[str, ...] = ()) -> NodeVitals:
    return NodeVitals(
        ready=ready,
        requests_in_progress=0,
        requests_queued=queued,
        cpu_usage=0.1,
        memory_usage=0.2,
        uptime_seconds=10.0,
        version="test",
        models=models,
    )


def kinds(changes: tuple[NodeChange, ...]) -> list[tuple[str, str, str]]:
    return [(c.kind.value, c.old, c.new) for c in changes]


def ids(pool: Pool, model: str | None = None) -> list[str]:
    return [n.id for n in pool.eligible(model).candidates]


def pool_of(*names: str, **options: Any) -> Pool:
    pool = Pool(PoolSettings(**options))
    for name in names:
        pool.register(registration(name), 0.0)
    return pool


def fail_checks(pool: Pool, node_id: str, times: int, now: float = 1.0) -> None:
    for _ in range(times):
        pool.check_failed(node_id, now, "timeout")


# --- discovery -----------------------------------------------------------------------------


def test_a_registered_node_is_in_rotation_at_once() -> None:
    pool = Pool()
    changes = pool.register(registration("a", models=["m"]), 5.0)
    node = pool.get("a")
    assert node is not None
    assert kinds(changes) == [("added", "", node.address), ("rotation", "out", "in")]
    assert node.source is NodeSource.REGISTERED
    assert node.health.state is HealthState.HEALTHY
    assert node.joined_at == 5.0
    assert ids(pool, "m") == ["a"]
    assert "a" in pool
    assert len(pool) == 1


def test_re_registering_updates_but_keeps_health_and_slow_start() -> None:
    pool = Pool()
    first = registration("a", models=["m"], weight=1.0)
    pool.register(first, 0.0)
    fail_checks(pool, "a", 2)
    update = registration("a", address=first.address, models=["m", "n"], weight=2.0)
    changes = pool.register(update, 50.0)
    node = pool.get("a")
    assert node is not None
    assert kinds(changes) == [("updated", first.address, first.address)]
    assert node.models == ("m", "n")
    assert node.weight == 2.0
    assert node.health.consecutive_failures == 2  # not reset by the announcement
    assert node.joined_at == 0.0
    assert pool.register(update, 60.0) == ()  # a periodic re-announcement is no news


def test_re_registering_at_a_new_address_starts_afresh() -> None:
    pool = Pool()
    pool.register(registration("a"), 0.0)
    fail_checks(pool, "a", 3)
    changes = pool.register(registration("a"), 10.0)
    node = pool.get("a")
    assert node is not None
    assert node.health.state is HealthState.HEALTHY
    assert node.joined_at == 10.0
    assert kinds(changes)[-1] == ("rotation", "out", "in")


def test_peers_lists_every_node_and_only_backends_are_routed() -> None:
    pool = Pool()
    pool.register(registration("b1"), 0.0)
    pool.register(registration("p1", node_type="proxy"), 0.0)
    assert [p.id for p in pool.peers()] == ["b1", "p1"]
    assert [n.id for n in pool.backends()] == ["b1"]
    assert ids(pool) == ["b1"]
    assert [d["id"] for d in pool.describe(1.0)] == ["b1"]


def test_peers_carry_the_models_a_backend_serves_now() -> None:
    pool = Pool()
    pool.add_static("127.0.0.1:9000", 0.0)
    pool.set_models("127.0.0.1:9000", ("read-from-the-node",), 1.0)
    assert [p.models for p in pool.peers()] == [("read-from-the-node",)]
    node = pool.get("127.0.0.1:9000")
    assert node is not None
    assert node.info.models == ()  # what it was configured with stays


def test_other_node_types_are_peers_kept_while_they_announce() -> None:
    pool = Pool()
    pool.register(registration("b1"), 0.0)
    proxy = registration("p1", node_type="proxy")
    changes = pool.register(proxy, 0.0)
    assert kinds(changes) == [("added", "", proxy.address)]  # no health, no rotation
    assert changes[0].reason == "peer"
    assert "p1" not in pool
    assert [n.id for n in pool.nodes()] == ["b1"]  # what the health loop checks
    assert pool.register(proxy, 60.0) == ()  # re-announced: no news, but fresh again
    assert pool.tick(60.0 + PEER_TTL - 1.0) == ()
    changes = pool.tick(60.0 + PEER_TTL)
    assert kinds(changes) == [("removed", proxy.address, "")]
    assert changes[0].reason == PEER_EXPIRED
    assert [p.id for p in pool.peers()] == ["b1"]
    pool.register(proxy, 200.0)
    assert kinds(pool.deregister("p1", 201.0)) == [("removed", proxy.address, "")]
    assert [p.id for p in pool.peers()] == ["b1"]


def test_a_node_that_changes_type_moves_between_backends_and_peers() -> None:
    pool = Pool(PoolSettings(max_nodes=2))
    pool.register(registration("x"), 0.0)
    changes = pool.register(registration("x", node_type="governator"), 1.0)
    assert [c.kind for c in changes] == [ChangeKind.REMOVED, ChangeKind.ADDED]
    assert pool.get("x") is None
    assert [(p.id, p.node_type) for p in pool.peers()] == [("x", "governator")]
    pool.register(registration("x"), 2.0)
    assert [(p.id, p.node_type) for p in pool.peers()] == [("x", "backend")]
    pool.register(registration("p", node_type="proxy"), 3.0)
    with pytest.raises(PoolFull):  # peers count against max_nodes too
        pool.register(registration("q", node_type="proxy"), 3.0)
    pool.deregister("p", 4.0)
    pool.add_static("127.0.0.1:9", 4.0)
    with pytest.raises(ValidationError, match="static backend"):
        pool.register(registration("127.0.0.1:9", node_type="proxy"), 5.0)


def test_the_pool_is_bounded() -> None:
    pool = Pool(PoolSettings(max_nodes=2))
    pool.register(registration("a"), 0.0)
    pool.register(registration("b"), 0.0)
    with pytest.raises(PoolFull, match="maximum"):
        pool.register(registration("c"), 0.0)
    pool.register(registration("a"), 1.0)  # updates still work
    assert len(pool) == 2


def test_static_backends_start_unchecked_and_join_on_their_first_pass() -> None:
    pool = Pool()
    changes = pool.add_static("localhost:8000", 0.0, models=("m",))
    node = pool.get("localhost:8000")
    assert node is not None
    assert kinds(changes) == [("added", "", "localhost:8000")]
    assert node.source is NodeSource.STATIC
    assert node.info.metrics_port == 8000
    assert [r.reason for r in node.out_reasons()] == [Why.UNCHECKED]
    changes = pool.check_passed("localhost:8000", 2.0)
    assert kinds(changes) == [("health", "unknown", "healthy"), ("rotation", "out", "in")]
    assert node.joined_at == 2.0


def test_a_static_address_that_registered_first_becomes_static() -> None:
    pool = Pool()
    pool.register(registration("127.0.0.1:8000", address="127.0.0.1:8000", models=["m"]), 0.0)
    changes = pool.add_static("127.0.0.1:8000", 1.0, weight=3.0)
    assert kinds(changes) == [("updated", "registered", "static")]
    node = pool.get("127.0.0.1:8000")
    assert node is not None
    assert (node.source, node.models, node.info.metrics_port) == (NodeSource.STATIC, ("m",), 9000)
    fail_checks(pool, node.id, 20)
    assert node.id in pool
    pool.add_static("127.0.0.1:8000", 2.0, weight=3.0)  # a reload: now its weight
    assert node.weight == 3.0


def test_a_bad_static_address_names_the_setting() -> None:
    with pytest.raises(ValidationError, match="backends"):
        Pool().add_static("no-port", 0.0)


def test_static_nodes_are_never_removed_by_failures() -> None:
    pool = Pool()
    pool.add_static("127.0.0.1:8000", 0.0)
    fail_checks(pool, "127.0.0.1:8000", 50)
    node = pool.get("127.0.0.1:8000")
    assert node is not None
    assert node.health.state is HealthState.UNHEALTHY


def test_registered_nodes_are_removed_after_ten_failed_checks() -> None:
    pool = pool_of("a", "b")
    fail_checks(pool, "a", 9)
    assert "a" in pool
    address = pool.get("a").address  # type: ignore[union-attr]
    changes = pool.check_failed("a", 2.0, "refused")
    assert "a" not in pool
    assert kinds(changes) == [("health", "unhealthy", "removed"), ("removed", address, "")]
    assert changes[-1].reason == "10 consecutive failures, last: refused"
    assert pool.check_failed("a", 3.0, "late") == ()  # results for a forgotten node are ignored
    assert pool.check_passed("a", 3.0) == ()


def test_deregistering_an_idle_node_removes_it_at_once() -> None:
    pool = pool_of("a", "b")
    changes = pool.deregister("a", 1.0)
    assert [c.kind for c in changes] == [ChangeKind.DRAINING, ChangeKind.REMOVED]
    assert "a" not in pool
    assert pool.deregister("a", 2.0) == ()


def test_deregistering_a_busy_node_drains_it_then_removes_it() -> None:
    pool = pool_of("a", "b")
    node = pool.get("a")
    assert node is not None
    lease = pool.start(node, 1.0)
    changes = pool.deregister("a", 2.0)
    assert [c.kind for c in changes] == [ChangeKind.DRAINING, ChangeKind.ROTATION]
    assert ids(pool) == ["b"]
    assert [r.reason for r in node.out_reasons()] == [Why.DRAINING]
    changes = pool.finish(lease, Outcome.SUCCESS, 3.0)
    assert ChangeKind.REMOVED in [c.kind for c in changes]
    assert "a" not in pool


def test_a_draining_node_that_registers_again_is_back() -> None:
    pool = pool_of("a")
    node = pool.get("a")
    assert node is not None
    pool.start(node, 1.0)
    pool.deregister("a", 2.0)
    pool.register(node.info, 3.0)
    assert ids(pool) == ["a"]
    assert node.joined_at == 3.0  # back from out: slow start again


def test_deregistering_a_static_node_marks_it_not_ready_until_it_passes_again() -> None:
    pool = Pool()
    pool.add_static("127.0.0.1:8000", 0.0)
    pool.check_passed("127.0.0.1:8000", 1.0)
    pool.deregister("127.0.0.1:8000", 2.0)
    assert "127.0.0.1:8000" in pool
    assert ids(pool) == []
    pool.check_passed("127.0.0.1:8000", 3.0)
    assert ids(pool) == ["127.0.0.1:8000"]


def test_remove_forgets_a_node_whatever_its_state() -> None:
    pool = pool_of("a")
    node = pool.get("a")
    assert node is not None
    pool.start(node, 0.0)
    changes = pool.remove("a", 1.0, "operator")
    assert kinds(changes) == [("removed", node.address, "")]
    assert changes[0].reason == "operator"
    assert "a" not in pool
    assert pool.remove("a", 1.0) == ()


# --- health through the pool ---------------------------------------------------------------


def test_failed_checks_take_a_node_out_and_passes_bring_it_back() -> None:
    pool = pool_of("a", "b", "c")
    fail_checks(pool, "a", 2)
    assert ids(pool) == ["a", "b", "c"]
    pool.check_failed("a", 1.0, "timeout")
    assert ids(pool) == ["b", "c"]
    node = pool.get("a")
    assert node is not None
    (reason,) = node.out_reasons()
    assert reason.reason == Why.FAILED_CHECKS
    assert reason.detail == "3 consecutive failures, last: timeout"
    pool.check_passed("a", 2.0)
    assert ids(pool) == ["b", "c"]
    changes = pool.check_passed("a", 3.0)
    assert kinds(changes) == [("health", "unhealthy", "healthy"), ("rotation", "out", "in")]
    assert ids(pool) == ["a", "b", "c"]
    assert node.joined_at == 3.0


def test_vitals_saying_not_ready_take_a_node_out_at_once() -> None:
    pool = pool_of("a", "b", "c")
    changes = pool.check_passed("a", 1.0, vitals(ready=False))
    assert kinds(changes)[0] == ("health", "healthy", "not_ready")
    assert ids(pool) == ["b", "c"]
    node = pool.get("a")
    assert node is not None
    assert node.describe(2.0)["ready"] is False
    pool.check_passed("a", 2.0, vitals(ready=True))
    assert ids(pool) == ["a", "b", "c"]


def test_vitals_feed_queue_depth_and_models() -> None:
    pool = Pool()
    pool.register(registration("a", models=["old"]), 0.0)
    node = pool.get("a")
    assert node is not None
    assert node.load == 0
    pool.check_passed("a", 1.0, vitals(queued=7, models=("new",)))
    pool.start(node, 1.0)
    assert (node.queue_depth, node.in_flight, node.load) == (7, 1, 8)
    assert node.models == ("new",)
    assert pool.serves("new")
    assert not pool.serves("old")
    assert node.describe(3.0)["vitals_age_seconds"] == 2.0


# --- models --------------------------------------------------------------------------------


def test_requests_go_only_to_nodes_serving_their_model() -> None:
    pool = Pool()
    pool.register(registration("a", models=["llama", "qwen"]), 0.0)
    pool.register(registration("b", models=["qwen"]), 0.0)
    pool.register(registration("c", models=["mistral"]), 0.0)
    assert ids(pool, "llama") == ["a"]
    assert ids(pool, "qwen") == ["a", "b"]
    assert ids(pool, None) == ["a", "b", "c"]
    unknown = pool.eligible("gpt-9")
    assert (unknown.candidates, unknown.serving) == ((), 0)
    assert not pool.serves("gpt-9")
    assert pool.models() == ["llama", "mistral", "qwen"]


def test_a_node_without_a_model_list_serves_any_model() -> None:
    pool = Pool()
    pool.add_static("127.0.0.1:8000", 0.0)
    pool.check_passed("127.0.0.1:8000", 1.0)
    assert ids(pool, "whatever") == ["127.0.0.1:8000"]
    assert pool.serves("whatever")
    assert pool.models() == []


def test_models_lists_only_nodes_in_rotation_but_serving_counts_all() -> None:
    pool = Pool()
    pool.register(registration("a", models=["m"]), 0.0)
    pool.register(registration("b", models=["n"]), 0.0)
    fail_checks(pool, "b", 3)
    assert pool.models() == ["m"]
    assert pool.eligible("n").serving == 1
    assert pool.serves("n")  # known, just down: the caller queues instead of answering 404


# --- panic ---------------------------------------------------------------------------------


def test_up_to_max_ejection_percent_out_is_not_panic() -> None:
    pool = pool_of("a", "b", "c", "d")
    fail_checks(pool, "a", 3)
    fail_checks(pool, "b", 3)
    selection = pool.eligible(None)
    assert not selection.panic
    assert [n.id for n in selection.candidates] == ["c", "d"]


def test_past_max_ejection_percent_the_pool_panics_and_offers_every_node() -> None:
    pool = pool_of("a", "b", "c", "d")
    for name in "abc":
        fail_checks(pool, name, 3)
    selection = pool.eligible(None)
    assert selection.panic
    assert [n.id for n in selection.candidates] == ["a", "b", "c", "d"]


def test_panic_leaves_out_nodes_that_withdrew_themselves() -> None:
    pool = pool_of("a", "b", "c", "d")
    pool.check_passed("a", 1.0, vitals(ready=False))
    node_b = pool.get("b")
    assert node_b is not None
    pool.start(node_b, 1.0)
    pool.deregister("b", 1.0)
    fail_checks(pool, "c", 3)
    # Of c and d (a and b withdrew), one is out: 50 %, not past it.
    assert not pool.eligible(None).panic
    fail_checks(pool, "d", 3)
    selection = pool.eligible(None)
    assert selection.panic
    assert [n.id for n in selection.candidates] == ["c", "d"]


def test_panic_includes_open_circuits_and_unchecked_nodes() -> None:
    pool = Pool(PoolSettings(circuit=CircuitSettings(failure_threshold=1)))
    pool.add_static("127.0.0.1:8000", 0.0)
    pool.register(registration("a"), 0.0)
    node = pool.get("a")
    assert node is not None
    pool.finish(pool.start(node, 1.0), Outcome.SERVER_ERROR, 1.0)
    assert node.circuit.state is CircuitState.OPEN
    assert ids(pool) == ["127.0.0.1:8000", "a"]


def test_a_lone_failing_node_stays_a_candidate_with_the_default_valve() -> None:
    pool = pool_of("a")
    fail_checks(pool, "a", 3)
    assert pool.eligible(None).panic
    assert ids(pool) == ["a"]


@pytest.mark.parametrize(
    ("percent", "out", "panic"),
    [(100.0, 4, False), (0.0, 1, True), (0.0, 0, False), (25.0, 1, False), (25.0, 2, True)],
)
def test_max_ejection_percent_bounds(percent: float, out: int, panic: bool) -> None:
    pool = pool_of("a", "b", "c", "d", max_ejection_percent=percent)
    for name in "abcd"[:out]:
        fail_checks(pool, name, 3)
    assert pool.eligible(None).panic is panic


def test_panic_is_judged_per_model() -> None:
    pool = Pool()
    pool.register(registration("a", models=["m"]), 0.0)
    pool.register(registration("b", models=["n"]), 0.0)
    pool.register(registration("c", models=["n"]), 0.0)
    fail_checks(pool, "a", 3)
    assert pool.eligible("m").panic
    assert not pool.eligible("n").panic


# --- slow start ----------------------------------------------------------------------------


def test_slow_start_ramps_linearly_from_a_floor_to_full_weight() -> None:
    pool = Pool(PoolSettings(slow_start=30.0))
    pool.register(registration("a", weight=2.0), 100.0)
    node = pool.get("a")
    assert node is not None
    factors = [node.slow_start_factor(100.0 + t) for t in (0.0, 1.5, 3.0, 15.0, 29.0, 30.0, 99.0)]
    assert factors == [
        MIN_SLOW_START_FRACTION,
        MIN_SLOW_START_FRACTION,
        0.1,
        0.5,
        29 / 30,
        1.0,
        1.0,
    ]
    assert node.effective_weight(115.0) == 1.0  # weight 2 at half way


def test_slow_start_restarts_when_a_node_rejoins() -> None:
    pool = pool_of("a", "b")
    node = pool.get("a")
    assert node is not None
    assert node.slow_start_factor(1000.0) == 1.0
    fail_checks(pool, "a", 3, now=1000.0)
    pool.check_passed("a", 1001.0)
    pool.check_passed("a", 1002.0)
    assert node.joined_at == 1002.0
    assert node.slow_start_factor(1017.0) == 0.5


def test_slow_start_can_be_turned_off() -> None:
    pool = pool_of("a", slow_start=0.0)
    node = pool.get("a")
    assert node is not None
    assert node.effective_weight(0.0) == 1.0


# --- live traffic: leases, the circuit, stalls ---------------------------------------------


def test_leases_count_in_flight_and_finishing_twice_is_harmless() -> None:
    pool = pool_of("a")
    node = pool.get("a")
    assert node is not None
    first, second = pool.start(node, 1.0), pool.start(node, 1.0)
    assert node.in_flight == 2
    pool.finish(first, Outcome.SUCCESS, 2.0)
    assert pool.finish(first, Outcome.TRANSPORT_FAILURE, 2.0) == ()
    assert node.in_flight == 1
    assert node.health.consecutive_failures == 0
    pool.finish(second, Outcome.NEUTRAL, 2.0)
    assert node.in_flight == 0


def test_transport_failures_count_for_health_at_once_server_errors_only_for_the_circuit() -> None:
    pool = pool_of("a", "b")
    node = pool.get("a")
    assert node is not None
    pool.finish(pool.start(node, 1.0), Outcome.SERVER_ERROR, 1.0, "HTTP 500")
    assert (node.health.consecutive_failures, node.circuit.consecutive_failures) == (0, 1)
    pool.finish(pool.start(node, 1.0), Outcome.TRANSPORT_FAILURE, 1.0, "connection reset")
    assert (node.health.consecutive_failures, node.circuit.consecutive_failures) == (1, 2)
    assert node.health.last_failure == "passive: connection reset"


def test_circuit_cycle_through_the_pool() -> None:
    config = PoolSettings(
        health=HealthSettings(failure_threshold=100, removal_threshold=100),
        circuit=CircuitSettings(failure_threshold=2, base_cooldown=5.0),
        slow_start=10.0,
    )
    pool = Pool(config)
    for name in "abc":
        pool.register(registration(name), 0.0)
    node = pool.get("a")
    assert node is not None
    pool.finish(pool.start(node, 100.0), Outcome.TRANSPORT_FAILURE, 100.0)
    changes = pool.finish(pool.start(node, 100.0), Outcome.TRANSPORT_FAILURE, 100.0, "reset")
    assert kinds(changes) == [("circuit", "closed", "open"), ("rotation", "in", "out")]
    assert ids(pool) == ["b", "c"]
    assert [r.reason for r in node.out_reasons()] == [Why.CIRCUIT_OPEN]
    assert pool.tick(104.0) == ()
    assert kinds(pool.tick(105.0)) == [("circuit", "open", "half_open")]
    assert ids(pool) == ["a", "b", "c"]  # a probe slot is free
    probe = pool.start(node, 105.5)
    assert probe.admission.probe
    assert ids(pool) == ["b", "c"]
    assert [r.reason for r in node.out_reasons()] == [Why.CIRCUIT_PROBING]
    changes = pool.finish(probe, Outcome.SUCCESS, 106.0)
    assert kinds(changes) == [("circuit", "half_open", "closed"), ("rotation", "out", "in")]
    assert node.slow_start_factor(111.0) == 0.5  # it rejoined at 106


def test_a_silent_node_with_requests_in_flight_is_stalled() -> None:
    pool = pool_of("a", "b", stall_timeout=30.0)
    node = pool.get("a")
    assert node is not None
    lease = pool.start(node, 100.0)  # idle until now: the silence starts here
    pool.progress(lease, 110.0)
    assert pool.tick(139.0) == ()
    changes = pool.tick(140.0)
    assert [c.kind for c in changes] == [ChangeKind.STALL, ChangeKind.ROTATION]
    assert "no byte for 30s with 1 request(s) in flight" in changes[0].reason
    assert node.health.consecutive_failures == 1
    assert node.circuit.consecutive_failures == 1
    assert ids(pool) == ["b"]
    assert [r.reason for r in node.out_reasons()] == [Why.STALLED]
    [out] = pool.describe(150.0)[0]["out"]
    assert out["detail"] == "no byte for 30s with 1 request(s) in flight"
    assert pool.tick(200.0) == ()  # once per episode
    changes = pool.progress(lease, 201.0)
    assert kinds(changes) == [("stall", "stalled", "flowing"), ("rotation", "out", "in")]
    assert ids(pool) == ["a", "b"]


def test_a_stall_ends_when_its_requests_end() -> None:
    pool = pool_of("a", "b", stall_timeout=30.0)
    node = pool.get("a")
    assert node is not None
    lease = pool.start(node, 0.0)
    pool.tick(30.0)
    changes = pool.finish(lease, Outcome.TRANSPORT_FAILURE, 31.0, "idle timeout")
    assert ("stall", "stalled", "flowing") in kinds(changes)
    assert node.stalled_since is None


def test_idle_nodes_never_stall_and_stall_detection_can_be_off() -> None:
    pool = pool_of("a", stall_timeout=30.0)
    assert pool.tick(1000.0) == ()
    node = pool.get("a")
    assert node is not None
    pool.start(node, 1000.0)  # silent since 0, but it was idle: the clock starts now
    assert pool.tick(1029.0) == ()
    assert pool.tick(1030.0)[0].kind is ChangeKind.STALL
    quiet = pool_of("a", stall_timeout=0.0)
    node = quiet.get("a")
    assert node is not None
    quiet.start(node, 0.0)
    assert quiet.tick(1e9) == ()


def test_describe_explains_why_a_node_is_out_and_for_how_long() -> None:
    pool = pool_of("a", "b")
    pool.check_passed("a", 1.0, vitals(queued=3))
    fail_checks(pool, "a", 3, now=10.0)
    node = pool.get("a")
    assert node is not None
    described = node.describe(25.0)
    assert described["healthy"] is False
    assert described["health"] == "unhealthy"
    assert described["circuit"] == "closed"
    assert described["queue_depth"] == 3
    assert described["out"] == [
        {
            "reason": "failed_checks",
            "for_seconds": 15.0,
            "detail": "3 consecutive failures, last: timeout",
        }
    ]
    assert described["vitals"]["requests_queued"] == 3


def test_reconfigure_applies_new_thresholds() -> None:
    pool = pool_of("a", "b")
    pool.reconfigure(PoolSettings(health=HealthSettings(failure_threshold=1)))
    pool.check_failed("a", 1.0, "x")
    assert ids(pool) == ["b"]


@pytest.mark.parametrize(
    "bad",
    [
        {"max_ejection_percent": 101.0},
        {"slow_start": -1.0},
        {"stall_timeout": -0.5},
        {"max_nodes": 0},
    ],
)
def test_pool_settings_are_validated(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        PoolSettings(**bad)  # type: ignore[arg-type]


# --- property: whatever happens, eligibility keeps its promises -------------------------------

EVENTS = st.lists(
    st.tuples(
        st.sampled_from(
            ["pass", "fail", "not_ready", "start", "ok", "error", "transport", "tick", "deregister"]
        ),
        st.integers(0, 3),
        st.floats(0.0, 20.0),
    ),
    max_size=80,
)


@settings(max_examples=200, deadline=None)
@given(events=EVENTS, percent=st.sampled_from([0.0, 25.0, 50.0, 100.0]))
def test_eligible_never_offers_withdrawn_nodes_and_panics_only_past_the_valve(
    events: list[tuple[str, int, float]], percent: float
) -> None:
    pool = Pool(PoolSettings(max_ejection_percent=percent, stall_timeout=15.0))
    names = ["n0", "n1", "n2", "n3"]
    for name in names:
        pool.register(registration(name), 0.0)
    leases: list[Any] = []
    now = 0.0
    outcomes = {
        "ok": Outcome.SUCCESS,
        "error": Outcome.SERVER_ERROR,
        "transport": Outcome.TRANSPORT_FAILURE,
    }
    for action, index, delay in events:
        now += delay
        name = names[index]
        node = pool.get(name)
        if action == "pass":
            pool.check_passed(name, now)
        elif action == "fail":
            pool.check_failed(name, now, "x")
        elif action == "not_ready":
            pool.check_passed(name, now, vitals(ready=False))
        elif action == "start" and node is not None:
            leases.append(pool.start(node, now))
        elif action in outcomes and leases:
            pool.finish(leases.pop(0), outcomes[action], now)
        elif action == "tick":
            pool.tick(now)
        elif action == "deregister":
            pool.deregister(name, now)
        selection = pool.eligible(None)
        members = [
            n
            for n in pool.backends()
            if n.draining_since is None and n.health.state is not HealthState.NOT_READY
        ]
        healthy = [n for n in members if n.in_rotation()]
        for candidate in selection.candidates:
            assert candidate.draining_since is None
            assert candidate.health.state is not HealthState.NOT_READY
            assert candidate.health.state is not HealthState.REMOVED
        if selection.panic:
            assert (len(members) - len(healthy)) * 100 > percent * len(members)
            assert list(selection.candidates) == members
        else:
            assert list(selection.candidates) == healthy
        for n in pool.nodes():
            assert n.in_flight >= 0
            if n.noted_in_rotation:
                assert n.fully_in_rotation()
