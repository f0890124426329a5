"""Routing policies: which of the eligible nodes serves the next request.

A policy is any object with a ``name`` and a ``choose`` method
(:class:`RoutingPolicy`); plugins offer more through
``inferno_routing_policies()``.  The proxy first asks the pool for the
candidates (:meth:`inferno_proxy.pool.Pool.eligible`: model, health, circuit,
panic), then asks its policy to pick one, passing the ids already tried for
this request in ``exclude`` so a retry goes elsewhere.

Built in:

* ``round_robin`` -- each candidate in turn (weights ignored, slow start honoured).
* ``weighted`` -- smooth weighted round robin, as nginx does it: over any run
  of ``sum(weights)`` picks each node gets exactly its share, interleaved
  rather than in bursts.
* ``least_requests`` (the default) -- power of two random choices: sample two
  candidates, send to the one with less load per unit of weight, where load
  is this proxy's in-flight count plus the queue depth the node reports.
  Nearly as good as scanning for the least loaded, without herding every
  proxy worker onto the same momentarily idle node.
* ``affinity`` -- consistent hashing with bounded loads (Mirrokni, Thorup and
  Zadimoghaddam, 2018): a key (session, user, prompt prefix) maps to a point
  on a ring of virtual nodes and goes to the first node clockwise whose load
  stays within ``ceil(load_factor * average)``, weighted.  Repeated prefixes
  reach the node whose KV cache holds them; a hot key spills to the next node
  instead of overloading one; a node joining or leaving moves only ~1/N keys.
  Without a key it behaves as ``least_requests``.

Every policy weighs nodes through :meth:`Node.effective_weight
<inferno_proxy.nodes.Node.effective_weight>` (or, for round robin, its slow
start factor), so slow start applies everywhere.  Policies are pure and
synchronous; randomness comes from a ``random.Random`` passed in, for tests
that fix the seed.
"""

from __future__ import annotations

import hashlib
import math
import random
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import Any, Final, Protocol

from inferno_proxy.nodes import Node

__all__ = [
    "DEFAULT_POLICY",
    "Affinity",
    "HashRing",
    "LeastRequests",
    "RoundRobin",
    "RoutingPolicy",
    "Weighted",
    "affinity_key",
    "hash_key",
    "routing_policy_factories",
]

DEFAULT_POLICY: Final = "least_requests"
DEFAULT_LOAD_FACTOR: Final = 1.25  # the paper's c: no node above 125 % of the mean load
DEFAULT_VNODES: Final = 160  # points per node: key shares within a few % of even at 10 nodes
MAX_CACHED_RINGS: Final = (
    32  # candidate sets differ per model and health; rings are rebuilt on miss
)
MAX_SWRR_STATE: Final = 256  # smooth-WRR entries kept beyond the current candidates before pruning
DEFAULT_PREFIX_CHARS: Final = 512  # prompt prefix hashed for affinity: a system prompt's worth


class RoutingPolicy(Protocol):
    """What the proxy needs from a routing policy.

    ``choose`` must not mutate the nodes; it may keep its own state (a
    rotation position).  It is called once per attempt of each request, on
    the event loop, so it must be cheap: O(candidates) at most.
    """

    #: The name it is configured by (``--policy``).
    name: str

    def choose(
        self,
        candidates: Sequence[Node],
        *,
        key: str | None,
        now: float,
        exclude: Collection[str],
    ) -> Node | None:
        """Pick the node for one attempt.

        :param candidates: the eligible nodes, in pool order.
        :param key: the request's affinity key, or ``None``; policies other
            than ``affinity`` ignore it.
        :param now: monotonic seconds, for slow start.
        :param exclude: ids of nodes already tried for this request; never
            return one of them.
        :returns: a node from *candidates* not in *exclude*, or ``None`` when
            there is none.
        """
        ...


