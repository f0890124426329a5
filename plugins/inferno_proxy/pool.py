"""The proxy's pool: every node it knows, and the one place their state changes.

A pure scheduling model (no I/O, no clock): the proxy's drivers feed it what
they observe and ask it what to do, passing ``now`` (monotonic seconds).

Feeding it:

* discovery: :meth:`Pool.register` (adds or updates), :meth:`Pool.add_static`,
  :meth:`Pool.deregister`, :meth:`Pool.remove`, and :meth:`Pool.set_models` for
  a static node's model list read from the node;
* active checks: :meth:`Pool.check_passed` (with the node's vitals, when the
  checker reads them) and :meth:`Pool.check_failed`;
* live traffic: :meth:`Pool.start` when a request goes to a node, then
  :meth:`Pool.progress` on every byte received from it and :meth:`Pool.finish`
  with its :class:`~inferno_proxy.nodes.Outcome`;
* the clock: :meth:`Pool.tick`, every :data:`~inferno_proxy.nodes.TICK_INTERVAL`:
  ends circuit cooldowns and detects stalled nodes.

Every mutator returns the :class:`~inferno_proxy.nodes.NodeChange` records it
caused (an empty tuple almost always), for the driver to log, count and share
with the other workers.

Asking it: :meth:`Pool.eligible` gives the candidates for a model, after the
health, circuit, readiness, draining and stall filters, and the panic valve;
a routing policy (:mod:`inferno_proxy.policies`) then picks one of them.

**Peers.**  Only backends are nodes of the pool.  A registration of any other
``node_type`` (another proxy, a governator) makes a *peer*: listed by
:meth:`Pool.peers` (``GET /peers``, the registration answer) and nothing else:
never routed to, never checked, never in ``GET /backends``.  Nobody checks a
peer, so it is forgotten :data:`PEER_TTL` seconds after its latest
registration (:meth:`Pool.tick`), or when it deregisters.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Final

from inferno.errors import ValidationError
from inferno.protocol import (
    NodeInfo,
    NodeType,
    NodeVitals,
    Registration,
    format_address,
    parse_address,
)
from inferno_proxy.circuit import NOT_PROBE, Admission
from inferno_proxy.fsm import Transition
from inferno_proxy.health import HealthState
from inferno_proxy.nodes import (
    ChangeKind,
    Lease,
    Node,
    NodeChange,
    NodeSource,
    Outcome,
    PoolFull,
    PoolSettings,
    Selection,
)

__all__ = ["PEER_EXPIRED", "PEER_TTL", "Pool"]

_NO_CHANGES: Final[tuple[NodeChange, ...]] = ()

#: Seconds a peer is kept after its latest registration.  Nodes re-announce every
#: ``announce_interval`` (30 s by default, DESIGN.md): three missed announcements
#: mean it is gone, one late or lost announcement does not drop it.
PEER_TTL: Final = 90.0
#: The reason of a peer's removal when it did not re-register within PEER_TTL.
PEER_EXPIRED: Final = f"peer not announced for {PEER_TTL:g}s"


class Pool:
    """Every node this proxy knows, keyed by id, in the order they arrived.

    :param settings: the pool's tuning; :meth:`reconfigure` replaces it.
    """

    def __init__(self, settings: PoolSettings | None = None) -> None:
        self.settings = settings or PoolSettings()
        self._nodes: dict[str, Node] = {}
        #: Nodes that are not backends: id -> (their description, latest registration).
        self._peers: dict[str, tuple[NodeInfo, float]] = {}

    # --- reading ----------------------------------------------------------------------------

    def get(self, node_id: str) -> Node | None:
        """The backend with *node_id*, or ``None`` (peers are not nodes: see :meth:`peers`)."""
        return self._nodes.get(node_id)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._nodes

    def __len__(self) -> int:
        """Backends in the pool (peers not counted)."""
        return len(self._nodes)

    def nodes(self) -> list[Node]:
        """Every node (every backend: peers are not nodes), in arrival order."""
        return list(self._nodes.values())

    def backends(self) -> list[Node]:
        """The nodes that serve requests, in arrival order."""
        return [node for node in self._nodes.values() if node.routable]

    def peers(self) -> list[NodeInfo]:
        """Descriptions of every known node, backends first, then the other peers
        (``GET /peers``, the registration answer), each backend with the models it
        serves now (its vitals' or ``/v1/models`` list may differ from its
        registration's)."""
        backends = [
            node.info
            if node.models == node.info.models
            else dataclasses.replace(node.info, models=node.models)
            for node in self._nodes.values()
        ]
        return backends + [info for info, _ in self._peers.values()]

    def describe(self, now: float) -> list[dict[str, Any]]:
        """``GET /backends``: every backend's state, explained (see :meth:`Node.describe`)."""
        return [node.describe(now) for node in self.backends()]

    def serves(self, model: str | None) -> bool:
        """Whether any backend, in any state, serves *model* (else: 404 unknown model)."""
        return any(node.serves(model) for node in self._nodes.values() if node.routable)

    def lists(self, model: str) -> bool:
        """Whether a backend, in any state, names *model* in its model list.

        Unlike :meth:`serves`, a node without a list (a wildcard: a static
        backend that has none) does not count: the model names this is true of
        come from registrations, vitals, configuration or discovery, never from
        a client, so they are bounded enough to label metrics with.
        """
        return any(
            node.models and node.serves(model) for node in self._nodes.values() if node.routable
        )

    def models(self) -> list[str]:
        """Sorted model names of the backends in rotation (``GET /v1/models``)."""
        names: set[str] = set()
        for node in self._nodes.values():
            if node.routable and node.in_rotation():
                names.update(node.models)
        return sorted(names)

    def eligible(self, model: str | None) -> Selection:
        """The nodes a request for *model* may go to (``None``: a request naming no model).

        Outside panic: the backends that serve the model and are in rotation
        (healthy, circuit admitting, not stalled, not draining).

        Panic: of the backends serving the model that are neither draining
        nor reporting ``ready=false`` (they withdrew themselves; nobody
        ejected them), if the share out of rotation exceeds
        ``max_ejection_percent``, all of them are candidates, whatever their
        health or circuit.  With the default 50 %, a lone node that fails
        stays a candidate (better a retry than a certain 503), two nodes
        panic only when both are out.
        """
        serving = 0
        pool: list[Node] = []
        healthy: list[Node] = []
        for node in self._nodes.values():
            if not node.routable or not node.serves(model):
                continue
            serving += 1
            if node.draining_since is not None or node.health.state is HealthState.NOT_READY:
                continue
            pool.append(node)
            if node.in_rotation():
                healthy.append(node)
        ejected = len(pool) - len(healthy)
        panic = ejected * 100.0 > self.settings.max_ejection_percent * len(pool)
        return Selection(tuple(pool if panic else healthy), panic, serving)

    # --- discovery --------------------------------------------------------------------------

    def register(self, node: NodeInfo | Registration, now: float) -> tuple[NodeChange, ...]:
        """Add a node that registered, or update it when its id is known.

        An update keeps the node's health, circuit and slow start (nodes
        re-announce every ``announce_interval``) unless its address changed,
        which starts them afresh; a draining node that registers again is
        back.  A static node keeps being static.

        :raises PoolFull: when a new node would exceed ``max_nodes``.
        """
        info = NodeInfo.from_registration(node) if isinstance(node, Registration) else node
        if info.node_type != NodeType.BACKEND:
            return self._register_peer(info, now)
        existing = self._nodes.get(info.id)
        if existing is None:
            return self._add(info, NodeSource.REGISTERED, now)
        changes: list[NodeChange] = []
        moved = existing.info.address != info.address
        if existing.info != info or existing.draining_since is not None:
            changes.append(
                NodeChange(info.id, ChangeKind.UPDATED, existing.info.address, info.address, now)
            )
        existing.info = info
        existing.set_models(info.models)
        existing.draining_since = None
        if moved:
            if existing.noted_in_rotation:
                changes.append(
                    NodeChange(info.id, ChangeKind.ROTATION, "in", "out", now, "address changed")
                )
            existing.reset(now)
        self._settle(existing, now, changes)
        return tuple(changes)

    def add_static(
        self, address: str, now: float, *, models: tuple[str, ...] = (), weight: float = 1.0
    ) -> tuple[NodeChange, ...]:
        """Add (or update) a static backend from ``--backends``; its id is its address.

        Static nodes are never removed by failures or deregistration; they
        start ``UNKNOWN`` and join on their first passing check.  Adding an
        address that is already a registered node's id makes that node
        static, keeping its registration's details.

        :raises inferno.errors.ValidationError: on a bad address or weight.
        """
        try:
            host, port = parse_address(address)
        except ValueError as exc:
            raise ValidationError("backends", str(exc)) from None
        address = format_address(host, port)
        info = NodeInfo(
            id=address,
            address=address,
            metrics_port=port,
            node_type=NodeType.BACKEND,
            models=models,
            weight=weight,
        )
        existing = self._nodes.get(info.id)
        if existing is None:
            return self._add(info, NodeSource.STATIC, now)
        if existing.source is NodeSource.STATIC:  # a reload: new models or weight
            return self.register(info, now)
        # It registered first: keep what it told us, but never forget it from now on.
        existing.source = NodeSource.STATIC
        existing.health.removable = False
        return (NodeChange(info.id, ChangeKind.UPDATED, "registered", "static", now),)

    def set_models(
        self, node_id: str, models: tuple[str, ...], now: float, reason: str = ""
    ) -> tuple[NodeChange, ...]:
        """*node_id* serves *models* now (``()``: no list, any model), as its server
        said (a static node's ``GET /v1/models``, see :mod:`inferno_proxy.staticnodes`).

        Changes :attr:`Node.models` only, not what it registered or was configured
        with.  A different list is an ``updated`` change (*reason* says what it is
        now), so the data path and the other workers follow it; the same list, or
        an unknown id, changes nothing.
        """
        node = self._nodes.get(node_id)
        if node is None or node.models == models:
            return _NO_CHANGES
        node.set_models(models)
        return (NodeChange(node_id, ChangeKind.UPDATED, node.address, node.address, now, reason),)

    def deregister(self, node_id: str, now: float) -> tuple[NodeChange, ...]:
        """A node said goodbye (``POST /deregister``): no new requests from now on.

        A registered node drains: it stays, out of rotation, until its last
        request in flight finishes, then is removed (at once when idle).  A
        static node is marked not ready instead, and joins again on its next
        passing check after it restarts.  An unknown id changes nothing.
        """
        peer = self._peers.pop(node_id, None)
        if peer is not None:
            return (
                NodeChange(node_id, ChangeKind.REMOVED, peer[0].address, "", now, "deregistered"),
            )
        node = self._nodes.get(node_id)
        if node is None:
            return _NO_CHANGES
        changes: list[NodeChange] = []
        if node.source is NodeSource.STATIC:
            self._record(node, ChangeKind.HEALTH, node.health.not_ready(now), changes)
        elif node.draining_since is None:
            node.draining_since = now
            changes.append(NodeChange(node_id, ChangeKind.DRAINING, "", "draining", now))
            if node.in_flight == 0:
                return (*changes, *self.remove(node_id, now, "deregistered"))
        self._settle(node, now, changes)
        return tuple(changes)

    def remove(self, node_id: str, now: float, reason: str = "removed") -> tuple[NodeChange, ...]:
        """Forget a node now, whatever its state; requests in flight finish on their own."""
        node = self._nodes.pop(node_id, None)
        if node is None:
            return _NO_CHANGES
        return (NodeChange(node_id, ChangeKind.REMOVED, node.address, "", now, reason),)

    def reconfigure(self, settings: PoolSettings) -> None:
        """Apply new settings (a reload) to the pool and every node's trackers."""
        self.settings = settings
        for node in self._nodes.values():
            node.settings = settings
            node.health.settings = settings.health
            node.circuit.settings = settings.circuit

    # --- active checks ----------------------------------------------------------------------

    def check_passed(
        self, node_id: str, now: float, vitals: NodeVitals | None = None
    ) -> tuple[NodeChange, ...]:
        """An active check reached *node_id*; *vitals* when the checker reads them.

        Vitals saying ``ready: false`` take the node out at once; their
        queue depth feeds :attr:`Node.load`, their model list :attr:`Node.models`.
        A result for a node no longer in the pool is ignored.
        """
        node = self._nodes.get(node_id)
        if node is None:
            return _NO_CHANGES
        changes: list[NodeChange] = []
        if vitals is not None:
            node.vitals, node.vitals_at = vitals, now
            if vitals.models:
                node.set_models(vitals.models)
        if vitals is not None and not vitals.ready:
            self._record(node, ChangeKind.HEALTH, node.health.not_ready(now), changes)
        else:
            self._record(node, ChangeKind.HEALTH, node.health.check_passed(now), changes)
        self._settle(node, now, changes)
        return tuple(changes)

    def check_failed(self, node_id: str, now: float, reason: str) -> tuple[NodeChange, ...]:
        """An active check of *node_id* failed because of *reason* (ignored for unknown ids)."""
        node = self._nodes.get(node_id)
        if node is None:
            return _NO_CHANGES
        changes: list[NodeChange] = []
        self._record(node, ChangeKind.HEALTH, node.health.check_failed(now, reason), changes)
        self._settle(node, now, changes)
        return tuple(changes)

    # --- live traffic -----------------------------------------------------------------------

    def start(self, node: Node, now: float) -> Lease:
        """A request goes to *node* now; hand the lease to :meth:`finish` when it ends."""
        if node.in_flight == 0:
            node.last_progress = now  # an idle node has not been silent while busy
        node.in_flight += 1
        return Lease(node, now, node.circuit.admit())

    def progress(self, lease: Lease, now: float) -> tuple[NodeChange, ...]:
        """A byte (response head or body chunk) arrived from the lease's node."""
        node = lease.node
        node.last_progress = now
        if node.stalled_since is None:
            return _NO_CHANGES
        changes: list[NodeChange] = []
        self._unstall(node, now, "a byte arrived", changes)
        self._settle(node, now, changes)
        return tuple(changes)

    def finish(
        self, lease: Lease, outcome: Outcome, now: float, reason: str = ""
    ) -> tuple[NodeChange, ...]:
        """The request of *lease* ended with *outcome* (*reason*: what failed, for logs).

        Safe to call twice (the second call does nothing), so a driver may
        call it from both its normal path and a ``finally``.
        """
        if lease.done:
            return _NO_CHANGES
        lease.done = True
        node = lease.node
        node.in_flight -= 1
        if not self._holds(node):
            # Removed (or replaced by a re-registration) while this request ran:
            # the outcome says nothing about a node the pool no longer routes
            # to, and its health machine is finished (REMOVED accepts no event).
            return _NO_CHANGES
        changes: list[NodeChange] = []
        self._judge(node, lease.admission, outcome, now, reason, changes)
        if node.in_flight == 0 and node.stalled_since is not None:
            self._unstall(node, now, "its requests ended", changes)
        if node.in_flight == 0 and node.draining_since is not None and self._holds(node):
            changes.extend(self.remove(node.id, now, "drained"))
        self._settle(node, now, changes)
        return tuple(changes)

    # --- traffic of other processes (``--workers``) -----------------------------------------

    def admit(self, node_id: str) -> Admission | None:
        """A circuit ticket for a request another process starts on *node_id*.

        :meth:`start` without counting the request in flight: a proxy's worker
        processes report their counts apart (:meth:`set_traffic`).  ``None``
        for an unknown id.
        """
        node = self._nodes.get(node_id)
        return None if node is None else node.circuit.admit()

    def record_outcome(
        self,
        node_id: str,
        outcome: Outcome,
        now: float,
        reason: str = "",
        admission: Admission = NOT_PROBE,
    ) -> tuple[NodeChange, ...]:
        """How a request another process sent to *node_id* ended.

        What :meth:`finish` makes of *outcome* (circuit, passive health), without
        the in-flight count, which :meth:`set_traffic` takes.  Ignored for an
        unknown id.
        """
        node = self._nodes.get(node_id)
        if node is None:
            return _NO_CHANGES
        changes: list[NodeChange] = []
        self._judge(node, admission, outcome, now, reason, changes)
        self._settle(node, now, changes)
        return tuple(changes)

    def set_traffic(
        self, node_id: str, in_flight: int, last_progress: float, now: float
    ) -> tuple[NodeChange, ...]:
        """Requests in flight at *node_id* and its latest byte, as other processes report them.

        A multi-process proxy's control plane counts no request itself; its
        workers report theirs.  As with :meth:`progress` and :meth:`finish`, a
        byte after a stall, or no request left, ends the stall, and a draining
        node with nothing in flight is removed.  Ignored for an unknown id.
        """
        node = self._nodes.get(node_id)
        if node is None:
            return _NO_CHANGES
        changes: list[NodeChange] = []
        node.in_flight = max(0, in_flight)
        node.last_progress = max(node.last_progress, last_progress)
        stalled = node.stalled_since
        if stalled is not None and node.in_flight == 0:
            self._unstall(node, now, "its requests ended", changes)
        elif stalled is not None and node.last_progress > stalled:
            self._unstall(node, now, "a byte arrived", changes)
        if node.in_flight == 0 and node.draining_since is not None:
            return (*changes, *self.remove(node_id, now, "drained"))
        self._settle(node, now, changes)
        return tuple(changes)

    def tick(self, now: float) -> tuple[NodeChange, ...]:
        """Apply the clock; call every :data:`TICK_INTERVAL` seconds.

        Moves open circuits whose cooldown is over to half-open, and finds
        stalled nodes: requests in flight and no byte for ``stall_timeout``.
        A stall counts once per episode as a passive failure (health) and a
        circuit failure, and keeps the node out until a byte arrives or its
        requests end.
        """
        changes: list[NodeChange] = []
        for peer_id, (info, seen) in list(self._peers.items()):
            if now - seen >= PEER_TTL:
                del self._peers[peer_id]
                changes.append(
                    NodeChange(peer_id, ChangeKind.REMOVED, info.address, "", now, PEER_EXPIRED)
                )
        stall_timeout = self.settings.stall_timeout
        for node in list(self._nodes.values()):
            self._record(node, ChangeKind.CIRCUIT, node.circuit.poll(now), changes)
            silent = now - node.last_progress
            if (
                stall_timeout > 0.0
                and node.in_flight > 0
                and node.stalled_since is None
                and silent >= stall_timeout
            ):
                what = f"no byte for {silent:.0f}s with {node.in_flight} request(s) in flight"
                node.stalled_since = now
                changes.append(
                    NodeChange(node.id, ChangeKind.STALL, "flowing", "stalled", now, what)
                )
                health = node.health.passive_failure(now, f"stalled: {what}")
                self._record(node, ChangeKind.HEALTH, health, changes)
                circuit = node.circuit.record_failure(None, now, "stalled")
                self._record(node, ChangeKind.CIRCUIT, circuit, changes)
            self._settle(node, now, changes)
        return tuple(changes)

    # --- internals --------------------------------------------------------------------------

    def _add(self, info: NodeInfo, source: NodeSource, now: float) -> tuple[NodeChange, ...]:
        self._check_room(info.id)
        self._peers.pop(info.id, None)  # a peer that now registers as a backend
        node = self._nodes[info.id] = Node(info, source, self.settings, now)
        changes = [NodeChange(info.id, ChangeKind.ADDED, "", info.address, now, source.value)]
        self._settle(node, now, changes)
        return tuple(changes)

    def _check_room(self, node_id: str) -> None:
        """Refuse a new id past ``max_nodes``, backends and peers together.

        :raises PoolFull: when it would not fit.
        """
        held = len(self._nodes) + len(self._peers)
        if held >= self.settings.max_nodes and node_id not in self._peers:
            raise PoolFull(f"the pool holds {held} nodes, its maximum")

    def _register_peer(self, info: NodeInfo, now: float) -> tuple[NodeChange, ...]:
        """Add or refresh a peer (a node that is not a backend); see the module docstring."""
        changes: list[NodeChange] = []
        if info.id in self._nodes:  # a backend that registers as another type now
            if self._nodes[info.id].source is NodeSource.STATIC:
                raise ValidationError("id", f"{info.id!r} is a static backend (--backends)")
            changes.extend(self.remove(info.id, now, f"registered again as a {info.node_type}"))
        known = self._peers.get(info.id)
        if known is None:
            self._check_room(info.id)
            changes.append(NodeChange(info.id, ChangeKind.ADDED, "", info.address, now, "peer"))
        elif known[0] != info:
            changes.append(
                NodeChange(info.id, ChangeKind.UPDATED, known[0].address, info.address, now)
            )
        self._peers[info.id] = (info, now)
        return tuple(changes)

    def _judge(
        self,
        node: Node,
        admission: Admission,
        outcome: Outcome,
        now: float,
        reason: str,
        changes: list[NodeChange],
    ) -> None:
        """What a request's *outcome* says about *node*: circuit, and health for transport."""
        circuit = node.circuit
        if outcome is Outcome.SUCCESS:
            transition = circuit.record_success(admission, now)
            self._record(node, ChangeKind.CIRCUIT, transition, changes)
        elif outcome is Outcome.NEUTRAL:
            circuit.release(admission)
        else:
            what = reason or outcome.value
            failed = circuit.record_failure(admission, now, what)
            self._record(node, ChangeKind.CIRCUIT, failed, changes)
            if outcome is Outcome.TRANSPORT_FAILURE:
                health = node.health.passive_failure(now, what)
                self._record(node, ChangeKind.HEALTH, health, changes)

    def _holds(self, node: Node) -> bool:
        return self._nodes.get(node.id) is node

    def _record(
        self,
        node: Node,
        kind: ChangeKind,
        transition: Transition[Any, Any] | None,
        changes: list[NodeChange],
    ) -> None:
        if transition is None:
            return
        changes.append(
            NodeChange(
                node.id,
                kind,
                transition.old.value,
                transition.new.value,
                transition.at,
                transition.reason,
            )
        )

    def _unstall(self, node: Node, now: float, why: str, changes: list[NodeChange]) -> None:
        node.stalled_since = None
        changes.append(NodeChange(node.id, ChangeKind.STALL, "stalled", "flowing", now, why))

    def _settle(self, node: Node, now: float, changes: list[NodeChange]) -> None:
        """Follow up a change: forget a removed node; note entering or leaving rotation."""
        if node.health.state is HealthState.REMOVED:
            if self._holds(node):
                health = node.health
                reason = f"{health.consecutive_failures} consecutive failures"
                if health.last_failure:
                    reason += f", last: {health.last_failure}"
                changes.extend(self.remove(node.id, now, reason))
            return
        settled = node.fully_in_rotation()
        if settled == node.noted_in_rotation:
            return
        node.noted_in_rotation = settled
        if settled:
            node.joined_at = now  # slow start runs from here
            changes.append(NodeChange(node.id, ChangeKind.ROTATION, "out", "in", now))
        else:
            why = ", ".join(r.reason for r in node.out_reasons())
            changes.append(NodeChange(node.id, ChangeKind.ROTATION, "in", "out", now, why))
