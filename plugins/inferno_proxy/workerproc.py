"""A worker process of ``--workers N``: the data path on a copy of the parent's pool.

Started by :class:`~inferno_proxy.workers.Supervisor` as
``python -c WORKER_BOOT <parent pid> <channel fd> <index> <uvloop>``::

    die with the parent -> boot frame (settings, logging) -> first snapshot applied
    -> listen on the service port with SO_REUSEPORT -> "listening"
    -> serve; apply "state"/"peers", "reload" from the parent; report traffic
    -> SIGTERM (or the channel closing): stop accepting, drain, final report, exit 0

It takes no decision about nodes (see :mod:`inferno_proxy.replica`): its
pool changes only when the parent says so, and what its requests saw goes
back in reports, at once after a failure or a probe, else every
:data:`REPORT_INTERVAL`.  It ignores SIGHUP (the parent forwards reloads over
the channel) and runs in its own session, so a terminal's Ctrl-C reaches only
the parent, which stops the workers once.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import sys
import time
from typing import Final

import anyio
import anyio.abc

from inferno.errors import InfernoError
from inferno.http import serve, server_ssl_context
from inferno.http.client import HTTPClient
from inferno.lifecycle import RoleContext, role_sections
from inferno.metrics import Registry
from inferno.plugins import collect_named, get_plugin_manager
from inferno_proxy.auth import ApiKeyFileError, ApiKeys, RateLimits, Spending
from inferno_proxy.budget import RetryBudget
from inferno_proxy.forward import ServiceApp
from inferno_proxy.policies import RoutingPolicy
from inferno_proxy.replica import ReplicaPool
from inferno_proxy.settings import ProxySettings
from inferno_proxy.workerwire import Channel, ChannelClosed, WorkerBoot

__all__ = ["METRICS_INTERVAL", "REPORT_INTERVAL", "WORKER_HEADER", "worker_main"]

logger = logging.getLogger("inferno_proxy.worker")

#: Seconds between two reports of in-flight counts and successes (failures go at once).
REPORT_INTERVAL: Final = 0.1
#: Seconds between two metrics snapshots sent for ``/telemetry`` and the vitals.
METRICS_INTERVAL: Final = 1.0
#: The debug header naming the worker that answered (``proxy.worker_header``).
WORKER_HEADER: Final = "x-inferno-worker"
#: Exit status of a worker that could not start (the parent reports its message).
EXIT_FAILED: Final = 1
#: Seconds a stopped worker spends sending its last report and metrics.
FINAL_REPORT_GRACE: Final = 1.0
_PR_SET_PDEATHSIG: Final = 1  # from <linux/prctl.h>
# The same connection pool sizes as a single-process proxy (see inferno_proxy.role).
_UPSTREAM_CONNECTIONS_PER_NODE: Final = 1024
_UPSTREAM_IDLE_TIMEOUT: Final = 30.0


def worker_main() -> None:
    """Entry of a worker process (``sys.argv``: ``-c``, parent pid, fd, index, uvloop)."""
    parent, fd, index, uvloop = (int(arg) for arg in sys.argv[1:5])
    _die_with_parent(parent)
    sock = socket.socket(fileno=fd)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    status = anyio.run(
        _worker, sock, index, backend="asyncio", backend_options={"use_uvloop": bool(uvloop)}
    )
    logging.shutdown()
    sys.exit(status)


def _die_with_parent(parent: int) -> None:
    """Have Linux SIGKILL this process when the parent dies; exit now if it already has."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):  # no libc symbols: the channel's end still stops us
            pass
    if os.getppid() != parent:
        sys.exit(EXIT_FAILED)


