"""The health loop against real nodes: real checkers, real servers on loopback, a real pool.

Every node is a real server (:func:`inferno.http.serve`) whose ``/metrics``
and ``/health`` answers a test flips: valid vitals, ``ready: false``, 500,
or down (its ports closed, so connections are refused).  Thresholds are
counted round by round with :meth:`HealthLoop.check_all`, one check of every
node per call; the free-running loop (interval and tick) is tested by
waiting, bounded, for what it must cause.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
import pytest
from inferno_health.checkers import CheckResult, CheckTarget, HTTPChecker, VitalsChecker
from inferno_proxy.circuit import CircuitSettings
from inferno_proxy.health import HealthSettings
from inferno_proxy.healthloop import ChangeReporter, HealthLoop, describe_change
from inferno_proxy.nodes import ChangeKind, NodeChange, Outcome, PoolSettings
from inferno_proxy.pool import Pool

from inferno.errors import HTTPError
from inferno.http import Request, Response, ServerInfo, serve
from inferno.metrics import Registry
from inferno.protocol import NodeType, Registration

pytestmark = pytest.mark.anyio

WAIT = 20.0  # seconds a test waits for what must happen before it fails instead of hanging
TIMEOUT = 2.0  # a check's timeout: never reached on loopback unless a node hangs

VITALS: dict[str, Any] = {
    "ready": True,
    "requests_in_progress": 0,
    "requests_queued": 2,
    "cpu_usage": 0.1,
    "memory_usage": 0.2,
    "uptime_seconds": 1.0,
    "version": "0.1.0",
    "models": ["tiny"],
}


@dataclass(eq=False)
class StandIn:
    """A backend stand-in: a service port and an operations port whose answers a test picks.

    ``mode``: ``valid`` | ``not_ready`` | ``error`` (500) for ``/metrics``;
    ``health_status`` for ``/health``.  :meth:`down` closes both ports (connections
    are refused) and :meth:`up` opens them again on the same port numbers.
    """

    mode: str = "valid"
    health_status: int = 200
    hold: anyio.Event | None = None  # when set, /metrics waits for it
    held: anyio.Event = field(default_factory=anyio.Event)
    paths: list[str] = field(default_factory=list)
    service_port: int = 0
    ops_port: int = 0
    _scope: anyio.CancelScope | None = None
    _tg: anyio.abc.TaskGroup | None = None

    async def handle(self, request: Request) -> Response:
        self.paths.append(request.path)
        if request.path == "/health":
            return Response.json({"status": "x"}, status=self.health_status)
        if request.path != "/metrics":
            raise HTTPError(404, "no such route")
        if self.hold is not None:
            self.held.set()
            await self.hold.wait()
        if self.mode == "error":
            raise HTTPError(500, "engine exploded")
        return Response.json({**VITALS, "ready": self.mode != "not_ready"})

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.service_port}"

    def registration(self, node_id: str = "node-a", **fields: Any) -> Registration:
        return Registration(
            id=node_id,
            address=self.address,
            metrics_port=self.ops_port,
            node_type=NodeType.BACKEND,
            **fields,
        )

    async def up(self) -> None:
        assert self._tg is not None
        self._scope = anyio.CancelScope()
        scope = self._scope

        async def both(*, task_status: anyio.abc.TaskStatus[None]) -> None:
            with scope:
                async with anyio.create_task_group() as tg:
                    service: ServerInfo = await tg.start(self._serve, self.service_port)
                    ops: ServerInfo = await tg.start(self._serve, self.ops_port)
                    self.service_port, self.ops_port = service.port, ops.port
                    task_status.started()

        await self._tg.start(both)

    async def _serve(self, port: int, *, task_status: anyio.abc.TaskStatus[ServerInfo]) -> None:
        await serve(self.handle, host="127.0.0.1", port=port, task_status=task_status)

    def down(self) -> None:
        assert self._scope is not None
        self._scope.cancel()  # the listeners close: new connections are refused


@contextlib.asynccontextmanager
async def running(*nodes: StandIn) -> AsyncIterator[None]:
    async with anyio.create_task_group() as tg:
        for node in nodes:
            node._tg = tg
            await node.up()
        yield
        tg.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def health_loop(pool: Pool, **options: Any) -> AsyncIterator[HealthLoop]:
    checker = VitalsChecker()
    static = HTTPChecker()
    loop = HealthLoop(
        pool,
        checker=checker,
        static_checker=static,
        interval=options.pop("interval", 60.0),
        timeout=options.pop("timeout", TIMEOUT),
        **options,
    )
    try:
        yield loop
    finally:
        await loop.aclose()
        await checker.aclose()
        await static.aclose()


def pool(**health: int) -> Pool:
    return Pool(PoolSettings(health=HealthSettings(**health), slow_start=0.0))


def state(pool: Pool, node_id: str) -> str:
    node = pool.get(node_id)
    return "gone" if node is None else node.health.state.value


async def eventually(condition: Callable[[], bool]) -> None:
    """Wait, bounded, for a condition the loop must bring about (no event to wait on)."""
    with anyio.fail_after(WAIT):
        while True:
            if condition():
                return
            await anyio.sleep(0.01)


# --- thresholds, round by round --------------------------------------------------------------


async def test_failures_take_a_node_out_at_the_threshold_and_passes_bring_it_back() -> None:
    node = StandIn()
    the_pool = pool(failure_threshold=3, recovery_threshold=2)
    async with running(node), health_loop(the_pool) as loop:
        the_pool.register(node.registration(), 0.0)
        await loop.check_all()
        assert state(the_pool, "node-a") == "healthy"
        node.mode = "error"
        for _ in range(2):
            await loop.check_all()
            assert state(the_pool, "node-a") == "healthy"  # a blip is not an outage
        await loop.check_all()
        assert state(the_pool, "node-a") == "unhealthy"
        [entry] = the_pool.describe(1.0)
        assert entry["healthy"] is False
        assert entry["out"][0]["reason"] == "failed_checks"
        assert "HTTP 500" in entry["out"][0]["detail"]

        node.mode = "valid"
        await loop.check_all()
        assert state(the_pool, "node-a") == "unhealthy"
        await loop.check_all()
        assert state(the_pool, "node-a") == "healthy"


async def test_vitals_feed_the_pool_and_ready_false_takes_a_node_out_at_once() -> None:
    node = StandIn()
    the_pool = pool()
    async with running(node), health_loop(the_pool) as loop:
        the_pool.register(node.registration(models=("registered-name",)), 0.0)
        await loop.check_all()
        found = the_pool.get("node-a")
        assert found is not None
        assert found.queue_depth == 2  # from the vitals
        assert found.models == ("tiny",)  # the vitals' list wins over the registration's
        node.mode = "not_ready"
        await loop.check_all()
        assert state(the_pool, "node-a") == "not_ready"
        assert found.health.consecutive_failures == 0  # alive: not a failure
        node.mode = "valid"
        await loop.check_all()
        assert state(the_pool, "node-a") == "healthy"  # its own word is enough


async def test_a_model_list_changed_by_vitals_is_told_to_the_data_path() -> None:
    node = StandIn()
    the_pool = pool()
    told: list[int] = []
    reporter = ChangeReporter(the_pool, Registry(), on_change=lambda: told.append(1))
    async with running(node), health_loop(the_pool, reporter=reporter) as loop:
        the_pool.register(node.registration(models=("old",)), 0.0)
        await loop.check_all()
        found = the_pool.get("node-a")
        assert found is not None
        assert found.models == ("tiny",)  # from its vitals
        assert told == [1]  # no state moved, yet the data path follows model lists
        await loop.check_all()
        assert told == [1]  # the same list again: nothing to tell


async def test_a_pass_that_ends_a_failure_streak_is_told_to_the_data_path() -> None:
    """Requests that found the node unreachable wait for it; a node back before its
    failures took it out changes no state, so this is their wake-up call."""
    node = StandIn()
    the_pool = pool(failure_threshold=3)
    told: list[int] = []
    reporter = ChangeReporter(the_pool, Registry(), on_change=lambda: told.append(1))
    async with running(node), health_loop(the_pool, reporter=reporter) as loop:
        the_pool.register(node.registration(models=("tiny",)), 0.0)
        await loop.check_all()
        assert told == []  # a pass like any other
        assert the_pool.check_failed("node-a", 1.0, "passive: reset") == ()  # still healthy
        await loop.check_all()
        assert told == [1]
        await loop.check_all()
        assert told == [1]


async def test_a_registered_node_that_is_down_is_removed_a_static_one_stays() -> None:
    registered, static = StandIn(), StandIn()
    the_pool = pool(failure_threshold=3, removal_threshold=10)
    async with running(registered, static), health_loop(the_pool) as loop:
        the_pool.register(registered.registration(), 0.0)
        the_pool.add_static(static.address, 0.0)
        await loop.check_all()
        assert state(the_pool, static.address) == "healthy"
        registered.down()
        static.down()
        for _ in range(9):
            await loop.check_all()
        assert state(the_pool, "node-a") == "unhealthy"
        await loop.check_all()
        assert state(the_pool, "node-a") == "gone"
        for _ in range(5):
            await loop.check_all()
        assert state(the_pool, static.address) == "unhealthy"
        [entry] = the_pool.describe(1.0)
        assert entry["consecutive_failures"] == 15
        assert entry["last_failure"] == "connect refused"

        await static.up()  # the same port again
        await loop.check_all()
        await loop.check_all()
        assert state(the_pool, static.address) == "healthy"


async def test_a_registered_proxy_is_a_peer_never_checked_nor_in_rotation(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="inferno_proxy.health")
    backend, proxy = StandIn(), StandIn()
    the_pool = pool(failure_threshold=1, removal_threshold=2)
    reporter = ChangeReporter(the_pool, Registry())
    async with running(backend, proxy), health_loop(the_pool, reporter=reporter) as loop:
        reporter.report(the_pool.register(backend.registration(), 0.0))
        peer = Registration(
            id="proxy-2", address=proxy.address, metrics_port=proxy.ops_port, node_type="proxy"
        )
        reporter.report(the_pool.register(peer, 0.0))
        for _ in range(3):
            await loop.check_all()
    assert backend.paths == ["/metrics"] * 3
    assert proxy.paths == []  # a peer is not a backend: nothing to check
    assert [p.id for p in the_pool.peers()] == ["node-a", "proxy-2"]
    assert the_pool.get("proxy-2") is None
    assert [d["id"] for d in the_pool.describe(1.0)] == ["node-a"]
    told = [m for m in caplog.messages if m.startswith("node proxy-2")]
    assert told == [f"node proxy-2 added (peer) at {proxy.address}"]


async def test_static_backends_are_checked_with_the_static_checker() -> None:
    static, registered = StandIn(health_status=200), StandIn()
    the_pool = pool()
    async with running(static, registered), health_loop(the_pool) as loop:
        the_pool.add_static(static.address, 0.0)
        the_pool.register(registered.registration(), 0.0)
        assert state(the_pool, static.address) == "unknown"
        await loop.check_all()
        assert state(the_pool, static.address) == "healthy"  # one pass: it joins
        # http checker, never the vitals; then its model list (a 404 here: none)
        assert static.paths == ["/health", "/v1/models"]
        assert registered.paths == ["/metrics"]  # a registered node is never asked
        static.health_status = 503
        for _ in range(3):
            await loop.check_all()
        assert state(the_pool, static.address) == "unhealthy"
        found = the_pool.get(static.address)
        assert found is not None
        assert found.health.last_failure == "HTTP 503"


async def test_a_result_for_a_node_that_moved_meanwhile_is_dropped() -> None:
    old, new = StandIn(mode="error", hold=anyio.Event()), StandIn()
    the_pool = pool(failure_threshold=1)
    async with running(old, new), health_loop(the_pool) as loop, anyio.create_task_group() as tg:
        the_pool.register(old.registration(), 0.0)
        tg.start_soon(loop.check_all)
        with anyio.fail_after(WAIT):
            await old.held.wait()  # the check is in flight at the old address
        the_pool.register(new.registration(), 1.0)  # the node restarted elsewhere
        assert old.hold is not None
        old.hold.set()  # the old address now answers 500
    assert state(the_pool, "node-a") == "healthy"
    found = the_pool.get("node-a")
    assert found is not None
    assert found.health.consecutive_failures == 0


class BrokenChecker:
    """A plugin's checker with a bug: it raises instead of returning a result."""

    name = "broken"

    async def check(self, target: CheckTarget, *, timeout: float) -> CheckResult:  # noqa: ASYNC109
        raise RuntimeError("bug in a plugin")

    async def aclose(self) -> None:
        pass


