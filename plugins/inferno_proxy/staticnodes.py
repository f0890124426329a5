"""Static backends (``--backends``): how an operator writes them, and their model lists.

A static backend is an inference server the proxy is told about instead of
one that registers itself: typically a plain vLLM, SGLang, llama.cpp or TGI
server.  This module holds what is pure about them; the health loop
(:mod:`inferno_proxy.healthloop`) does the one piece of I/O, a ``GET``.

**Configuration.**  Each entry of ``[proxy] backends`` (``--backends``,
``INFERNO_PROXY_BACKENDS``) is ``host:port``, optionally followed by options,
each after a ``;``:

* ``weight=W``: the node's share of traffic (``weighted`` policy, and every
  policy's slow start), a number > 0 as in a registration; 1 by default;
* ``model=NAME``: a model it serves, once per model (names may hold ``/`` and
  ``:``).  Configured models turn discovery off for that node.

::

    --backends '10.0.0.5:8000;weight=2;model=llama3,10.0.0.6:8000'
    backends = ["10.0.0.5:8000;weight=2;model=meta-llama/Llama-3-8B"]
    backends = [{ address = "10.0.0.5:8000", weight = 2, models = ["llama3"] }]

(the last, a TOML table, only in a file; ``inferno config`` shows entries as
strings either way).

Commas separate entries on a command line and in a variable, which is why
each model takes its own ``;model=``.  :class:`BackendSpec` is the setting's
value type: it parses an entry to a :class:`StaticBackend` and renders one
back to text it parses again (``inferno config proxy``).
:func:`add_static_backends` puts them in a pool.

**Discovery.**  A node with no configured model takes requests for *any*
model (a wildcard) and adds nothing to the proxy's ``GET /v1/models``.  The
servers above all answer OpenAI's ``GET /v1/models``
(``{"object": "list", "data": [{"id": "name", ...}]}``), so the health loop
asks a static node without configured models for it: at its first passing
check, at its first passing check after a failed one (it may have restarted
with another model), and every :data:`MODEL_REFRESH_INTERVAL` while it passes
(a model swapped while the server runs).  :func:`read_model_list` judges an
answer and :class:`ModelDiscovery` keeps the schedule and what the operator
was last told, so an answer that stays the same is logged once.  Registered
nodes are never asked: they declare their models when they register.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Final, TypeGuard

from inferno.config import Address, HostPort, TomlValue

if TYPE_CHECKING:
    from inferno_proxy.nodes import NodeChange
    from inferno_proxy.pool import Pool

__all__ = [
    "MAX_MODEL_LIST_BYTES",
    "MODELS_PATH",
    "MODEL_REFRESH_INTERVAL",
    "MODEL_RETRY_INTERVAL",
    "BackendSpec",
    "ModelAnswer",
    "ModelDiscovery",
    "StaticBackend",
    "add_static_backends",
    "describe_models",
    "read_model_list",
]

#: Where OpenAI-compatible servers list their models.
MODELS_PATH: Final = "/v1/models"
#: Seconds between two model-list requests to a node that keeps passing its checks.
#: A server changes its model on a restart, which a failed check catches sooner; a
#: minute catches a model swapped in a running server for one small GET per node.
MODEL_REFRESH_INTERVAL: Final = 60.0
#: Seconds before asking again after an answer that taught nothing (a timeout, a
#: 5xx): a node that was only slow gets its list soon, one that keeps failing costs
#: one request per this long.
MODEL_RETRY_INTERVAL: Final = 10.0
#: Largest ``/v1/models`` answer read.  vLLM describes a model in about 600 bytes
#: (its permissions included), so MAX_MODELS entries with long names fit; a larger
#: answer is refused rather than buffered.
MAX_MODEL_LIST_BYTES: Final = 1024 * 1024
#: Statuses that mean "not now" rather than "no such list": the list is kept.
_PASSING_TROUBLE: Final = frozenset({408, 425, 429})
#: Model names a log line or a change reason shows before "and N more".
_SHOWN_MODELS: Final = 5
_SHOWN_CHARS: Final = 60  # a quoted raw value in an error message, shortened past this
_OPTIONS: Final = "the options are weight=W and model=NAME"


# --- configuration -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StaticBackend:
    """One static backend as configured.

    ``str()`` of it is its address, which is also the node's id in the pool;
    :meth:`spec` is the whole entry, options included.

    :ivar address: where its service port listens.
    :ivar weight: its share of traffic (> 0, finite), as a registration's ``weight``.
    :ivar models: the models it serves, distinct; empty: ask the node (discovery).
    :raises ValueError: on a weight or model list a registration could not carry.
    """

    address: HostPort
    weight: float = 1.0
    models: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # The registration's own rules, so a static node is never something a
        # registered one could not be (weight > 0, at most 1024 printable names).
        # Imported here: ``inferno --help`` imports this module, through the settings.
        from inferno.errors import ValidationError
        from inferno.protocol import NodeInfo, NodeType

        try:
            NodeInfo(
                id="static",
                address="static:1",
                metrics_port=1,
                node_type=NodeType.BACKEND,
                models=self.models,
                weight=self.weight,
            )
        except ValidationError as exc:
            what = exc.field
            if what.startswith("models["):  # models[2]: name the model, not its index
                what = f"model {_quote(self.models[int(what[7:-1])])}"
            raise ValueError(f"{what}: {exc.problem}") from None
        for name in self.models:
            if ";" in name:  # it could not be written back as an option (inferno config)
                raise ValueError(f"model {_quote(name)}: ';' separates options")
        object.__setattr__(self, "weight", float(self.weight))
        object.__setattr__(self, "models", tuple(self.models))

    def __str__(self) -> str:
        return str(self.address)

    def spec(self) -> str:
        """The entry as an operator writes it: ``host:port[;weight=W][;model=NAME]...``."""
        parts = [str(self.address)]
        if self.weight != 1.0:
            parts.append(f"weight={_format_weight(self.weight)}")
        parts.extend(f"model={name}" for name in self.models)
        return ";".join(parts)


def _format_weight(weight: float) -> str:
    """``2`` rather than ``2.0``; otherwise ``repr``, which reads back exactly."""
    return str(int(weight)) if weight.is_integer() and abs(weight) < 2**53 else repr(weight)


def _quote(text: str) -> str:
    shown = repr(text)
    return shown if len(shown) <= _SHOWN_CHARS else shown[: _SHOWN_CHARS - 3] + "..."


@dataclass(frozen=True, slots=True)
class BackendSpec:
    """``host:port`` with optional ``;weight=W`` and ``;model=NAME`` options, parsed to
    :class:`StaticBackend` (the value type of one ``backends`` entry).

    The address must be one the proxy can connect to: a host and a port from
    1 to 65535, not a wildcard such as ``0.0.0.0``.
    """

    metavar: ClassVar[str] = "HOST:PORT"

    def parse(self, raw: object) -> StaticBackend:
        if isinstance(raw, Mapping):
            return _parse_table(raw)
        if not isinstance(raw, str):
            kind = "an array" if isinstance(raw, (list, tuple)) else type(raw).__name__
            raise ValueError(f"expected a 'host:port;option=value' string, got {kind}")
        text, *options = raw.strip().split(";")
        address = _connectable(text)
        weight: float | None = None
        models: list[str] = []
        for option in options:
            key, equals, value = (part.strip() for part in option.partition("="))
            if not key and not value:
                raise ValueError(f"{_quote(raw)} has an empty option (';' with nothing after it)")
            if not equals:
                raise ValueError(f"{_quote(raw)} has an option {key!r} without '='; {_OPTIONS}")
            if key == "weight":
                if weight is not None:
                    raise ValueError(f"{_quote(raw)} gives weight twice")
                weight = _parse_weight(raw, value)
            elif key == "model":
                if not value:
                    raise ValueError(f"{_quote(raw)} has an empty model name")
                if value in models:
                    raise ValueError(f"{_quote(raw)} gives model {_quote(value)} twice")
                models.append(value)
            else:
                raise ValueError(f"{_quote(raw)} has an unknown option {key!r}; {_OPTIONS}")
        try:
            return StaticBackend(address, 1.0 if weight is None else weight, tuple(models))
        except ValueError as exc:
            raise ValueError(f"{_quote(raw)}: {exc}") from None

    def describe(self) -> str:
        return (
            "host:port or [IPv6]:port, optionally followed by ;weight=W (a number > 0) and "
            ";model=NAME (once per model), such as 10.0.0.5:8000;weight=2;model=llama3; "
            'in TOML also a table {address = "host:port", weight = W, models = ["NAME"]}'
        )

    def render(self, value: Any) -> TomlValue:
        if isinstance(value, StaticBackend):
            return value.spec()
        return str(HostPort(*value))  # a plain (host, port) from code


def _connectable(text: str) -> HostPort:
    """*text* as an address the proxy can connect to (no wildcard host, no port 0)."""
    from inferno.protocol import parse_address

    address = Address().parse(text)
    try:
        parse_address(str(address))
    except ValueError as exc:
        raise ValueError(f"{_quote(text.strip())} cannot be connected to: {exc}") from None
    return address


_TABLE_KEYS: Final = ("address", "weight", "models")


def _parse_table(raw: Mapping[Any, Any]) -> StaticBackend:
    """The TOML table form: ``{address = "h:p", weight = 2, models = ["m"]}``."""
    unknown = [str(key) for key in raw if key not in _TABLE_KEYS]
    if unknown:
        raise ValueError(
            f"a backend table has unknown key(s) {', '.join(map(repr, unknown))}; "
            f"its keys are {', '.join(_TABLE_KEYS)}"
        )
    address = raw.get("address")
    if not isinstance(address, str):
        raise ValueError('a backend table needs address = "host:port"')
    where = _connectable(address)
    weight = raw.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise ValueError(f"{_quote(address)}: weight must be a number > 0, got {weight!r}")
    if not (math.isfinite(weight) and weight > 0.0):
        raise ValueError(f"{_quote(address)}: weight {weight!r} is out of range: expected > 0")
    models = raw.get("models", [])
    if not isinstance(models, (list, tuple)) or not all(isinstance(m, str) for m in models):
        raise ValueError(f"{_quote(address)}: models must be an array of names")
    if any(not m for m in models):
        raise ValueError(f"{_quote(address)} has an empty model name")
    if len(set(models)) != len(models):
        raise ValueError(f"{_quote(address)} lists a model twice")
    try:
        return StaticBackend(where, float(weight), tuple(models))
    except ValueError as exc:
        raise ValueError(f"{_quote(address)}: {exc}") from None


def _parse_weight(raw: str, value: str) -> float:
    try:
        weight = float(value)
    except ValueError:
        raise ValueError(f"{_quote(raw)} has a weight {value!r} that is not a number") from None
    if not (math.isfinite(weight) and weight > 0.0):
        raise ValueError(
            f"{_quote(raw)} has a weight {value!r} out of range: expected a number > 0"
        )
    return weight


def add_static_backends(
    pool: Pool, backends: Iterable[StaticBackend], now: float
) -> tuple[NodeChange, ...]:
    """Put *backends* in *pool* (a repeated address: its last entry wins); the changes.

    :raises inferno.errors.ValidationError: on an address the pool refuses.
    """
    changes: list[NodeChange] = []
    for backend in backends:
        changes.extend(
            pool.add_static(str(backend), now, models=backend.models, weight=backend.weight)
        )
    return tuple(changes)


# --- discovery ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ModelAnswer:
    """What one ``GET /v1/models`` taught about a node.

    :ivar models: the names to route by; ``()``: the node has no list, it takes
        any model; ``None``: nothing learned (it could not answer now), keep
        what is known.
    :ivar note: what the operator should read about it, once (why there is no
        list, entries left out); empty for a clean answer.
    """

    models: tuple[str, ...] | None
    note: str = ""


def read_model_list(status: int, body: bytes | None) -> ModelAnswer:
    """Judge a ``GET /v1/models`` answer (*body* ``None``: over :data:`MAX_MODEL_LIST_BYTES`).

    A 2xx OpenAI model list gives its ``data[].id`` names, in order, duplicates
    dropped; entries whose ``id`` is no usable model name (not a string,
    empty, longer than a registration allows, control characters, blanks
    around it) and entries past :data:`~inferno.protocol.MAX_MODELS` are left
    out and counted in the note.  408, 425, 429 and 5xx teach nothing (the list
    is kept).  Any other answer (404 from a server without the route, 401
    from one that wants a key, a body that is no model list) means no list.
    """
    from inferno.protocol import MAX_MODELS, MAX_NAME_CHARS

    if status in _PASSING_TROUBLE or status >= 500:
        return ModelAnswer(
            None, f"{MODELS_PATH} answered HTTP {status}; its models stay as they were"
        )
    if not 200 <= status < 300:
        return _no_list(f"HTTP {status}")
    if body is None:
        return _no_list(f"an answer over {MAX_MODEL_LIST_BYTES // 1024} KiB")
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):  # bad JSON, bad UTF-8, absurd nesting
        return _no_list("an answer that is not JSON")
    data = document.get("data") if isinstance(document, dict) else None
    if not isinstance(data, list):
        return _no_list('JSON without a "data" array')
    names: dict[str, None] = {}  # insertion-ordered set
    left_out = 0
    for entry in data:
        name = entry.get("id") if isinstance(entry, dict) else None
        if isinstance(name, str) and name in names:
            continue
        if len(names) < MAX_MODELS and _usable_name(name, MAX_NAME_CHARS):
            names[name] = None
        else:
            left_out += 1
    if not names:
        return _no_list("an empty model list" if not left_out else "no usable model id")
    note = ""
    if left_out:
        note = f"{left_out} entries of {MODELS_PATH} left out (no usable id, or past {MAX_MODELS})"
    return ModelAnswer(tuple(names), note)


def _no_list(what: str) -> ModelAnswer:
    return ModelAnswer((), f"no model list ({MODELS_PATH} gave {what}): it takes any model")


def _usable_name(name: object, max_chars: int) -> TypeGuard[str]:
    """Whether a registration could carry *name* as a model (protocol's rule for names)."""
    return (
        isinstance(name, str)
        and 0 < len(name) <= max_chars
        and name.isprintable()
        and name.strip() == name
    )


def describe_models(models: tuple[str, ...]) -> str:
    """``models a, b, c`` (the first few, then ``and N more``), for a change's reason."""
    if not models:
        return "no model list: takes any model"
    shown = ", ".join(models[:_SHOWN_MODELS])
    more = len(models) - _SHOWN_MODELS
    return f"models {shown}" + (f" and {more} more" if more > 0 else "")


class ModelDiscovery:
    """When to ask each static node for its model list, and what was said about it.

    The health loop calls :meth:`due` after a passing check, :meth:`lost` after
    a failed one, and :meth:`answered` with each answer.  Pure: times are the
    caller's monotonic seconds.

    :param interval: seconds between two requests to a node that keeps passing.
    :param retry: seconds before asking again after an answer that taught nothing
        (at most *interval*).
    :raises ValueError: on an interval or retry that is not > 0.
    """

    __slots__ = ("_next", "_told", "interval", "retry")

    def __init__(
        self, interval: float = MODEL_REFRESH_INTERVAL, retry: float = MODEL_RETRY_INTERVAL
    ) -> None:
        for name, value in (("interval", interval), ("retry", retry)):
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"model list {name} must be > 0 seconds, got {value!r}")
        self.interval = interval
        self.retry = min(retry, interval)
        self._next: dict[str, float] = {}  # node id -> when to ask next
        self._told: dict[str, str] = {}  # node id -> the note last logged

    def due(self, node_id: str, now: float) -> bool:
        """Whether to ask *node_id* now: never asked, back from a failure, or time."""
        return now >= self._next.get(node_id, -math.inf)

    def lost(self, node_id: str) -> None:
        """A check of *node_id* failed: ask again at its next passing check."""
        self._next.pop(node_id, None)

    def answered(self, node_id: str, answer: ModelAnswer, now: float) -> str:
        """Note *answer* and schedule the next request; the note to log, or ``""``
        when the operator was already told the same."""
        wait = self.interval if answer.models is not None else self.retry
        self._next[node_id] = now + wait
        told = self._told.get(node_id, "")
        self._told[node_id] = answer.note
        return answer.note if answer.note != told else ""

    def forget(self, keep: Collection[str]) -> None:
        """Drop what is kept about nodes not in *keep* (they left the pool)."""
        for table in (self._next, self._told):
            for node_id in [n for n in table if n not in keep]:
                del table[node_id]