class _SmoothWeighted:
    """Smooth weighted round robin over per-node weights (nginx's algorithm).

    Each pick adds every candidate's weight to its running score, picks the
    highest, and takes the total off the winner.  Scores persist per node id,
    so candidate sets that vary (models, retries) share one fair rotation.
    """

    name = "smooth_weighted"

    def __init__(self) -> None:
        self._score: dict[str, float] = {}

    def _weight(self, node: Node, now: float) -> float:
        raise NotImplementedError

    def choose(
        self,
        candidates: Sequence[Node],
        *,
        key: str | None = None,
        now: float,
        exclude: Collection[str] = (),
    ) -> Node | None:
        score = self._score
        best: Node | None = None
        best_score = 0.0
        total = 0.0
        for node in candidates:
            if node.id in exclude:
                continue
            weight = self._weight(node, now)
            current = score.get(node.id, 0.0) + weight
            score[node.id] = current
            total += weight
            if best is None or current > best_score:
                best, best_score = node, current
        if best is None:
            return None
        score[best.id] = best_score - total
        if len(score) > len(candidates) + MAX_SWRR_STATE:  # nodes that left: forget them
            keep = {node.id for node in candidates}
            self._score = {k: v for k, v in score.items() if k in keep}
        return best


class RoundRobin(_SmoothWeighted):
    """Each candidate in turn; ignores configured weights but ramps slow-starting nodes."""

    name = "round_robin"

    def _weight(self, node: Node, now: float) -> float:
        return node.slow_start_factor(now)


class Weighted(_SmoothWeighted):
    """Smooth weighted round robin on :meth:`Node.effective_weight`."""

    name = "weighted"

    def _weight(self, node: Node, now: float) -> float:
        return node.effective_weight(now)


def _score(node: Node, now: float) -> float:
    """Load per unit of weight; the +1 counts the request being placed, so idle nodes
    still compare by weight."""
    return (node.load + 1) / node.effective_weight(now)


class LeastRequests:
    """Power of two random choices on load per unit of effective weight.

    :param rng: the randomness source (seed it in tests); a fresh one by default.
    """

    name = "least_requests"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def choose(
        self,
        candidates: Sequence[Node],
        *,
        key: str | None = None,
        now: float,
        exclude: Collection[str] = (),
    ) -> Node | None:
        pool = [n for n in candidates if n.id not in exclude] if exclude else candidates
        count = len(pool)
        if count <= 1:
            return pool[0] if pool else None
        first = self._rng.randrange(count)
        second = self._rng.randrange(count - 1)
        if second >= first:
            second += 1
        a, b = pool[first], pool[second]
        return a if _score(a, now) <= _score(b, now) else b