async def test_a_checker_that_raises_counts_as_a_failed_check(
    caplog: pytest.LogCaptureFixture,
) -> None:
    the_pool = pool(failure_threshold=1)
    the_pool.register(
        Registration(id="n", address="127.0.0.1:1", metrics_port=1, node_type="backend"), 0.0
    )
    loop = HealthLoop(the_pool, checker=BrokenChecker(), interval=60.0, timeout=TIMEOUT)
    await loop.check_all()
    assert state(the_pool, "n") == "unhealthy"
    found = the_pool.get("n")
    assert found is not None
    assert found.health.last_failure == "checker error: RuntimeError"
    assert "health checker 'broken' failed on node n" in caplog.text


# --- what changes are told ---------------------------------------------------------------------


async def test_changes_are_logged_counted_and_told_to_the_data_path(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="inferno_proxy.health")
    node = StandIn(mode="error")
    the_pool = pool(failure_threshold=3)
    registry = Registry()
    told: list[int] = []
    reporter = ChangeReporter(the_pool, registry, on_change=lambda: told.append(1))
    async with running(node), health_loop(the_pool, registry=registry, reporter=reporter) as loop:
        the_pool.register(node.registration(), 0.0)
        for _ in range(3):
            await loop.check_all()
    assert "node node-a unhealthy: 3 consecutive failures (HTTP 500)" in caplog.messages
    assert "node node-a out of rotation (failed_checks)" in caplog.messages
    assert told == [1]  # one batch: the third check's
    text = registry.render_prometheus()
    assert 'inferno_proxy_node_changes_total{kind="health",state="unhealthy"} 1' in text
    assert 'inferno_proxy_health_checks_total{checker="vitals",result="fail"} 3' in text


