"""PoolScheduler on its own: scheduling decisions without any I/O."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from inferno.http.pool import (
    TRANSITIONS,
    Entry,
    EntryState,
    Origin,
    OriginStats,
    PoolScheduler,
    Waiter,
)

A = Origin("http", "10.0.0.1", 8000)
B = Origin("https", "::1", 8443)


class Conn:
    """Stands in for a connection: the scheduler only stores and returns it."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


def connect(pool: PoolScheduler[Conn], origin: Origin, name: str) -> Entry[Conn]:
    entry = pool.checkout(origin)
    assert entry is not None
    assert entry.state is EntryState.CONNECTING
    pool.connected(entry, Conn(name))
    return entry


def test_origin_text() -> None:
    assert str(A) == "http://10.0.0.1:8000"
    assert str(B) == "https://[::1]:8443"


def test_new_slots_up_to_the_limit_then_none() -> None:
    pool: PoolScheduler[Conn] = PoolScheduler(max_per_origin=2, idle_timeout=30)
    connect(pool, A, "a1")
    connect(pool, A, "a2")
    assert pool.checkout(A) is None
    assert pool.checkout(B) is not None  # the limit is per origin
    assert pool.stats().origins[str(A)] == OriginStats(idle=0, active=2, waiting=0)
    assert pool.stats().opened == 2


def test_idle_connections_are_reused_most_recent_first() -> None:
    pool: PoolScheduler[Conn] = PoolScheduler(max_per_origin=5, idle_timeout=30)
    first, second = connect(pool, A, "a1"), connect(pool, A, "a2")
    pool.release(first, reusable=True, now=1.0)
    pool.release(second, reusable=True, now=2.0)
    again = pool.checkout(A)
    assert again is second
    assert again.state is EntryState.ACTIVE
    assert pool.stats().origins[str(A)] == OriginStats(idle=1, active=1, waiting=0)


def test_released_connection_goes_straight_to_the_first_waiter() -> None:
    pool: PoolScheduler[Conn] = PoolScheduler(max_per_origin=1, idle_timeout=30)
    entry = connect(pool, A, "a1")
    assert pool.checkout(A) is None
    first: Waiter[Conn] = pool.wait(A, lambda: None)
    second: Waiter[Conn] = pool.wait(A, lambda: None)
    released = pool.release(entry, reusable=True, now=1.0)
    assert released.wake == [first]
    assert released.close == []
    assert first.entry is entry
    assert entry.state is EntryState.ACTIVE
    assert second.entry is None
    assert pool.stats().origins[str(A)] == OriginStats(idle=0, active=1, waiting=1)


def test_broken_connection_frees_its_slot_for_a_waiter() -> None:
    pool: PoolScheduler[Conn] = PoolScheduler(max_per_origin=1, idle_timeout=30)
    entry = connect(pool, A, "a1")
    waiter: Waiter[Conn] = pool.wait(A, lambda: None)
    released = pool.release(entry, reusable=False, now=1.0)
    assert [c.name for c in released.close] == ["a1"]
    assert released.wake == [waiter]
    assert waiter.entry is not None
    assert waiter.entry.state is EntryState.CONNECTING
    assert entry.state is EntryState.CLOSED
    assert pool.stats().closed == 1


def test_a_newcomer_never_overtakes_a_waiter() -> None:
    pool: PoolScheduler[Conn] = PoolScheduler(max_per_origin=1, idle_timeout=30)
    entry = connect(pool, A, "a1")
    waiter: Waiter[Conn] = pool.wait(A, lambda: None)
    pool.release(entry, reusable=True, now=1.0)
    assert waiter.entry is entry
    assert pool.checkout(A) is None


def test_cancelled_waiter_leaves_the_queue() -> None:
    pool: PoolScheduler[Conn] = PoolScheduler(max_per_origin=1, idle_timeout=30)
    entry = connect(pool, A, "a1")
    waiter: Waiter[Conn] = pool.wait(A, lambda: None)
    assert pool.cancel(waiter, now=1.0).wake == []
    assert pool.stats().origins[str(A)].waiting == 0
    pool.release(entry, reusable=True, now=2.0)
    assert pool.stats().origins[str(A)] == OriginStats(idle=1, active=0, waiting=0)


