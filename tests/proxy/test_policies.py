"""Routing policies: distributions, exclusion, slow start, affinity's stability and load bound."""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from inferno_proxy.nodes import Node, PoolSettings
from inferno_proxy.policies import (
    DEFAULT_POLICY,
    DEFAULT_VNODES,
    Affinity,
    HashRing,
    LeastRequests,
    RoundRobin,
    RoutingPolicy,
    Weighted,
    affinity_key,
    hash_key,
    routing_policy_factories,
)
from inferno_proxy.pool import Pool

from inferno.protocol import NodeVitals, Registration

HASH_OF_SESSION_1 = 0xAE49BD2CD463E7AC  # blake2b-64 of "session-1"
LATER = 10_000.0  # long after every node joined: slow start is over


def make_pool(weights: dict[str, float], *, joined: float = 0.0, **options: Any) -> Pool:
    pool = Pool(PoolSettings(**options))
    for port, (name, weight) in enumerate(weights.items(), start=20000):
        pool.register(
            Registration(
                id=name,
                address=f"127.0.0.1:{port}",
                metrics_port=9000,
                node_type="backend",
                weight=weight,
            ),
            joined,
        )
    return pool


def nodes(*names: str, **weights: float) -> list[Node]:
    spec = {name: 1.0 for name in names} | weights
    return make_pool(spec).backends()


def load(pool: Pool, name: str, in_flight: int) -> None:
    node = pool.get(name)
    assert node is not None
    for _ in range(in_flight):
        pool.start(node, 0.0)


def picks(
    policy: RoutingPolicy,
    candidates: Sequence[Node],
    count: int,
    *,
    key: str | None = None,
    now: float = LATER,
    exclude: frozenset[str] = frozenset(),
) -> list[str]:
    chosen = []
    for _ in range(count):
        node = policy.choose(candidates, key=key, now=now, exclude=exclude)
        assert node is not None
        chosen.append(node.id)
    return chosen


# --- round robin ---------------------------------------------------------------------------


def test_round_robin_takes_each_node_in_turn_exactly() -> None:
    assert picks(RoundRobin(), nodes("a", "b", "c"), 9) == ["a", "b", "c"] * 3


def test_round_robin_ignores_weights() -> None:
    counts = Counter(picks(RoundRobin(), nodes("a", b=5.0), 100))
    assert counts == {"a": 50, "b": 50}


def test_round_robin_skips_excluded_nodes() -> None:
    chosen = picks(RoundRobin(), nodes("a", "b", "c"), 6, exclude=frozenset({"b"}))
    assert chosen == ["a", "c"] * 3


def test_round_robin_keeps_turns_when_candidates_change() -> None:
    policy = RoundRobin()
    three = nodes("a", "b", "c")
    chosen = picks(policy, three, 2)
    assert chosen == ["a", "b"]
    chosen += picks(policy, three[:2], 1)  # c is out for one pick
    assert chosen[-1] == "a"
    chosen += picks(policy, three, 30)
    # c, whose turn it was, is served first when back; over the run all are even.
    assert chosen[3] == "c"
    assert Counter(chosen) == {"a": 11, "b": 11, "c": 11}


def test_round_robin_honours_slow_start() -> None:
    pool = make_pool({"old": 1.0}, joined=0.0, slow_start=100.0)
    pool.register(
        Registration(id="new", address="127.0.0.1:1", metrics_port=1, node_type="backend"), 1000.0
    )
    counts = Counter(picks(RoundRobin(), pool.backends(), 1200, now=1025.0))
    assert counts == {"old": 960, "new": 240}  # factor 0.25 against 1.0


# --- weighted ------------------------------------------------------------------------------


def test_weighted_gives_exact_shares_over_a_cycle_smoothly() -> None:
    candidates = nodes(a=5.0, b=1.0, c=1.0)
    policy = Weighted()
    assert picks(policy, candidates, 7) == ["a", "a", "b", "a", "c", "a", "a"]
    assert Counter(picks(policy, candidates, 700)) == {"a": 500, "b": 100, "c": 100}


