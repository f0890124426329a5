"""The retry budget and the per-client token buckets."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from inferno_proxy.budget import RateDecision, RateLimiter, RetryBudget, retry_after_header

# --- retry budget --------------------------------------------------------------------------


def spend(budget: RetryBudget, now: float) -> int:
    """Retries granted now until the budget says no."""
    granted = 0
    while budget.try_retry(now):
        granted += 1
        assert granted < 10_000
    return granted


def test_retries_are_capped_at_the_ratio_of_requests() -> None:
    budget = RetryBudget(ratio=0.2, min_per_second=0.0, window=10.0)
    for _ in range(100):
        budget.record_request(1.0)
    assert spend(budget, 1.5) == 20
    assert not budget.can_retry(1.5)
    assert budget.counts(1.5) == (100, 20)


def test_a_floor_lets_a_quiet_proxy_retry() -> None:
    budget = RetryBudget(ratio=0.2, min_per_second=3.0, window=10.0)
    assert budget.can_retry(0.0)
    assert spend(budget, 0.0) == 30  # 3 per second of a 10 s window
    for _ in range(1000):
        budget.record_request(0.5)
    assert spend(budget, 0.5) == 170  # now the ratio allows 200 in all


def test_the_window_slides() -> None:
    budget = RetryBudget(ratio=0.5, min_per_second=0.0, window=10.0, buckets=10)
    for _ in range(10):
        budget.record_request(0.0)
    assert spend(budget, 0.0) == 5
    for _ in range(10):
        budget.record_request(5.0)
    assert budget.counts(5.0) == (20, 5)
    assert spend(budget, 5.0) == 5
    # At 10 s the first second's requests and retries have left the window.
    assert budget.counts(10.0) == (10, 5)
    assert not budget.can_retry(10.0)
    assert budget.counts(15.0) == (0, 0)
    for _ in range(2):
        budget.record_request(15.0)
    assert spend(budget, 15.0) == 1


def test_zero_ratio_and_floor_never_retries() -> None:
    budget = RetryBudget(ratio=0.0, min_per_second=0.0)
    for _ in range(100):
        budget.record_request(0.0)
    assert not budget.try_retry(0.0)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"ratio": 1.5}, "ratio"),
        ({"min_per_second": -1.0}, "min_per_second"),
        ({"window": 0.0}, "window"),
        ({"buckets": 0}, "buckets"),
    ],
)
def test_retry_budget_options_are_validated(options: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RetryBudget(**options)  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(
    ratio=st.floats(0.0, 1.0),
    floor=st.floats(0.0, 5.0),
    steps=st.lists(st.tuples(st.booleans(), st.floats(0.0, 3.0)), max_size=200),
)
def test_retries_are_granted_exactly_while_within_the_budget(
    ratio: float, floor: float, steps: list[tuple[bool, float]]
) -> None:
    budget = RetryBudget(ratio=ratio, min_per_second=floor, window=10.0)
    now = 0.0
    for is_request, delay in steps:
        now += delay
        if is_request:
            budget.record_request(now)
        elif budget.try_retry(now):
            # Judged when granted: later, requests may slide out of the window first.
            requests, retries = budget.counts(now)
            assert retries <= max(ratio * requests, floor * 10.0) + 1e-9
        else:
            requests, retries = budget.counts(now)
            assert retries + 1 > max(ratio * requests, floor * 10.0) - 1e-9


# --- rate limiter --------------------------------------------------------------------------


def test_a_new_key_gets_its_burst_then_waits_for_tokens() -> None:
    limiter = RateLimiter(rate=2.0, burst=3.0)
    assert [limiter.check("k", 0.0).allowed for _ in range(3)] == [True, True, True]
    refused = limiter.check("k", 0.0)
    assert refused == RateDecision(False, 0.5, 0.0)
    assert limiter.check("k", 0.25) == RateDecision(False, 0.25, 0.5)
    assert limiter.check("k", 0.5).allowed
    assert not limiter.check("k", 0.5).allowed


def test_tokens_refill_up_to_the_burst_only() -> None:
    limiter = RateLimiter(rate=10.0, burst=5.0)
    for _ in range(5):
        limiter.check("k", 0.0)
    decision = limiter.check("k", 1000.0)
    assert decision.allowed
    assert decision.remaining == 4.0


def test_keys_are_independent() -> None:
    limiter = RateLimiter(rate=1.0, burst=1.0)
    assert limiter.check("key-a", 0.0).allowed
    assert not limiter.check("key-a", 0.0).allowed
    assert limiter.check("10.0.0.1", 0.0).allowed


def test_costlier_requests_take_more_tokens() -> None:
    limiter = RateLimiter(rate=1.0, burst=4.0)
    assert limiter.check("k", 0.0, cost=3.0).allowed
    decision = limiter.check("k", 0.0, cost=3.0)
    assert (decision.allowed, decision.retry_after) == (False, 2.0)
    with pytest.raises(ValueError, match="cost"):
        limiter.check("k", 0.0, cost=5.0)


def test_a_clock_step_back_costs_no_tokens() -> None:
    limiter = RateLimiter(rate=1.0, burst=2.0)
    limiter.check("k", 10.0)
    decision = limiter.check("k", 5.0)
    assert (decision.allowed, decision.remaining) == (True, 0.0)


def test_memory_is_bounded_by_forgetting_the_least_recently_seen_key() -> None:
    limiter = RateLimiter(rate=1.0, burst=1.0, max_keys=3)
    for key in ("a", "b", "c"):
        limiter.check(key, 0.0)
    limiter.check("a", 0.1)  # a is fresh again; b is now the stalest
    limiter.check("d", 0.2)
    assert len(limiter) == 3
    assert "b" not in limiter
    assert all(key in limiter for key in ("a", "c", "d"))
    assert limiter.check("b", 0.3).allowed  # forgotten: a fresh bucket
    for index in range(10_000):
        limiter.check(f"flood-{index}", 1.0)
    assert len(limiter) == 3


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"rate": 0.0, "burst": 1.0}, "rate"),
        ({"rate": float("inf"), "burst": 1.0}, "rate"),
        ({"rate": 1.0, "burst": 0.5}, "burst"),
        ({"rate": 1.0, "burst": 1.0, "max_keys": 0}, "max_keys"),
    ],
)
def test_rate_limiter_options_are_validated(options: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RateLimiter(**options)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("seconds", "header"), [(0.0, "1"), (0.2, "1"), (1.0, "1"), (1.01, "2"), (59.5, "60")]
)
def test_retry_after_header_rounds_up_to_whole_seconds(seconds: float, header: str) -> None:
    assert retry_after_header(seconds) == header


@settings(max_examples=200, deadline=None)
@given(
    rate=st.floats(0.1, 100.0),
    burst=st.floats(1.0, 50.0),
    gaps=st.lists(st.floats(0.0, 2.0), min_size=1, max_size=100),
)
def test_allowed_requests_never_exceed_burst_plus_refill(
    rate: float, burst: float, gaps: list[float]
) -> None:
    limiter = RateLimiter(rate=rate, burst=burst)
    now = 0.0
    allowed = 0
    for gap in gaps:
        now += gap
        decision = limiter.check("k", now)
        allowed += decision.allowed
        if not decision.allowed:
            assert 0.0 < decision.retry_after <= 1.0 / rate + 1e-9
    assert allowed <= burst + rate * now + 1e-6


# --- shared across processes ----------------------------------------------------------------


def test_an_unshared_limiter_keeps_no_spending() -> None:
    limiter = RateLimiter(rate=1.0, burst=3.0)
    limiter.check("k", 0.0)
    assert limiter.take_spent() == {}


def test_a_shared_limiter_hands_over_what_it_allowed_once() -> None:
    limiter = RateLimiter(rate=1.0, burst=2.0, shared=True)
    for _ in range(3):  # the third is refused: not spent
        limiter.check("a", 0.0)
    limiter.check("b", 0.0)
    assert limiter.take_spent() == {"a": 2.0, "b": 1.0}
    assert limiter.take_spent() == {}


def test_charges_from_other_processes_hold_the_client_to_one_rate() -> None:
    # Two processes share a client: 1 token/s, burst 4.  Each allows what its
    # own bucket holds, then charges the other's spending.
    one = RateLimiter(rate=1.0, burst=4.0, shared=True)
    two = RateLimiter(rate=1.0, burst=4.0, shared=True)
    allowed = 0
    for step in range(200):  # 100 s, a request to each every half second
        now = step * 0.5
        allowed += one.check("c", now).allowed + two.check("c", now).allowed
        spent_one, spent_two = one.take_spent(), two.take_spent()
        one.charge(spent_two, now)
        two.charge(spent_one, now)
    # Alone, each would allow burst + rate * time: about 2 * (4 + 100).
    assert allowed <= 4 + 100 + 4  # one burst of overshoot at most (both full at once)
    assert allowed >= 100  # and the rate is still granted


def test_a_charge_is_a_debt_capped_at_one_burst() -> None:
    limiter = RateLimiter(rate=2.0, burst=5.0, shared=True)
    limiter.charge({"c": 100.0}, 0.0)  # a key never seen here: a full bucket, then the debt
    decision = limiter.check("c", 0.0)
    assert not decision.allowed
    assert decision.remaining == -5.0
    assert decision.retry_after == pytest.approx((1.0 + 5.0) / 2.0)
    assert limiter.check("c", 3.0).allowed  # repaid at the rate: -5 + 6 tokens
    assert limiter.take_spent() == {"c": 1.0}  # charges are not spending of its own


def test_charges_respect_the_key_bound() -> None:
    limiter = RateLimiter(rate=1.0, burst=1.0, max_keys=2, shared=True)
    limiter.charge({"a": 1.0, "b": 1.0, "c": 1.0}, 0.0)
    assert len(limiter) == 2
    assert "a" not in limiter