def test_cancelled_waiter_hands_a_granted_connection_on() -> None:
    pool: PoolScheduler[Conn] = PoolScheduler(max_per_origin=1, idle_timeout=30)
    entry = connect(pool, A, "a1")
    granted: Waiter[Conn] = pool.wait(A, lambda: None)
    next_in_line: Waiter[Conn] = pool.wait(A, lambda: None)
    pool.release(entry, reusable=True, now=1.0)
    assert granted.entry is entry
    # The granted request was cancelled before it could use the connection.
    released = pool.cancel(granted, now=1.5)
    assert released.wake == [next_in_line]
    assert released.close == []
    assert next_in_line.entry is entry
    released = pool.cancel(next_in_line, now=2.0)
    assert released.wake == []
    assert pool.stats().origins[str(A)] == OriginStats(idle=1, active=0, waiting=0)


def test_cancelled_waiter_hands_a_granted_slot_on() -> None:
    pool: PoolScheduler[Conn] = PoolScheduler(max_per_origin=1, idle_timeout=30)
    entry = connect(pool, A, "a1")
    granted: Waiter[Conn] = pool.wait(A, lambda: None)
    pool.release(entry, reusable=False, now=1.0)
    assert granted.entry is not None
    assert granted.entry.state is EntryState.CONNECTING
    assert pool.cancel(granted, now=1.5).close == []
    assert str(A) not in pool.stats().origins  # nothing left for that origin


def test_idle_connections_expire() -> None:
    pool: PoolScheduler[Conn] = PoolScheduler(max_per_origin=5, idle_timeout=10)
    old, new = connect(pool, A, "old"), connect(pool, A, "new")
    pool.release(old, reusable=True, now=100.0)
    pool.release(new, reusable=True, now=105.0)
    assert pool.expire(109.9) == []
    assert [c.name for c in pool.expire(110.0)] == ["old"]
    assert pool.stats().origins[str(A)] == OriginStats(idle=1, active=0, waiting=0)
    assert [c.name for c in pool.expire(115.0)] == ["new"]
    assert pool.stats().origins == {}
    assert pool.stats().connections == 0


def test_zero_idle_timeout_keeps_nothing() -> None:
    pool: PoolScheduler[Conn] = PoolScheduler(max_per_origin=5, idle_timeout=0)
    pool.release(connect(pool, A, "a1"), reusable=True, now=1.0)
    assert [c.name for c in pool.expire(1.0)] == ["a1"]


def test_replace_keeps_the_slot() -> None:
    pool: PoolScheduler[Conn] = PoolScheduler(max_per_origin=1, idle_timeout=30)
    pool.release(connect(pool, A, "stale"), reusable=True, now=1.0)
    reused = pool.checkout(A)
    assert reused is not None
    fresh, dead = pool.replace(reused)
    assert dead.name == "stale"
    assert fresh.state is EntryState.CONNECTING
    assert reused.state is EntryState.CLOSED
    assert pool.checkout(A) is None  # still one slot, held by the fresh entry
    pool.connected(fresh, Conn("fresh"))
    stats = pool.stats()
    assert (stats.opened, stats.closed, stats.connections) == (2, 1, 1)


def test_replace_needs_a_connected_active_entry() -> None:
    pool: PoolScheduler[Conn] = PoolScheduler(max_per_origin=1, idle_timeout=30)
    entry = pool.checkout(A)
    assert entry is not None
    with pytest.raises(RuntimeError, match="replaced"):
        pool.replace(entry)


def test_close_returns_idle_connections_and_waiters() -> None:
    pool: PoolScheduler[Conn] = PoolScheduler(max_per_origin=1, idle_timeout=30)
    pool.release(connect(pool, A, "idle"), reusable=True, now=1.0)
    busy = connect(pool, B, "busy")
    waiter: Waiter[Conn] = pool.wait(B, lambda: None)
    released = pool.close()
    assert [c.name for c in released.close] == ["idle"]
    assert released.wake == [waiter]
    assert waiter.entry is None
    # Active connections are closed as their requests finish, never reused,
    # and their slots go to nobody.
    released = pool.release(busy, reusable=True, now=2.0)
    assert [c.name for c in released.close] == ["busy"]
    assert released.wake == []
    assert pool.stats().connections == 0
    with pytest.raises(RuntimeError, match="closed"):
        pool.checkout(A)


