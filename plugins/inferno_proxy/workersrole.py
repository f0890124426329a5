"""The role's entry for a proxy whose service port several worker processes serve.

:func:`serve_workers` is what :func:`inferno_proxy.role.run` calls instead of
:func:`~inferno_proxy.role.serve_proxy` when more than one worker is asked
for: the same control plane (operations port, health loop, one pool) in this
process, with a :class:`~inferno_proxy.workers.Supervisor` running the data
path in the workers (see :mod:`inferno_proxy.workers`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import anyio
import anyio.abc

from inferno.config import Config
from inferno.errors import InfernoError, find_exception
from inferno.http import ServerInfo
from inferno.logs import LEVELS, JSONFormatter
from inferno.metrics import Registry
from inferno.protocol import format_address
from inferno_proxy.healthloop import ChangeReporter
from inferno_proxy.pool import Pool
from inferno_proxy.role import (
    STOP_RESERVE,
    ListenError,
    ProxyParts,
    close_parts,
    control_plane,
    serve_ports,
)
from inferno_proxy.settings import ProxySettings
from inferno_proxy.staticnodes import add_static_backends
from inferno_proxy.workermetrics import WorkersOpsApp
from inferno_proxy.workers import Supervisor
from inferno_proxy.workerwire import WorkerBoot

__all__ = ["WorkersInfo", "make_boot", "serve_workers"]

logger = logging.getLogger("inferno_proxy.workers")


@dataclass(frozen=True, slots=True)
class WorkersInfo:
    """Where a started multi-process proxy listens, and what runs it."""

    service: ServerInfo
    ops: ServerInfo
    ops_app: WorkersOpsApp
    supervisor: Supervisor


def make_boot(config: Config, drain_budget: float) -> WorkerBoot:
    """What every worker boots with: *config* without secrets, this process's logging."""
    values = {key: None if config.setting(key).secret else value for key, value in config.items()}
    sources = {key: config.source(key) for key in values}
    root = logging.getLogger()
    level = logging.getLevelName(root.getEffectiveLevel()).lower()
    if not any(isinstance(h.formatter, JSONFormatter) for h in root.handlers):
        style = "pretty" if root.handlers else "auto"
    else:
        style = "json"
    return WorkerBoot(
        values,
        sources,
        port=0,
        log_level=level if level in LEVELS else "info",
        log_format=style,
        drain_budget=drain_budget,
        worker_header=bool(config["proxy.worker_header"]),
    )


async def serve_workers(
    settings: ProxySettings,
    parts: ProxyParts,
    *,
    count: int,
    boot: WorkerBoot,
    registry: Registry,
    stopping: anyio.Event,
    shutdown_timeout: float = 30.0,
    uvloop: bool = False,
    scheme: str = "http",
    tick_interval: float | None = None,
    clock: Callable[[], float] = time.monotonic,
    task_status: anyio.abc.TaskStatus[WorkersInfo] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Run a proxy whose service port *count* worker processes serve; like
    :func:`~inferno_proxy.role.serve_proxy` otherwise (same ports, same stop sequence).

    :raises ListenError: when a port cannot be bound.
    :raises WorkerFailed: when a worker cannot start or keeps dying.
    """
    pool = Pool(settings.pool_settings())
    reporter = ChangeReporter(pool, registry)
    supervisor = Supervisor(
        count,
        boot,
        host=settings.host,
        port=settings.port,
        pool=pool,
        reporter=reporter,
        uvloop=uvloop,
        scheme=scheme,
        clock=clock,
    )
    reporter.on_change = supervisor.pool_changed
    drain_budget = max(0.0, shutdown_timeout - STOP_RESERVE)
    try:
        reporter.report(add_static_backends(pool, settings.backends, clock()))
        ops, health = control_plane(
            settings,
            parts,
            pool,
            reporter,
            registry,
            supervisor.load,
            clock,
            tick_interval,
            ops_class=WorkersOpsApp,
        )
        assert isinstance(ops, WorkersOpsApp)
        ops.worker_metrics = supervisor.worker_metrics
        ops.sync = supervisor.sync
        ops.refresh = supervisor.fresh_metrics

        async def start_service(group: anyio.abc.TaskGroup, stop: anyio.Event) -> ServerInfo:
            try:
                info: ServerInfo = await group.start(supervisor.run, stop, health)
            except OSError as exc:
                where = format_address(settings.host, settings.port)
                raise ListenError(
                    f"cannot listen on {where} (proxy.port): {exc.strerror or exc}"
                ) from None
            logger.info("proxy serving with %d worker processes", count)
            return info

        def started(service: ServerInfo, ops_info: ServerInfo) -> None:
            assert isinstance(ops, WorkersOpsApp)
            task_status.started(WorkersInfo(service, ops_info, ops, supervisor))

        try:
            await serve_ports(settings, ops, health, start_service, stopping, drain_budget, started)
        except Exception as exc:
            raise find_exception(exc, InfernoError) or exc from None
    finally:
        await close_parts(parts)
    logger.info("proxy stopped")
