"""The parent's bookkeeping of the workers' rate-limit spending and queue depths."""

from __future__ import annotations

from inferno_proxy.auth import RateLimits, Spending
from inferno_proxy.sharedlimits import LimitLedger


def test_each_worker_charges_the_total_less_its_own_part_once() -> None:
    ledger = LimitLedger()
    ledger.report(0, None, Spending({"team": 2.0}, {"10.0.0.1": 2.0}))
    ledger.report(1, None, Spending({"team": 1.0}, {"10.0.0.2": 1.0}))
    ledger.report(0, None, Spending({}, {"10.0.0.1": 1.0}))  # a second report adds up
    total, own = ledger.hand_out()
    assert total == Spending({"team": 3.0}, {"10.0.0.1": 3.0, "10.0.0.2": 1.0})
    assert total.minus(own.get(0)) == Spending({"team": 1.0}, {"10.0.0.2": 1.0})
    assert total.minus(own.get(1)) == Spending({"team": 2.0}, {"10.0.0.1": 3.0})
    assert total.minus(own.get(2)) == total  # spent nothing: charges everything
    assert ledger.hand_out() == (None, {})  # a new period: nothing spent since


def test_a_worker_alone_in_its_spending_charges_nothing() -> None:
    ledger = LimitLedger()
    ledger.report(0, None, Spending({"team": 2.0}, {}))
    total, own = ledger.hand_out()
    assert total is not None
    assert total.minus(own[0]) == Spending({}, {})


def test_queue_depths_of_the_others_are_summed_and_forgotten_with_a_worker() -> None:
    ledger = LimitLedger()
    ledger.report(0, {"m": 2, None: 1}, None)
    ledger.report(1, {"m": 3}, None)
    ledger.report(2, {"m": 0}, None)
    assert ledger.others_depths(0) == {"m": 3}
    assert ledger.others_depths(2) == {"m": 5, None: 1}
    ledger.report(1, None, Spending({}, {}))  # no depths in this message: they stay
    assert ledger.others_depths(0) == {"m": 3}
    ledger.forget(1)
    assert ledger.others_depths(0) == {}


def test_limits_built_shared_take_and_charge_both_kinds() -> None:
    one = RateLimits.build(per_key=1.0, per_ip=1.0, burst=2.0, shared=True)
    two = RateLimits.build(per_key=1.0, per_ip=1.0, burst=2.0, shared=True)
    one.check_ip("10.0.0.1", 0.0)
    one.check_key("team", 0.0)
    spent = one.take_spent()
    assert spent == Spending({"team": 1.0}, {"10.0.0.1": 1.0})
    assert one.take_spent() is None
    two.charge(spent, 0.0)
    two.check_ip("10.0.0.1", 0.0)  # the second of its burst of two
    assert two.per_ip is not None
    assert not two.per_ip.check("10.0.0.1", 0.0).allowed