@pytest.mark.parametrize(
    "weights",
    [
        {"a": 1.0, "b": 2.0, "c": 3.0},
        {"a": 3.0, "b": 1.0},
        {"a": 1.0, "b": 1.0, "c": 1.0, "d": 7.0},
    ],
)
def test_weighted_proportions_are_exact_for_any_integer_weights(weights: dict[str, float]) -> None:
    candidates = make_pool(weights).backends()
    cycle = int(sum(weights.values()))
    counts = Counter(picks(Weighted(), candidates, cycle * 4))
    assert counts == {name: int(weight) * 4 for name, weight in weights.items()}


def test_weighted_honours_slow_start() -> None:
    pool = make_pool({"old": 1.0}, slow_start=100.0)
    pool.register(
        Registration(
            id="new", address="127.0.0.1:1", metrics_port=1, node_type="backend", weight=2.0
        ),
        1000.0,
    )
    # At 50 % of its ramp, "new" (weight 2) weighs as much as "old" (weight 1).
    assert Counter(picks(Weighted(), pool.backends(), 100, now=1050.0)) == {"old": 50, "new": 50}


def test_weighted_returns_none_when_everything_is_excluded() -> None:
    assert Weighted().choose(nodes("a"), key=None, now=LATER, exclude={"a"}) is None
    assert Weighted().choose([], key=None, now=LATER, exclude=()) is None


# --- least requests ------------------------------------------------------------------------


def test_least_requests_prefers_the_less_loaded_node() -> None:
    pool = make_pool({"idle": 1.0, "busy": 1.0, "busier": 1.0})
    load(pool, "busy", 5)
    load(pool, "busier", 10)
    counts = Counter(picks(LeastRequests(random.Random(7)), pool.backends(), 3000))
    # Two of three distinct pairs contain "idle", and it wins both: 2/3 of picks.
    assert 1900 < counts["idle"] < 2100
    assert 900 < counts["busy"] < 1100
    assert counts["busier"] == 0  # it loses every comparison


def test_least_requests_counts_the_queue_a_node_reports() -> None:
    pool = make_pool({"a": 1.0, "b": 1.0})
    pool.check_passed(
        "a",
        1.0,
        NodeVitals(
            ready=True,
            requests_in_progress=0,
            requests_queued=4,
            cpu_usage=0.0,
            memory_usage=0.0,
            uptime_seconds=1.0,
            version="t",
        ),
    )
    load(pool, "b", 3)
    assert set(picks(LeastRequests(random.Random(1)), pool.backends(), 20)) == {"b"}


def test_least_requests_spreads_evenly_between_equals() -> None:
    counts = Counter(picks(LeastRequests(random.Random(3)), nodes("a", "b", "c", "d"), 4000))
    assert all(900 < count < 1100 for count in counts.values())


def test_least_requests_weighs_load_by_weight() -> None:
    pool = make_pool({"small": 1.0, "big": 4.0})
    load(pool, "small", 1)  # 2 per unit of weight with this request
    load(pool, "big", 6)  # 7 / 4 = 1.75 per unit: still the better choice
    assert set(picks(LeastRequests(random.Random(5)), pool.backends(), 10)) == {"big"}


def test_least_requests_honours_exclusion_and_single_candidates() -> None:
    policy = LeastRequests(random.Random(0))
    candidates = nodes("a", "b", "c")
    assert set(picks(policy, candidates, 50, exclude=frozenset({"a", "c"}))) == {"b"}
    assert policy.choose(candidates, key=None, now=LATER, exclude={"a", "b", "c"}) is None
    assert policy.choose(candidates[:1], key=None, now=LATER, exclude=()) is candidates[0]


def test_least_requests_ramps_a_slow_starting_node() -> None:
    pool = make_pool({"old": 1.0}, slow_start=100.0)
    pool.register(
        Registration(id="new", address="127.0.0.1:1", metrics_port=1, node_type="backend"), 1000.0
    )
    load(pool, "old", 4)  # (4+1)/1 = 5 against the new node's (0+1)/0.1 = 10
    policy = LeastRequests(random.Random(2))
    assert set(picks(policy, pool.backends(), 10, now=1000.0)) == {"old"}
    assert set(picks(policy, pool.backends(), 10, now=1100.0)) == {"new"}


# --- affinity ------------------------------------------------------------------------------

KEYS = [f"session-{i}" for i in range(2000)]