def test_illegal_transitions_raise() -> None:
    pool: PoolScheduler[Conn] = PoolScheduler(max_per_origin=1, idle_timeout=30)
    entry = connect(pool, A, "a1")
    with pytest.raises(RuntimeError, match="active -> active"):
        pool.connected(entry, Conn("again"))
    assert EntryState.IDLE not in TRANSITIONS[EntryState.CONNECTING]
    assert TRANSITIONS[EntryState.CLOSED] == frozenset()


@pytest.mark.parametrize(("limit", "idle"), [(0, 1.0), (1, -1.0)])
def test_bad_settings(limit: int, idle: float) -> None:
    with pytest.raises(ValueError, match="must"):
        PoolScheduler(max_per_origin=limit, idle_timeout=idle)


class PoolMachine(RuleBasedStateMachine):
    """Random interleavings of every operation; the invariants must always hold."""

    def __init__(self) -> None:
        super().__init__()
        self.pool: PoolScheduler[Conn] = PoolScheduler(max_per_origin=2, idle_timeout=5)
        self.now = 0.0
        self.held: list[Entry[Conn]] = []  # entries checked out by "requests"
        self.waiters: list[Waiter[Conn]] = []
        self.live: set[Conn] = set()  # connections handed out and not returned to close
        self.count = 0

    def _absorb(self, close: list[Conn], wake: list[Waiter[Conn]]) -> None:
        for conn in close:
            self.live.remove(conn)
        for waiter in wake:
            assert waiter.entry is not None
            self.waiters.remove(waiter)
            self.held.append(waiter.entry)

    @rule(origin=st.sampled_from([A, B]))
    def request(self, origin: Origin) -> None:
        entry = self.pool.checkout(origin)
        if entry is None:
            self.waiters.append(self.pool.wait(origin, lambda: None))
        else:
            self.held.append(entry)

    @precondition(lambda self: any(e.state is EntryState.CONNECTING for e in self.held))
    @rule(data=st.data())
    def connect_one(self, data: st.DataObject) -> None:
        pending = [e for e in self.held if e.state is EntryState.CONNECTING]
        entry = data.draw(st.sampled_from(pending))
        self.count += 1
        conn = Conn(f"c{self.count}")
        self.pool.connected(entry, conn)
        self.live.add(conn)

    @precondition(lambda self: self.held)
    @rule(data=st.data(), reusable=st.booleans())
    def finish(self, data: st.DataObject, reusable: bool) -> None:
        entry = data.draw(st.sampled_from(self.held))
        self.held.remove(entry)
        released = self.pool.release(entry, reusable=reusable, now=self.now)
        self._absorb(released.close, released.wake)

    @precondition(lambda self: any(e.connection is not None for e in self.held))
    @rule(data=st.data())
    def replace_dead(self, data: st.DataObject) -> None:
        connected = [e for e in self.held if e.connection is not None]
        entry = data.draw(st.sampled_from(connected))
        self.held.remove(entry)
        fresh, dead = self.pool.replace(entry)
        self.live.remove(dead)
        self.held.append(fresh)

    @precondition(lambda self: self.waiters)
    @rule(data=st.data())
    def give_up(self, data: st.DataObject) -> None:
        waiter = data.draw(st.sampled_from(self.waiters))
        self.waiters.remove(waiter)
        released = self.pool.cancel(waiter, now=self.now)
        self._absorb(released.close, released.wake)

    @rule(seconds=st.floats(min_value=0, max_value=10))
    def time_passes(self, seconds: float) -> None:
        self.now += seconds
        for conn in self.pool.expire(self.now):
            self.live.remove(conn)

    @invariant()
    def counts_agree(self) -> None:
        stats = self.pool.stats()
        assert stats.connections == len(self.live)
        for origin in (A, B):
            counts = stats.origins.get(str(origin), OriginStats(0, 0, 0))
            held = [e for e in self.held if e.origin == origin]
            waiting = [w for w in self.waiters if w.origin == origin]
            assert counts.active == len(held)
            assert counts.waiting == len(waiting)
            assert counts.idle + counts.active <= self.pool.max_per_origin
            if waiting:  # nobody waits while a connection or a slot is free
                assert counts.idle == 0
                assert counts.active == self.pool.max_per_origin


PoolMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=30, deadline=None)
test_pool_machine = PoolMachine.TestCase
