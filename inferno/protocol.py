"""Wire types shared by the roles: registrations, peer descriptions and node vitals.

These are the JSON documents nodes exchange (DESIGN.md, "Wire protocol"):

* :class:`Registration` -- what a node POSTs to a proxy's ``/register``.
* :class:`NodeInfo` -- how a proxy describes a known node (the ``peers`` list).
* :class:`NodeVitals` -- a node's ``GET /metrics`` JSON document.

Each is a frozen, slotted dataclass, validated when it is built, whether from
code or from JSON, so an invalid value never exists.  ``from_json`` is strict:
a missing required field, a wrong type or an out-of-range number raises
:class:`inferno.errors.ValidationError` naming the field by its path
(``models[1]``, ``peers[2].address``), which an HTTP handler answers with
``exc.to_http()`` (400).  JSON booleans are never accepted as numbers.
Unknown fields are ignored, so an older node can read a newer node's
documents (forward compatibility); ``to_json`` returns the JSON-ready dict.

Parsing runs per registration and per vitals poll, not per request; it is a
straight pass over a fixed field table.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Final, TypeVar

from inferno.errors import ValidationError

__all__ = [
    "NodeInfo",
    "NodeType",
    "NodeVitals",
    "Registration",
    "field_names",
    "format_address",
    "parse_address",
    "required_fields",
]

MAX_ID_CHARS: Final = 256  # ids appear in logs, URLs and metric labels: keep them short
MAX_NAME_CHARS: Final = 256  # a model or capability name; HF ids are well under this
MAX_MODELS: Final = 1024  # per node: bounds what one registration can make us store
MAX_CAPABILITIES: Final = 64
MAX_VERSION_CHARS: Final = 128
MAX_HOST_CHARS: Final = 253  # the longest DNS name (RFC 1035)
MAX_COUNT: Final = 2**63 - 1  # counts must fit a signed 64-bit integer (SQLite, Prometheus)


class NodeType:
    """The kinds of node, as written in ``node_type``."""

    BACKEND: Final = "backend"  # serves inference; proxies route requests to it
    PROXY: Final = "proxy"  # load balancer in front of backends
    GOVERNATOR: Final = "governator"  # watches the fleet and starts/stops nodes
    KNOWN: Final = frozenset({BACKEND, PROXY, GOVERNATOR})


# --- addresses ------------------------------------------------------------------------------

_PORT_RE: Final = re.compile(r"[0-9]{1,5}")
_NUMERIC_HOST_RE: Final = re.compile(r"[0-9.]+")
_HOST_LABEL_RE: Final = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


def parse_address(text: str) -> tuple[str, int]:
    """Split ``host:port`` or ``[ipv6]:port`` into ``(host, port)``.

    The host is a DNS name, an IPv4 address, or a bracketed IPv6 address; a
    wildcard (``0.0.0.0``, ``[::]``) is refused, because a node advertises an
    address its peers must be able to connect to.

    :raises ValueError: saying what is wrong and what is expected.
    """
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise ValueError(f"{text!r} is not [ipv6]:port")
        port_text = rest[1:]
        try:
            unspecified = ipaddress.IPv6Address(host).is_unspecified
        except ValueError:
            raise ValueError(f"{host!r} in brackets is not an IPv6 address") from None
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon or not host:
            raise ValueError(f"{text!r} is not host:port")
        if ":" in host:
            raise ValueError(f"{text!r}: an IPv6 address needs brackets, as in [::1]:8000")
        if len(host) > MAX_HOST_CHARS or not all(
            _HOST_LABEL_RE.fullmatch(label) for label in host.split(".")
        ):
            raise ValueError(f"{host!r} is not a valid host name or IPv4 address")
        try:
            unspecified = ipaddress.IPv4Address(host).is_unspecified
        except ValueError:
            if _NUMERIC_HOST_RE.fullmatch(host):  # 1.2.3.256, 10.1: not a name, not an IPv4
                raise ValueError(f"{host!r} is not a valid IPv4 address") from None
            unspecified = False
    if unspecified:
        raise ValueError(f"{host!r} is a wildcard address; advertise one peers can reach")
    if not _PORT_RE.fullmatch(port_text) or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"port {port_text!r} is not a number from 1 to 65535")
    return host, int(port_text)


def format_address(host: str, port: int) -> str:
    """The ``host:port`` text for *host* and *port*, bracketing an IPv6 host."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --- field checks: each takes (value, field path) and returns the normalised value ----------

Check = Callable[[Any, str], Any]