def assignment(policy: Affinity, candidates: Sequence[Node]) -> dict[str, str]:
    return {key: picks(policy, candidates, 1, key=key)[0] for key in KEYS}


def test_affinity_sends_a_key_to_the_same_node_every_time() -> None:
    candidates = nodes(*"abcde")
    policy = Affinity()
    for key in KEYS[:50]:
        assert len(set(picks(policy, candidates, 5, key=key))) == 1


def test_affinity_spreads_keys_roughly_evenly() -> None:
    counts = Counter(assignment(Affinity(), nodes(*"abcde")).values())
    assert set(counts) == set("abcde")
    assert all(250 < count < 550 for count in counts.values())  # 400 each on average


def test_affinity_moves_only_the_leaving_nodes_keys() -> None:
    policy = Affinity()
    all_nodes = nodes(*"abcdefghij")
    before = assignment(policy, all_nodes)
    after = assignment(policy, [n for n in all_nodes if n.id != "c"])
    moved = {key for key in KEYS if before[key] != after[key]}
    assert moved == {key for key in KEYS if before[key] == "c"}
    assert 100 < len(moved) < 300  # ~1/10 of 2000


def test_affinity_moves_about_one_nth_of_keys_to_a_joining_node() -> None:
    policy = Affinity()
    eleven = nodes(*"abcdefghijk")
    before = assignment(policy, eleven[:10])
    after = assignment(policy, eleven)
    moved = {key for key in KEYS if before[key] != after[key]}
    assert {after[key] for key in moved} == {"k"}
    assert 2000 / 11 / 2 < len(moved) < 2000 / 11 * 2


def test_affinity_bounds_the_load_of_a_hot_keys_node() -> None:
    pool = make_pool({name: 1.0 for name in "abcd"})
    policy = Affinity(load_factor=1.25)
    home = picks(policy, pool.backends(), 1, key="hot")[0]
    chosen = []
    for _ in range(40):  # the hot key's requests pile up (none finish)
        node = policy.choose(pool.backends(), key="hot", now=LATER, exclude=())
        assert node is not None
        pool.start(node, 0.0)
        chosen.append(node.id)
    loads = {n.id: n.in_flight for n in pool.backends()}
    assert chosen[0] == home
    assert loads[home] < 40  # spilled over
    # No node carries more than ceil(1.25 * mean), counting the request being placed.
    assert max(loads.values()) <= math.ceil(1.25 * 40 / 4)
    # The spill walks the ring from the key: nodes nearer the key carry at least as much.
    walk = list(HashRing(list(loads), DEFAULT_VNODES).walk(hash_key("hot")))
    assert walk[0] == home
    assert [loads[name] for name in walk] == sorted(loads.values(), reverse=True)


def test_affinity_retries_go_to_the_keys_next_node() -> None:
    policy = Affinity()
    candidates = nodes(*"abcde")
    first = picks(policy, candidates, 1, key="k")[0]
    second = picks(policy, candidates, 1, key="k", exclude=frozenset({first}))[0]
    assert second != first
    assert picks(policy, candidates, 3, key="k", exclude=frozenset({first})) == [second] * 3
    ring = HashRing([n.id for n in candidates], 160)
    assert list(ring.walk(hash_key("k")))[:2] == [first, second]


def test_affinity_without_a_key_balances_by_load() -> None:
    pool = make_pool({"idle": 1.0, "busy": 1.0})
    load(pool, "busy", 3)
    assert set(picks(Affinity(random.Random(0)), pool.backends(), 10)) == {"idle"}


def test_affinity_capacity_follows_slow_start() -> None:
    pool = make_pool({name: 1.0 for name in "abc"}, slow_start=100.0)
    pool.register(
        Registration(id="new", address="127.0.0.1:1", metrics_port=1, node_type="backend"), 1000.0
    )
    policy = Affinity()
    key = next(k for k in KEYS if picks(policy, pool.backends(), 1, key=k, now=2000.0)[0] == "new")
    new = pool.get("new")
    assert new is not None
    for name in "abc":
        load(pool, name, 2)
    pool.start(new, 1000.0)  # 7 requests in flight in all, one of them on the new node
    # Ramping (factor 0.1): capacity ceil(1.25 * 8 * 0.1 / 3.1) = 1, full: the key spills.
    assert picks(policy, pool.backends(), 1, key=key, now=1000.0)[0] != "new"
    # Ramped: capacity ceil(1.25 * 8 * 1 / 4) = 3, room for a second request.
    assert picks(policy, pool.backends(), 1, key=key, now=2000.0)[0] == "new"


