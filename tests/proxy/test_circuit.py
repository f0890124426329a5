# State changes through method calls, which mypy cannot see: it would narrow
# `x.state` after one assert and call the next one unreachable.
# mypy: disable-error-code="comparison-overlap, unreachable"
"""The circuit breaker: its table, the closed -> open -> half-open -> closed cycle, cooldowns."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from inferno_proxy.circuit import (
    CIRCUIT_TABLE,
    NOT_PROBE,
    Admission,
    CircuitBreaker,
    CircuitEvent,
    CircuitSettings,
    CircuitState,
)
from inferno_proxy.fsm import IllegalTransition

S, E = CircuitState, CircuitEvent
CONFIG = CircuitSettings(failure_threshold=3, base_cooldown=5.0, max_cooldown=40.0)


def breaker() -> CircuitBreaker:
    return CircuitBreaker(CONFIG, now=0.0)


def trip(circuit: CircuitBreaker, now: float) -> None:
    for _ in range(CONFIG.failure_threshold):
        circuit.record_failure(circuit.admit(), now, "reset")
    assert circuit.state is S.OPEN


def probe_then(circuit: CircuitBreaker, now: float, *, succeed: bool) -> None:
    """Wait out the cooldown, admit one probe, and report its outcome."""
    assert circuit.poll(circuit.retry_at) is not None
    ticket = circuit.admit()
    assert ticket.probe
    if succeed:
        circuit.record_success(ticket, now)
    else:
        circuit.record_failure(ticket, now, "refused")


# --- the table -----------------------------------------------------------------------------

LEGAL = [(s, e, t) for s, row in CIRCUIT_TABLE.items() for e, t in row.items()]
ILLEGAL = [(s, e) for s in S for e in E if e not in CIRCUIT_TABLE[s]]


def in_state(state: CircuitState) -> CircuitBreaker:
    circuit = breaker()
    if state is not S.CLOSED:
        trip(circuit, 0.0)
    if state is S.HALF_OPEN:
        circuit.poll(100.0)
    assert circuit.state is state
    return circuit


@pytest.mark.parametrize(("state", "event", "target"), LEGAL)
def test_every_legal_transition_lands_where_the_table_says(
    state: CircuitState, event: CircuitEvent, target: CircuitState
) -> None:
    circuit = in_state(state)
    change = circuit.transition(event, 200.0, "why")
    assert circuit.state is target
    assert (change is None) == (target is state)
    if change is not None:
        assert (change.old, change.new, change.event, change.at) == (state, target, event, 200.0)


@pytest.mark.parametrize(("state", "event"), ILLEGAL)
def test_every_illegal_transition_raises_naming_state_and_event(
    state: CircuitState, event: CircuitEvent
) -> None:
    circuit = in_state(state)
    with pytest.raises(IllegalTransition, match=rf"circuit: event {event.name} .* {state.name}"):
        circuit.transition(event, 1.0)
    assert circuit.state is state


def test_there_are_illegal_pairs() -> None:
    assert (S.CLOSED, E.COOLDOWN_ELAPSED) in ILLEGAL
    assert (S.OPEN, E.PROBE_SUCCESS) in ILLEGAL


# --- the cycle -----------------------------------------------------------------------------


def test_full_cycle_closed_open_half_open_closed() -> None:
    circuit = breaker()
    for _ in range(2):
        assert circuit.record_failure(circuit.admit(), 1.0, "reset") is None
    assert circuit.admits()
    change = circuit.record_failure(circuit.admit(), 1.0, "reset")
    assert change is not None
    assert (change.new, change.event) == (S.OPEN, E.TRIP)
    assert "3 consecutive failures, last: reset" in change.reason
    assert not circuit.admits()
    assert circuit.retry_at == 6.0

    assert circuit.poll(5.9) is None
    change = circuit.poll(6.0)
    assert change is not None
    assert change.new is S.HALF_OPEN
    assert circuit.admits()

    probe = circuit.admit()
    assert probe.probe
    assert not circuit.admits()  # the one probe slot is taken
    assert not circuit.admit().probe  # in panic a request still goes, but is no probe

    change = circuit.record_success(probe, 7.0)
    assert change is not None
    assert (change.new, change.event) == (S.CLOSED, E.PROBE_SUCCESS)
    assert circuit.admits()


def test_a_success_resets_the_failure_streak() -> None:
    circuit = breaker()
    circuit.record_failure(circuit.admit(), 1.0, "x")
    circuit.record_failure(circuit.admit(), 1.0, "x")
    circuit.record_success(circuit.admit(), 1.0)
    circuit.record_failure(circuit.admit(), 1.0, "x")
    circuit.record_failure(circuit.admit(), 1.0, "x")
    assert circuit.state is S.CLOSED


def test_a_failed_probe_reopens_with_a_doubled_cooldown_up_to_the_cap() -> None:
    circuit = breaker()
    trip(circuit, 0.0)
    cooldowns = [circuit.retry_at - circuit.since]
    for _ in range(5):
        probe_then(circuit, circuit.retry_at, succeed=False)
        assert circuit.state is S.OPEN
        cooldowns.append(circuit.retry_at - circuit.since)
    assert cooldowns == [5.0, 10.0, 20.0, 40.0, 40.0, 40.0]
    assert circuit.opens == 6


def test_reopening_soon_after_closing_keeps_growing() -> None:
    circuit = breaker()
    trip(circuit, 0.0)
    probe_then(circuit, 5.0, succeed=True)
    assert circuit.state is S.CLOSED
    trip(circuit, 10.0)  # 5 s after closing: the node is flapping
    assert circuit.retry_at - circuit.since == 10.0


def test_openings_are_forgiven_after_staying_closed_for_max_cooldown() -> None:
    circuit = breaker()
    trip(circuit, 0.0)
    probe_then(circuit, 5.0, succeed=True)
    trip(circuit, 5.0 + CONFIG.max_cooldown)
    assert circuit.retry_at - circuit.since == CONFIG.base_cooldown
    assert circuit.opens == 1


def test_late_results_do_not_move_an_open_or_half_open_circuit() -> None:
    circuit = breaker()
    early = circuit.admit()  # admitted while closed
    trip(circuit, 0.0)
    assert circuit.record_success(early, 1.0) is None
    assert circuit.state is S.OPEN
    circuit.poll(100.0)
    assert circuit.record_failure(NOT_PROBE, 100.0, "late") is None
    assert circuit.record_success(NOT_PROBE, 100.0) is None
    assert circuit.state is S.HALF_OPEN


def test_a_probe_of_an_earlier_episode_is_ignored() -> None:
    circuit = CircuitBreaker(CircuitSettings(failure_threshold=1, half_open_probes=2), now=0.0)
    trip_now = circuit.admit()
    circuit.record_failure(trip_now, 0.0, "x")
    circuit.poll(100.0)
    stale, fresh = circuit.admit(), circuit.admit()
    circuit.record_failure(fresh, 101.0, "x")  # reopens: a new episode follows
    circuit.poll(1000.0)
    assert circuit.state is S.HALF_OPEN
    assert circuit.record_success(stale, 1001.0) is None
    assert circuit.state is S.HALF_OPEN
    assert circuit.probes_in_flight == 0


def test_a_neutral_outcome_frees_the_probe_slot_without_deciding() -> None:
    circuit = breaker()
    trip(circuit, 0.0)
    circuit.poll(10.0)
    probe = circuit.admit()
    assert not circuit.admits()
    circuit.release(probe)
    assert circuit.state is S.HALF_OPEN
    assert circuit.admits()


def test_a_stall_counts_as_a_failure_and_reopens_a_half_open_circuit() -> None:
    circuit = breaker()
    circuit.record_failure(None, 1.0, "stalled")
    assert circuit.consecutive_failures == 1
    trip(circuit, 2.0)
    circuit.poll(100.0)
    circuit.admit()
    change = circuit.record_failure(None, 101.0, "stalled")
    assert change is not None
    assert (change.old, change.new, change.event) == (S.HALF_OPEN, S.OPEN, E.PROBE_FAILURE)


def test_cooldown_sequence_and_overflow_guard() -> None:
    config = CircuitSettings(base_cooldown=1.0, max_cooldown=1e300)
    assert [config.cooldown(n) for n in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 8.0]
    assert config.cooldown(10_000) == 2.0**60


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ({"failure_threshold": 0}, "failure_threshold"),
        ({"half_open_probes": 0}, "half_open_probes"),
        ({"base_cooldown": 0.0}, "base_cooldown"),
        ({"base_cooldown": 10.0, "max_cooldown": 5.0}, "max_cooldown"),
    ],
)
def test_settings_are_validated(bad: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CircuitSettings(**bad)  # type: ignore[arg-type]


# --- property: random traffic never leaves the table -----------------------------------------

ACTIONS = st.lists(
    st.tuples(
        st.sampled_from(["admit", "success", "failure", "neutral", "stall", "poll"]),
        st.floats(0.0, 30.0),
    ),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(probes=st.integers(1, 3), threshold=st.integers(1, 4), actions=ACTIONS)
def test_random_traffic_stays_inside_the_table(
    probes: int, threshold: int, actions: list[tuple[str, float]]
) -> None:
    config = CircuitSettings(failure_threshold=threshold, half_open_probes=probes)
    circuit = CircuitBreaker(config, now=0.0)
    now = 0.0
    tickets: list[Admission] = []
    for action, delay in actions:
        now += delay
        if action == "admit":
            tickets.append(circuit.admit())
        elif action == "poll":
            circuit.poll(now)
        elif action == "stall":
            circuit.record_failure(None, now, "stalled")
        elif tickets:
            ticket = tickets.pop(0)
            if action == "success":
                circuit.record_success(ticket, now)
            elif action == "failure":
                circuit.record_failure(ticket, now, "x")
            else:
                circuit.release(ticket)
        assert circuit.state in CIRCUIT_TABLE
        assert 0 <= circuit.probes_in_flight <= probes
        assert circuit.consecutive_failures < threshold or circuit.state is not S.CLOSED
        if circuit.state is S.OPEN:
            assert circuit.since < circuit.retry_at <= circuit.since + config.max_cooldown
            assert not circuit.admits()
        if circuit.state is S.CLOSED:
            assert circuit.admits()
