"""The active health loop: check every node each interval, apply the clock, report changes.

The driver between the checkers (:mod:`inferno_health.checkers`) and the
pure :class:`~inferno_proxy.pool.Pool`::

    every interval:  check all nodes at once, each within `timeout`
                     -> pool.check_passed(id, now, vitals) / pool.check_failed(id, now, reason)
    every tick:      pool.tick(now)   (circuit cooldowns, stalled nodes)
    every change:    one log line, a counter, and `on_change()` (the data path's
                     ServiceApp.pool_changed, which wakes requests waiting for a node)

Registered nodes are checked with ``checker`` (``vitals`` by default: their
``/metrics`` brings readiness, queue depth and models); static nodes from
``--backends`` with ``static_checker`` (``http`` by default, since a plain
vLLM or llama.cpp server has ``/health`` but no Inferno vitals).

A static node configured without models is asked for its OpenAI model list
(``GET /v1/models``, within the check timeout) after a passing check when
:class:`~inferno_proxy.staticnodes.ModelDiscovery` says it is due: its first
pass, its first after a failure, then every ``model_refresh`` seconds.  The
answer is applied together with the check that preceded it, so a node joins
rotation with its models already known rather than as a wildcard for a
moment; a new list is an ``updated`` change like any other.  The loop holds
its own small HTTP client for this, closed when :meth:`HealthLoop.run` ends
(or by :meth:`HealthLoop.aclose`).

A round never overlaps the next: when checks take longer than the interval
(a timeout above it), the next round starts as soon as this one ends.  Each
result is applied as soon as it arrives, to the node it was taken for: a
node that re-registered at another address meanwhile, or left, ignores it.

:class:`ChangeReporter` is shared with the operations port, so every change of
the pool is told the same way whichever driver caused it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Final

import anyio
import anyio.abc
from inferno_health.checkers import CheckResult, CheckTarget, HealthChecker, describe_failure

from inferno.http.client import HTTPClient, Timeouts
from inferno.http.client_errors import ClientError, ResponseTooLarge
from inferno.metrics import Registry
from inferno.protocol import format_address
from inferno_proxy.circuit import CircuitState
from inferno_proxy.health import HealthState
from inferno_proxy.nodes import TICK_INTERVAL, ChangeKind, Node, NodeChange, NodeSource
from inferno_proxy.pool import PEER_EXPIRED, Pool
from inferno_proxy.staticnodes import (
    MAX_MODEL_LIST_BYTES,
    MODEL_REFRESH_INTERVAL,
    MODELS_PATH,
    ModelAnswer,
    ModelDiscovery,
    describe_models,
    read_model_list,
)

__all__ = ["CHANGE_STATES", "ChangeReporter", "HealthLoop", "change_state", "describe_change"]

logger = logging.getLogger("inferno_proxy.health")

#: Monotonic seconds, the pool's time base; shared with the data path.
Clock = Callable[[], float]
#: Called after every batch of changes (no arguments, must not block).
OnChange = Callable[[], None]

#: Extra seconds a check may overrun its own timeout before the loop gives up on
#: it: checkers promise to return within the timeout, this bounds one that does not.
CHECK_GRACE: Final = 1.0

#: Reasons of a removal that is the normal end of a node (the reasons
#: :meth:`Pool.deregister <inferno_proxy.pool.Pool.deregister>` and the drain that
#: follows it give): logged at INFO.  Any other removal (failed checks) is a warning.
ROUTINE_REMOVALS: Final = frozenset({"deregistered", "drained", PEER_EXPIRED})

#: Seconds an idle model-list connection is kept: none, in effect.  Requests come
#: a minute apart, past any server's keep-alive (uvicorn's is 5 s), so a kept
#: connection would only be found closed.
MODEL_LIST_IDLE_TIMEOUT: Final = 1.0
_MODEL_LIST_HEADERS: Final = (("accept", "application/json"), ("user-agent", "inferno-proxy"))

#: Every ``state`` label of ``inferno_proxy_node_changes_total``: the new state of
#: a health, circuit, stall, draining or rotation change; how a node was added
#: (its source, or ``peer`` for a node that is not a backend) or updated
#: (``moved``: a new address, ``changed``: anything else, ``static``: listed in
#: ``--backends`` too); ``none`` for a removal.  Anything
#: else counts as ``other``: a label must never carry an address or a name, or
#: each node would make series that outlive it.
CHANGE_STATES: Final = frozenset(
    {state.value for state in HealthState}
    | {state.value for state in CircuitState}
    | {source.value for source in NodeSource}
    | {"peer", "flowing", "stalled", "draining", "in", "out", "moved", "changed", "none", "other"}
)


def describe_change(change: NodeChange, pool: Pool | None = None) -> str:
    """One line saying what happened to a node, for people reading the log.

    ``node backend-a unhealthy: 3 consecutive failures (connect refused)``.
    With ``pool``, a health change names the node's last failure too.
    """
    node = f"node {change.node_id}"
    kind = change.kind
    if kind is ChangeKind.ADDED:
        return f"{node} added ({change.reason}) at {change.new}"
    if kind is ChangeKind.UPDATED:
        if change.old == change.new:  # same address: models, weight... changed
            # The reason says what changed when the pool knows (a model list read
            # from the node); a registration's update says nothing more.
            return (
                f"{node} updated: {change.reason}"
                if change.reason
                else f"{node} updated its registration"
            )
        return f"{node} updated: {change.old} -> {change.new}"
    if kind is ChangeKind.REMOVED:
        return f"{node} removed: {change.reason}"
    if kind is ChangeKind.DRAINING:
        return f"{node} deregistered: draining"
    if kind is ChangeKind.ROTATION:
        if change.new == "in":
            return f"{node} in rotation"
        return f"{node} out of rotation ({change.reason})" if change.reason else f"{node} out"
    if kind is ChangeKind.STALL:
        return f"{node} {change.new}: {change.reason}"
    if kind is ChangeKind.CIRCUIT:
        return f"{node} circuit {change.new}: {change.reason}"
    # HEALTH: "node x unhealthy: 3 consecutive failures (connect refused)"
    text = f"{node} {change.new.replace('_', ' ')}"
    if change.reason:
        text += f": {change.reason}"
    found = pool.get(change.node_id) if pool is not None else None
    last = found.health.last_failure if found is not None else None
    if change.new == "unhealthy" and last and last not in text:
        text += f" ({last})"
    return text


def change_state(change: NodeChange) -> str:
    """The ``state`` label counting *change*: one of :data:`CHANGE_STATES`."""
    kind = change.kind
    if kind is ChangeKind.ADDED:
        state = change.reason  # the node's source
    elif kind is ChangeKind.UPDATED:
        if change.new == NodeSource.STATIC.value:
            state = change.new
        else:
            state = "moved" if change.old != change.new else "changed"
    else:
        state = change.new or "none"
    return state if state in CHANGE_STATES else "other"


class ChangeReporter:
    """Tells every change of the pool: one log line each, a counter, then ``on_change()``.

    One reporter is shared by every driver that changes the pool (the health
    loop, the operations port), so changes read the same whoever caused them.

    :param pool: the pool the changes happened in (to name a node's last failure).
    :param registry: where ``inferno_proxy_node_changes_total`` is counted.
    :param on_change: called once after each non-empty batch (must not block).
    """

    def __init__(self, pool: Pool, registry: Registry, on_change: OnChange | None = None) -> None:
        self.pool = pool
        self.on_change = on_change
        self._counter = registry.counter(
            "inferno_proxy_node_changes_total",
            "Changes of nodes in the pool, by kind and new state (health, circuit, stall "
            "and rotation states; registered/static/moved/changed for additions and updates).",
            ("kind", "state"),
        )

    def report(self, changes: Iterable[NodeChange], *, notify: bool = True) -> None:
        """Log and count each change, then, with ``notify``, call ``on_change`` (the
        data path passes ``False`` for its own changes).

        A node removed after failing is one warning (its health reaching
        ``removed`` is counted but not logged: the removal that follows says the
        same, with the last failure); a deregistered node leaving is routine (INFO).
        """
        told = False
        for change in changes:
            told = True
            self._counter.labels(kind=change.kind.value, state=change_state(change)).inc()
            kind = change.kind
            if kind is ChangeKind.HEALTH and change.new == HealthState.REMOVED.value:
                continue
            routine = kind is not ChangeKind.REMOVED or change.reason in ROUTINE_REMOVALS
            logger.log(
                logging.INFO if routine else logging.WARNING,
                "%s",
                describe_change(change, self.pool),
                extra={"node": change.node_id, "change": kind.value, "state": change.new},
            )
        if told and notify:
            self.notify()

    def notify(self) -> None:
        """Call ``on_change`` for a change of the pool that is no :class:`NodeChange`
        (a node's model list read from its vitals, a failure streak that ended)."""
        if self.on_change is not None:
            self.on_change()


class HealthLoop:
    """Drives active checks and the pool's clock (see the module docstring).

    :param pool: the pool to feed.
    :param checker: checks registered nodes.
    :param static_checker: checks static nodes (``--backends``); default ``checker``.
    :param interval: seconds from the start of one round to the start of the next.
    :param timeout: seconds one check may take.
    :param tick_interval: seconds between two :meth:`Pool.tick` calls.
    :param registry: where check counters and latencies go.
    :param reporter: tells the changes the loop causes (logs, counter, the
        data path's callback); by default one that only logs and counts.
    :param clock: monotonic seconds; the same clock as the data path's.
    :param model_refresh: seconds between two model-list requests to a static
        node that keeps passing its checks (see the module docstring).
    """

    def __init__(
        self,
        pool: Pool,
        *,
        checker: HealthChecker,
        static_checker: HealthChecker | None = None,
        interval: float,
        timeout: float,
        tick_interval: float = TICK_INTERVAL,
        registry: Registry | None = None,
        reporter: ChangeReporter | None = None,
        clock: Clock = time.monotonic,
        model_refresh: float = MODEL_REFRESH_INTERVAL,
    ) -> None:
        for name, value in (("interval", interval), ("timeout", timeout), ("tick", tick_interval)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {value!r}")
        self.pool = pool
        self.checker = checker
        self.static_checker = static_checker or checker
        self.interval = interval
        self.timeout = timeout
        self.tick_interval = tick_interval
        self.registry = registry or Registry()
        self.reporter = reporter or ChangeReporter(pool, self.registry)
        self.clock = clock
        self.discovery = ModelDiscovery(model_refresh)
        # One request per static node at a time; see MODEL_LIST_IDLE_TIMEOUT.
        self._client = HTTPClient(
            max_connections_per_origin=1, idle_timeout=MODEL_LIST_IDLE_TIMEOUT
        )
        #: Completed rounds; tests and operators can see the loop is alive.
        self.rounds = 0
        self._round_done: anyio.Event | None = None
        self._checks = self.registry.counter(
            "inferno_proxy_health_checks_total",
            "Active health checks, by checker and result (pass, not_ready, fail).",
            ("checker", "result"),
        )
        self._latency = self.registry.histogram(
            "inferno_proxy_health_check_seconds",
            "Time an active health check took, failed ones included.",
            ("checker",),
        )

    # --- running ----------------------------------------------------------------------------

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Check and tick until cancelled; reports started before the first round.

        Closes the loop's HTTP client when it ends.
        """
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._tick_forever)
                task_status.started()
                while True:
                    started = anyio.current_time()
                    await self.check_all()
                    await anyio.sleep_until(started + self.interval)
        finally:
            with anyio.CancelScope(shield=True):
                await self.aclose()

    async def aclose(self) -> None:
        """Close the connections the loop opened to read model lists."""
        await self._client.aclose()

    async def wait_round(self) -> None:
        """Wait until the round in progress (or the next one) has completed."""
        if self._round_done is None:
            self._round_done = anyio.Event()
        await self._round_done.wait()

    async def _tick_forever(self) -> None:
        while True:
            await anyio.sleep(self.tick_interval)
            self.apply(self.pool.tick(self.clock()))

    async def check_all(self) -> None:
        """One round: check every node at once; each result is applied when it arrives."""
        nodes = self.pool.nodes()
        self.discovery.forget({node.id for node in nodes})
        async with anyio.create_task_group() as tg:
            for node in nodes:
                tg.start_soon(self._check_one, node.id, node.address, self._target(node))
        self.rounds += 1
        done, self._round_done = self._round_done, None
        if done is not None:
            done.set()

    def _checker_for(self, source: NodeSource) -> HealthChecker:
        return self.static_checker if source is NodeSource.STATIC else self.checker

    def _target(self, node: Node) -> CheckTarget:
        info = node.info
        return CheckTarget(
            node_id=node.id,
            host=info.host,
            port=info.port,
            metrics_port=info.metrics_port,
        )

    async def _check_one(self, node_id: str, address: str, target: CheckTarget) -> None:
        node = self.pool.get(node_id)
        if node is None:
            return
        checker = self._checker_for(node.source)
        result: CheckResult | None = None
        with anyio.move_on_after(self.timeout + CHECK_GRACE):
            try:
                result = await checker.check(target, timeout=self.timeout)
            except Exception as exc:  # a broken checker must not stop the loop
                logger.error(
                    "health checker %r failed on node %s: %s: %s",
                    checker.name,
                    node_id,
                    type(exc).__name__,
                    exc,
                )
                result = CheckResult(False, f"checker error: {type(exc).__name__}")
        if result is None:
            result = CheckResult(False, f"timeout after {self.timeout:g}s")
        self._latency.labels(checker=checker.name).observe(result.latency)
        answer: ModelAnswer | None = None
        if _discovers(node):
            if not result.ok:
                self.discovery.lost(node_id)  # it may come back serving another model
            elif result.ready is not False and self.discovery.due(node_id, self.clock()):
                answer = await self._read_models(target)
        current = self.pool.get(node_id)
        if current is None or current.address != address:
            return  # it left, or moved: this result is about a node that no longer exists
        models, failing = current.models, current.health.consecutive_failures
        changes = self._take_models(current, answer) + self._feed(node_id, checker.name, result)
        if changes:
            self.apply(changes)
        elif current.models != models or (failing and not current.health.consecutive_failures):
            # No state moved, but the data path cares: it follows model lists
            # (/v1/models, which unknown models may wait rather than be 404), and
            # requests that found this node unreachable wait for it to answer again
            # (a node back before its failures took it out changes no state).
            self.reporter.notify()

    async def _read_models(self, target: CheckTarget) -> ModelAnswer:
        """``GET /v1/models`` from the node's service port, within the check timeout."""
        seconds = self.timeout
        url = f"{target.scheme}://{format_address(target.host, target.port)}{MODELS_PATH}"
        phase = Timeouts(connect=seconds, read=seconds, write=seconds, pool=seconds, total=seconds)
        what = f"timeout after {seconds:g}s"
        with anyio.move_on_after(seconds):
            try:
                async with self._client.stream(
                    "GET", url, headers=_MODEL_LIST_HEADERS, timeouts=phase
                ) as response:
                    try:
                        body: bytes | None = await response.read(max_bytes=MAX_MODEL_LIST_BYTES)
                    except ResponseTooLarge:
                        body = None  # the connection is closed; the answer is no usable list
                    return read_model_list(response.status, body)
            except (ClientError, OSError) as exc:
                what = describe_failure(exc, seconds)
        # Nothing learned: a node that passed its check but could not answer this.
        return ModelAnswer(None, f"{MODELS_PATH} failed ({what}); its models stay as they were")

    def _take_models(self, node: Node, answer: ModelAnswer | None) -> tuple[NodeChange, ...]:
        """Apply a model-list answer to *node*; say what the operator should know, once."""
        if answer is None:
            return ()
        now = self.clock()
        note = self.discovery.answered(node.id, answer, now)
        if note:
            logger.info("node %s: %s", node.id, note, extra={"node": node.id})
        if answer.models is None:
            return ()
        return self.pool.set_models(node.id, answer.models, now, describe_models(answer.models))

    def _feed(self, node_id: str, checker: str, result: CheckResult) -> tuple[NodeChange, ...]:
        now = self.clock()
        if result.ok and (result.ready is not False or result.vitals is not None):
            outcome = "not_ready" if result.ready is False else "pass"
            self._checks.labels(checker=checker, result=outcome).inc()
            return self.pool.check_passed(node_id, now, result.vitals)
        # A checker of a plugin may say ready=false without vitals; the pool takes
        # not-ready from vitals only, so that counts as a failed check.
        self._checks.labels(checker=checker, result="fail").inc()
        reason = result.reason or ("not ready" if result.ok else "check failed")
        return self.pool.check_failed(node_id, now, reason)

    def apply(self, changes: tuple[NodeChange, ...]) -> None:
        """Report changes (see :class:`ChangeReporter`); nothing when there are none."""
        if changes:
            self.reporter.report(changes)


def _discovers(node: Node) -> bool:
    """Whether *node*'s models are read from it: a static node configured without any."""
    return node.source is NodeSource.STATIC and not node.info.models
