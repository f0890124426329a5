"""The proxy's operations port: discovery, the pool explained, vitals and telemetry.

Routes (DESIGN.md, "Wire protocol")::

    POST /register     Registration JSON -> 200 {"status": "registered", "peers": [NodeInfo...]}
                       400 naming the invalid field (nothing stored), 401 without the secret,
                       503 + Retry-After when the pool is full
    POST /deregister   {"id"} -> 200 {"status": "deregistered"} (an unknown id too: idempotent)
    GET  /backends     {"backends": [...]}: every backend's state, and why it is out since when
    GET  /peers        {"peers": [NodeInfo...]}: every known node of every type
    GET  /metrics      the proxy's own NodeVitals JSON; Prometheus text when Accept asks for it
    GET  /telemetry    Prometheus text of the role's registry (per-node gauges refreshed first)
    GET  /health       200 {"status": "ready"} or 503 {"status": "draining"}

Enrolment: with a shared secret, ``/register`` and ``/deregister`` need
``Authorization: Bearer <secret>``, compared in constant time
(:func:`hmac.compare_digest`) *before* the body is read, so an unauthorised
caller learns nothing about what a valid registration looks like.  Without
one, enrolment is open (the role refuses that on a non-loopback address
unless asked).  The reading routes are open: they serve monitoring, as a
node's own ``/metrics`` does, and the port is loopback-only by default.

The registration answer lists the *other* nodes the proxy knows (proxies and
backends), so a node that knows one proxy learns the rest of the fleet.  A
node that is not a backend is a peer (:class:`~inferno_proxy.pool.Pool`): listed,
never routed to or checked, forgotten when it stops re-registering.
"""

from __future__ import annotations

import hmac
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Final

from inferno import __version__
from inferno.errors import HTTPError, ValidationError
from inferno.http import Request, Response
from inferno.metrics import PROMETHEUS_CONTENT_TYPE, Registry, wants_prometheus
from inferno.protocol import NodeVitals, Registration
from inferno_proxy.circuit import CircuitState
from inferno_proxy.health import HealthState
from inferno_proxy.healthloop import ChangeReporter
from inferno_proxy.nodes import PoolFull
from inferno_proxy.pool import Pool

__all__ = ["MAX_OPS_BODY_BYTES", "OpsApp", "ServiceLoad"]

logger = logging.getLogger("inferno_proxy.ops")

#: Largest request body on the operations port: a registration with 1024 model
#: names of 256 characters is ~270 KiB (see inferno.protocol.MAX_MODELS).
MAX_OPS_BODY_BYTES: Final = 1024 * 1024
#: Seconds a node is told to wait before registering again with a full pool.
FULL_RETRY_AFTER: Final = 30
_ROUTES: Final = {
    "/register": "POST",
    "/deregister": "POST",
    "/backends": "GET",
    "/peers": "GET",
    "/metrics": "GET",
    "/telemetry": "GET",
    "/health": "GET",
}
_UNAUTHORIZED_HEADERS: Final = [("www-authenticate", 'Bearer realm="inferno"')]


@dataclass(frozen=True, slots=True)
class ServiceLoad:
    """What the data path reports for the proxy's vitals.

    :ivar in_flight: client requests being served now.
    :ivar queued: client requests waiting for a node.
    :ivar failed_responses: answers that failed (5xx, broken streams) since start.
    :ivar backoff_requests: requests turned away with Retry-After (429/503) since start.
    """

    in_flight: int = 0
    queued: int = 0
    failed_responses: int = 0
    backoff_requests: int = 0


#: Reads the data path's load; the role passes one over its ServiceApp.
LoadSource = Callable[[], ServiceLoad]


