"""The ``proxy`` role: pool, health loop, operations port and data path, started in order.

Start (``inferno proxy``)::

    check the settings (policy and checker names against the plugins, enrolment
    safety, TLS files, static backends) -> one ConfigError naming every problem
    -> pool with the static backends -> listen: operations port, then service port
    -> health loop (first round at once, so static backends join within a check)

Once both ports listen, one info line says where, for people and for tests
that start the role with ``--port 0 --ops-port 0``::

    proxy listening on 127.0.0.1:PORT (ops 127.0.0.1:PORT)

Stop (``ctx.stopping``, the first SIGTERM or SIGINT)::

    /health and /metrics say not ready -> the service port stops accepting;
    requests in flight finish, up to runtime.shutdown_timeout minus STOP_RESERVE
    -> health loop stops -> operations port closes -> checkers close -> return (exit 0)

The operations port stays up while the service port drains, so nodes can
still deregister and monitors can watch the drain.

Security: an operations port on a non-loopback address with open enrolment
would let anyone who reaches it put a node of theirs in front of clients'
requests.  The role refuses to start so (exit 2) unless ``--open-enrollment``
says it is meant.  The shared secret is never logged.
"""

from __future__ import annotations

import functools
import importlib.util
import ipaddress
import logging
import pathlib
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

import anyio
import anyio.abc
from inferno_health.checkers import HealthChecker

from inferno.errors import (
    ConfigError,
    ConfigProblem,
    InfernoError,
    ListenError,
    find_exception,
)
from inferno.http import ServerInfo, ServerLimits, server_ssl_context, start_server
from inferno.http.client import HTTPClient
from inferno.http.server import TLSConfigError
from inferno.lifecycle import RoleContext
from inferno.metrics import Registry
from inferno.plugins import Named, collect_named
from inferno.protocol import format_address, parse_address
from inferno_proxy.auth import ApiKeyFileError, ApiKeys, RateLimits
from inferno_proxy.budget import RetryBudget
from inferno_proxy.forward import ServiceApp
from inferno_proxy.healthloop import ChangeReporter, HealthLoop
from inferno_proxy.ops import MAX_OPS_BODY_BYTES, LoadSource, OpsApp, ServiceLoad
from inferno_proxy.policies import RoutingPolicy
from inferno_proxy.pool import Pool
from inferno_proxy.settings import ProxySettings
from inferno_proxy.staticnodes import add_static_backends
from inferno_proxy.workermetrics import count_backoff

__all__ = [
    "STOP_RESERVE",
    "ListenError",
    "ProxyInfo",
    "ProxyParts",
    "check_settings",
    "run",
    "serve_proxy",
]

logger = logging.getLogger("inferno_proxy")

#: Seconds of ``runtime.shutdown_timeout`` kept for closing the operations port,
#: the health loop and the checkers after the drain, so the role returns before
#: the core cancels it (exit 1).
STOP_RESERVE: Final = 3.0
#: Longest the operations port waits for answers being written when it closes.
OPS_WRITE_GRACE: Final = 2.0
#: The operations port's own limits: small bodies (registrations), few clients.
OPS_LIMITS: Final = ServerLimits(max_body_bytes=MAX_OPS_BODY_BYTES, max_connections=1024)
#: Connections kept per node for forwarded requests: above one node's concurrency
#: (a backend's default max_concurrency is 64, and streams hold theirs for minutes).
UPSTREAM_CONNECTIONS_PER_NODE: Final = 1024
#: Seconds an unused upstream connection stays open: below the backend server's
#: keep-alive timeout (60 s), so the proxy, not the node, closes it.
UPSTREAM_IDLE_TIMEOUT: Final = 30.0
_LOCAL_NAMES: Final = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


@dataclass(frozen=True, slots=True)
class ProxyInfo:
    """Where a started proxy listens, and its two handlers (to reload or inspect them)."""

    service: ServerInfo
    ops: ServerInfo
    app: ServiceApp
    ops_app: OpsApp


@dataclass(frozen=True, slots=True)
class ProxyParts:
    """What the plugins contribute to a proxy: its policy and its checkers.

    :ivar policy: routes each request among the eligible nodes.
    :ivar checker: checks registered nodes.
    :ivar static_checker: checks static nodes (``--backends``).
    """

    policy: RoutingPolicy
    checker: HealthChecker
    static_checker: HealthChecker


# -- the role -------------------------------------------------------------------------------