def test_a_deregistered_node_leaves_at_info_a_failed_one_with_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="inferno_proxy.health")
    the_pool = pool(failure_threshold=3, removal_threshold=4)
    registry = Registry()
    reporter = ChangeReporter(the_pool, registry)
    for name in ("leaving", "failing"):
        the_pool.register(
            Registration(id=name, address="127.0.0.1:1", metrics_port=1, node_type="backend"),
            0.0,
        )
    reporter.report(the_pool.deregister("leaving", 1.0))
    for second in range(4):
        reporter.report(the_pool.check_failed("failing", 2.0 + second, "connect refused"))
    assert "failing" not in the_pool
    leaving = [r for r in caplog.records if r.getMessage().startswith("node leaving removed")]
    assert [(r.levelname, r.getMessage()) for r in leaving] == [
        ("INFO", "node leaving removed: deregistered")
    ]
    failing = [r for r in caplog.records if r.getMessage().startswith("node failing removed")]
    assert [(r.levelname, r.getMessage()) for r in failing] == [
        ("WARNING", "node failing removed: 4 consecutive failures, last: connect refused")
    ]
    assert [r.levelname for r in caplog.records].count("WARNING") == 1
    text = registry.render_prometheus()
    assert 'inferno_proxy_node_changes_total{kind="health",state="removed"} 1' in text