def test_affinity_refuses_bad_options() -> None:
    with pytest.raises(ValueError, match="load_factor"):
        Affinity(load_factor=1.0)
    with pytest.raises(ValueError, match="vnodes"):
        Affinity(vnodes=0)


def test_the_ring_walks_every_node_once() -> None:
    ring = HashRing(["a", "b", "c"], vnodes=50)
    for key in KEYS[:20]:
        walked = list(ring.walk(hash_key(key)))
        assert sorted(walked) == ["a", "b", "c"]


def test_hash_key_is_pinned_so_every_worker_and_proxy_agrees() -> None:
    # Unlike hash(), it does not vary with PYTHONHASHSEED; changing it reshuffles every key.
    assert hash_key("session-1") == HASH_OF_SESSION_1
    assert hash_key("x") != hash_key("y")


# --- affinity keys -------------------------------------------------------------------------


def test_affinity_key_prefers_session_then_user_then_prompt_prefix() -> None:
    chat = {"user": "u1", "messages": [{"role": "system", "content": "be brief"}]}
    assert affinity_key("s1", chat) == "session:s1"
    assert affinity_key(None, chat) == "user:u1"
    assert affinity_key(None, {"messages": chat["messages"]}) == "prefix:system:be brief\n"
    assert affinity_key(None, {"prompt": "Once upon a time"}, prefix_chars=4) == "prefix:Once"
    assert affinity_key(None, {"prompt": ["first", "second"]}) == "prefix:first"
    assert affinity_key(None, {"model": "m"}) is None
    assert affinity_key(None, None) is None


def test_affinity_key_reads_text_content_parts() -> None:
    body = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image_url"}]},
            "garbage",
        ]
    }
    assert affinity_key(None, body) == "prefix:user:hi\n"


def test_same_prefix_same_key_so_same_node() -> None:
    system = {"role": "system", "content": "You are a helpful assistant. " * 40}
    one = {"messages": [system, {"role": "user", "content": "question one"}]}
    two = {"messages": [system, {"role": "user", "content": "question two"}]}
    assert affinity_key(None, one) == affinity_key(None, two)


# --- every policy --------------------------------------------------------------------------


def test_factories_build_each_builtin_policy_by_name() -> None:
    factories = routing_policy_factories()
    assert DEFAULT_POLICY in factories
    for name, factory in factories.items():
        policy = factory(None)
        assert policy.name == name
        assert policy.choose(nodes("a"), key="k", now=0.0, exclude=()) is not None


POLICIES = st.sampled_from(["round_robin", "weighted", "least_requests", "affinity"])


@settings(max_examples=150, deadline=None)
@given(
    name=POLICIES,
    weights=st.lists(st.floats(0.1, 10.0), min_size=0, max_size=6),
    loads=st.lists(st.integers(0, 5), min_size=6, max_size=6),
    excluded=st.sets(st.integers(0, 5)),
    key=st.none() | st.text(max_size=8),
    seed=st.integers(0, 1000),
)
def test_every_policy_picks_a_candidate_not_excluded(
    name: str,
    weights: list[float],
    loads: list[int],
    excluded: set[int],
    key: str | None,
    seed: int,
) -> None:
    pool = make_pool({f"n{i}": w for i, w in enumerate(weights)})
    for i in range(len(weights)):
        load(pool, f"n{i}", loads[i])
    policies: dict[str, RoutingPolicy] = {
        "round_robin": RoundRobin(),
        "weighted": Weighted(),
        "least_requests": LeastRequests(random.Random(seed)),
        "affinity": Affinity(random.Random(seed)),
    }
    policy = policies[name]
    exclude = {f"n{i}" for i in excluded}
    candidates = pool.backends()
    allowed = [n for n in candidates if n.id not in exclude]
    for _ in range(3):
        chosen = policy.choose(candidates, key=key, now=LATER, exclude=exclude)
        if allowed:
            assert chosen in allowed
        else:
            assert chosen is None
