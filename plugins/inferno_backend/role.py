"""The ``backend`` role: engine, API, vitals and registration, started and drained in order.

Lifecycle (DESIGN.md, "Backend lifecycle")::

    start the engine -> listen (service port, ops port) -> engine ready
      -> register with every load balancer, re-announce every announce_interval
    SIGTERM (ctx.stopping):
      ready=false, new requests 503 + Retry-After, idle WebSockets closed (1001)
      -> deregister from every load balancer (in parallel with the drain)
      -> in-flight and queued requests finish, up to drain_timeout
         (then running generations are cut: a stream ends with a "draining"
         error event, an answer not started is 503 "draining")
      -> close both ports -> stop the engine -> exit 0

A second signal exits at once (:mod:`inferno.lifecycle`).  The drain is
bounded so that the role returns before ``runtime.shutdown_timeout`` (after
which the core cancels it and exits 1): at most that timeout minus
:data:`STOP_RESERVE`.

Once both ports listen, one info line says where, for people and for tests
that start the role with ``--port 0``::

    backend listening on 127.0.0.1:PORT (ops 127.0.0.1:PORT)
"""

from __future__ import annotations

import functools
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import anyio
import anyio.abc

from inferno.config import HostPort
from inferno.errors import (
    ConfigError,
    ConfigProblem,
    InfernoError,
    ListenError,
    ValidationError,
    find_exception,
)
from inferno.http import ServerInfo, ServerLimits, start_server
from inferno.http.client import HTTPClient
from inferno.lifecycle import RoleContext
from inferno.metrics import Registry
from inferno.plugins import collect_named
from inferno.protocol import NodeType, Registration, format_address
from inferno_backend.admission import Admission
from inferno_backend.api import InferenceAPI
from inferno_backend.engines.base import Engine
from inferno_backend.gpu import GPUSampler
from inferno_backend.registration import DEFAULT_BACKOFF, REGISTER_TIMEOUTS, Backoff, Registrar
from inferno_backend.settings import BackendSettings
from inferno_backend.system import SystemSampler
from inferno_backend.vitals import Vitals

__all__ = [
    "CAPABILITIES",
    "BackendInfo",
    "ListenError",
    "make_openai_engine",
    "make_sim_engine",
    "run",
    "run_doctor",
    "serve_backend",
]

logger = logging.getLogger("inferno_backend")

#: Seconds of ``runtime.shutdown_timeout`` kept for closing the ports and the
#: engine after the drain, so the role returns before the core cancels it.
STOP_RESERVE: Final = 3.0
#: Longest the service port waits for answers still being written after the
#: drain (their generations are done; this is the last bytes going out).
WRITE_GRACE: Final = 2.0
#: How often a starting node checks whether its engine is ready to register.
READY_POLL: Final = 0.25
#: Connections the ``openai`` engine may hold beyond ``max_concurrency``: a
#: generation gives its admission slot back once its stream is closed, but a
#: close that outlasts its bound (api.CLOSE_TIMEOUT) may still hold the
#: connection while the slot's next request wants one.
ENGINE_POOL_HEADROOM: Final = 8
#: What a backend announces it can do.
CAPABILITIES: Final = ("chat", "completions", "streaming", "websocket")
_WILDCARDS: Final = frozenset({"", "0.0.0.0", "::", "[::]"})


@dataclass(frozen=True, slots=True)
class BackendInfo:
    """Where a started backend listens and what it registers as."""

    service: ServerInfo
    ops: ServerInfo
    node_id: str
    advertise_address: str


# -- the role -------------------------------------------------------------------------------


async def run(ctx: RoleContext) -> None:
    """``inferno backend``: serve until ``ctx.stopping``, then drain and return.

    Once listening, ``ctx.state["backend"]`` holds the :class:`BackendInfo`.
    """
    settings = BackendSettings.from_section(ctx.config.section("backend"))
    if settings.gpu_report:
        await _gpu_report()
        return
    engines = collect_named(ctx.plugins, "inferno_engines")
    named = engines.get(settings.engine)
    if named is None:
        raise ConfigError(
            [
                ConfigProblem(
                    "backend.engine",
                    ctx.config.source("backend.engine"),
                    f"no engine {settings.engine!r}",
                    "one of " + ", ".join(engines),
                )
            ]
        )
    engine: Engine = named.factory(ctx)
    try:
        async with anyio.create_task_group() as tg:
            start = functools.partial(
                serve_backend,
                settings,
                engine,
                registry=ctx.metrics,
                stopping=ctx.stopping,
                shutdown_timeout=ctx.shutdown_timeout,
            )
            # For lifecycle hooks (and tests): where the node listens, once it does.
            ctx.state["backend"] = await tg.start(start)
    except Exception as exc:
        # A task group wraps even a failed start in an exception group: one line is enough.
        raise find_exception(exc, InfernoError) or exc from None


