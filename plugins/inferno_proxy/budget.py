"""Budgets that keep the proxy from amplifying trouble: retries and client request rates.

* :class:`RetryBudget` -- retries never exceed a share of the traffic.  When
  a node dies, every request to it is retried elsewhere, which is what we
  want; when *every* node is overloaded, retrying each failure would double
  the load on a fleet already drowning.  A budget (Finagle's idea; Envoy has
  the same) lets retries through up to ``ratio`` of recent requests, with a
  floor of ``min_per_second`` so a quiet proxy can still retry at all.
* :class:`RateLimiter` -- a token bucket per client key (API key or client
  IP): ``rate`` requests per second sustained, ``burst`` at once, with a
  bounded number of keys remembered (least recently seen forgotten first),
  so a flood of distinct keys cannot exhaust memory.  Built with
  ``shared=True`` it also keeps what it spent, so that processes serving one
  port (``--workers``) can charge each other's spending
  (:meth:`RateLimiter.take_spent`, :meth:`RateLimiter.charge`) and hold a
  client to one rate across them.

Both are pure: time comes in as ``now`` (monotonic seconds).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

__all__ = ["RateDecision", "RateLimiter", "RetryBudget", "retry_after_header"]

DEFAULT_RETRY_RATIO: Final = 0.2  # retries may add at most 20 % to the traffic
DEFAULT_MIN_RETRIES_PER_SECOND: Final = 3.0  # a floor, so low traffic can still retry
DEFAULT_WINDOW: Final = 10.0  # seconds of history the budget looks at
DEFAULT_BUCKETS: Final = 10  # the window slides in steps of window / buckets
DEFAULT_MAX_KEYS: Final = 100_000  # rate-limit buckets kept: ~10 MB at most


class RetryBudget:
    """Admits a retry only while retries stay within a share of recent requests.

    Over the last ``window`` seconds (sliding in ``buckets`` steps), a retry
    is allowed when ``retries + 1 <= max(ratio * requests, min_per_second *
    window)``.  Count every client request once with :meth:`record_request`
    (not every attempt), and ask :meth:`try_retry` before each retry.

    :param ratio: the share of requests that may be retried (0-1).
    :param min_per_second: retries always allowed per second of window.
    :param window: seconds of history.
    :param buckets: how finely the window slides.
    :raises ValueError: on a value out of range.
    """

    __slots__ = (
        "_epochs",
        "_requests",
        "_retries",
        "_width",
        "buckets",
        "min_per_second",
        "ratio",
        "window",
    )

    def __init__(
        self,
        *,
        ratio: float = DEFAULT_RETRY_RATIO,
        min_per_second: float = DEFAULT_MIN_RETRIES_PER_SECOND,
        window: float = DEFAULT_WINDOW,
        buckets: int = DEFAULT_BUCKETS,
    ) -> None:
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"ratio must be from 0 to 1, got {ratio!r}")
        if not min_per_second >= 0.0:
            raise ValueError(f"min_per_second must be >= 0, got {min_per_second!r}")
        if not window > 0.0:
            raise ValueError(f"window must be > 0 seconds, got {window!r}")
        if buckets < 1:
            raise ValueError(f"buckets must be >= 1, got {buckets!r}")
        self.ratio = ratio
        self.min_per_second = min_per_second
        self.window = window
        self.buckets = buckets
        self._width = window / buckets
        self._epochs = [-1] * buckets  # which step of time each slot currently counts
        self._requests = [0] * buckets
        self._retries = [0] * buckets

    def _slot(self, now: float) -> int:
        epoch = math.floor(now / self._width)
        slot = epoch % self.buckets
        if self._epochs[slot] != epoch:  # a step that slid out of the window: reuse it
            self._epochs[slot] = epoch
            self._requests[slot] = 0
            self._retries[slot] = 0
        return slot

    def counts(self, now: float) -> tuple[int, int]:
        """``(requests, retries)`` in the window ending at *now*."""
        current = math.floor(now / self._width)
        oldest = current - self.buckets + 1
        requests = retries = 0
        for slot, epoch in enumerate(self._epochs):
            if oldest <= epoch <= current:
                requests += self._requests[slot]
                retries += self._retries[slot]
        return requests, retries

    def record_request(self, now: float) -> None:
        """Count one client request (once, however many attempts it takes)."""
        self._requests[self._slot(now)] += 1

    def can_retry(self, now: float) -> bool:
        """Whether a retry now would stay within the budget (does not spend it)."""
        requests, retries = self.counts(now)
        allowance = max(self.ratio * requests, self.min_per_second * self.window)
        return retries + 1 <= allowance

    def try_retry(self, now: float) -> bool:
        """Spend one retry if the budget allows it; ``False`` means do not retry."""
        if not self.can_retry(now):
            return False
        self._retries[self._slot(now)] += 1
        return True


@dataclass(frozen=True, slots=True)
class RateDecision:
    """What :meth:`RateLimiter.check` decided.

    :ivar allowed: whether the request may proceed (its tokens were taken).
    :ivar retry_after: seconds until it would be allowed; 0.0 when allowed.
        Send it with :func:`retry_after_header` in a 429.
    :ivar remaining: tokens left in the key's bucket after the decision.
    """

    allowed: bool
    retry_after: float
    remaining: float


class RateLimiter:
    """Token buckets keyed by client (API key, client IP), with an LRU bound on keys.

    A new key starts with a full bucket of ``burst`` tokens; tokens refill at
    ``rate`` per second up to ``burst``; a request costs ``cost`` tokens.
    Beyond ``max_keys`` the least recently seen key is forgotten.  That
    loses nothing when its bucket had refilled (likely: it is the idlest),
    and at worst grants it a fresh burst, so set ``max_keys`` above the
    number of clients active within ``burst / rate`` seconds.

    **Shared.**  Several processes, each with its own limiter, hold a client
    to one rate when each charges the others' spending to its own buckets:
    :meth:`take_spent` hands over what this one allowed since it was last
    asked, and :meth:`charge` takes what the others allowed.  A bucket may
    then go below zero, a debt the client repays at ``rate`` before it is
    allowed again, so the sustained rate holds across the processes.  Until a
    charge arrives each process judges alone: a client spread over N of them
    may exceed its burst up to N times once, not its rate.  Debt is capped at
    one ``burst``, so that such an overshoot is not punished for longer than
    ``2 * burst / rate``.

    :param rate: tokens per second (> 0).
    :param burst: bucket size (>= 1): requests allowed at once.
    :param max_keys: keys remembered.
    :param shared: keep what is spent for :meth:`take_spent` (off: no cost).
    :raises ValueError: on a value out of range.
    """

    __slots__ = ("_buckets", "_spent", "burst", "max_keys", "rate")

    def __init__(
        self,
        *,
        rate: float,
        burst: float,
        max_keys: int = DEFAULT_MAX_KEYS,
        shared: bool = False,
    ) -> None:
        if not rate > 0.0 or math.isinf(rate):
            raise ValueError(f"rate must be a positive number of tokens per second, got {rate!r}")
        if not burst >= 1.0 or math.isinf(burst):
            raise ValueError(f"burst must be >= 1, got {burst!r}")
        if max_keys < 1:
            raise ValueError(f"max_keys must be >= 1, got {max_keys!r}")
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        # key -> [tokens, when they were counted]; a list, updated in place, per key.
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()
        # key -> tokens allowed since take_spent(); None when not shared.
        self._spent: dict[str, float] | None = {} if shared else None

    def __len__(self) -> int:
        return len(self._buckets)

    def __contains__(self, key: object) -> bool:
        return key in self._buckets

    def check(self, key: str, now: float, cost: float = 1.0) -> RateDecision:
        """Take *cost* tokens from *key*'s bucket if it has them.

        :raises ValueError: when *cost* is not from 0 to ``burst`` (it could
            never be allowed).
        """
        if not 0.0 <= cost <= self.burst:
            raise ValueError(f"cost must be from 0 to the burst ({self.burst:g}), got {cost!r}")
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = [self.burst, now]
            if len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            elapsed = max(0.0, now - bucket[1])  # a clock step back never costs tokens
            bucket[0] = min(self.burst, bucket[0] + elapsed * self.rate)
            bucket[1] = now
        if bucket[0] >= cost:
            bucket[0] -= cost
            spent = self._spent
            if spent is not None:
                spent[key] = spent.get(key, 0.0) + cost
            return RateDecision(True, 0.0, bucket[0])
        return RateDecision(False, (cost - bucket[0]) / self.rate, bucket[0])

    def take_spent(self) -> dict[str, float]:
        """``key -> tokens`` this limiter allowed since the previous call (shared only)."""
        spent = self._spent
        if not spent:
            return {}
        self._spent = {}
        return spent

    def charge(self, spent: Mapping[str, float], now: float) -> None:
        """Take tokens other processes allowed from these buckets (a debt, at most one burst).

        A key not seen here gets a bucket as if it had been full: its next
        request here is judged with what is left of the client's rate.
        """
        buckets, rate, burst, floor = self._buckets, self.rate, self.burst, -self.burst
        for key, tokens in spent.items():
            bucket = buckets.get(key)
            if bucket is None:
                bucket = buckets[key] = [burst, now]
                if len(buckets) > self.max_keys:
                    buckets.popitem(last=False)
            else:
                buckets.move_to_end(key)
                elapsed = max(0.0, now - bucket[1])
                bucket[0] = min(burst, bucket[0] + elapsed * rate)
                bucket[1] = now
            bucket[0] = max(floor, bucket[0] - tokens)


def retry_after_header(seconds: float) -> str:
    """The ``Retry-After`` value for a delay: whole seconds, rounded up, at least 1 (RFC 9110)."""
    if not math.isfinite(seconds):
        return "1"
    return str(max(1, math.ceil(seconds)))