class OpsApp:
    """The operations port's handler (see the module docstring).

    :param pool: the pool registrations go to.
    :param reporter: tells the changes registrations cause (logs, data path).
    :param registry: the role's metrics: ``/telemetry``, and gauges added here.
    :param shared_secret: required from registering nodes; ``None`` for open enrolment.
    :param load: the data path's load, for ``/metrics``.
    :param clock: monotonic seconds, the pool's time base.
    :param wall_clock: seconds since the epoch, to say "since when" in ``/backends``.
    """

    def __init__(
        self,
        pool: Pool,
        *,
        reporter: ChangeReporter,
        registry: Registry,
        shared_secret: str | None = None,
        load: LoadSource | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if shared_secret is not None and not shared_secret:
            raise ValueError("an empty shared secret would let anyone in; pass None for open")
        self.pool = pool
        self.reporter = reporter
        self.registry = registry
        self._secret = shared_secret.encode("utf-8") if shared_secret is not None else None
        self._load = load or ServiceLoad
        self._clock = clock
        self._wall_clock = wall_clock
        self._started = clock()
        self._cpu = _CpuUsage()
        #: Set by :meth:`start_draining`: ``/health`` and ``/metrics`` say not ready.
        self.draining = False
        self._add_metrics()

    def start_draining(self) -> None:
        """The proxy is stopping: report not ready, so peers and monitors stop counting on it."""
        self.draining = True

    # --- routing ----------------------------------------------------------------------------

    async def handle(self, request: Request) -> Response:
        """Answer one operations request."""
        path = request.path
        method = _ROUTES.get(path)
        if method is None:
            raise HTTPError(404, f"no route {request.method} {path}", code="not_found")
        allowed = (method, "HEAD") if method == "GET" else (method,)
        if request.method not in allowed:
            raise HTTPError(
                405,
                f"{path} takes {method}",
                code="method_not_allowed",
                headers=[("allow", ", ".join(allowed))],
            )
        if path == "/register":
            return await self._register(request)
        if path == "/deregister":
            return await self._deregister(request)
        if path == "/backends":
            return Response.json({"backends": self.describe_backends()})
        if path == "/peers":
            return Response.json({"peers": [info.to_json() for info in self.pool.peers()]})
        if path == "/health":
            if self.draining:
                return Response.json({"status": "draining"}, status=503)
            return Response.json({"status": "ready"})
        if path == "/metrics" and not wants_prometheus(request.headers.get("accept")):
            return Response.json(self.vitals().to_json())
        return Response.text(self.render_prometheus(), content_type=PROMETHEUS_CONTENT_TYPE)

    # --- discovery --------------------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        """Refuse (401) a request without the shared secret; nothing to check when open."""
        if self._secret is None:
            return
        header = request.headers.get("authorization") or ""
        scheme, _, token = header.partition(" ")
        # Header values arrive decoded as latin-1: encoding back gives the bytes sent.
        given = token.strip().encode("latin-1") if scheme.lower() == "bearer" else b""
        # compare_digest's time does not depend on where the bytes differ.
        if not hmac.compare_digest(given, self._secret):
            what = "wrong shared secret" if header else "missing shared secret"
            raise HTTPError(
                401,
                f"{what}: send 'Authorization: Bearer <secret>'",
                code="unauthorized",
                headers=_UNAUTHORIZED_HEADERS,
            )

    async def _register(self, request: Request) -> Response:
        self._authorize(request)
        document = await request.json()
        try:
            registration = Registration.from_json(document)
        except ValidationError as exc:
            raise _invalid("registration", exc) from None
        try:
            changes = self.pool.register(registration, self._clock())
        except PoolFull as exc:
            raise HTTPError(
                503,
                str(exc),
                code="pool_full",
                headers=[("retry-after", str(FULL_RETRY_AFTER))],
            ) from None
        self._registrations.labels(result="registered").inc()
        self.reporter.report(changes)
        peers = [info.to_json() for info in self.pool.peers() if info.id != registration.id]
        return Response.json({"status": "registered", "peers": peers})

    async def _deregister(self, request: Request) -> Response:
        self._authorize(request)
        document = await request.json()
        if not isinstance(document, dict):
            raise _invalid("deregistration", ValidationError("body", "expected a JSON object"))
        if "id" not in document:
            raise _invalid("deregistration", ValidationError("id", "is required"))
        node_id = document["id"]
        if not isinstance(node_id, str) or not node_id:
            raise _invalid("deregistration", ValidationError("id", "expected a non-empty string"))
        self._registrations.labels(result="deregistered").inc()
        self.reporter.report(self.pool.deregister(node_id, self._clock()))
        return Response.json({"status": "deregistered"})

    def describe_backends(self) -> list[dict[str, Any]]:
        """Every backend's ``GET /backends`` entry, each reason out with its wall-clock start."""
        now, wall = self._clock(), self._wall_clock()
        described = self.pool.describe(now)
        for entry in described:
            for out in entry["out"]:
                out["since"] = _iso(wall - out["for_seconds"])
        return described

    # --- vitals -----------------------------------------------------------------------------

    def vitals(self) -> NodeVitals:
        """The proxy's own vitals, as a node's ``GET /metrics`` reports them."""
        load = self._load()
        return NodeVitals(
            ready=not self.draining,
            requests_in_progress=max(0, load.in_flight),
            requests_queued=max(0, load.queued),
            cpu_usage=self._cpu.sample(),
            memory_usage=_memory_usage(),
            failed_responses=max(0, load.failed_responses),
            backoff_requests=max(0, load.backoff_requests),
            connected_peers=len(self.pool.peers()),
            uptime_seconds=max(0.0, self._clock() - self._started),
            version=__version__,
            models=tuple(self.pool.models()),
        )

    def render_prometheus(self) -> str:
        """The registry in Prometheus text, per-node gauges refreshed from the pool."""
        self._refresh_node_gauges()
        return self.registry.render_prometheus()

    def _add_metrics(self) -> None:
        registry = self.registry
        self._registrations = registry.counter(
            "inferno_proxy_registrations_total",
            "Registrations and deregistrations accepted on the operations port.",
            ("result",),
        )
        registry.gauge("inferno_proxy_ready", "1 while the proxy takes new requests.").set_function(
            lambda: 0.0 if self.draining else 1.0
        )
        labels = ("node",)
        # Requests in flight per node are the data path's (inferno_proxy_node_in_flight_requests).
        self._node_queue = registry.gauge(
            "inferno_proxy_node_requests_queued",
            "Requests waiting at each node, as its latest vitals reported.",
            labels,
        )
        self._node_in_rotation = registry.gauge(
            "inferno_proxy_node_in_rotation",
            "1 when a node may receive new requests (healthy, circuit admitting, not stalled).",
            labels,
        )
        self._node_health = registry.gauge(
            "inferno_proxy_node_health_state",
            "1 for each node's current health state.",
            ("node", "state"),
        )
        self._node_circuit = registry.gauge(
            "inferno_proxy_node_circuit_state",
            "1 for each node's current circuit breaker state.",
            ("node", "state"),
        )

    def _refresh_node_gauges(self) -> None:
        """Per-node series from the pool now: nodes that left lose theirs."""
        families = (
            self._node_queue,
            self._node_in_rotation,
            self._node_health,
            self._node_circuit,
        )
        for family in families:
            family.clear()
        for node in self.pool.backends():
            self._node_queue.labels(node=node.id).set(node.queue_depth)
            self._node_in_rotation.labels(node=node.id).set(1.0 if node.in_rotation() else 0.0)
            for health in HealthState:
                if health is not HealthState.REMOVED:
                    value = 1.0 if node.health.state is health else 0.0
                    self._node_health.labels(node=node.id, state=health.value).set(value)
            for circuit in CircuitState:
                value = 1.0 if node.circuit.state is circuit else 0.0
                self._node_circuit.labels(node=node.id, state=circuit.value).set(value)


def _invalid(what: str, exc: ValidationError) -> HTTPError:
    """The 400 for an invalid *what* (registration, deregistration), naming the field.

    One problem at a time, the first found (as :meth:`Registration.from_json`
    checks), worded so the field stands out from its problem:
    ``invalid registration: field 'metrics_port': is required``.
    """
    return HTTPError(
        400, f"invalid {what}: field {exc.field!r}: {exc.problem}", code="invalid_field"
    )


def _iso(epoch_seconds: float) -> str:
    """``2024-05-01T12:00:00.000Z``: when a node went out, for operators."""
    moment = datetime.fromtimestamp(epoch_seconds, tz=timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --- the machine's usage, for the proxy's vitals ----------------------------------------------


class _CpuUsage:
    """Busy fraction of every CPU of the machine since the previous sample (``/proc/stat``).

    The first sample compares against the machine's boot (the average since
    then); without ``/proc`` the answer is 0.0.
    """

    def __init__(self) -> None:
        self._last = (0, 0)

    def sample(self) -> float:
        reading = _read_cpu_times()
        if reading is None:
            return 0.0
        busy, total = reading[0] - self._last[0], reading[1] - self._last[1]
        self._last = reading
        if total <= 0:
            return 0.0
        return min(1.0, max(0.0, busy / total))


def _read_cpu_times() -> tuple[int, int] | None:
    """``(busy, total)`` clock ticks of the machine from the ``cpu`` line of ``/proc/stat``."""
    try:
        with open("/proc/stat", encoding="ascii") as file:
            fields = file.readline().split()
        ticks = [int(value) for value in fields[1:]]
    except (OSError, ValueError):
        return None
    if fields[:1] != ["cpu"] or len(ticks) < 4:
        return None
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    total = sum(ticks[:8])  # guest time is already counted in user time
    return total - idle, total


def _memory_usage() -> float:
    """``1 - MemAvailable / MemTotal`` from ``/proc/meminfo``; 0.0 when it cannot be read."""
    values: dict[str, int] = {}
    try:
        with open("/proc/meminfo", encoding="ascii") as file:
            for line in file:
                name, _, rest = line.partition(":")
                if name in ("MemTotal", "MemAvailable"):
                    values[name] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0
    total, available = values.get("MemTotal", 0), values.get("MemAvailable")
    if total <= 0 or available is None:
        return 0.0
    usage = 1.0 - available / total
    return min(1.0, max(0.0, usage)) if math.isfinite(usage) else 0.0