async def run_doctor(ctx: RoleContext) -> None:
    """``inferno doctor``: print the GPU report and return."""
    section = ctx.config.section("doctor")
    await _gpu_report(float(section["window"]), int(section["samples"]), bool(section["matmul"]))


async def _gpu_report(window: float = 5.0, samples: int = 5, matmul: bool = True) -> None:
    from inferno_backend.gpureport import gpu_report

    if await gpu_report(window, samples=samples, matmul=matmul) != 0:
        raise InfernoError("GPU report: a throughput measurement failed (see above)")


# -- engines (the factories of plugin.inferno_engines) ---------------------------------------


def _problem(ctx: RoleContext, key: str, problem: str, allowed: str = "") -> ConfigProblem:
    dotted = f"backend.{key}"
    return ConfigProblem(dotted, ctx.config.source(dotted), problem, allowed)


def make_sim_engine(ctx: RoleContext) -> Engine:
    """The ``sim`` engine from ``[backend]`` sim_profile, sim_speed, sim_faults and model.

    :raises ConfigError: naming every bad setting.
    """
    from inferno_backend.engines.sim import SimEngine, SimFaults
    from inferno_backend.profiles import ProfileError, load_profile

    settings = BackendSettings.from_section(ctx.config.section("backend"))
    problems: list[ConfigProblem] = []
    try:
        profile = load_profile(settings.sim_profile)
    except ProfileError as exc:
        # The message says it all: the shipped names for an unknown one, the file
        # and key at fault for a profile file (shipped names would not help there).
        problems.append(_problem(ctx, "sim_profile", str(exc)))
    try:
        faults = SimFaults.parse(settings.sim_faults)
    except ValueError as exc:
        problems.append(_problem(ctx, "sim_faults", str(exc)))
    if problems:
        raise ConfigError(problems)
    return SimEngine(profile, model=settings.model, speed=settings.sim_speed, faults=faults)


def make_openai_engine(ctx: RoleContext) -> Engine:
    """The ``openai`` engine from ``[backend]`` ``engine_url``, ``engine_metrics_url``,
    ``engine_api_key`` and ``model``.

    Its connection pool follows ``max_concurrency``: every admitted request
    streams over a connection of its own.

    :raises ConfigError: without an ``engine_url``, or with an unusable URL.
    """
    from inferno_backend.engines.openai import OpenAIEngine

    settings = BackendSettings.from_section(ctx.config.section("backend"))
    if not settings.engine_url:
        raise ConfigError(
            [_problem(ctx, "engine_url", "is required with engine = openai", "a URL")]
        )
    try:
        return OpenAIEngine(
            settings.engine_url,
            models=[settings.model] if settings.model else None,
            metrics_url=settings.engine_metrics_url,
            api_key=settings.engine_api_key,
            max_connections=settings.max_concurrency + ENGINE_POOL_HEADROOM,
        )
    except ValueError as exc:
        key = "engine_metrics_url" if settings.engine_metrics_url else "engine_url"
        raise ConfigError([_problem(ctx, key, str(exc), "http:// or https:// URL")]) from None


# -- serving --------------------------------------------------------------------------------


def _advertised(settings: BackendSettings, service: ServerInfo) -> HostPort:
    if settings.advertise_address is not None:
        return settings.advertise_address
    host = settings.host
    if host in _WILDCARDS:
        host = socket.gethostname()
        logger.info("advertising %s:%d; set --advertise-address to change it", host, service.port)
    return HostPort(host, service.port)


def _drain_budget(settings: BackendSettings, shutdown_timeout: float) -> float:
    budget = max(0.0, min(settings.drain_timeout, shutdown_timeout - STOP_RESERVE))
    if budget < settings.drain_timeout:
        logger.warning(
            "drain_timeout %g s does not fit runtime.shutdown_timeout %g s; draining %g s at most",
            settings.drain_timeout,
            shutdown_timeout,
            budget,
        )
    return budget


