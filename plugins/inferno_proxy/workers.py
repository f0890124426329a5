"""``--workers N``: the service port served by N processes, one pool kept by the parent.

The process the CLI started (the *parent*) keeps the operations port, the
health loop and the authoritative pool, and serves no client request.  It
reserves the service port, then starts N worker processes
(:mod:`inferno_proxy.workerproc`), each running the data path
(:class:`~inferno_proxy.forward.ServiceApp`) on a
:class:`~inferno_proxy.replica.ReplicaPool` and listening on the same port
with ``SO_REUSEPORT``, so the kernel spreads connections over them::

    parent: reserve port (bound, not listening) -> spawn workers -> each: boot, snapshot,
            listen -> "listening" -> log "proxy listening on ..." -> stop: SIGTERM each,
            wait for their drain -> close the reservation

**The port.**  ``--port 0`` must pick one port for all: the parent binds a
socket with ``SO_REUSEPORT`` and keeps it, bound but never listening, for its
whole life.  Linux puts only *listening* sockets in a port's reuse group, so
the reservation receives no connection, while no other program can take the
port from a worker that restarts.

**The channel.**  One Unix socketpair per worker carries pickled frames
(:mod:`inferno_proxy.workerwire`).  Parent to worker: the boot frame, pool snapshots and deltas
the moment the pool changes (:class:`~inferno_proxy.replica.StatePublisher`),
the other workers' in-flight counts every :data:`LOAD_INTERVAL`, ``reload``
on SIGHUP.  Worker to parent: ``listening``, reports of its traffic (at once
after a failure, else every :data:`~inferno_proxy.workerproc.REPORT_INTERVAL`)
and its metrics every :data:`~inferno_proxy.workerproc.METRICS_INTERVAL`.

**Crashes.**  A worker that dies is restarted after a short backoff; its
requests in flight are forgotten with it.  A worker that cannot start (a port
it cannot bind), or more than :data:`MAX_RESTARTS` deaths within
:data:`RESTART_WINDOW`, fails the proxy (exit non-zero): a proxy that keeps
crashing is better replaced by its supervisor than left limping.

**Per proxy, not per worker.**  Rate limits (per key, per address) and the
wait queue's bound hold for the proxy as a whole: each worker reports what
its limiters allowed and what it holds waiting, and the parent hands each
the others' figures with their in-flight counts
(:mod:`inferno_proxy.sharedlimits`).  The retry budget, a share of traffic,
stays each worker's own.  Connections the kernel queued on a worker that
dies are reset with its socket (Linux moves them to another listener only
with the ``net.ipv4.tcp_migrate_req`` sysctl).

**Stopping.**  The parent's stop signal becomes SIGTERM to each worker, which
drains like a single-process proxy; a worker still running
:data:`EXIT_GRACE` after the drain budget is killed.  Workers run in their own
session (a terminal's Ctrl-C reaches the parent alone, which stops them once),
ask Linux to kill them when the parent dies, and stop when their channel
closes, so none outlives it.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import pickle
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import anyio
import anyio.abc

from inferno.http import ServerInfo
from inferno_proxy.healthloop import ChangeReporter, HealthLoop
from inferno_proxy.ops import ServiceLoad
from inferno_proxy.pool import Pool
from inferno_proxy.replica import Report, StatePublisher, TrafficLedger
from inferno_proxy.sharedlimits import LimitLedger
from inferno_proxy.workermetrics import count_backoff
from inferno_proxy.workerspawn import (
    WorkerFailed,
    describe_exit,
    end_process,
    reserve_port,
    signal_process,
    worker_command,
)
from inferno_proxy.workerwire import Channel, ChannelClosed, WorkerBoot, frame

__all__ = ["Supervisor"]

logger = logging.getLogger("inferno_proxy.workers")

#: Seconds between two sends of the other workers' in-flight counts.
LOAD_INTERVAL: Final = 0.1
#: Seconds between two pool deltas without a change to announce (vitals refreshed).
RESYNC_INTERVAL: Final = 1.0
#: Longest an operations-port registration waits for the workers to apply it (seconds).
SYNC_TIMEOUT: Final = 2.0
#: Longest ``/telemetry`` or ``/metrics`` waits for the workers' current metrics (seconds);
#: past it, a worker's latest periodic snapshot is used.
METRICS_TIMEOUT: Final = 0.5
#: Seconds a burst of changes is gathered into one delta.
PUBLISH_GAP: Final = 0.005
#: Seconds a worker has to start listening before it counts as failed.
START_TIMEOUT: Final = 60.0
#: Deaths of one worker within RESTART_WINDOW seconds that fail the proxy.
MAX_RESTARTS: Final = 5
RESTART_WINDOW: Final = 60.0
#: First wait before restarting a worker, doubled on each death in the window (seconds).
RESTART_BACKOFF: Final = 0.2
#: Seconds a worker may run past its drain budget before it is killed.
EXIT_GRACE: Final = 1.0


# --- the parent's side -------------------------------------------------------------------------


@dataclass(eq=False)
class _Worker:
    index: int
    process: anyio.abc.Process
    channel: Channel
    ready: anyio.Event  # it listens
    settled: anyio.Event = dataclasses.field(default_factory=anyio.Event)  # listens, or never will
    failure: str = ""
    metrics: dict[str, Any] | None = None
    applied: int = 0  # the latest pool version it acknowledged
    answered: int = 0  # the latest request for metrics it answered
    #: The others' in-flight counts and queue depths last sent to it.
    peers_sent: tuple[dict[str, int], dict[str | None, int]] | None = None


class Supervisor:
    """Starts, feeds and restarts the workers (see the module docstring).

    :param count: workers to run.
    :param boot: what each worker boots with (its ``port`` is set here).
    :param host: the service port's address.
    :param port: its port (0: any free one).
    :param pool: :param reporter: the authoritative pool and its change reporter.
    :param uvloop: whether workers run uvloop.
    :param clock: monotonic seconds.
    """

    def __init__(
        self,
        count: int,
        boot: WorkerBoot,
        *,
        host: str,
        port: int,
        pool: Pool,
        reporter: ChangeReporter,
        uvloop: bool = False,
        scheme: str = "http",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.count = count
        self.boot = boot
        self.host = host
        self.port = port
        self.scheme = scheme
        self.pool = pool
        self.reporter = reporter
        self.uvloop = uvloop
        self.clock = clock
        self.publisher = StatePublisher(pool)
        self.ledger = TrafficLedger(pool)
        self.limits = LimitLedger()
        self.workers: dict[int, _Worker] = {}
        self._dirty = anyio.Event()
        self._acked = anyio.Event()  # set (and replaced) on each acknowledgement or answer
        self._asked = 0  # requests for metrics sent
        self._version = 0  # of the pool state sent to the workers
        self._stopping = False

    # --- what the control plane calls -------------------------------------------------------

    def pool_changed(self) -> None:
        """The pool changed: publish a delta to every worker (now, bursts gathered)."""
        self._dirty.set()

    def reload(self) -> None:
        """SIGHUP: every worker reads its reloadable files (API keys) again."""
        self._broadcast(("reload",))

    def stopping(self) -> bool:
        """Whether the proxy is stopping (workers that exit now are not restarted)."""
        return self._stopping

    def pids(self) -> dict[int, int]:
        """``worker index -> pid`` of the workers running now."""
        return {i: w.process.pid for i, w in self.workers.items() if w.process.returncode is None}

    def load(self) -> ServiceLoad:
        """The data path's figures, all workers together, for the proxy's vitals."""
        in_flight, queued = self.ledger.load()
        failed = backoff = 0
        for worker in self.workers.values():
            if worker.metrics is not None:
                f, b = count_backoff(worker.metrics)
                failed, backoff = failed + f, backoff + b
        return ServiceLoad(in_flight, queued, failed, backoff)

    def worker_metrics(self) -> dict[int, dict[str, Any]]:
        """Each worker's latest metrics snapshot."""
        return {i: w.metrics for i, w in sorted(self.workers.items()) if w.metrics is not None}

    # --- running ----------------------------------------------------------------------------

    async def run(
        self,
        stop: anyio.Event,
        health: HealthLoop | None = None,
        *,
        task_status: anyio.abc.TaskStatus[ServerInfo] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run the workers until *stop* is set and they have drained.

        :raises OSError: when the port cannot be reserved.
        :raises WorkerFailed: when a worker cannot start or keeps dying.
        """
        reserved = reserve_port(self.host, self.port)
        try:
            port = reserved[0].getsockname()[1]
            async with anyio.create_task_group() as loops:
                loops.start_soon(self._publish_forever)
                loops.start_soon(self._send_loads_forever)
                if health is not None:
                    loops.start_soon(self._publish_after_rounds, health)
                async with anyio.create_task_group() as keepers:
                    listening = [anyio.Event() for _ in range(self.count)]
                    for index, event in enumerate(listening):
                        keepers.start_soon(self._keep, index, port, event)
                    for event in listening:  # all start at once; a failure cancels the wait
                        await event.wait()
                    task_status.started(ServerInfo(self.host, port, self.scheme, "proxy"))
                    await stop.wait()
                    self._stopping = True
                    for worker in list(self.workers.values()):
                        signal_process(worker.process, signal.SIGTERM)
                loops.cancel_scope.cancel()
        finally:
            for sock in reserved:
                sock.close()

    async def _keep(self, index: int, port: int, listening: anyio.Event) -> None:
        """Run worker *index*, restarting it when it dies, until the proxy stops."""
        deaths: collections.deque[float] = collections.deque()
        started = False
        while not self.stopping():
            status, failure, ready = await self._run_one(index, port, listening)
            started = started or ready
            if self.stopping():
                level = logging.INFO if status == 0 else logging.WARNING
                logger.log(level, "proxy worker %d exited (%s)", index, describe_exit(status))
                return
            if not started:
                raise WorkerFailed(failure or f"proxy worker {index} {describe_exit(status)}")
            now = time.monotonic()
            deaths.append(now)
            while deaths and deaths[0] < now - RESTART_WINDOW:
                deaths.popleft()
            if len(deaths) > MAX_RESTARTS:
                raise WorkerFailed(
                    f"proxy worker {index} died {len(deaths)} times within "
                    f"{RESTART_WINDOW:g}s, last {describe_exit(status)}: giving up"
                )
            backoff = RESTART_BACKOFF * 2 ** (len(deaths) - 1)
            logger.error(
                "proxy worker %d %s; restarting in %gs", index, describe_exit(status), backoff
            )
            await anyio.sleep(backoff)

    async def _run_one(
        self, index: int, port: int, listening: anyio.Event
    ) -> tuple[int, str, bool]:
        """One life of worker *index*: ``(exit status, why it failed, whether it listened)``."""
        parent_end, child_end = socket.socketpair()
        try:
            command = worker_command(index, child_end.fileno(), self.uvloop)
            process = await anyio.open_process(
                command,
                stdin=subprocess.DEVNULL,
                stdout=None,
                stderr=None,
                pass_fds=(child_end.fileno(),),
                start_new_session=True,
            )
        except BaseException:
            parent_end.close()
            raise
        finally:
            child_end.close()
        channel = await Channel.open(parent_end)
        worker = _Worker(index, process, channel, anyio.Event())
        self.workers[index] = worker
        boot = dataclasses.replace(self.boot, port=port)
        try:
            channel.send(("boot", boot))
            channel.send(("state", self.publisher.snapshot(), [], True, self._version))
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._pump, worker)
                with anyio.move_on_after(START_TIMEOUT):
                    await worker.settled.wait()
                if worker.ready.is_set():
                    logger.debug("proxy worker %d listening (pid %d)", index, process.pid)
                    listening.set()
                elif not worker.settled.is_set():
                    worker.failure = f"proxy worker {index} did not listen within {START_TIMEOUT}s"
                    signal_process(process, signal.SIGKILL)
            status = await process.wait()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await end_process(process, EXIT_GRACE)
            raise
        finally:
            channel.close()
            if self.workers.get(index) is worker:
                del self.workers[index]
            self.reporter.report(self.ledger.forget(index, self.clock()))
            self.limits.forget(index)
        return status, worker.failure, worker.ready.is_set()

    async def _pump(self, worker: _Worker) -> None:
        """Read one worker's messages until its channel closes."""
        try:
            while (message := await worker.channel.receive()) is not None:
                self._take(worker, message)
        except (ValueError, pickle.UnpicklingError) as exc:
            logger.error("proxy worker %d sent a bad message: %s", worker.index, exc)
            signal_process(worker.process, signal.SIGKILL)
        finally:
            worker.settled.set()  # it will never listen now

    def _take(self, worker: _Worker, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "report" and isinstance(message[1], Report):
            report: Report = message[1]
            changes = self.ledger.apply(worker.index, report, self.clock())
            self.reporter.report(changes)  # logs, counts, and (any change) publishes
            if report.probes or report.outcomes or report.probe_ends:
                self.pool_changed()  # probe slots and streaks move without a change
        elif kind == "limits" and len(message) == 3:
            self.limits.report(worker.index, message[1], message[2])
        elif kind == "applied" and isinstance(message[1], int):
            worker.applied = message[1]
            self._acked.set()
            self._acked = anyio.Event()
        elif kind == "metrics" and isinstance(message[1], dict):
            worker.metrics = message[1]
            if len(message) > 2 and isinstance(message[2], int):  # an answer to fresh_metrics
                worker.answered = message[2]
                self._acked.set()
                self._acked = anyio.Event()
        elif kind == "listening":
            worker.ready.set()
            worker.settled.set()
        elif kind == "failed":
            worker.failure = str(message[1])
            worker.settled.set()
        else:
            logger.warning("proxy worker %d sent unknown message %r", worker.index, kind)

    # --- telling the workers ----------------------------------------------------------------

    def _broadcast(self, message: tuple[Any, ...]) -> None:
        for worker in list(self.workers.values()):
            self._send(worker, message)

    def _send(self, worker: _Worker, message: tuple[Any, ...]) -> None:
        self._send_frame(worker, frame(message))

    def _send_frame(self, worker: _Worker, data: bytes) -> None:
        try:
            worker.channel.send_frame(data)
        except ChannelClosed as exc:
            if worker.process.returncode is None and not self._stopping:
                logger.error("proxy worker %d does not read its channel (%s): killing it",
                             worker.index, exc)  # fmt: skip
                signal_process(worker.process, signal.SIGKILL)

    def _publish(self, *, always: bool = False) -> int:
        """Send the pool's delta to every worker (*always*: even an empty one); its version."""
        changed, removed = self.publisher.delta()
        if changed or removed or always:
            self._version += 1
            self._broadcast(("state", changed, removed, False, self._version))
        return self._version

    async def sync(self) -> None:
        """Publish now, and wait (at most :data:`SYNC_TIMEOUT`) until every listening
        worker applied it.

        The operations port calls it before answering ``/register`` and
        ``/deregister``: once a node has its answer, every worker routes to it
        (or has stopped).  Frames arrive in order, so an acknowledged version
        covers every earlier change too.
        """
        version = self._publish(always=True)
        with anyio.move_on_after(SYNC_TIMEOUT):
            await self._until(lambda w: w.applied >= version)
            return
        logger.warning("workers did not apply pool version %d within %gs", version, SYNC_TIMEOUT)

    async def fresh_metrics(self) -> None:
        """Have every listening worker send its metrics now, and wait (at most
        :data:`METRICS_TIMEOUT`) for them.

        The operations port calls it before ``/telemetry`` and ``/metrics``, so
        they count every request whose client has its answer, rather than what
        the workers' last periodic snapshots held.
        """
        self._asked += 1
        asked = self._asked
        self._broadcast(("metrics?", asked))
        with anyio.move_on_after(METRICS_TIMEOUT):
            await self._until(lambda w: w.answered >= asked)

    async def _until(self, done: Callable[[_Worker], bool]) -> None:
        """Wait until *done* holds for every worker that listens and runs."""
        while True:
            acked = self._acked
            if all(
                done(w) or not w.ready.is_set() or w.process.returncode is not None
                for w in self.workers.values()
            ):
                return
            await acked.wait()

    async def _publish_forever(self) -> None:
        while True:
            with anyio.move_on_after(RESYNC_INTERVAL):
                await self._dirty.wait()
            # A change no record shows (a failure streak that ended, a round of
            # checks) still wakes the workers' waiting requests: publish, even empty.
            told = self._dirty.is_set()
            self._dirty = anyio.Event()
            self._publish(always=told)
            await anyio.sleep(PUBLISH_GAP)

    async def _publish_after_rounds(self, health: HealthLoop) -> None:
        """Vitals (queue depths, models) arrive with checks that change no state."""
        while True:
            await health.wait_round()
            self.pool_changed()

    async def _send_loads_forever(self) -> None:
        while True:
            await anyio.sleep(LOAD_INTERVAL)
            total, own = self.limits.hand_out()
            charge = None if total is None else frame(("charge", total))  # pickled once
            for worker in list(self.workers.values()):
                index = worker.index
                figures = (self.ledger.others(index), self.limits.others_depths(index))
                if figures != worker.peers_sent or charge is not None:
                    worker.peers_sent = figures
                    self._send(worker, ("peers", *figures, own.get(index)))
                if charge is not None:
                    self._send_frame(worker, charge)