async def _worker(sock: socket.socket, index: int) -> int:
    channel = await Channel.open(sock)
    first = await channel.receive()
    if first is None or first[0] != "boot" or not isinstance(first[1], WorkerBoot):
        return EXIT_FAILED
    boot: WorkerBoot = first[1]
    _setup_logging(boot, index)
    try:
        worker = _build(boot)
    except (InfernoError, OSError, ValueError) as exc:
        channel.send(("failed", f"proxy worker {index}: {exc}"))
        await channel.flush()
        return EXIT_FAILED
    return await worker.run(channel, index)


def _setup_logging(boot: WorkerBoot, index: int) -> None:
    from inferno.logs import setup_logging

    setup_logging(boot.log_level, boot.log_format)

    def tag(record: logging.LogRecord) -> bool:
        record.worker = index
        return True

    for handler in logging.getLogger().handlers:
        handler.addFilter(tag)


def _build(boot: WorkerBoot) -> _Worker:
    from inferno.config import Config
    from inferno_proxy.plugin import PROXY_ROLE

    plugins = get_plugin_manager()
    config = Config(role_sections(PROXY_ROLE), boot.values, boot.sources, role=PROXY_ROLE.name)
    settings = dataclasses.replace(
        ProxySettings.from_section(config.section("proxy")), port=boot.port
    )
    ctx = RoleContext(
        role=PROXY_ROLE,
        config=config,
        plugins=plugins,
        stopping=anyio.Event(),
        shutdown_timeout=boot.drain_budget,
        metrics=Registry(),
    )
    policy: RoutingPolicy = collect_named(plugins, "inferno_routing_policies")[
        settings.policy
    ].factory(ctx)
    return _Worker(boot, settings, ctx, policy)


