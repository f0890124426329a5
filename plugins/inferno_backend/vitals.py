"""The backend's ops port: vitals, telemetry and health.

Routes::

    GET /metrics     NodeVitals JSON (inferno.protocol); Prometheus text when Accept asks for it
    GET /telemetry   Prometheus text exposition of the role's registry
    GET /health      200 {"status": "ready"}, or 503 {"status": "draining" | "engine not ready"}

What each NodeVitals field means here:

``ready``
    the node takes new requests: its engine answers and it is not draining.
``requests_in_progress``
    requests holding an admission slot (in the engine, or writing their answer).
``requests_queued``
    requests waiting for a slot, plus what the engine itself reports waiting
    (a sim engine short of KV cache, a fronted vLLM's queue).
``cpu_usage`` / ``memory_usage``
    from :class:`~inferno_backend.system.SystemSampler`: the tighter of the
    machine and its cgroup limits, 0..1 (0 when ``/proc`` cannot be read;
    ``cpu_usage`` also until the sampler's first full window, 250 ms after
    start: the protocol requires a number, and "idle" is the safe guess for
    a node that has only just started).
``gpu_usage`` / ``gpu_memory_usage``
    from :class:`~inferno_backend.gpu.GPUSampler` (NVML, sampled in the
    background, never on this path); ``null`` without a GPU or driver.
``kv_cache_usage`` / ``tokens_per_second``
    from the engine's own statistics (``null`` / 0 when it cannot tell).
``failed_responses`` / ``backoff_requests``
    answers that failed (5xx, broken streams; not a ``/health`` probe's 503)
    and requests turned away with Retry-After (429 queue full, 503 draining),
    since start.
``connected_peers``
    load balancers this node is registered with now.
``uptime_seconds``
    since the node's process started (``/proc``; else since this module was
    imported), so a crash loop shows as a small uptime even when the vitals
    are set up late in start-up.

The same figures are gauges in ``/telemetry`` (``inferno_backend_*``), with per-GPU
utilisation, memory, temperature and power (``inferno_gpu_*``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Final

from inferno import __version__
from inferno.errors import HTTPError
from inferno.http import Request, Response
from inferno.metrics import (
    PROMETHEUS_CONTENT_TYPE,
    Gauge,
    Registry,
    wants_prometheus,
)
from inferno.protocol import NodeVitals
from inferno_backend.api import InferenceAPI, health_response
from inferno_backend.engines.base import EngineStats
from inferno_backend.gpu import GPUSampler, GPUSnapshot
from inferno_backend.system import SystemSample, SystemSampler, process_age_seconds

__all__ = ["Vitals", "node_vitals"]

_NAN: Final = math.nan
#: When this module was imported (monotonic): the process's start when /proc cannot tell.
_IMPORTED: Final = time.monotonic()


def _fraction(value: float | None) -> float | None:
    """Clamp to 0..1 (samplers and engines may overshoot a hair); ``None`` stays unknown."""
    if value is None or not math.isfinite(value):
        return None
    return min(1.0, max(0.0, float(value)))


def node_vitals(
    *,
    ready: bool,
    running: int,
    queued: int,
    engine: EngineStats,
    system: SystemSample,
    gpu: GPUSnapshot,
    failed_responses: int,
    backoff_requests: int,
    connected_peers: int,
    uptime_seconds: float,
    models: list[str],
    version: str = __version__,
) -> NodeVitals:
    """The NodeVitals document from the node's parts (pure: no I/O, no clock)."""
    tokens = engine.tokens_per_second
    return NodeVitals(
        ready=ready,
        requests_in_progress=max(0, running),
        requests_queued=max(0, queued) + max(0, engine.waiting or 0),
        cpu_usage=_fraction(system.cpu_usage) or 0.0,
        memory_usage=_fraction(system.memory_usage) or 0.0,
        gpu_usage=_fraction(gpu.gpu_usage),
        gpu_memory_usage=_fraction(gpu.gpu_memory_usage),
        kv_cache_usage=_fraction(engine.kv_cache_usage),
        tokens_per_second=max(0.0, tokens) if tokens is not None and math.isfinite(tokens) else 0.0,
        failed_responses=failed_responses,
        backoff_requests=backoff_requests,
        connected_peers=connected_peers,
        uptime_seconds=max(0.0, uptime_seconds),
        version=version,
        models=tuple(dict.fromkeys(models)),  # distinct, in order
    )


def _or_nan(value: float | None) -> float:
    return _NAN if value is None else float(value)


