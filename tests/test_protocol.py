"""inferno.protocol: strict parsing of Registration, NodeInfo and NodeVitals."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from inferno.errors import ValidationError
from inferno.protocol import (
    MAX_CAPABILITIES,
    MAX_COUNT,
    MAX_ID_CHARS,
    MAX_MODELS,
    NodeInfo,
    NodeType,
    NodeVitals,
    Registration,
    field_names,
    format_address,
    parse_address,
    required_fields,
)

WireType = type[Registration] | type[NodeInfo] | type[NodeVitals]

REGISTRATION: dict[str, Any] = {
    "id": "backend-1",
    "address": "10.0.0.7:8000",
    "metrics_port": 9100,
    "node_type": "backend",
    "models": ["meta-llama/Llama-3.1-8B-Instruct", "qwen2.5:7b"],
    "capabilities": ["chat", "streaming"],
    "weight": 1.5,
    "max_concurrency": 64,
}
NODE_INFO: dict[str, Any] = {**REGISTRATION, "id": "proxy-a", "node_type": "proxy", "models": []}
VITALS: dict[str, Any] = {
    "ready": True,
    "requests_in_progress": 3,
    "requests_queued": 1,
    "cpu_usage": 0.25,
    "memory_usage": 0.5,
    "gpu_usage": 0.9,
    "gpu_memory_usage": 0.75,
    "kv_cache_usage": None,
    "tokens_per_second": 812.5,
    "failed_responses": 2,
    "backoff_requests": 0,
    "connected_peers": 2,
    "uptime_seconds": 3600.25,
    "version": "0.1.0",
    "models": ["sim-small"],
}
DOCUMENTS: list[tuple[WireType, dict[str, Any]]] = [
    (Registration, REGISTRATION),
    (NodeInfo, NODE_INFO),
    (NodeVitals, VITALS),
]


def ident(value: object) -> str:
    """Short test ids: class names, and values cut to 30 characters."""
    return value.__name__ if isinstance(value, type) else repr(value)[:30]


@pytest.mark.parametrize(("cls", "document"), DOCUMENTS, ids=ident)
def test_valid_documents_round_trip(cls: WireType, document: dict[str, Any]) -> None:
    value = cls.from_json(json.loads(json.dumps(document)))
    assert value.to_json() == document
    assert list(value.to_json()) == list(field_names(cls))  # wire order, every field present
    assert cls.from_json(value.to_json()) == value


def test_defaults_and_normalisation() -> None:
    minimal = {name: REGISTRATION[name] for name in required_fields(Registration)}
    registration = Registration.from_json({**minimal, "address": "Example.COM:0080"})
    assert registration.models == ()
    assert registration.capabilities == ()
    assert registration.weight == 1.0
    assert registration.max_concurrency is None
    assert registration.address == "Example.COM:80"
    assert (registration.host, registration.port) == ("Example.COM", 80)
    vitals = NodeVitals.from_json({name: VITALS[name] for name in required_fields(NodeVitals)})
    assert (vitals.gpu_usage, vitals.kv_cache_usage, vitals.tokens_per_second) == (None, None, 0)
    assert vitals.models == ()
    whole = NodeVitals.from_json({**VITALS, "cpu_usage": 1, "uptime_seconds": 7})
    assert type(whole.cpu_usage) is float  # JSON integers for float fields become floats
    assert type(whole.uptime_seconds) is float


def test_required_fields() -> None:
    assert required_fields(Registration) == ("id", "address", "metrics_port", "node_type")
    assert required_fields(NodeInfo) == required_fields(Registration)
    assert required_fields(NodeVitals) == (
        "ready",
        "requests_in_progress",
        "requests_queued",
        "cpu_usage",
        "memory_usage",
        "uptime_seconds",
        "version",
    )


MISSING = [(cls, name) for cls, _ in DOCUMENTS for name in required_fields(cls)]


@pytest.mark.parametrize(("cls", "name"), MISSING, ids=ident)
def test_missing_required_field_is_named(cls: WireType, name: str) -> None:
    document = dict(dict(DOCUMENTS)[cls])
    del document[name]
    with pytest.raises(ValidationError) as caught:
        cls.from_json(document)
    assert (caught.value.field, caught.value.problem) == (name, "is required")
    assert str(caught.value) == f"{name}: is required"


STRING = ["1", "x"]
INT = [1.0, 1.5, "1", True, None, [1], {"n": 1}]
NUMBER = ["0.5", True, False, None, [0.5], {}]
# Wrong JSON types for each field (bool is never a number; null only where nullable).
WRONG_TYPES: dict[str, list[Any]] = {
    "id": [1, None, True, ["a"], {}],
    "address": [8000, None, ["h", 1], {"host": "h"}],
    "metrics_port": INT,
    "node_type": [1, None, ["backend"]],
    "models": ["model", None, {"a": 1}, 3],
    "capabilities": ["chat", None, 1],
    "weight": NUMBER,
    "max_concurrency": [1.5, "8", True, [8]],
    "ready": [1, 0, "true", None],
    "requests_in_progress": INT,
    "requests_queued": INT,
    "cpu_usage": NUMBER,
    "memory_usage": NUMBER,
    "gpu_usage": ["0.5", True, [0.5]],
    "gpu_memory_usage": ["0.5", False],
    "kv_cache_usage": ["0.5", True],
    "tokens_per_second": NUMBER,
    "failed_responses": INT,
    "backoff_requests": INT,
    "connected_peers": INT,
    "uptime_seconds": NUMBER,
    "version": [1, None, ["0.1"]],
}
WRONG = [
    (cls, name, value)
    for cls, _ in DOCUMENTS
    for name in field_names(cls)
    for value in WRONG_TYPES[name]
]


@pytest.mark.parametrize(("cls", "name", "value"), WRONG, ids=ident)
def test_wrong_type_is_named(cls: WireType, name: str, value: Any) -> None:
    document = {**dict(DOCUMENTS)[cls], name: value}
    with pytest.raises(ValidationError) as caught:
        cls.from_json(document)
    assert caught.value.field == name
    assert "expected" in caught.value.problem


def test_every_field_has_wrong_type_cases() -> None:
    for cls, _ in DOCUMENTS:
        assert set(field_names(cls)) <= WRONG_TYPES.keys()


OUT_OF_RANGE: list[tuple[WireType, str, Any, str]] = [
    (Registration, "id", "", "must not be empty"),
    (Registration, "id", "x" * (MAX_ID_CHARS + 1), "at most 256"),
    (Registration, "id", "a b", "whitespace"),
    (Registration, "id", "a\x00b", "printable"),
    (Registration, "id", "\u2028", "printable"),
    (Registration, "metrics_port", 0, "out of range"),
    (Registration, "metrics_port", 65536, "out of range"),
    (Registration, "metrics_port", -1, "out of range"),
    (Registration, "node_type", "router", "not a node type"),
    (NodeInfo, "node_type", "Router!", "not a node type name"),
    (Registration, "models", ["a", "a"], "duplicate"),
    (Registration, "models", ["x"] * (MAX_MODELS + 1), "at most 1024"),
    (Registration, "capabilities", [str(i) for i in range(MAX_CAPABILITIES + 1)], "at most 64"),
    (Registration, "weight", 0, "out of range"),
    (Registration, "weight", -1.5, "out of range"),
    (Registration, "weight", math.inf, "not finite"),
    (Registration, "weight", math.nan, "not finite"),
    (Registration, "weight", 10**400, "too large"),
    (Registration, "max_concurrency", 0, "out of range"),
    (NodeVitals, "cpu_usage", -0.01, "out of range"),
    (NodeVitals, "cpu_usage", 1.01, "out of range"),
    (NodeVitals, "memory_usage", 2, "out of range"),
    (NodeVitals, "gpu_usage", 1.5, "out of range"),
    (NodeVitals, "kv_cache_usage", -1, "out of range"),
    (NodeVitals, "requests_in_progress", -1, "out of range"),
    (NodeVitals, "failed_responses", MAX_COUNT + 1, "out of range"),
    (NodeVitals, "uptime_seconds", -1, "out of range"),
    (NodeVitals, "tokens_per_second", math.inf, "not finite"),
    (NodeVitals, "version", "", "must not be empty"),
    (NodeVitals, "version", " 0.1", "surrounding whitespace"),
]


@pytest.mark.parametrize(("cls", "name", "value", "problem"), OUT_OF_RANGE, ids=ident)
def test_out_of_range_values(cls: WireType, name: str, value: Any, problem: str) -> None:
    document = {**dict(DOCUMENTS)[cls], name: value}
    with pytest.raises(ValidationError, match=problem) as caught:
        cls.from_json(document)
    assert caught.value.field.partition("[")[0] == name  # "models[1]" for a list item


@pytest.mark.parametrize(
    ("models", "field"),
    [(["ok", 7], "models[1]"), (["ok", "fine", ""], "models[2]"), ([None], "models[0]")],
)
def test_list_items_are_named_by_index(models: list[Any], field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        Registration.from_json({**REGISTRATION, "models": models})
    assert caught.value.field == field


def test_nested_path_prefix() -> None:
    with pytest.raises(ValidationError) as caught:
        NodeInfo.from_json({**NODE_INFO, "models": ["a", 1]}, path="peers[3]")
    assert caught.value.field == "peers[3].models[1]"
    with pytest.raises(ValidationError) as caught:
        NodeInfo.from_json({"id": "x"}, path="peers[0]")
    assert str(caught.value) == "peers[0].address: is required"
    with pytest.raises(ValidationError) as caught:
        NodeInfo.from_json("nope", path="peers[1]")
    assert str(caught.value) == "peers[1]: expected a JSON object, got string"


@pytest.mark.parametrize("document", [None, [], "x", 1, True, [REGISTRATION]])
def test_document_must_be_an_object(document: object) -> None:
    with pytest.raises(ValidationError) as caught:
        Registration.from_json(document)
    assert caught.value.field == "body"
    assert caught.value.to_http().status == 400


def test_unknown_fields_are_ignored() -> None:
    newer = {**VITALS, "energy_joules": 12.5, "ready_reason": {"nested": [1, 2]}, "": None}
    assert NodeVitals.from_json(newer) == NodeVitals.from_json(VITALS)
    assert "energy_joules" not in NodeVitals.from_json(newer).to_json()


def test_booleans_are_not_numbers_and_numbers_not_booleans() -> None:
    for name in ("requests_in_progress", "cpu_usage", "gpu_usage", "uptime_seconds"):
        with pytest.raises(ValidationError, match="got boolean"):
            NodeVitals.from_json({**VITALS, name: True})
    with pytest.raises(ValidationError, match="expected true or false, got number"):
        NodeVitals.from_json({**VITALS, "ready": 1})


def test_nan_and_infinity_from_python_json_are_refused() -> None:
    # Python's json.loads accepts NaN/Infinity literals; they must not get through.
    for literal in ("NaN", "Infinity", "-Infinity"):
        document = json.loads(
            json.dumps(VITALS).replace('"cpu_usage": 0.25', f'"cpu_usage": {literal}')
        )
        with pytest.raises(ValidationError, match="cpu_usage"):
            NodeVitals.from_json(document)


def test_node_types() -> None:
    assert sorted(NodeType.KNOWN) == ["backend", "governator", "proxy"]
    for node_type in NodeType.KNOWN:
        assert (
            Registration.from_json({**REGISTRATION, "node_type": node_type}).node_type == node_type
        )
    # A newer proxy may list kinds of node this version does not know.
    assert NodeInfo.from_json({**NODE_INFO, "node_type": "router"}).node_type == "router"


def test_constructing_in_code_validates_too() -> None:
    with pytest.raises(ValidationError, match="weight"):
        Registration(id="b", address="h:1", metrics_port=1, node_type="backend", weight=0)
    vitals = NodeVitals.from_json(VITALS)
    with pytest.raises(dataclasses.FrozenInstanceError):
        vitals.ready = False  # type: ignore[misc]
    info = NodeInfo.from_registration(Registration.from_json(REGISTRATION))
    assert info.to_json() == REGISTRATION
    assert (info.host, info.port) == ("10.0.0.7", 8000)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("localhost:8000", ("localhost", 8000)),
        ("127.0.0.1:1", ("127.0.0.1", 1)),
        ("[::1]:65535", ("::1", 65535)),
        ("[fe80::1%eth0]:80", ("fe80::1%eth0", 80)),
        ("node-7.pool.example.com:443", ("node-7.pool.example.com", 443)),
        ("under_score:80", ("under_score", 80)),
    ],
)
def test_parse_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected
    assert format_address(*expected) == text


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("localhost", "not host:port"),
        (":8000", "not host:port"),
        ("::1:8000", "needs brackets"),
        ("[::1]", "not \\[ipv6\\]:port"),
        ("[::1:80", "not \\[ipv6\\]:port"),
        ("[not-v6]:80", "not an IPv6 address"),
        ("[::]:80", "wildcard"),
        ("0.0.0.0:80", "wildcard"),
        ("host:0", "1 to 65535"),
        ("host:65536", "1 to 65535"),
        ("host:http", "1 to 65535"),
        ("host:", "1 to 65535"),
        ("host:+80", "1 to 65535"),
        ("host:٨٠", "1 to 65535"),  # Arabic-Indic digits: str.isdigit() would say yes
        ("bad host:80", "not a valid host"),
        ("-lead.example:80", "not a valid host"),
        ("a..b:80", "not a valid host"),
        ("1.2.3.256:80", "not a valid IPv4"),
        ("x" * 254 + ":80", "not a valid host"),
    ],
)
def test_bad_addresses(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_address(text)
    with pytest.raises(ValidationError, match=problem) as caught:
        Registration.from_json({**REGISTRATION, "address": text})
    assert caught.value.field == "address"


# --- properties -----------------------------------------------------------------------------

NAMES = st.text(st.characters(blacklist_categories=("C", "Z")), min_size=1, max_size=40)
HOST_LABEL = st.from_regex(r"[a-z](?:[a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
HOSTS = st.one_of(
    st.lists(HOST_LABEL, min_size=1, max_size=4).map(".".join),
    st.ip_addresses(v=4).filter(lambda ip: not ip.is_unspecified).map(str),
    st.ip_addresses(v=6).filter(lambda ip: not ip.is_unspecified).map(str),
)
ADDRESSES = st.builds(format_address, HOSTS, st.integers(1, 65535))
FRACTIONS = st.floats(0.0, 1.0)
COUNTS = st.integers(0, MAX_COUNT)
NAME_LISTS = st.lists(NAMES, max_size=5, unique=True).map(tuple)
NODE_FIELDS: dict[str, Any] = {
    "id": NAMES,
    "address": ADDRESSES,
    "metrics_port": st.integers(1, 65535),
    "node_type": st.sampled_from(sorted(NodeType.KNOWN)),
    "models": NAME_LISTS,
    "capabilities": NAME_LISTS,
    "weight": st.floats(0.0, 1e300, exclude_min=True),
    "max_concurrency": st.none() | st.integers(1, 10**6),
}
VALID = st.one_of(
    st.builds(Registration, **NODE_FIELDS),
    st.builds(NodeInfo, **NODE_FIELDS),
    st.builds(
        NodeVitals,
        ready=st.booleans(),
        requests_in_progress=COUNTS,
        requests_queued=COUNTS,
        cpu_usage=FRACTIONS,
        memory_usage=FRACTIONS,
        gpu_usage=st.none() | FRACTIONS,
        gpu_memory_usage=st.none() | FRACTIONS,
        kv_cache_usage=st.none() | FRACTIONS,
        tokens_per_second=st.floats(0.0, 1e12),
        failed_responses=COUNTS,
        backoff_requests=COUNTS,
        connected_peers=COUNTS,
        uptime_seconds=st.floats(0.0, 1e10),
        version=NAMES,
        models=NAME_LISTS,
    ),
)


@given(VALID)
def test_json_round_trip_property(value: Registration | NodeInfo | NodeVitals) -> None:
    wire = json.loads(json.dumps(value.to_json(), allow_nan=False))
    assert type(value).from_json(wire) == value


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=12,
)
ALL_FIELDS = sorted({name for cls, _ in DOCUMENTS for name in field_names(cls)})
# Documents that use our field names with arbitrary values reach every check.
FIELDISH = st.dictionaries(st.sampled_from(ALL_FIELDS), JSON, max_size=len(ALL_FIELDS))
NEAR_VALID = st.sampled_from([d for _, d in DOCUMENTS]).flatmap(
    lambda base: st.dictionaries(st.sampled_from(sorted(base)), JSON, max_size=3).map(
        lambda changes: {**base, **changes}
    )
)


@given(st.sampled_from([cls for cls, _ in DOCUMENTS]), JSON | FIELDISH | NEAR_VALID)
def test_any_json_raises_only_validation_error(cls: WireType, document: Any) -> None:
    try:
        value = cls.from_json(document)
    except ValidationError as exc:
        refusal = exc
    else:
        assert cls.from_json(value.to_json()) == value
        return
    assert refusal.field
    assert refusal.problem
