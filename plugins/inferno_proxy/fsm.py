"""Transition tables: the one way the proxy's state machines change state.

A machine is a table ``{state: {event: next_state}}``; a pair missing from the
table is illegal.  The health tracker and the circuit breaker each classify
what they observe (a check passed, a request failed, a cooldown ran out) into
an event, then ask :func:`next_state` where that event leads.  Keeping every
legal move in one literal table makes the machine readable at a glance and
lets tests walk it exhaustively.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Generic, TypeVar

from inferno.errors import InfernoError

__all__ = ["IllegalTransition", "Table", "Transition", "check_table", "next_state"]

S = TypeVar("S", bound=Enum)
E = TypeVar("E", bound=Enum)

#: ``{state: {event: next_state}}``; a state with an empty row is terminal.
Table = Mapping[S, Mapping[E, S]]


class IllegalTransition(InfernoError):
    """Raised when an event arrives in a state whose table row does not list it.

    This is a programming error (the classifier produced an event the table
    does not expect, or a caller fed a terminal machine), never a user error;
    the message names the machine, the state and the event.
    """

    def __init__(self, machine: str, state: Enum, event: Enum) -> None:
        super().__init__(f"{machine}: event {event.name} is not allowed in state {state.name}")
        self.machine = machine
        self.state = state
        self.event = event


@dataclass(frozen=True, slots=True)
class Transition(Generic[S, E]):
    """One change of state, for logs, metrics and ``GET /backends``.

    :ivar old: the state before.
    :ivar new: the state after (differs from ``old``: self-loops are not reported).
    :ivar event: what caused it.
    :ivar at: when (monotonic seconds, as passed in by the caller).
    :ivar reason: a human explanation ("connect refused", "3 consecutive failures").
    """

    old: S
    new: S
    event: E
    at: float
    reason: str = ""


def next_state(machine: str, table: Table[S, E], state: S, event: E) -> S:
    """Where *event* leads from *state* in *table*.

    :raises IllegalTransition: when the table has no entry for the pair.
    """
    try:
        return table[state][event]
    except KeyError:
        raise IllegalTransition(machine, state, event) from None


def check_table(table: Table[S, E], states: type[S], events: type[E]) -> None:
    """Assert at import time that *table* has a row for every state and names only known values.

    :raises ValueError: naming the first problem.
    """
    for state in states:
        if state not in table:
            raise ValueError(f"no row for state {state.name}")
        for event, target in table[state].items():
            if not isinstance(event, events) or not isinstance(target, states):
                raise ValueError(f"row {state.name} maps {event!r} to {target!r}")