class Vitals:
    """The ops port's handler and the vitals gauges of the role's registry.

    :param api: the inference API (load, counters, readiness).
    :param system: the CPU and memory sampler, running in the background.
    :param gpu: the NVML sampler, running in the background.
    :param registry: the role's metrics; vitals gauges are added to it.
    :param peers: how many load balancers the node is registered with now.
    :param clock: monotonic seconds.
    :param started: the ``clock`` reading at which the node started; by
        default when this process started.
    """

    def __init__(
        self,
        api: InferenceAPI,
        system: SystemSampler,
        gpu: GPUSampler,
        registry: Registry,
        *,
        peers: Callable[[], int] = lambda: 0,
        clock: Callable[[], float] = time.monotonic,
        started: float | None = None,
    ) -> None:
        self.api = api
        self.system = system
        self.gpu = gpu
        self.registry = registry
        self.peers = peers
        self._clock = clock
        if started is None:
            age = process_age_seconds()
            started = clock() - (age if age is not None else time.monotonic() - _IMPORTED)
        self._started = started
        self._add_gauges()

    def snapshot(self) -> NodeVitals:
        """The vitals now (cheap: every figure is already in memory)."""
        api = self.api
        engine = api.engine
        return node_vitals(
            ready=api.not_ready_reason() is None,
            running=api.admission.running,
            queued=api.admission.queued,
            engine=engine.stats(),
            system=self.system.snapshot(),
            gpu=self.gpu.snapshot(),
            failed_responses=api.failed_responses,
            backoff_requests=api.backoff_requests,
            connected_peers=self.peers(),
            uptime_seconds=self._clock() - self._started,
            models=engine.models(),
        )

    async def handle(self, request: Request) -> Response:
        """Answer one ops request."""
        path = request.path
        if path not in ("/metrics", "/telemetry", "/health"):
            raise HTTPError(404, f"no route {request.method} {path}", code="not_found")
        if request.method not in ("GET", "HEAD"):
            raise HTTPError(
                405, f"{path} takes GET", code="method_not_allowed", headers=[("allow", "GET")]
            )
        if path == "/health":
            return health_response(self.api.not_ready_reason())
        if path == "/metrics" and not wants_prometheus(request.headers.get("accept")):
            return Response.json(self.snapshot().to_json())
        self._refresh_gpu_devices()
        return Response.text(
            self.registry.render_prometheus(), content_type=PROMETHEUS_CONTENT_TYPE
        )

    # -- gauges -------------------------------------------------------------------------

    def _add_gauges(self) -> None:
        registry, api = self.registry, self.api
        engine = api.engine

        def gauge(name: str, help: str, read: Callable[[], float]) -> None:
            registry.gauge(name, help).set_function(read)

        gauge(
            "inferno_backend_ready",
            "1 when the node takes new requests.",
            lambda: float(api.not_ready_reason() is None),
        )
        gauge(
            "inferno_backend_requests_in_progress",
            "Requests holding an admission slot.",
            lambda: float(api.admission.running),
        )
        gauge(
            "inferno_backend_requests_queued",
            "Requests waiting for an admission slot.",
            lambda: float(api.admission.queued),
        )
        gauge(
            "inferno_backend_engine_requests_waiting",
            "Requests the engine reports waiting (NaN: unknown).",
            lambda: _or_nan(engine.stats().waiting),
        )
        gauge(
            "inferno_backend_kv_cache_usage_ratio",
            "Fraction of the engine's KV cache in use (NaN: unknown).",
            lambda: _or_nan(engine.stats().kv_cache_usage),
        )
        gauge(
            "inferno_backend_generation_tokens_per_second",
            "Tokens generated per second, as the engine measures it (NaN: unknown).",
            lambda: _or_nan(engine.stats().tokens_per_second),
        )
        gauge(
            "inferno_backend_cpu_usage_ratio",
            "CPU in use, the tighter of machine and cgroup (NaN: unknown).",
            lambda: _or_nan(self.system.snapshot().cpu_usage),
        )
        gauge(
            "inferno_backend_memory_usage_ratio",
            "Memory in use, the tighter of machine and cgroup (NaN: unknown).",
            lambda: _or_nan(self.system.snapshot().memory_usage),
        )
        gauge(
            "inferno_backend_gpu_usage_ratio",
            "Mean GPU utilisation (NaN: no GPU).",
            lambda: _or_nan(self.gpu.snapshot().gpu_usage),
        )
        gauge(
            "inferno_backend_gpu_memory_usage_ratio",
            "GPU memory in use over all GPUs (NaN: no GPU).",
            lambda: _or_nan(self.gpu.snapshot().gpu_memory_usage),
        )
        gauge(
            "inferno_backend_registered_load_balancers",
            "Load balancers this node is registered with now.",
            lambda: float(self.peers()),
        )
        gauge(
            "inferno_backend_uptime_seconds",
            "Seconds since the node's process started.",
            lambda: self._clock() - self._started,
        )
        labels = ("gpu", "name")
        self._gpu_gauges: dict[str, Gauge] = {
            "utilization_gpu": registry.gauge(
                "inferno_gpu_utilization_ratio", "Busy fraction of each GPU (NVML).", labels
            ),
            "memory_used_bytes": registry.gauge(
                "inferno_gpu_memory_used_bytes", "Memory used on each GPU (NVML).", labels
            ),
            "memory_total_bytes": registry.gauge(
                "inferno_gpu_memory_total_bytes", "Memory of each GPU (NVML).", labels
            ),
            "temperature_c": registry.gauge(
                "inferno_gpu_temperature_celsius", "Temperature of each GPU (NVML).", labels
            ),
            "power_w": registry.gauge(
                "inferno_gpu_power_watts", "Power drawn by each GPU (NVML).", labels
            ),
        }

    def _refresh_gpu_devices(self) -> None:
        """Per-device GPU gauges from the latest NVML sample (none without a GPU)."""
        devices = self.gpu.snapshot().devices
        for field, family in self._gpu_gauges.items():
            family.clear()
            for device in devices:
                value = getattr(device, field)
                if value is not None:
                    family.labels(gpu=str(device.index), name=device.name or "").set(float(value))
