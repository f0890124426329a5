"""The ``backend`` and ``doctor`` configuration sections, declared once.

Every setting derives its TOML key (``[backend] max_queue = 64``), its
environment variable (``INFERNO_BACKEND_MAX_QUEUE``) and its flag
(``inferno backend --max-queue 64``) from the table below; see
:mod:`inferno.config`.  ``inferno --help`` imports this module to build the
command line, so it imports nothing heavier than :mod:`inferno.config`.

:class:`BackendSettings` is the typed view the role's code reads, built from
the effective :class:`~inferno.config.Config` once at start.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from inferno.config import (
    Address,
    Bool,
    Duration,
    Float,
    HostPort,
    Int,
    ListOf,
    Section,
    Setting,
    Size,
    Str,
)

__all__ = [
    "BACKEND_SECTION",
    "DEFAULT_DRAIN_TIMEOUT",
    "DEFAULT_MAX_BODY_BYTES",
    "DOCTOR_SECTION",
    "BackendSettings",
]

#: Seconds in-flight requests get to finish after SIGTERM.  Below the core's
#: default ``runtime.shutdown_timeout`` (30 s), which must leave the role time
#: to close its servers after the drain, or the role is cancelled (exit 1).
DEFAULT_DRAIN_TIMEOUT: Final = 25.0
#: Largest request body accepted on the service port (413 beyond): a long chat
#: history in JSON is well under a MiB; 8 MiB leaves room for long contexts.
DEFAULT_MAX_BODY_BYTES: Final = 8 * 1024 * 1024

BACKEND_SECTION: Final = Section(
    "backend",
    (
        Setting(
            "model",
            Str(),
            None,
            "model name served and registered (sim: default is the profile's model; "
            "openai: default is what the engine server lists)",
        ),
        Setting("engine", Str(), "sim", "inference engine: sim, openai, or one from a plugin"),
        Setting("host", Str(), "127.0.0.1", "address the service and ops ports bind to"),
        Setting("port", Int(min=0, max=65535), 3000, "service port: the OpenAI API (0: any free)"),
        Setting("ops_port", Int(min=0, max=65535), 6101, "ops port: vitals and telemetry"),
        Setting(
            "advertise_address",
            Address(),
            None,
            "host:port load balancers reach the service port at (default: host and bound port)",
        ),
        Setting(
            "node_id",
            Str(),
            None,
            "id registered with load balancers (default: backend-<advertise address>)",
        ),
        Setting(
            "discovery_lb",
            ListOf(Address()),
            (),
            "load balancers to register with: their ops ports, host:port,host:port",
        ),
        Setting(
            "shared_secret",
            Str(),
            None,
            "secret sent to load balancers as 'Authorization: Bearer'; never logged",
            secret=True,
        ),
        Setting("weight", Float(min=0.001), 1.0, "relative share of traffic for weighted policies"),
        Setting(
            "announce_interval",
            Duration(),
            30.0,
            "seconds between re-registrations, so a restarted load balancer re-learns this node",
        ),
        Setting(
            "drain_timeout",
            Duration(),
            DEFAULT_DRAIN_TIMEOUT,
            "on SIGTERM, how long in-flight and queued requests may take to finish",
        ),
        Setting(
            "max_concurrency",
            Int(min=1, max=100_000),
            64,
            "requests running in the engine at once; more wait in the queue",
        ),
        Setting(
            "max_queue",
            Int(min=0, max=1_000_000),
            256,
            "requests waiting for a slot; beyond that the answer is 429 with Retry-After",
        ),
        Setting(
            "max_body_size",
            Size(),
            DEFAULT_MAX_BODY_BYTES,
            "largest request body on the service port (413 beyond)",
        ),
        Setting(
            "engine_url",
            Str(),
            None,
            "openai engine: base URL of the OpenAI-compatible server (vLLM, llama.cpp, ...)",
        ),
        Setting(
            "engine_metrics_url",
            Str(),
            None,
            "openai engine: its Prometheus metrics (default <engine-url>/metrics)",
        ),
        Setting(
            "engine_api_key",
            Str(),
            None,
            "openai engine: API key sent to the engine server; never logged",
            secret=True,
        ),
        Setting(
            "sim_profile",
            Str(),
            None,
            "sim engine: profile name (cpu-tiny, a10g-llama3-8b, h100-llama3-8b) or .toml path",
        ),
        Setting(
            "sim_speed",
            Float(min=0.001, max=1_000_000.0),
            1.0,
            "sim engine: run this many times faster than the profile says",
        ),
        Setting(
            "sim_faults",
            Str(),
            "",
            "sim engine: faults to inject, e.g. failure_rate=0.1,stall_after_tokens=5",
        ),
        Setting(
            "gpu_report",
            Bool(),
            False,
            "print the GPU report (inventory, NVML samples, matmul throughput) and exit",
        ),
    ),
    help="the inference node: an OpenAI-compatible API over an engine",
)

DOCTOR_SECTION: Final = Section(
    "doctor",
    (
        Setting("window", Duration(), 5.0, "seconds over which NVML samples are taken"),
        Setting("samples", Int(min=1, max=1000), 5, "NVML readings over the window"),
        Setting("matmul", Bool(), True, "run the PyTorch matmul throughput test when importable"),
    ),
    help="the GPU report: devices, NVML samples and matmul throughput",
)


@dataclass(frozen=True, slots=True)
class BackendSettings:
    """The ``[backend]`` section as typed values (see :data:`BACKEND_SECTION` for meanings)."""

    model: str | None = None
    engine: str = "sim"
    host: str = "127.0.0.1"
    port: int = 3000
    ops_port: int = 6101
    advertise_address: HostPort | None = None
    node_id: str | None = None
    discovery_lb: tuple[HostPort, ...] = ()
    shared_secret: str | None = None
    weight: float = 1.0
    announce_interval: float = 30.0
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT
    max_concurrency: int = 64
    max_queue: int = 256
    max_body_size: int = DEFAULT_MAX_BODY_BYTES
    engine_url: str | None = None
    engine_metrics_url: str | None = None
    engine_api_key: str | None = None
    sim_profile: str | None = None
    sim_speed: float = 1.0
    sim_faults: str = ""
    gpu_report: bool = False

    @classmethod
    def from_section(cls, values: Mapping[str, Any]) -> BackendSettings:
        """Build from ``config.section("backend")``."""
        return cls(**{key: values[key] for key in cls.__dataclass_fields__ if key in values})

    def __repr__(self) -> str:
        # Secrets stay out of logs and tracebacks.
        shown = {
            name: ("<redacted>" if name in ("shared_secret", "engine_api_key") and value else value)
            for name, value in ((n, getattr(self, n)) for n in self.__dataclass_fields__)
        }
        return f"BackendSettings({shown})"
