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
import ipaddress
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import anyio
import anyio.abc
from inferno_health.checkers import HealthChecker

from inferno.errors import ConfigError, ConfigProblem
from inferno.http import Handler, ServerInfo, ServerLimits, serve, server_ssl_context
from inferno.http.server import TLSConfigError
from inferno.lifecycle import RoleContext
from inferno.metrics import Registry
from inferno.plugins import Named, collect_named
from inferno.protocol import format_address, parse_address
from inferno_proxy.healthloop import ChangeReporter, HealthLoop
from inferno_proxy.ops import MAX_OPS_BODY_BYTES, OpsApp, ServiceLoad
from inferno_proxy.policies import RoutingPolicy
from inferno_proxy.pool import Pool
from inferno_proxy.settings import ProxySettings

__all__ = ["STOP_RESERVE", "ProxyInfo", "ProxyParts", "check_settings", "run", "serve_proxy"]

logger = logging.getLogger("inferno_proxy")

#: Seconds of ``runtime.shutdown_timeout`` kept for closing the operations port,
#: the health loop and the checkers after the drain, so the role returns before
#: the core cancels it (exit 1).
STOP_RESERVE: Final = 3.0
#: Longest the operations port waits for answers being written when it closes.
OPS_WRITE_GRACE: Final = 2.0
#: The operations port's own limits: small bodies (registrations), few clients.
OPS_LIMITS: Final = ServerLimits(max_body_bytes=MAX_OPS_BODY_BYTES, max_connections=1024)
_LOCAL_NAMES: Final = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


@dataclass(frozen=True, slots=True)
class ProxyInfo:
    """Where a started proxy listens."""

    service: ServerInfo
    ops: ServerInfo


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

    :raises ConfigError: naming every bad setting (the CLI exits 2).
    """
    settings = ProxySettings.from_section(ctx.config.section("proxy"))
    policies = collect_named(ctx.plugins, "inferno_routing_policies")
    checkers = collect_named(ctx.plugins, "inferno_health_checkers")
    check_settings(settings, ctx.config.source, policies=policies, checkers=checkers)
    ssl_context = _service_ssl_context(settings, ctx.config.source)
    parts = _make_parts(ctx, settings, policies, checkers)
    await serve_proxy(
        settings,
        parts,
        registry=ctx.metrics,
        stopping=ctx.stopping,
        shutdown_timeout=ctx.shutdown_timeout,
        ssl_context=ssl_context,
    )


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
    if settings.workers != 1:
        problem("workers", f"{settings.workers} workers: this version runs 1 process", "1")
    for address in settings.backends:
        try:
            parse_address(str(address))  # what the pool will insist on: no wildcard, a real port
        except ValueError as exc:
            problem("backends", str(exc), "host:port where the proxy can reach a node")
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
    tick_interval: float | None = None,
    clock: Callable[[], float] = time.monotonic,
    task_status: anyio.abc.TaskStatus[ProxyInfo] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Run a proxy until ``stopping`` is set, then drain and return.

    Closes the checkers of ``parts`` when it returns.  Reports a
    :class:`ProxyInfo` once both ports listen.

    :param tick_interval: seconds between two pool ticks (default
        :data:`~inferno_proxy.nodes.TICK_INTERVAL`; tests pass less).
    :param clock: monotonic seconds, shared by the pool's every driver.
    :raises OSError: when a port cannot be bound.
    """
    pool = Pool(settings.pool_settings())
    try:
        async with _DataPath(settings, pool, parts.policy, registry, clock) as data:
            reporter = ChangeReporter(pool, registry, on_change=data.pool_changed)
            for address in settings.backends:
                reporter.report(pool.add_static(str(address), clock()))
            ops = OpsApp(
                pool,
                reporter=reporter,
                registry=registry,
                shared_secret=settings.shared_secret,
                load=data.load,
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
            await _serve(
                settings,
                ops,
                health,
                data.handle,
                ssl_context,
                stopping,
                _drain_budget(shutdown_timeout),
                task_status,
            )
    finally:
        with anyio.CancelScope(shield=True):
            await parts.checker.aclose()
            if parts.static_checker is not parts.checker:
                await parts.static_checker.aclose()
    logger.info("proxy stopped")


async def _serve(
    settings: ProxySettings,
    ops: OpsApp,
    health: HealthLoop,
    handler: Handler,
    ssl_context: ssl.SSLContext | None,
    stopping: anyio.Event,
    drain_budget: float,
    task_status: anyio.abc.TaskStatus[ProxyInfo],
) -> None:
    ops_stop, service_stop = anyio.Event(), anyio.Event()
    checking = anyio.CancelScope()

    async def run_health(*, task_status: anyio.abc.TaskStatus[None]) -> None:
        with checking:
            await health.run(task_status=task_status)

    async with anyio.create_task_group() as outer:
        ops_info: ServerInfo = await outer.start(
            functools.partial(
                serve,
                ops.handle,
                host=settings.ops_host,
                port=settings.ops_port,
                limits=OPS_LIMITS,
                shutdown=ops_stop,
                shutdown_timeout=OPS_WRITE_GRACE,
                name="proxy-ops",
            )
        )
        async with anyio.create_task_group() as service_group:
            service: ServerInfo = await service_group.start(
                functools.partial(
                    serve,
                    handler,
                    host=settings.host,
                    port=settings.port,
                    limits=settings.server_limits(),
                    ssl_context=ssl_context,
                    shutdown=service_stop,
                    shutdown_timeout=drain_budget,
                    name="proxy",
                )
            )
            await outer.start(run_health)
            logger.info(
                "proxy listening on %s (ops %s)",
                format_address(service.host, service.port),
                format_address(ops_info.host, ops_info.port),
            )
            task_status.started(ProxyInfo(service, ops_info))
            await stopping.wait()
            logger.info("proxy stopping: draining requests in flight for up to %gs", drain_budget)
            ops.start_draining()
            service_stop.set()
        checking.cancel()
        ops_stop.set()


# -- the data path ----------------------------------------------------------------------------


class _DataPath:
    """The service port's handler over the pool, and what the operations port reads of it."""

    def __init__(
        self,
        settings: ProxySettings,
        pool: Pool,
        policy: RoutingPolicy,
        registry: Registry,
        clock: Callable[[], float],
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.policy = policy
        self.registry = registry
        self.clock = clock

    async def __aenter__(self) -> _DataPath:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        return None

    def pool_changed(self) -> None:
        """The pool changed: requests waiting for a node look again."""

    def load(self) -> ServiceLoad:
        return ServiceLoad()

    async def handle(self, request: Any) -> Any:
        from inferno.errors import HTTPError

        raise HTTPError(503, "no data path", code="no_data_path")