async def serve_backend(
    settings: BackendSettings,
    engine: Engine,
    *,
    registry: Registry,
    stopping: anyio.Event,
    shutdown_timeout: float = 30.0,
    backoff: Backoff = DEFAULT_BACKOFF,
    system: SystemSampler | None = None,
    gpu: GPUSampler | None = None,
    task_status: anyio.abc.TaskStatus[BackendInfo] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Run a backend over ``engine`` until ``stopping`` is set, then drain and return.

    Starts and closes ``engine``.  Reports a :class:`BackendInfo` once both
    ports listen.  ``system`` and ``gpu`` are the samplers to run (by default
    new ones over ``/proc`` and NVML); ``backoff`` is the registration retry
    schedule.

    :raises ListenError: when a port cannot be bound.
    :raises ConfigError: when the node id or advertised address would be refused.
    """
    drain_budget = _drain_budget(settings, shutdown_timeout)
    admission = Admission(settings.max_concurrency, settings.max_queue)
    api = InferenceAPI(engine, admission, registry, max_message_bytes=settings.max_body_size)
    async with HTTPClient(timeouts=REGISTER_TIMEOUTS) as client:
        registrar = Registrar(
            settings.discovery_lb,
            client,
            announce_interval=settings.announce_interval,
            shared_secret=settings.shared_secret,
            backoff=backoff,
        )
        system = system or SystemSampler()
        gpu = gpu or GPUSampler()
        vitals = Vitals(api, system, gpu, registry, peers=lambda: registrar.connected)
        await engine.start()
        try:
            async with anyio.create_task_group() as background:
                await background.start(system.run)
                background.start_soon(gpu.run)  # NVML may take seconds to initialise
                await _serve(
                    settings,
                    api,
                    vitals,
                    registrar,
                    background,
                    stopping,
                    drain_budget,
                    task_status,
                )
                background.cancel_scope.cancel()
        except Exception as exc:
            # Task groups wrap a failed start in exception groups; say it in one line.
            raise find_exception(exc, InfernoError) or exc from None
        finally:
            # Not in a cancel scope of its own: start() and aclose() are the two halves
            # of the engine's task group, and no scope may be opened between them.
            await engine.aclose()
    logger.info("backend stopped")


async def _serve(
    settings: BackendSettings,
    api: InferenceAPI,
    vitals: Vitals,
    registrar: Registrar,
    background: anyio.abc.TaskGroup,
    stopping: anyio.Event,
    drain_budget: float,
    task_status: anyio.abc.TaskStatus[BackendInfo],
) -> None:
    service_stop, ops_stop = anyio.Event(), anyio.Event()
    limits = ServerLimits(max_body_bytes=settings.max_body_size)
    async with anyio.create_task_group() as servers:
        service = await start_server(
            servers,
            setting="backend.port",
            handler=api.handle,
            host=settings.host,
            port=settings.port,
            limits=limits,
            shutdown=service_stop,
            shutdown_timeout=WRITE_GRACE,
            name="backend",
        )
        ops = await start_server(
            servers,
            setting="backend.ops_port",
            handler=vitals.handle,
            host=settings.host,
            port=settings.ops_port,
            shutdown=ops_stop,
            shutdown_timeout=WRITE_GRACE,
            name="backend-ops",
        )
        advertise = _advertised(settings, service)
        node_id = settings.node_id or f"backend-{advertise}"
        logger.info(
            "backend listening on %s (ops %s)",
            format_address(service.host, service.port),
            format_address(ops.host, ops.port),
        )
        registration = functools.partial(_registration, settings, api, node_id, advertise, ops)
        try:
            registration()  # an id or address load balancers would refuse: say so now
        except ValidationError as exc:
            key = "node_id" if exc.field == "id" else "advertise_address"
            raise ConfigError(
                [ConfigProblem(f"backend.{key}", "effective value", f"{exc.problem}")]
            ) from None
        announcing = anyio.CancelScope()
        background.start_soon(_announce_when_ready, api, registrar, registration, announcing)
        task_status.started(BackendInfo(service, ops, node_id, str(advertise)))

        await stopping.wait()
        logger.info(
            "draining: up to %g s for %d running, %d queued",
            drain_budget,
            api.admission.running,
            api.admission.queued,
        )
        api.start_draining()
        announcing.cancel()  # no re-announcement may follow the deregistration
        async with anyio.create_task_group() as drain:
            drain.start_soon(registrar.deregister_all, node_id)
            with anyio.move_on_after(drain_budget) as waiting:
                await api.admission.wait_idle()
        if waiting.cancelled_caught:
            queued = api.admission.queued
            cut, silent = api.cut_generations()  # they end at once, with a "draining" error
            logger.warning(
                "drain timeout: cutting %d running generations and %d queued requests%s",
                cut,
                queued,
                f" ({silent} of them at their engine's next chunk)" if silent else "",
            )
        service_stop.set()
        ops_stop.set()


def _registration(
    settings: BackendSettings,
    api: InferenceAPI,
    node_id: str,
    advertise: HostPort,
    ops: ServerInfo,
) -> Registration:
    return Registration(
        id=node_id,
        address=str(advertise),
        metrics_port=ops.port,
        node_type=NodeType.BACKEND,
        models=tuple(dict.fromkeys(api.engine.models())),
        capabilities=CAPABILITIES,
        weight=settings.weight,
        max_concurrency=settings.max_concurrency,
    )


async def _announce_when_ready(
    api: InferenceAPI,
    registrar: Registrar,
    registration: Callable[[], Registration],
    scope: anyio.CancelScope,
) -> None:
    with scope:
        # Engines tell readiness when asked (Engine.ready), they do not signal it.
        while api.not_ready_reason() is not None:  # noqa: ASYNC110
            await anyio.sleep(READY_POLL)
        await registrar.run(registration)