@pytest.mark.parametrize(
    ("change", "text"),
    [
        (
            NodeChange("a", ChangeKind.ADDED, "", "h:1", 0.0, "static"),
            "node a added (static) at h:1",
        ),
        (NodeChange("a", ChangeKind.REMOVED, "h:1", "", 0.0, "drained"), "node a removed: drained"),
        (
            NodeChange("a", ChangeKind.DRAINING, "", "draining", 0.0),
            "node a deregistered: draining",
        ),
        (NodeChange("a", ChangeKind.ROTATION, "out", "in", 0.0), "node a in rotation"),
        (NodeChange("a", ChangeKind.UPDATED, "h:1", "h:1", 0.0), "node a updated its registration"),
        (NodeChange("a", ChangeKind.UPDATED, "h:1", "h:2", 0.0), "node a updated: h:1 -> h:2"),
        (
            NodeChange("a", ChangeKind.CIRCUIT, "closed", "open", 0.0, "5 failures"),
            "node a circuit open: 5 failures",
        ),
        (
            NodeChange("a", ChangeKind.HEALTH, "healthy", "not_ready", 0.0, "ready=false"),
            "node a not ready: ready=false",
        ),
        (
            NodeChange("a", ChangeKind.STALL, "flowing", "stalled", 0.0, "no byte for 30s"),
            "node a stalled: no byte for 30s",
        ),
    ],
)
def test_each_kind_of_change_reads_as_one_line(change: NodeChange, text: str) -> None:
    assert describe_change(change) == text


# --- the free-running loop -----------------------------------------------------------------------


async def test_the_loop_checks_every_interval_and_ticks_the_pool() -> None:
    node = StandIn()
    the_pool = Pool(
        PoolSettings(
            health=HealthSettings(failure_threshold=2),
            circuit=CircuitSettings(failure_threshold=1, base_cooldown=0.05, max_cooldown=1.0),
            slow_start=0.0,
        )
    )
    told: list[int] = []
    reporter = ChangeReporter(the_pool, Registry(), on_change=lambda: told.append(1))
    async with (
        running(node),
        health_loop(the_pool, interval=0.05, tick_interval=0.02, reporter=reporter) as loop,
        anyio.create_task_group() as tg,
    ):
        the_pool.register(node.registration(), 0.0)
        await tg.start(loop.run)
        await loop.wait_round()
        node.mode = "error"
        await eventually(lambda: state(the_pool, "node-a") == "unhealthy")
        node.mode = "valid"
        await eventually(lambda: state(the_pool, "node-a") == "healthy")

        found = the_pool.get("node-a")
        assert found is not None
        lease = the_pool.start(found, loop.clock())
        reporter.report(the_pool.finish(lease, Outcome.SERVER_ERROR, loop.clock()))
        assert found.circuit.state.value == "open"
        await eventually(lambda: found.circuit.state.value == "half_open")  # only a tick does it
        tg.cancel_scope.cancel()
    assert loop.rounds >= 4
    assert told


def test_intervals_must_be_positive() -> None:
    with pytest.raises(ValueError, match="interval must be > 0"):
        HealthLoop(Pool(), checker=BrokenChecker(), interval=0.0, timeout=1.0)