async def run(ctx: RoleContext) -> None:
    """``inferno proxy``: serve until ``ctx.stopping``, then drain and return.

    On SIGHUP the API key file is read again (a bad file keeps the old keys).

    :raises ConfigError: naming every bad setting (the CLI exits 2).
    """
    settings = ProxySettings.from_section(ctx.config.section("proxy"))
    policies = collect_named(ctx.plugins, "inferno_routing_policies")
    checkers = collect_named(ctx.plugins, "inferno_health_checkers")
    check_settings(settings, ctx.config.source, policies=policies, checkers=checkers)
    ssl_context = _service_ssl_context(settings, ctx.config.source)
    api_keys = _load_api_keys(settings, ctx.config.source)
    parts = _make_parts(ctx, settings, policies, checkers)
    count = settings.worker_count()
    try:
        async with anyio.create_task_group() as tg:
            if count > 1:
                from inferno_proxy.workersrole import WorkersInfo, make_boot, serve_workers

                workers: WorkersInfo = await tg.start(
                    functools.partial(
                        serve_workers,
                        settings,
                        parts,
                        count=count,
                        boot=make_boot(ctx.config, _drain_budget(ctx.shutdown_timeout)),
                        registry=ctx.metrics,
                        stopping=ctx.stopping,
                        shutdown_timeout=ctx.shutdown_timeout,
                        uvloop=_uses_uvloop(ctx),
                        scheme="http" if ssl_context is None else "https",
                    )
                )
                if settings.api_keys is not None:
                    ctx.on_reload(workers.supervisor.reload)
                return
            info: ProxyInfo = await tg.start(
                functools.partial(
                    serve_proxy,
                    settings,
                    parts,
                    registry=ctx.metrics,
                    stopping=ctx.stopping,
                    shutdown_timeout=ctx.shutdown_timeout,
                    ssl_context=ssl_context,
                    api_keys=api_keys,
                )
            )
            if settings.api_keys is not None:
                ctx.on_reload(functools.partial(_reload_api_keys, settings.api_keys, info.app))
    except Exception as exc:
        # A task group wraps even a failed start in an exception group: one line is enough.
        raise find_exception(exc, InfernoError) or exc from None


def _uses_uvloop(ctx: RoleContext) -> bool:
    """Whether this process runs uvloop (its workers then do too)."""
    choice = ctx.config["runtime.event_loop"]
    return choice == "uvloop" or (
        choice == "auto" and importlib.util.find_spec("uvloop") is not None
    )


def _load_api_keys(settings: ProxySettings, source: Callable[[str], str]) -> ApiKeys | None:
    if settings.api_keys is None:
        return None
    try:
        keys = ApiKeys.from_file(settings.api_keys)
    except ApiKeyFileError as exc:
        key = "proxy.api_keys"
        raise ConfigError([ConfigProblem(key, source(key), str(exc))]) from None
    logger.info("API keys required on the service port: %d key(s) loaded", len(keys))
    return keys


def _reload_api_keys(path: pathlib.Path, app: ServiceApp) -> None:
    try:
        app.api_keys = ApiKeys.from_file(path)
    except ApiKeyFileError as exc:
        logger.error("API keys not reloaded, the previous ones stay: %s", exc)
        return
    logger.info("API keys reloaded: %d key(s)", len(app.api_keys))


