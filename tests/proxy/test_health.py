# State changes through method calls, which mypy cannot see: it would narrow
# `x.state` after one assert and call the next one unreachable.
# mypy: disable-error-code="comparison-overlap, unreachable"
"""The per-node health state machine: every table entry, the thresholds, and its invariants."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from inferno_proxy.fsm import IllegalTransition, check_table
from inferno_proxy.health import (
    HEALTH_TABLE,
    HealthEvent,
    HealthSettings,
    HealthState,
    HealthTracker,
)

S, E = HealthState, HealthEvent
DEFAULTS = HealthSettings()  # 3 to go out, 2 to come back, 10 to be removed


def tracker(state: HealthState = S.HEALTHY, *, removable: bool = True) -> HealthTracker:
    return HealthTracker(DEFAULTS, removable=removable, now=0.0, state=state)


# --- the table, entry by entry -------------------------------------------------------------

LEGAL = [
    (state, event, target) for state, row in HEALTH_TABLE.items() for event, target in row.items()
]
ILLEGAL = [(state, event) for state in S for event in E if event not in HEALTH_TABLE[state]]


@pytest.mark.parametrize(("state", "event", "target"), LEGAL)
def test_every_legal_transition_lands_where_the_table_says(
    state: HealthState, event: HealthEvent, target: HealthState
) -> None:
    health = tracker(state)
    change = health.transition(event, 5.0, "why")
    assert health.state is target
    if target is state:
        assert change is None
        assert health.since == 0.0
    else:
        assert change is not None
        assert (change.old, change.new, change.event, change.at, change.reason) == (
            state,
            target,
            event,
            5.0,
            "why",
        )
        assert health.since == 5.0


@pytest.mark.parametrize(("state", "event"), ILLEGAL)
def test_every_illegal_transition_raises_naming_state_and_event(
    state: HealthState, event: HealthEvent
) -> None:
    health = tracker(state)
    with pytest.raises(
        IllegalTransition, match=rf"health: event {event.name} .* state {state.name}"
    ):
        health.transition(event, 1.0)
    assert health.state is state


def test_the_table_has_illegal_pairs_and_a_terminal_state() -> None:
    assert ILLEGAL  # so the test above tests something
    assert HEALTH_TABLE[S.REMOVED] == {}
    check_table(HEALTH_TABLE, HealthState, HealthEvent)


def test_check_table_finds_a_missing_row() -> None:
    partial: dict[HealthState, Mapping[HealthEvent, HealthState]] = {
        s: HEALTH_TABLE[s] for s in S if s is not S.REMOVED
    }
    with pytest.raises(ValueError, match="no row for state REMOVED"):
        check_table(partial, HealthState, HealthEvent)


# --- the observations: thresholds ----------------------------------------------------------


def test_failure_threshold_takes_a_healthy_node_out() -> None:
    health = tracker()
    assert health.check_failed(1.0, "timeout") is None
    assert health.check_failed(2.0, "timeout") is None
    assert health.in_rotation
    change = health.check_failed(3.0, "refused")
    assert change is not None
    assert (change.old, change.new, change.event) == (S.HEALTHY, S.UNHEALTHY, E.TRIP)
    assert "3 consecutive failures" in change.reason
    assert not health.in_rotation
    assert (health.since, health.last_failure, health.last_failure_at) == (3.0, "refused", 3.0)


def test_a_pass_between_failures_resets_the_streak() -> None:
    health = tracker()
    health.check_failed(1.0, "x")
    health.check_failed(2.0, "x")
    health.check_passed(3.0)
    health.check_failed(4.0, "x")
    health.check_failed(5.0, "x")
    assert health.state is S.HEALTHY
    assert health.consecutive_failures == 2


def test_recovery_threshold_brings_an_unhealthy_node_back() -> None:
    health = tracker(S.UNHEALTHY)
    assert health.check_passed(1.0) is None
    assert health.state is S.UNHEALTHY
    change = health.check_passed(2.0)
    assert change is not None
    assert (change.new, change.event) == (S.HEALTHY, E.RECOVER)


def test_a_failure_during_recovery_restarts_the_count() -> None:
    health = tracker(S.UNHEALTHY)
    health.check_passed(1.0)
    health.check_failed(2.0, "x")
    health.check_passed(3.0)
    assert health.state is S.UNHEALTHY
    health.check_passed(4.0)
    assert health.state is S.HEALTHY


def test_a_never_checked_node_joins_on_its_first_pass() -> None:
    health = tracker(S.UNKNOWN, removable=False)
    assert not health.in_rotation
    change = health.check_passed(1.0)
    assert change is not None
    assert (change.old, change.new) == (S.UNKNOWN, S.HEALTHY)


def test_a_never_checked_node_that_fails_is_unhealthy_at_once() -> None:
    health = tracker(S.UNKNOWN, removable=False)
    change = health.check_failed(1.0, "refused")
    assert change is not None
    assert change.new is S.UNHEALTHY
    health.check_passed(2.0)
    assert health.state is S.UNHEALTHY  # now it has to recover like any other
    health.check_passed(3.0)
    assert health.state is S.HEALTHY


@pytest.mark.parametrize("state", [S.UNKNOWN, S.HEALTHY, S.UNHEALTHY])
def test_not_ready_takes_a_node_out_at_once(state: HealthState) -> None:
    health = tracker(state)
    change = health.not_ready(1.0)
    assert change is not None
    assert change.new is S.NOT_READY
    assert not health.in_rotation


def test_ready_again_puts_it_back_at_once() -> None:
    health = tracker(S.NOT_READY)
    change = health.check_passed(1.0)
    assert change is not None
    assert change.new is S.HEALTHY


def test_not_ready_is_never_a_failure_and_never_removes() -> None:
    health = tracker()
    for second in range(100):
        health.not_ready(float(second))
    assert health.state is S.NOT_READY
    assert health.consecutive_failures == 0


def test_a_not_ready_node_that_stops_answering_goes_unhealthy() -> None:
    health = tracker(S.NOT_READY)
    health.check_failed(1.0, "x")
    health.check_failed(2.0, "x")
    assert health.state is S.NOT_READY
    health.check_failed(3.0, "x")
    assert health.state is S.UNHEALTHY


def test_registered_nodes_are_removed_after_ten_consecutive_failures() -> None:
    health = tracker(removable=True)
    for second in range(9):
        health.check_failed(float(second), "refused")
    assert health.state is S.UNHEALTHY
    change = health.check_failed(9.0, "refused")
    assert change is not None
    assert (change.new, change.event) == (S.REMOVED, E.EXPIRE)
    assert "10 consecutive failures" in change.reason


def test_removed_is_terminal() -> None:
    health = tracker(S.REMOVED)
    with pytest.raises(IllegalTransition, match="PASS is not allowed in state REMOVED"):
        health.check_passed(1.0)


def test_static_nodes_stay_unhealthy_however_long_they_fail() -> None:
    health = tracker(removable=False)
    for second in range(100):
        health.check_failed(float(second), "refused")
    assert health.state is S.UNHEALTHY
    assert health.consecutive_failures == 100


def test_a_passive_failure_counts_at_once_like_a_failed_check() -> None:
    health = tracker()
    health.passive_failure(1.0, "connection reset")
    health.check_failed(2.0, "timeout")
    change = health.passive_failure(3.0, "connect refused")
    assert change is not None
    assert change.new is S.UNHEALTHY
    assert health.last_failure == "passive: connect refused"


def test_removal_before_unhealthy_when_thresholds_say_so() -> None:
    health = HealthTracker(
        HealthSettings(failure_threshold=5, removal_threshold=2),
        removable=True,
        now=0.0,
        state=S.HEALTHY,
    )
    health.check_failed(1.0, "x")
    change = health.check_failed(2.0, "x")
    assert change is not None
    assert (change.old, change.new) == (S.HEALTHY, S.REMOVED)


@pytest.mark.parametrize(
    "bad",
    [
        {"failure_threshold": 0},
        {"recovery_threshold": -1},
        {"removal_threshold": 1.5},
        {"failure_threshold": True},
    ],
)
def test_settings_refuse_thresholds_below_one(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        HealthSettings(**bad)  # type: ignore[arg-type]


# --- property: any sequence of observations stays inside the table ----------------------------

OBSERVATIONS = st.lists(st.sampled_from(["pass", "fail", "passive", "not_ready"]), max_size=60)


@settings(max_examples=300, deadline=None)
@given(
    start=st.sampled_from([S.UNKNOWN, S.HEALTHY]),
    removable=st.booleans(),
    failure=st.integers(1, 5),
    recovery=st.integers(1, 5),
    removal=st.integers(1, 12),
    observations=OBSERVATIONS,
)
def test_observations_never_reach_an_undefined_state(
    start: HealthState,
    removable: bool,
    failure: int,
    recovery: int,
    removal: int,
    observations: list[str],
) -> None:
    config = HealthSettings(failure, recovery, removal)
    health = HealthTracker(config, removable=removable, now=0.0, state=start)
    for step, observation in enumerate(observations):
        now = float(step + 1)
        if observation == "pass":
            health.check_passed(now)
        elif observation == "fail":
            health.check_failed(now, "x")
        elif observation == "passive":
            health.passive_failure(now, "x")
        else:
            health.not_ready(now)
        assert health.state in HEALTH_TABLE
        if health.state is S.REMOVED:
            assert removable
            assert health.consecutive_failures >= removal
            return
        if health.state is S.HEALTHY:
            assert health.consecutive_failures < failure
        if health.state is S.UNHEALTHY:
            assert health.consecutive_successes < recovery
        if removable:
            assert health.consecutive_failures < removal
        assert health.since <= now
