"""Keep-alive pool scheduling for the HTTP client, as plain state without I/O.

:class:`PoolScheduler` decides which connection serves which request, which
request waits, and which connections must be closed; it never touches a
socket or awaits anything.  The async client asks it, does the I/O it was
told to do (connect, close) and reports back.  Because every method runs to
completion without yielding, each decision is atomic under the event loop,
and the scheduler can be tested exhaustively without a network.

Each *entry* is one slot of an origin's ``max_per_origin``; it moves through
the states of :data:`TRANSITIONS`::

    CONNECTING --connected--> ACTIVE --release(reusable)--> IDLE --checkout--> ACTIVE
         \\                      \\                          \\
          `--release-------------`--release(broken)---------`--expire/close--> CLOSED

A slot freed while requests wait for that origin is handed straight to the
first waiter, so a request that arrives later never overtakes one that waits.
Idle connections are reused last-in first-out: the most recently used one is
the least likely to have been closed by the server's own idle timer, and the
oldest ones age out.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, NamedTuple, TypeVar

__all__ = [
    "TRANSITIONS",
    "Entry",
    "EntryState",
    "Origin",
    "OriginStats",
    "PoolScheduler",
    "PoolStats",
    "Release",
    "Waiter",
]

C = TypeVar("C")


class Origin(NamedTuple):
    """Where connections go and what they may be shared for: (scheme, host, port)."""

    scheme: str
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


class EntryState(enum.IntEnum):
    """Where one pool slot is in its life.

    An ``IntEnum`` so that the transition check, twice per request, hashes in C.
    """

    CONNECTING = 1  # reserved; the request holding it is opening the connection
    ACTIVE = 2  # serving exactly one request
    IDLE = 3  # kept alive between requests
    CLOSED = 4  # out of the pool; its connection is closed by the caller


TRANSITIONS: dict[EntryState, frozenset[EntryState]] = {
    EntryState.CONNECTING: frozenset({EntryState.ACTIVE, EntryState.CLOSED}),
    EntryState.ACTIVE: frozenset({EntryState.IDLE, EntryState.CLOSED}),
    EntryState.IDLE: frozenset({EntryState.ACTIVE, EntryState.CLOSED}),
    EntryState.CLOSED: frozenset(),
}


class Entry(Generic[C]):
    """One slot of an origin: its state and, once connected, its connection."""

    __slots__ = ("connection", "idle_since", "origin", "state")

    def __init__(self, origin: Origin) -> None:
        self.origin = origin
        self.state = EntryState.CONNECTING
        self.connection: C | None = None
        self.idle_since = 0.0  # event-loop seconds; meaningful only while IDLE

    def __repr__(self) -> str:
        return f"<Entry {self.origin} {self.state.name.lower()}>"


class Waiter(Generic[C]):
    """A request waiting for a slot of a full origin.

    ``wake`` is the caller's own callback (it sets an event); the scheduler
    never calls it, it returns the waiters to wake.  ``entry`` is set when a
    slot has been granted: an ACTIVE entry holding an idle connection to reuse,
    or a CONNECTING one for which the waiter opens a new connection.
    """

    __slots__ = ("entry", "origin", "wake")

    def __init__(self, origin: Origin, wake: Callable[[], None]) -> None:
        self.origin = origin
        self.wake = wake
        self.entry: Entry[C] | None = None


@dataclass(frozen=True, slots=True)
class Release(Generic[C]):
    """What the caller must do after a scheduling step: close these, wake those."""

    close: list[C]
    wake: list[Waiter[C]]


@dataclass(frozen=True, slots=True)
class OriginStats:
    """Connection counts of one origin at one moment."""

    idle: int  # connected, waiting for a request
    active: int  # serving a request or being connected
    waiting: int  # requests queued for a slot


@dataclass(frozen=True, slots=True)
class PoolStats:
    """The whole pool at one moment; ``opened - closed`` is the number of live connections."""

    origins: dict[str, OriginStats]
    opened: int  # connections ever established
    closed: int  # connections ever handed back to be closed

    @property
    def connections(self) -> int:
        """Connections established and not yet closed."""
        return self.opened - self.closed


class _OriginState(Generic[C]):
    __slots__ = ("count", "idle", "waiters")

    def __init__(self) -> None:
        self.count = 0  # entries in CONNECTING, ACTIVE or IDLE
        self.idle: deque[Entry[C]] = deque()  # oldest first
        self.waiters: deque[Waiter[C]] = deque()  # first come, first served


class PoolScheduler(Generic[C]):
    """Per-origin keep-alive scheduling: at most ``max_per_origin`` connections each.

    ``idle_timeout`` (seconds) is how long an unused connection is kept; times
    are the caller's monotonic clock (the client's is ``time.monotonic()``),
    passed in so tests control them.
    """

    def __init__(self, max_per_origin: int, idle_timeout: float) -> None:
        if max_per_origin < 1:
            raise ValueError(f"max_per_origin must be at least 1, not {max_per_origin}")
        if idle_timeout < 0:
            raise ValueError(f"idle_timeout must not be negative, not {idle_timeout}")
        self.max_per_origin = max_per_origin
        self.idle_timeout = idle_timeout
        self.is_closed = False
        self._origins: dict[Origin, _OriginState[C]] = {}
        self._next_expiry = float("inf")  # no idle connection can expire before this
        self._opened = 0
        self._closed = 0

    # -- requests ------------------------------------------------------------

    def checkout(self, origin: Origin) -> Entry[C] | None:
        """Give a request a slot now, or ``None`` when it must :meth:`wait`.

        The entry returned is ACTIVE with a connection to reuse (the caller
        should first check the server did not close it, see :meth:`replace`),
        or CONNECTING without one (the caller connects, then :meth:`connected`).
        """
        if self.is_closed:
            raise RuntimeError("the connection pool is closed")
        state = self._origins.get(origin)
        if state is None:
            state = self._origins[origin] = _OriginState()
        if state.idle:
            entry = state.idle.pop()
            _move(entry, EntryState.ACTIVE)
            return entry
        if state.count < self.max_per_origin and not state.waiters:
            state.count += 1
            return Entry(origin)
        return None

    def wait(self, origin: Origin, wake: Callable[[], None]) -> Waiter[C]:
        """Queue a request that :meth:`checkout` could not serve."""
        waiter: Waiter[C] = Waiter(origin, wake)
        self._origins[origin].waiters.append(waiter)
        return waiter

    def cancel(self, waiter: Waiter[C], now: float) -> Release[C]:
        """Withdraw a waiter that gave up (timeout, cancellation).

        If a slot was granted to it in the meantime, the slot goes back to the
        pool, possibly to the next waiter; nothing ever needs closing here.
        """
        entry = waiter.entry
        if entry is None:
            state = self._origins.get(waiter.origin)
            if state is not None and waiter in state.waiters:
                state.waiters.remove(waiter)
                self._forget_if_empty(waiter.origin, state)
            return Release([], [])
        waiter.entry = None
        # A granted connection is untouched and still clean; a granted CONNECTING
        # slot has no connection yet.
        return self.release(entry, reusable=entry.connection is not None, now=now)

    def connected(self, entry: Entry[C], connection: C) -> None:
        """Record that the caller opened ``connection`` for a CONNECTING entry."""
        _move(entry, EntryState.ACTIVE)
        entry.connection = connection
        self._opened += 1

    def replace(self, entry: Entry[C]) -> tuple[Entry[C], C]:
        """Swap the dead connection of a checked-out entry for a fresh slot.

        Used when the server closed an idle connection (or it failed before any
        byte of the request went out): the request keeps its place instead of
        queueing again.  Returns the CONNECTING entry to connect and the old
        connection to close.
        """
        old = entry.connection
        if entry.state is not EntryState.ACTIVE or old is None:
            raise RuntimeError(f"only a connected ACTIVE entry can be replaced, not {entry!r}")
        _move(entry, EntryState.CLOSED)
        entry.connection = None
        self._closed += 1
        return Entry(entry.origin), old

    def release(self, entry: Entry[C], *, reusable: bool, now: float) -> Release[C]:
        """Give back the entry of a finished (or failed) request.

        ``reusable`` means the caller verified the connection can carry another
        request (HTTP/1.1 keep-alive, both sides finished).  A reusable
        connection goes to the first waiter or becomes idle; anything else is
        closed, and its freed slot goes to the first waiter as a new connection.
        """
        state = self._origins[entry.origin]
        connection = entry.connection
        if reusable and connection is not None and not self.is_closed:
            if state.waiters:
                waiter = state.waiters.popleft()
                waiter.entry = entry  # stays ACTIVE, now serving the waiter
                return Release([], [waiter])
            _move(entry, EntryState.IDLE)
            entry.idle_since = now
            state.idle.append(entry)
            self._next_expiry = min(self._next_expiry, now + self.idle_timeout)
            return Release([], [])
        _move(entry, EntryState.CLOSED)
        entry.connection = None
        state.count -= 1
        close = []
        if connection is not None:
            close.append(connection)
            self._closed += 1
        return Release(close, self._grant_new_slots(entry.origin, state))

    # -- housekeeping --------------------------------------------------------

    def expire(self, now: float) -> list[C]:
        """Remove idle connections unused for ``idle_timeout``; return them to close.

        Cheap when nothing is due: one comparison against the earliest deadline.
        """
        if now < self._next_expiry:
            return []
        expired: list[C] = []
        next_expiry = float("inf")
        for origin, state in list(self._origins.items()):
            idle = state.idle
            while idle and idle[0].idle_since + self.idle_timeout <= now:
                expired.append(self._remove_idle(idle.popleft(), state))
            if idle:
                next_expiry = min(next_expiry, idle[0].idle_since + self.idle_timeout)
            # Waiters only exist while an origin is full and has no idle
            # connection, so expiry frees no slot anyone waits for; be safe anyway.
            self._grant_new_slots(origin, state)
            self._forget_if_empty(origin, state)
        self._next_expiry = next_expiry
        return expired

    def close(self) -> Release[C]:
        """Shut the pool: every idle connection to close, every waiter to wake empty-handed.

        ACTIVE entries are closed when their requests release them.
        """
        self.is_closed = True
        close: list[C] = []
        wake: list[Waiter[C]] = []
        for state in self._origins.values():
            while state.idle:
                close.append(self._remove_idle(state.idle.popleft(), state))
            wake.extend(state.waiters)
            state.waiters.clear()
        self._next_expiry = float("inf")
        return Release(close, wake)

    def stats(self) -> PoolStats:
        """Counts per origin (``str(origin)`` keys) and connections opened/closed so far."""
        origins = {
            str(origin): OriginStats(
                idle=len(state.idle),
                active=state.count - len(state.idle),
                waiting=len(state.waiters),
            )
            for origin, state in self._origins.items()
        }
        return PoolStats(origins=origins, opened=self._opened, closed=self._closed)

    # -- internals -----------------------------------------------------------

    def _remove_idle(self, entry: Entry[C], state: _OriginState[C]) -> C:
        connection = entry.connection
        assert connection is not None  # an IDLE entry is always connected
        _move(entry, EntryState.CLOSED)
        entry.connection = None
        state.count -= 1
        self._closed += 1
        return connection

    def _grant_new_slots(self, origin: Origin, state: _OriginState[C]) -> list[Waiter[C]]:
        woken: list[Waiter[C]] = []
        while state.waiters and state.count < self.max_per_origin and not self.is_closed:
            waiter = state.waiters.popleft()
            state.count += 1
            waiter.entry = Entry(origin)
            woken.append(waiter)
        if not woken:
            self._forget_if_empty(origin, state)
        return woken

    def _forget_if_empty(self, origin: Origin, state: _OriginState[C]) -> None:
        # Origins come and go (backends scale); an empty one costs nothing to rebuild.
        if state.count == 0 and not state.waiters:
            self._origins.pop(origin, None)


def _move(entry: Entry[C], new: EntryState) -> None:
    """The one mutator of entry states; an illegal move is a bug in the caller."""
    if new not in TRANSITIONS[entry.state]:
        raise RuntimeError(
            f"illegal pool entry transition {entry.state.name.lower()} -> {new.name.lower()}"
        )
    entry.state = new