def check_settings(
    settings: ProxySettings,
    source: Callable[[str], str],
    *,
    policies: dict[str, Named] | None = None,
    checkers: dict[str, Named] | None = None,
) -> None:
    """Refuse settings the proxy cannot or must not run with.

    :param source: where a dotted key's value came from (``Config.source``).
    :param policies: the known routing policies (not checked when ``None``).
    :param checkers: the known health checkers (not checked when ``None``).
    :raises ConfigError: naming every problem at once.
    """
    problems: list[ConfigProblem] = []

    def problem(key: str, what: str, allowed: str = "") -> None:
        dotted = f"proxy.{key}"
        problems.append(ConfigProblem(dotted, source(dotted), what, allowed))

    if policies is not None and settings.policy not in policies:
        problem("policy", f"no routing policy {settings.policy!r}", ", ".join(policies))
    if checkers is not None:
        for key in ("health_checker", "static_health_checker"):
            name = getattr(settings, key)
            if name not in checkers:
                problem(key, f"no health checker {name!r}", ", ".join(checkers))
    if settings.shared_secret is not None and not settings.shared_secret.strip():
        problem("shared_secret", "is empty", "a secret nodes send as 'Authorization: Bearer'")
    elif settings.shared_secret is not None and settings.open_enrollment:
        problem(
            "open_enrollment",
            "is set together with a shared secret",
            "either --shared-secret or --open-enrollment",
        )
    if (
        settings.shared_secret is None
        and not settings.open_enrollment
        and not is_loopback(settings.ops_host)
    ):
        problem(
            "ops_host",
            f"{settings.ops_host!r} is not a loopback address, and without a shared secret "
            "anyone who reaches the operations port could register a node",
            "a loopback address, --shared-secret, or --open-enrollment to allow it",
        )
    if settings.tls_key is not None and settings.tls_cert is None:
        problem("tls_key", "is set without tls_cert", "set tls_cert too")
    if settings.circuit_max_cooldown < settings.circuit_cooldown:
        problem("circuit_max_cooldown", "is below circuit_cooldown", "at least circuit_cooldown")
    seen: dict[str, int] = {}
    for position, address in enumerate(settings.backends, start=1):
        try:
            host, port = parse_address(str(address))  # as the pool insists: a real host and port
        except ValueError as exc:
            problem("backends", str(exc), "host:port where the proxy can reach a node")
            continue
        node_id = format_address(host, port)
        if node_id in seen:  # one node, two entries: which weight and models were meant?
            problem(
                "backends",
                f"item {position}: {node_id} is item {seen[node_id]} again",
                "each backend once, with all its options in one entry",
            )
        seen.setdefault(node_id, position)
    if problems:
        raise ConfigError(problems)
    if settings.health_timeout > settings.health_interval:
        logger.warning(
            "health_timeout %gs exceeds health_interval %gs: rounds run back to back",
            settings.health_timeout,
            settings.health_interval,
        )


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps a port on this machine (``127.0.0.0/8``, ``::1``)."""
    name = host.strip().strip("[]").lower()
    if name in _LOCAL_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # a host name other than localhost, or a wildcard: assume reachable


def _service_ssl_context(
    settings: ProxySettings, source: Callable[[str], str]
) -> ssl.SSLContext | None:
    if settings.tls_cert is None:
        return None
    try:
        return server_ssl_context(settings.tls_cert, settings.tls_key)
    except TLSConfigError as exc:
        key = "proxy.tls_cert"
        raise ConfigError([ConfigProblem(key, source(key), str(exc))]) from None


def _make_parts(
    ctx: RoleContext,
    settings: ProxySettings,
    policies: dict[str, Named],
    checkers: dict[str, Named],
) -> ProxyParts:
    policy: RoutingPolicy = policies[settings.policy].factory(ctx)
    checker: HealthChecker = checkers[settings.health_checker].factory(ctx)
    if settings.static_health_checker == settings.health_checker:
        static_checker = checker
    else:
        static_checker = checkers[settings.static_health_checker].factory(ctx)
    return ProxyParts(policy, checker, static_checker)


# -- serving --------------------------------------------------------------------------------


def _drain_budget(shutdown_timeout: float) -> float:
    return max(0.0, shutdown_timeout - STOP_RESERVE)


async def serve_proxy(
    settings: ProxySettings,
    parts: ProxyParts,
    *,
    registry: Registry,
    stopping: anyio.Event,
    shutdown_timeout: float = 30.0,
    ssl_context: ssl.SSLContext | None = None,
    api_keys: ApiKeys | None = None,
    tick_interval: float | None = None,
    clock: Callable[[], float] = time.monotonic,
    task_status: anyio.abc.TaskStatus[ProxyInfo] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Run a proxy until ``stopping`` is set, then drain and return.

    Closes the checkers of ``parts`` when it returns.  Reports a
    :class:`ProxyInfo` once both ports listen.

    :param api_keys: accepted client keys; ``None`` leaves the service port open.
    :param tick_interval: seconds between two pool ticks (default
        :data:`~inferno_proxy.nodes.TICK_INTERVAL`; tests pass less).
    :param clock: monotonic seconds, shared by the pool's every driver.
    :raises OSError: when a port cannot be bound.
    """
    pool = Pool(settings.pool_settings())
    reporter = ChangeReporter(pool, registry)
    try:
        async with HTTPClient(
            max_connections_per_origin=UPSTREAM_CONNECTIONS_PER_NODE,
            idle_timeout=UPSTREAM_IDLE_TIMEOUT,
        ) as client:
            app = ServiceApp(
                pool,
                parts.policy,
                client,
                RetryBudget(ratio=settings.retry_ratio),
                settings.forward_settings(),
                registry,
                api_keys=api_keys,
                rate_limits=RateLimits.build(
                    per_key=settings.rate_limit_per_key,
                    per_ip=settings.rate_limit_per_ip,
                    burst=settings.rate_limit_burst,
                ),
                clock=clock,
                # The data path wakes its own waiters; the reporter only tells.
                on_pool_changes=functools.partial(reporter.report, notify=False),
            )
            reporter.on_change = app.pool_changed
            reporter.report(add_static_backends(pool, settings.backends, clock()))
            load = functools.partial(_service_load, app, registry)
            ops, health = control_plane(
                settings, parts, pool, reporter, registry, load, clock, tick_interval
            )

            async def start_service(group: anyio.abc.TaskGroup, stop: anyio.Event) -> ServerInfo:
                return await start_server(
                    group,
                    setting="proxy.port",
                    handler=app.handle,
                    host=settings.host,
                    port=settings.port,
                    limits=settings.server_limits(),
                    ssl_context=ssl_context,
                    shutdown=stop,
                    shutdown_timeout=_drain_budget(shutdown_timeout),
                    name="proxy",
                )

            def started(service: ServerInfo, ops_info: ServerInfo) -> None:
                task_status.started(ProxyInfo(service, ops_info, app, ops))

            try:
                await serve_ports(
                    settings,
                    ops,
                    health,
                    start_service,
                    stopping,
                    _drain_budget(shutdown_timeout),
                    started,
                )
            except Exception as exc:
                # Task groups wrap a failed start in exception groups; say it in one line.
                raise find_exception(exc, ListenError) or exc from None
    finally:
        await close_parts(parts)
    logger.info("proxy stopped")


