"""Client limits kept per proxy, not per worker: rate-limit spending and queue depths.

With ``--workers N`` the kernel spreads a client's connections over N
processes.  Were each to judge alone, a client would get N times its rate
limit and N times ``max_queue`` requests could wait per model.  Instead
every worker tells the parent what it allowed and what it holds waiting, and
the parent tells each worker what the *others* did, which the worker counts
against its own limits::

    worker i -> parent   ("limits", depths | None, Spending | None)
                           its queue depths when they changed, what its
                           rate limiters allowed since its previous report
    parent -> worker i   ("peers", in flight, LimitLedger.others_depths(i), own_i)
                         ("charge", total)          (total, own) = LimitLedger.hand_out()
                           every LOAD_INTERVAL, with the others' in-flight counts;
                           the worker charges total less its own share

The parent adds the workers' spending once and pickles the total once for
every worker; each worker takes its own share out itself, so the parent's
work per interval grows with the keys spent, not with keys times workers.

Per-request work stays in the worker (a dictionary update per allowed
request); the exchange costs a few small messages per worker and interval,
and only while clients are rate limited or waiting.  What a worker knows of
the others is at most two intervals old (its report, then the parent's
round), so a client spreading a sudden burst over several workers may pass
its burst, and a flood may pass the queue bound, by what arrives in that
time; sustained rates and steady queues hold across workers (see
:class:`~inferno_proxy.budget.RateLimiter` and
:class:`~inferno_proxy.waitqueue.WaitQueue`).

The retry budget stays per worker on purpose: it is a share of the traffic,
and each worker's share of its own traffic adds up to the same share of the
proxy's.

This module is the parent's pure bookkeeping (no I/O, no clock).
"""

from __future__ import annotations

from collections.abc import Mapping

from inferno_proxy.auth import Spending

__all__ = ["LimitLedger"]

Depths = Mapping[str | None, int]


class LimitLedger:
    """The workers' queue depths and rate-limit spending, summed for the others."""

    def __init__(self) -> None:
        self._depths: dict[int, dict[str | None, int]] = {}
        self._spent: dict[int, Spending] = {}  # since the previous hand_out()

    def report(self, worker: int, depths: Depths | None, spent: Spending | None) -> None:
        """Take one ``limits`` message of *worker* (``None``: that part did not change)."""
        if depths is not None:
            self._depths[worker] = {model: n for model, n in depths.items() if n > 0}
        if spent is not None:
            own = self._spent.get(worker)
            if own is None:
                self._spent[worker] = Spending(dict(spent.per_key), dict(spent.per_ip))
            else:
                own.add(spent)

    def forget(self, worker: int) -> None:
        """*worker* exited: its waiting requests went with it (its spending still counts)."""
        self._depths.pop(worker, None)

    def others_depths(self, worker: int) -> dict[str | None, int]:
        """``model -> requests waiting`` in every worker but *worker*."""
        totals: dict[str | None, int] = {}
        for other, depths in self._depths.items():
            if other != worker:
                for model, n in depths.items():
                    totals[model] = totals.get(model, 0) + n
        return totals

    def hand_out(self) -> tuple[Spending | None, dict[int, Spending]]:
        """Every worker's spending since the previous call, summed, and each worker's
        own part of it (a worker charges the total less its own; ``None``: nothing
        was spent).  Starts the next period."""
        spent, self._spent = self._spent, {}
        if not spent:
            return None, {}
        total = Spending({}, {})
        for one in spent.values():
            total.add(one)
        return total, spent