def hash_key(text: str) -> int:
    """A stable 64-bit hash (the same in every process and worker, unlike ``hash()``)."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big")


class HashRing:
    """A consistent-hash ring: *vnodes* points per node id, sorted.

    :param node_ids: the nodes on the ring.
    :param vnodes: points per node; more points, more even key shares.
    """

    __slots__ = ("_owners", "_points", "node_ids")

    def __init__(self, node_ids: Collection[str], vnodes: int = DEFAULT_VNODES) -> None:
        self.node_ids = frozenset(node_ids)
        entries = sorted(
            (hash_key(f"{node_id}#{index}"), node_id)
            for node_id in self.node_ids
            for index in range(vnodes)
        )
        self._points = [point for point, _ in entries]
        self._owners = [owner for _, owner in entries]

    def walk(self, key_hash: int) -> Iterator[str]:
        """Node ids in clockwise order from *key_hash*, each once."""
        points, owners = self._points, self._owners
        size = len(points)
        start = bisect_right(points, key_hash)
        seen: set[str] = set()
        for offset in range(size):
            owner = owners[(start + offset) % size]
            if owner not in seen:
                seen.add(owner)
                yield owner
                if len(seen) == len(self.node_ids):
                    return


class Affinity:
    """Consistent hashing with bounded loads on the request's key.

    A node accepts the request when its load plus this request stays within
    ``ceil(load_factor * (total_load + 1) * weight / total_weight)`` over the
    non-excluded candidates; the first accepting node clockwise from the
    key's point wins.  Such a node always exists (the capacities sum to more
    than the load); when exclusions leave none, the first non-excluded node
    clockwise takes it anyway.

    :param rng: randomness for the keyless fallback (``least_requests``).
    :param load_factor: the paper's ``c`` (> 1): 1.25 lets a node carry 25 %
        above the mean before its keys spill over.
    :param vnodes: ring points per node.
    """

    name = "affinity"

    def __init__(
        self,
        rng: random.Random | None = None,
        *,
        load_factor: float = DEFAULT_LOAD_FACTOR,
        vnodes: int = DEFAULT_VNODES,
    ) -> None:
        if not load_factor > 1.0:
            raise ValueError(f"load_factor must be > 1, got {load_factor!r}")
        if vnodes < 1:
            raise ValueError(f"vnodes must be >= 1, got {vnodes!r}")
        self.load_factor = load_factor
        self.vnodes = vnodes
        self._fallback = LeastRequests(rng)
        self._rings: OrderedDict[frozenset[str], HashRing] = OrderedDict()

    def choose(
        self,
        candidates: Sequence[Node],
        *,
        key: str | None,
        now: float,
        exclude: Collection[str] = (),
    ) -> Node | None:
        if key is None:
            return self._fallback.choose(candidates, key=None, now=now, exclude=exclude)
        allowed = {n.id: n for n in candidates if n.id not in exclude}
        if len(allowed) <= 1:
            return next(iter(allowed.values()), None)
        total_load = sum(n.load for n in allowed.values())
        total_weight = sum(n.effective_weight(now) for n in allowed.values())
        scale = self.load_factor * (total_load + 1) / total_weight
        # The ring spans every candidate, excluded or not, so a retry of a key
        # goes to the key's next node rather than to a reshuffled ring.
        ring = self._ring(frozenset(n.id for n in candidates))
        fallback: Node | None = None
        for node_id in ring.walk(hash_key(key)):
            node = allowed.get(node_id)
            if node is None:
                continue
            if node.load + 1 <= math.ceil(scale * node.effective_weight(now)):
                return node
            fallback = fallback or node
        return fallback

    def _ring(self, node_ids: frozenset[str]) -> HashRing:
        ring = self._rings.get(node_ids)
        if ring is None:
            ring = self._rings[node_ids] = HashRing(node_ids, self.vnodes)
            if len(self._rings) > MAX_CACHED_RINGS:
                self._rings.popitem(last=False)
        else:
            self._rings.move_to_end(node_ids)
        return ring


def affinity_key(
    session_id: str | None,
    body: Mapping[str, Any] | None,
    *,
    prefix_chars: int = DEFAULT_PREFIX_CHARS,
) -> str | None:
    """The affinity key of a request: its session, else its user, else its prompt's start.

    :param session_id: the ``X-Session-Id`` header, if any.
    :param body: the decoded JSON body, if any (OpenAI completions or chat).
    :param prefix_chars: how much of the prompt to key on.
    :returns: a namespaced key (``session:...``, ``user:...``, ``prefix:...``)
        or ``None`` when the request has none of them.
    """
    if session_id:
        return f"session:{session_id}"
    if not isinstance(body, Mapping):
        return None
    user = body.get("user")
    if isinstance(user, str) and user:
        return f"user:{user}"
    text = _prompt_text(body, prefix_chars)
    return f"prefix:{text}" if text else None


def _prompt_text(body: Mapping[str, Any], limit: int) -> str:
    """The first *limit* characters of the prompt, whatever its OpenAI shape."""
    parts: list[str] = []
    size = 0
    prompt = body.get("prompt")
    messages = body.get("messages")
    if isinstance(prompt, str):
        parts.append(prompt)
    elif isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        parts.append(prompt[0])
    elif isinstance(messages, list):
        for message in messages:
            if size >= limit:
                break
            if not isinstance(message, Mapping):
                continue
            content = message.get("content")
            if isinstance(content, list):  # content parts: keep the text ones
                texts = (p.get("text") for p in content if isinstance(p, Mapping))
                content = "".join(t for t in texts if isinstance(t, str))
            if isinstance(content, str):
                part = f"{message.get('role', '')}:{content}\n"
                parts.append(part)
                size += len(part)
    return "".join(parts)[:limit]


def routing_policy_factories() -> dict[str, Callable[[object], RoutingPolicy]]:
    """The built-in policies as ``inferno_routing_policies()`` returns them.

    Each factory takes the role context (unused: the built-ins need no
    configuration beyond their defaults) and returns a fresh policy.
    """

    def round_robin(ctx: object = None) -> RoutingPolicy:
        return RoundRobin()

    def least_requests(ctx: object = None) -> RoutingPolicy:
        return LeastRequests()

    def weighted(ctx: object = None) -> RoutingPolicy:
        return Weighted()

    def affinity(ctx: object = None) -> RoutingPolicy:
        return Affinity()

    return {
        "round_robin": round_robin,
        "least_requests": least_requests,
        "weighted": weighted,
        "affinity": affinity,
    }