class _Worker:
    """One worker's data path and its conversation with the parent."""

    def __init__(
        self, boot: WorkerBoot, settings: ProxySettings, ctx: RoleContext, policy: RoutingPolicy
    ) -> None:
        self.boot = boot
        self.settings = settings
        self.ctx = ctx
        self.policy = policy
        self.urgent = anyio.Event()
        self.depths_sent: dict[str | None, int] = {}  # the queue depths the parent knows
        self.pool = ReplicaPool(settings.pool_settings(), on_urgent=self._wake)
        self.ssl_context = (
            None
            if settings.tls_cert is None
            else server_ssl_context(settings.tls_cert, settings.tls_key)
        )
        self.api_keys = None if settings.api_keys is None else ApiKeys.from_file(settings.api_keys)

    def _wake(self) -> None:
        self.urgent.set()

    async def run(self, channel: Channel, index: int) -> int:
        first = await channel.receive()
        if first is None or first[0] != "state":
            return EXIT_FAILED
        self.pool.apply(first[1], first[2], full=True)
        channel.send(("applied", first[4]))
        settings = self.settings
        forward = settings.forward_settings()
        if self.boot.worker_header:
            headers = (*forward.security_headers, (WORKER_HEADER, str(os.getpid())))
            forward = dataclasses.replace(forward, security_headers=headers)
        async with HTTPClient(
            max_connections_per_origin=_UPSTREAM_CONNECTIONS_PER_NODE,
            idle_timeout=_UPSTREAM_IDLE_TIMEOUT,
        ) as client:
            app = ServiceApp(
                self.pool,
                self.policy,
                client,
                RetryBudget(ratio=settings.retry_ratio),
                forward,
                self.ctx.metrics,
                api_keys=self.api_keys,
                rate_limits=RateLimits.build(
                    per_key=settings.rate_limit_per_key,
                    per_ip=settings.rate_limit_per_ip,
                    burst=settings.rate_limit_burst,
                    shared=True,
                ),
            )
            return await self._serve(app, channel, index)

    async def _serve(self, app: ServiceApp, channel: Channel, index: int) -> int:
        stopping, service_stop, served = self.ctx.stopping, anyio.Event(), anyio.Event()
        settings = self.settings

        async def run_service(*, task_status: anyio.abc.TaskStatus[object]) -> None:
            try:
                await serve(
                    app.handle,
                    host=settings.host,
                    port=settings.port,
                    limits=settings.server_limits(),
                    ssl_context=self.ssl_context,
                    shutdown=service_stop,
                    shutdown_timeout=self.boot.drain_budget,
                    name=f"proxy-worker-{index}",
                    reuse_port=True,
                    task_status=task_status,
                )
            finally:
                served.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(self._watch_signals, stopping)
            tg.start_soon(self._listen_to_parent, channel, app, stopping)
            try:
                await tg.start(run_service)
            except OSError as exc:
                where = f"{settings.host}:{settings.port}"
                why = exc.strerror or str(exc)
                channel.send(("failed", f"cannot listen on {where} (proxy.port): {why}"))
                await channel.flush()
                tg.cancel_scope.cancel()
                return EXIT_FAILED
            try:
                channel.send(("listening", os.getpid()))
                tg.start_soon(self._report_forever, channel, app)
                await stopping.wait()
                service_stop.set()
                await served.wait()
                with anyio.CancelScope(shield=True), anyio.move_on_after(FINAL_REPORT_GRACE):
                    self._report(channel, app, metrics=True)
                    await channel.flush()
            except ChannelClosed:
                pass  # the parent is gone; nothing to tell
            tg.cancel_scope.cancel()
        return 0

    async def _watch_signals(self, stopping: anyio.Event) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as received:
            async for signum in received:
                if stopping.is_set():
                    logging.shutdown()
                    os._exit(128 + int(signum))  # a second signal: no waiting
                logger.debug("worker %s received: draining", signal.Signals(signum).name)
                stopping.set()

    async def _listen_to_parent(
        self, channel: Channel, app: ServiceApp, stopping: anyio.Event
    ) -> None:
        own: Spending | None = None
        while (message := await channel.receive()) is not None:
            kind = message[0]
            if kind == "state":
                self.pool.apply(message[1], message[2], full=message[3])
                app.pool_changed()
                channel.send(("applied", message[4]))
            elif kind == "peers":
                self.pool.set_peer_load(message[1])
                app.queue.peer_depths = message[2]
                own = message[3]  # this worker's part of the charge that follows
            elif kind == "charge":
                if app.rate_limits is not None:
                    app.rate_limits.charge(message[1].minus(own), app.clock())
                own = None
            elif kind == "metrics?":
                channel.send(("metrics", self.ctx.metrics.snapshot(), message[1]))
            elif kind == "reload":
                self._reload_api_keys(app)
        stopping.set()  # the parent is gone: nobody keeps our pool true any more

    def _reload_api_keys(self, app: ServiceApp) -> None:
        path = self.settings.api_keys
        if path is None:
            return
        try:
            app.api_keys = ApiKeys.from_file(path)
        except ApiKeyFileError as exc:
            logger.error("API keys not reloaded, the previous ones stay: %s", exc)
            return
        logger.info("API keys reloaded: %d key(s)", len(app.api_keys))

    async def _report_forever(self, channel: Channel, app: ServiceApp) -> None:
        next_metrics = time.monotonic() + METRICS_INTERVAL
        while True:
            with anyio.move_on_after(REPORT_INTERVAL):
                await self.urgent.wait()
            self.urgent = anyio.Event()
            due = time.monotonic() >= next_metrics
            if due:
                next_metrics += METRICS_INTERVAL
            self._report(channel, app, metrics=due)
            await channel.flush()

    def _report(self, channel: Channel, app: ServiceApp, *, metrics: bool) -> None:
        report = self.pool.take_report((app.in_flight(), app.queue.total()))
        if report is not None:
            channel.send(("report", report))
        depths = app.queue.depths()
        changed = depths if depths != self.depths_sent else None
        spent = None if app.rate_limits is None else app.rate_limits.take_spent()
        if changed is not None or spent is not None:
            self.depths_sent = depths
            channel.send(("limits", changed, spent))
        if metrics:
            channel.send(("metrics", self.ctx.metrics.snapshot()))