def control_plane(
    settings: ProxySettings,
    parts: ProxyParts,
    pool: Pool,
    reporter: ChangeReporter,
    registry: Registry,
    load: LoadSource,
    clock: Callable[[], float],
    tick_interval: float | None = None,
    ops_class: type[OpsApp] = OpsApp,
) -> tuple[OpsApp, HealthLoop]:
    """The operations port's handler and the health loop over *pool*.

    :param load: the data path's figures for the proxy's vitals.
    :param ops_class: :class:`OpsApp` or a subclass (the multi-process one).
    """
    ops = ops_class(
        pool,
        reporter=reporter,
        registry=registry,
        shared_secret=settings.shared_secret,
        load=load,
        clock=clock,
    )
    health = HealthLoop(
        pool,
        checker=parts.checker,
        static_checker=parts.static_checker,
        interval=settings.health_interval,
        timeout=settings.health_timeout,
        registry=registry,
        reporter=reporter,
        clock=clock,
        **({"tick_interval": tick_interval} if tick_interval else {}),
    )
    return ops, health


async def close_parts(parts: ProxyParts) -> None:
    """Close the checkers of *parts* (shielded: this runs while stopping)."""
    with anyio.CancelScope(shield=True):
        await parts.checker.aclose()
        if parts.static_checker is not parts.checker:
            await parts.static_checker.aclose()


#: Starts the service port in a task group; it stops accepting and drains when
#: the event is set, and its task ends once drained.
StartService = Callable[[anyio.abc.TaskGroup, anyio.Event], Awaitable[ServerInfo]]


async def serve_ports(
    settings: ProxySettings,
    ops: OpsApp,
    health: HealthLoop,
    start_service: StartService,
    stopping: anyio.Event,
    drain_budget: float,
    started: Callable[[ServerInfo, ServerInfo], None],
) -> None:
    """Operations port, service port, health loop; then, on *stopping*, the stop sequence.

    :param started: called with the service and operations ports' info once
        both listen and the health loop runs.
    """
    ops_stop, service_stop = anyio.Event(), anyio.Event()
    checking = anyio.CancelScope()

    async def run_health(*, task_status: anyio.abc.TaskStatus[None]) -> None:
        with checking:
            await health.run(task_status=task_status)

    async with anyio.create_task_group() as outer:
        ops_info = await start_server(
            outer,
            setting="proxy.ops_port",
            handler=ops.handle,
            host=settings.ops_host,
            port=settings.ops_port,
            limits=OPS_LIMITS,
            shutdown=ops_stop,
            shutdown_timeout=OPS_WRITE_GRACE,
            name="proxy-ops",
        )
        async with anyio.create_task_group() as service_group:
            service = await start_service(service_group, service_stop)
            await outer.start(run_health)
            logger.info(
                "proxy listening on %s (ops %s)",
                format_address(service.host, service.port),
                format_address(ops_info.host, ops_info.port),
            )
            started(service, ops_info)
            await stopping.wait()
            logger.info("proxy stopping: draining requests in flight for up to %gs", drain_budget)
            ops.start_draining()
            service_stop.set()
        checking.cancel()
        ops_stop.set()


# -- the data path ----------------------------------------------------------------------------


def _service_load(app: ServiceApp, registry: Registry) -> ServiceLoad:
    """The data path's figures for the proxy's vitals (read per ``GET /metrics``)."""
    failed, backoff = count_backoff(registry.snapshot())
    return ServiceLoad(
        in_flight=app.in_flight(),
        queued=app.queue.total(),
        failed_responses=failed,
        backoff_requests=backoff,
    )