_JSON_TYPES: Final = {bool: "boolean", int: "number", float: "number", str: "string"}


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, dict):
        return "object"
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _wrong(path: str, expected: str, value: object) -> ValidationError:
    return ValidationError(path, f"expected {expected}, got {_json_type(value)}")


def _bool(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise _wrong(path, "true or false", value)
    return value


def _integer(minimum: int, maximum: int = MAX_COUNT, *, nullable: bool = False) -> Check:
    expected = (
        f"an integer >= {minimum}" if maximum == MAX_COUNT else f"an integer {minimum}-{maximum}"
    )
    expected += " or null" if nullable else ""

    def check(value: Any, path: str) -> int | None:
        if value is None and nullable:
            return None
        if not isinstance(value, int) or isinstance(value, bool):
            raise _wrong(path, expected, value)
        if not minimum <= value <= maximum:
            raise ValidationError(path, f"{value} is out of range: expected {expected}")
        return value

    return check


def _number(
    minimum: float = 0.0,
    maximum: float = math.inf,
    *,
    above_minimum: bool = False,
    nullable: bool = False,
) -> Check:
    low = f"> {minimum:g}" if above_minimum else f">= {minimum:g}"
    expected = (
        f"a number {low}" if maximum == math.inf else f"a number from {minimum:g} to {maximum:g}"
    )
    expected += " or null" if nullable else ""

    def check(value: Any, path: str) -> float | None:
        if value is None and nullable:
            return None
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise _wrong(path, expected, value)
        try:
            number = float(value)
        except OverflowError:  # a JSON integer too large for a float
            raise ValidationError(path, f"is too large: expected {expected}") from None
        if not math.isfinite(number):
            raise ValidationError(path, f"{value} is not finite: expected {expected}")
        if number < minimum or number > maximum or (above_minimum and number == minimum):
            raise ValidationError(path, f"{value} is out of range: expected {expected}")
        return number

    return check


def _text(max_chars: int, *, spaces: bool = True) -> Check:
    """Non-empty printable text without surrounding blanks (or without any blank)."""

    def check(value: Any, path: str) -> str:
        if not isinstance(value, str):
            raise _wrong(path, "a string", value)
        if not value:
            raise ValidationError(path, "must not be empty")
        if len(value) > max_chars:
            raise ValidationError(path, f"is {len(value)} characters long; at most {max_chars}")
        if not value.isprintable():
            raise ValidationError(path, "must be printable (no control characters)")
        if value.strip() != value or (not spaces and any(c.isspace() for c in value)):
            what = "must not contain whitespace" if not spaces else "has surrounding whitespace"
            raise ValidationError(path, what)
        return value

    return check


def _names(max_items: int) -> Check:
    """A list of distinct names (models, capabilities), stored as a tuple."""
    name = _text(MAX_NAME_CHARS)

    def check(value: Any, path: str) -> tuple[str, ...]:
        if not isinstance(value, (list, tuple)):
            raise _wrong(path, "an array of strings", value)
        if len(value) > max_items:
            raise ValidationError(path, f"has {len(value)} entries; at most {max_items}")
        seen: set[str] = set()
        for index, item in enumerate(value):
            name(item, f"{path}[{index}]")
            if item in seen:
                raise ValidationError(f"{path}[{index}]", f"duplicate {item!r}")
            seen.add(item)
        return tuple(value)

    return check


def _address(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise _wrong(path, 'a "host:port" string', value)
    try:
        return format_address(*parse_address(value))
    except ValueError as exc:
        raise ValidationError(path, str(exc)) from None


_NODE_TYPE_RE: Final = re.compile(r"[a-z][a-z0-9_-]{0,31}")


def _node_type(*, known_only: bool) -> Check:
    def check(value: Any, path: str) -> str:
        if not isinstance(value, str):
            raise _wrong(path, "a string", value)
        if known_only and value not in NodeType.KNOWN:
            raise ValidationError(
                path, f"{value!r} is not a node type; one of {', '.join(sorted(NodeType.KNOWN))}"
            )
        if not _NODE_TYPE_RE.fullmatch(value):
            raise ValidationError(path, f"{value!r} is not a node type name ([a-z][a-z0-9_-]*)")
        return value

    return check


_ID = _text(MAX_ID_CHARS, spaces=False)
_PORT = _integer(1, 65535)
_COUNT = _integer(0)
_FRACTION = _number(0.0, 1.0)
_FRACTION_OR_NULL = _number(0.0, 1.0, nullable=True)

# --- the shared machinery -------------------------------------------------------------------

T = TypeVar("T", bound="_WireType")


class _WireType:
    """Validation and JSON conversion from a per-class table of (field, check, required)."""

    __slots__ = ()
    _FIELDS: ClassVar[tuple[tuple[str, Check, bool], ...]]

    def __post_init__(self) -> None:
        for name, check, _ in self._FIELDS:
            value = getattr(self, name)
            checked = check(value, name)
            if checked is not value:  # normalised (list -> tuple, int -> float, address)
                object.__setattr__(self, name, checked)

    @classmethod
    def from_json(cls: type[T], obj: object, path: str = "") -> T:
        """Build from a decoded JSON value; *path* prefixes field names in errors.

        :raises ValidationError: naming the first missing or invalid field.
        """
        if not isinstance(obj, dict):
            raise _wrong(path or "body", "a JSON object", obj)
        kwargs = {}
        for name, _, required in cls._FIELDS:
            if name in obj:
                kwargs[name] = obj[name]
            elif required:
                raise ValidationError(f"{path}.{name}" if path else name, "is required")
        try:
            return cls(**kwargs)
        except ValidationError as exc:
            if not path:
                raise
            raise ValidationError(f"{path}.{exc.field}", exc.problem) from None

    def to_json(self) -> dict[str, Any]:
        """The JSON-ready dict (tuples become lists, every field present)."""
        document = {}
        for name, _, _ in self._FIELDS:
            value = getattr(self, name)
            document[name] = list(value) if isinstance(value, tuple) else value
        return document


def _fields(*spec: tuple[str, Check, bool]) -> tuple[tuple[str, Check, bool], ...]:
    return spec


_REQUIRED, _OPTIONAL = True, False


# --- the documents --------------------------------------------------------------------------


def _node_fields(*, known_types_only: bool) -> tuple[tuple[str, Check, bool], ...]:
    """The field table of :class:`Registration` and :class:`NodeInfo`.

    The two documents carry the same fields; they differ only in whether an
    unknown ``node_type`` is refused (a registration) or kept (a peer list
    written by a newer proxy).
    """
    return _fields(
        ("id", _ID, _REQUIRED),
        ("address", _address, _REQUIRED),
        ("metrics_port", _PORT, _REQUIRED),
        ("node_type", _node_type(known_only=known_types_only), _REQUIRED),
        ("models", _names(MAX_MODELS), _OPTIONAL),
        ("capabilities", _names(MAX_CAPABILITIES), _OPTIONAL),
        ("weight", _number(0.0, above_minimum=True), _OPTIONAL),
        ("max_concurrency", _integer(1, nullable=True), _OPTIONAL),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Registration(_WireType):
    """What a node POSTs to a proxy's ``/register`` (re-registering an id updates it).

    :ivar id: the node's unique, stable name (1-256 printable characters, no
        whitespace); the proxy keys its pool by it.
    :ivar address: ``host:port`` where peers reach the node's service port
        (``[v6]:port`` for IPv6; never a wildcard like ``0.0.0.0``).  Stored
        normalised (``host:0080`` becomes ``host:80``).
    :ivar metrics_port: the node's operations port on the same host, serving
        ``/metrics`` (vitals) and ``/telemetry``; 1-65535.
    :ivar node_type: ``"backend"``, ``"proxy"`` or ``"governator"`` (:class:`NodeType`).
    :ivar models: model names the node serves, as clients name them in
        requests (at most 1024, distinct); empty for nodes serving none.
    :ivar capabilities: feature names the node supports (``"chat"``,
        ``"embeddings"``, ``"streaming"``...; at most 64, distinct).
    :ivar weight: relative share of traffic for weighted routing policies
        (> 0; 1.0 is the norm, 2.0 takes twice the share).
    :ivar max_concurrency: requests the node serves at once before it queues
        (>= 1), or ``None`` when it does not say.
    """

    id: str
    address: str
    metrics_port: int
    node_type: str
    models: tuple[str, ...] = ()
    capabilities: tuple[str, ...] = ()
    weight: float = 1.0
    max_concurrency: int | None = None

    _FIELDS: ClassVar = _node_fields(known_types_only=True)

    @property
    def host(self) -> str:
        """The host part of :attr:`address` (without IPv6 brackets)."""
        return parse_address(self.address)[0]

    @property
    def port(self) -> int:
        """The port part of :attr:`address`."""
        return parse_address(self.address)[1]


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeInfo(_WireType):
    """How a proxy describes a node it knows (the ``peers`` list of its answers).

    Fields mean what they mean in :class:`Registration`.  ``node_type`` may be
    any well-formed type name here, not only the three known ones: a newer
    proxy may know kinds of node this one does not, and must not make its
    whole peer list unreadable.
    """

    id: str
    address: str
    metrics_port: int
    node_type: str
    models: tuple[str, ...] = ()
    capabilities: tuple[str, ...] = ()
    weight: float = 1.0
    max_concurrency: int | None = None

    _FIELDS: ClassVar = _node_fields(known_types_only=False)

    @classmethod
    def from_registration(cls, registration: Registration) -> NodeInfo:
        """The peer description of a registered node."""
        return cls(**{name: getattr(registration, name) for name, _, _ in cls._FIELDS})

    @property
    def host(self) -> str:
        return parse_address(self.address)[0]

    @property
    def port(self) -> int:
        return parse_address(self.address)[1]


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeVitals(_WireType):
    """A node's ``GET /metrics`` JSON document: how it is doing right now.

    Health checkers read it every check interval; ``ready`` false takes a
    node out of rotation at once.  Usage figures are fractions from 0.0 to
    1.0 (not percent); the GPU and KV-cache ones are ``null`` on nodes that
    have no GPU or KV cache, or cannot measure it.  Counters (``failed_responses``,
    ``backoff_requests``) count since the node process started.

    :ivar ready: whether the node takes new requests (false while starting
        or draining).
    :ivar requests_in_progress: requests being served now (admitted, not yet
        answered in full), >= 0.
    :ivar requests_queued: requests waiting for a serving slot, >= 0.
    :ivar cpu_usage: fraction of the machine's total CPU capacity in use
        (all cores together; 1.0 = every core busy) over the last sample
        window; 0.0 until the node has measured a first window.
    :ivar memory_usage: fraction of memory in use: the machine's and, where
        the node measures it, its cgroup's against the cgroup limit, whichever
        is higher (a node is as full as its tightest limit).
    :ivar gpu_usage: fraction of time the GPUs were busy (mean over GPUs),
        or null.
    :ivar gpu_memory_usage: fraction of GPU memory in use (all GPUs), or null.
    :ivar kv_cache_usage: fraction of the inference engine's KV cache in use,
        or null; near 1.0 the engine starts queueing or preempting.
    :ivar tokens_per_second: generated tokens per second over the last
        sample window, >= 0.
    :ivar failed_responses: responses that failed (5xx or broken streams),
        since start.
    :ivar backoff_requests: requests turned away with a back-off answer
        (429/503 with Retry-After): because the node was full, or because it
        was draining for shutdown, since start.
    :ivar connected_peers: peers this node currently knows (a proxy: its
        registered nodes; a backend: proxies it is registered with).
    :ivar uptime_seconds: seconds since the node process started, >= 0.
    :ivar version: the Inferno version the node runs.
    :ivar models: model names the node serves now.
    """

    # In DESIGN.md's order (kw_only lets defaults and required fields mix).
    ready: bool
    requests_in_progress: int
    requests_queued: int
    cpu_usage: float
    memory_usage: float
    gpu_usage: float | None = None
    gpu_memory_usage: float | None = None
    kv_cache_usage: float | None = None
    tokens_per_second: float = 0.0
    failed_responses: int = 0
    backoff_requests: int = 0
    connected_peers: int = 0
    uptime_seconds: float
    version: str
    models: tuple[str, ...] = ()

    _FIELDS: ClassVar = _fields(
        ("ready", _bool, _REQUIRED),
        ("requests_in_progress", _COUNT, _REQUIRED),
        ("requests_queued", _COUNT, _REQUIRED),
        ("cpu_usage", _FRACTION, _REQUIRED),
        ("memory_usage", _FRACTION, _REQUIRED),
        ("gpu_usage", _FRACTION_OR_NULL, _OPTIONAL),
        ("gpu_memory_usage", _FRACTION_OR_NULL, _OPTIONAL),
        ("kv_cache_usage", _FRACTION_OR_NULL, _OPTIONAL),
        ("tokens_per_second", _number(0.0), _OPTIONAL),
        ("failed_responses", _COUNT, _OPTIONAL),
        ("backoff_requests", _COUNT, _OPTIONAL),
        ("connected_peers", _COUNT, _OPTIONAL),
        ("uptime_seconds", _number(0.0), _REQUIRED),
        ("version", _text(MAX_VERSION_CHARS), _REQUIRED),
        ("models", _names(MAX_MODELS), _OPTIONAL),
    )


def required_fields(cls: type[_WireType]) -> tuple[str, ...]:
    """Names of the fields *cls* requires in JSON (for documentation and tests)."""
    return tuple(name for name, _, required in cls._FIELDS if required)


def field_names(cls: type[_WireType]) -> tuple[str, ...]:
    """Names of every field of *cls*, in wire order."""
    return tuple(name for name, _, _ in cls._FIELDS)
