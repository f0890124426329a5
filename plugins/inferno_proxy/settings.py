"""The ``proxy`` configuration section, declared once.

Every setting derives its TOML key (``[proxy] policy = "affinity"``), its
environment variable (``INFERNO_PROXY_POLICY``) and its flag (``inferno proxy
--policy affinity``) from the table below; see :mod:`inferno.config`.
``inferno --help`` imports this module to build the command line, so it
imports nothing heavier than :mod:`inferno.config`.

:class:`ProxySettings` is the typed view the role reads, built from the
effective :class:`~inferno.config.Config` once at start; it also turns the
flat settings into the pure modules' own settings objects
(:meth:`ProxySettings.pool_settings`, :meth:`ProxySettings.server_limits`).

Names the proxy cannot check before plugins are loaded (``policy``,
``health_checker``, ``static_health_checker``) are plain strings here and are
checked against the plugins' tables when the role starts.
"""

from __future__ import annotations

import os
import pathlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar, Final

from inferno.config import (
    Bool,
    Duration,
    Enum,
    Float,
    Int,
    ListOf,
    Path,
    Section,
    Setting,
    Size,
    Str,
    TomlValue,
)
from inferno_proxy.staticnodes import BackendSpec, StaticBackend

if TYPE_CHECKING:
    from inferno.http import ServerLimits
    from inferno_proxy.forward import ForwardSettings
    from inferno_proxy.nodes import PoolSettings

__all__ = [
    "DEFAULT_OPS_PORT",
    "DEFAULT_PORT",
    "MAX_WORKERS",
    "PROXY_SECTION",
    "SECRET_SETTINGS",
    "HeaderField",
    "ProxySettings",
    "WorkerCount",
    "response_fields",
]

DEFAULT_PORT: Final = 8080  # the service port clients send inference requests to
DEFAULT_OPS_PORT: Final = 6100  # registration, vitals and telemetry (DESIGN.md)
#: Largest client request body: a long chat history in JSON is well under a MiB;
#: 8 MiB leaves room for long contexts, as the backend allows.
DEFAULT_MAX_BODY_BYTES: Final = 8 * 1024 * 1024
#: Settings whose values never appear in logs or ``repr``.
SECRET_SETTINGS: Final = frozenset({"shared_secret"})
_SHORTEST_INTERVAL: Final = 0.01  # seconds; below this a check loop would only burn CPU

#: Most worker processes: far above any machine's cores, low enough that a typo
#: (``--workers 10000``) is refused rather than forking the machine to death.
MAX_WORKERS: Final = 1024


#: Fields a configuration may not set on responses: the server frames each
#: message and owns the connection, and the request id is the proxy's.
_RESERVED_RESPONSE_FIELDS: Final = frozenset(
    {
        "connection",
        "content-length",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "x-request-id",
    }
)
_TOKEN: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FIELD_VALUE: Final = re.compile(r"[\t\x20-\x7e\x80-\xff]*")


@dataclass(frozen=True, slots=True)
class HeaderField:
    """A ``Name: value`` response field, parsed to ``(name, value)`` (RFC 9110 syntax)."""

    metavar: ClassVar[str] = "'NAME: VALUE'"

    def parse(self, raw: object) -> tuple[str, str]:
        if not isinstance(raw, str):
            raise ValueError(f"expected a 'Name: value' string, got {type(raw).__name__}")
        name, colon, value = raw.partition(":")
        name, value = name.strip(), value.strip()
        if not colon or not name:
            raise ValueError(f"{raw!r} is not 'Name: value'")
        if not _TOKEN.fullmatch(name):
            raise ValueError(f"{name!r} is not a valid field name")
        if name.lower() in _RESERVED_RESPONSE_FIELDS:
            raise ValueError(f"{name!r} is set by the proxy itself")
        if not _FIELD_VALUE.fullmatch(value):
            raise ValueError(f"the value of {name!r} holds a control character")
        return name, value

    def describe(self) -> str:
        return "'Name: value' (a field name the proxy does not set itself, a printable value)"

    def render(self, value: Any) -> TomlValue:
        name, text = value
        return f"{name}: {text}"


def response_fields(
    fixed: tuple[tuple[str, str], ...], configured: tuple[tuple[str, str], ...]
) -> tuple[tuple[str, str], ...]:
    """*fixed* fields, then *configured* ones, a configured name replacing a fixed one
    (names compared without case; the last of a repeated configured name wins)."""
    chosen = {name.lower(): (name, value) for name, value in configured}
    kept = tuple(field for field in fixed if field[0].lower() not in chosen)
    return kept + tuple(chosen.values())


@dataclass(frozen=True, slots=True)
class WorkerCount:
    """``auto`` (stored as 0: one process per core) or a number of processes."""

    metavar: ClassVar[str] = "N|auto"

    def parse(self, raw: object) -> int:
        if isinstance(raw, str) and raw.strip().lower() == "auto":
            return 0
        value: int = Int(min=0, max=MAX_WORKERS).parse(raw)
        return value

    def describe(self) -> str:
        return f"auto, or an integer from 0 (auto) to {MAX_WORKERS}"

    def render(self, value: Any) -> TomlValue:
        return "auto" if value == 0 else int(value)


PROXY_SECTION: Final = Section(
    "proxy",
    (
        # -- where it listens -----------------------------------------------------------------
        Setting("host", Str(), "127.0.0.1", "address the service port binds to"),
        Setting(
            "port",
            Int(min=0, max=65535),
            DEFAULT_PORT,
            "service port: clients' inference requests (0: any free port)",
        ),
        Setting(
            "ops_host",
            Str(),
            "127.0.0.1",
            "address the operations port binds to; a non-loopback one needs --shared-secret "
            "or --open-enrollment",
        ),
        Setting(
            "ops_port",
            Int(min=0, max=65535),
            DEFAULT_OPS_PORT,
            "operations port: /register, /deregister, /backends, /peers, /metrics, /telemetry",
        ),
        Setting(
            "workers",
            WorkerCount(),
            0,
            "processes serving the service port, sharing it (SO_REUSEPORT); auto: one per core",
        ),
        Setting(
            "worker_header",
            Bool(),
            False,
            "add X-Inferno-Worker: <pid> to responses, naming the process that answered "
            "(debugging, tests)",
        ),
        Setting("tls_cert", Path(), None, "PEM certificate (chain) for TLS on the service port"),
        Setting("tls_key", Path(), None, "PEM private key for --tls-cert (if not in that file)"),
        # -- discovery ------------------------------------------------------------------------
        Setting(
            "backends",
            ListOf(BackendSpec()),
            (),
            "static backends host:port,host:port (plain vLLM, llama.cpp... servers), each "
            "optionally with ;weight=W and ;model=NAME (once per model); without a model, "
            "a node's models are read from its GET /v1/models",
        ),
        Setting(
            "shared_secret",
            Str(),
            None,
            "secret nodes must send to /register and /deregister as 'Authorization: Bearer'",
            secret=True,
        ),
        Setting(
            "open_enrollment",
            Bool(),
            False,
            "let anyone who reaches a non-loopback operations port register nodes",
        ),
        Setting("max_nodes", Int(min=1, max=1_000_000), 10_000, "most nodes the pool holds"),
        # -- clients --------------------------------------------------------------------------
        Setting(
            "api_keys",
            Path(),
            None,
            "file of client API keys (hashed); without it the service port is open",
        ),
        Setting(
            "rate_limit_per_key",
            Float(min=0.0),
            0.0,
            "requests per second per API key, sustained (0: no limit)",
        ),
        Setting(
            "rate_limit_per_ip",
            Float(min=0.0),
            0.0,
            "requests per second per client IP address, sustained (0: no limit)",
        ),
        Setting(
            "rate_limit_burst",
            Float(min=1.0),
            20.0,
            "requests a client may send at once before its rate limit applies",
        ),
        Setting(
            "security_headers",
            Bool(),
            True,
            "add nosniff, frame and referrer security headers to every response",
        ),
        Setting(
            "response_headers",
            ListOf(HeaderField()),
            (),
            "'Name: value' fields set on every response, replacing a node's own and the"
            " security headers of the same name (e.g. Strict-Transport-Security)",
        ),
        Setting(
            "trust_forwarded_headers",
            Bool(),
            False,
            "believe clients' X-Forwarded-For/-Proto (only behind another trusted proxy)",
        ),
        # -- routing --------------------------------------------------------------------------
        Setting(
            "policy",
            Str(),
            "least_requests",
            "routing policy: least_requests, round_robin, weighted, affinity, or a plugin's",
        ),
        Setting(
            "max_ejection_percent",
            Float(min=0.0, max=100.0),
            50.0,
            "most nodes of a model kept out of rotation; beyond it all are used (panic)",
        ),
        Setting(
            "slow_start",
            Duration(),
            30.0,
            "a (re)joining node's share of traffic ramps up over this long (0: off)",
        ),
        # -- health ---------------------------------------------------------------------------
        Setting(
            "health_checker",
            Str(),
            "vitals",
            "active check of registered nodes: vitals, http, tcp, or a plugin's",
        ),
        Setting(
            "static_health_checker",
            Str(),
            "http",
            "active check of --backends nodes (which may lack vitals): http, tcp, vitals, ...",
        ),
        Setting("health_path", Str(), "/health", "the path the http checker GETs"),
        Setting(
            "health_port",
            Enum("service", "metrics"),
            "service",
            "where the http checker GETs health_path: the service or the metrics port",
        ),
        Setting(
            "health_interval",
            Duration(min=_SHORTEST_INTERVAL),
            5.0,
            "time between two active checks of every node",
        ),
        Setting(
            "health_timeout",
            Duration(min=_SHORTEST_INTERVAL),
            2.0,
            "longest one active check may take before it counts as failed",
        ),
        Setting(
            "failure_threshold",
            Int(min=1, max=1000),
            3,
            "consecutive failures that take a healthy node out of rotation",
        ),
        Setting(
            "recovery_threshold",
            Int(min=1, max=1000),
            2,
            "consecutive passed checks that bring an unhealthy node back",
        ),
        Setting(
            "removal_threshold",
            Int(min=1, max=100_000),
            10,
            "consecutive failures after which a registered node is forgotten",
        ),
        Setting(
            "stall_timeout",
            Duration(),
            30.0,
            "a node with requests in flight that sends no byte this long is hung (0: off)",
        ),
        Setting(
            "circuit_failure_threshold",
            Int(min=1, max=1000),
            5,
            "consecutive failed requests that open a node's circuit breaker",
        ),
        Setting(
            "circuit_cooldown",
            Duration(min=0.001),
            5.0,
            "how long an open circuit first stays open; doubles on each reopening",
        ),
        Setting(
            "circuit_max_cooldown",
            Duration(min=0.001),
            300.0,
            "the longest an open circuit stays open",
        ),
        # -- forwarding -----------------------------------------------------------------------
        Setting(
            "connect_timeout",
            Duration(min=0.001),
            5.0,
            "longest wait to connect to a node before trying another",
        ),
        Setting(
            "first_byte_timeout",
            Duration(min=0.001),
            60.0,
            "longest wait for the start of a node's response: its head and first chunk,"
            " one deadline (prefill of a long prompt included)",
        ),
        Setting(
            "idle_timeout",
            Duration(min=0.001),
            60.0,
            "longest silence between two chunks of a response (never caps a whole stream)",
        ),
        Setting(
            "max_attempts",
            Int(min=1, max=100),
            3,
            "nodes tried for one request whose response has not started",
        ),
        Setting(
            "retry_ratio",
            Float(min=0.0, max=1.0),
            0.2,
            "retries may add at most this share of the traffic",
        ),
        Setting(
            "queue_timeout",
            Duration(),
            30.0,
            "how long a request waits for a node when none is ready, or for one to come"
            " back when every node it tried was unreachable (from its arrival; then 503)",
        ),
        Setting(
            "max_queue",
            Int(min=0, max=1_000_000),
            256,
            "requests waiting per model for a node; beyond that the answer is 429",
        ),
        # -- limits of the proxy's own server -------------------------------------------------
        Setting("max_header_bytes", Size(min=1024), 16 * 1024, "largest request head (431)"),
        Setting(
            "max_body_bytes", Size(min=1), DEFAULT_MAX_BODY_BYTES, "largest request body (413)"
        ),
        Setting(
            "header_timeout",
            Duration(min=0.001),
            10.0,
            "longest a client may take to send a request head (408)",
        ),
        Setting(
            "keepalive_timeout",
            Duration(min=0.001),
            60.0,
            "an idle client connection is closed after this long",
        ),
        Setting(
            "max_connections",
            Int(min=1, max=10_000_000),
            4096,
            "client connections served at once; more are answered 503",
        ),
    ),
    help="the load balancer in front of inference nodes",
)


@dataclass(frozen=True, slots=True)
class ProxySettings:
    """The ``[proxy]`` section as typed values (see :data:`PROXY_SECTION` for meanings).

    Defaults match the section's, except the ports, 0 (any free port), and
    ``workers``, 1 (this process serves): that suits code that builds
    settings by hand, such as tests.
    """

    host: str = "127.0.0.1"
    port: int = 0
    ops_host: str = "127.0.0.1"
    ops_port: int = 0
    workers: int = 1
    worker_header: bool = False
    tls_cert: pathlib.Path | None = None
    tls_key: pathlib.Path | None = None
    backends: tuple[StaticBackend, ...] = ()
    shared_secret: str | None = None
    open_enrollment: bool = False
    max_nodes: int = 10_000
    api_keys: pathlib.Path | None = None
    rate_limit_per_key: float = 0.0
    rate_limit_per_ip: float = 0.0
    rate_limit_burst: float = 20.0
    security_headers: bool = True
    response_headers: tuple[tuple[str, str], ...] = ()
    trust_forwarded_headers: bool = False
    policy: str = "least_requests"
    max_ejection_percent: float = 50.0
    slow_start: float = 30.0
    health_checker: str = "vitals"
    static_health_checker: str = "http"
    health_path: str = "/health"
    health_port: str = "service"
    health_interval: float = 5.0
    health_timeout: float = 2.0
    failure_threshold: int = 3
    recovery_threshold: int = 2
    removal_threshold: int = 10
    stall_timeout: float = 30.0
    circuit_failure_threshold: int = 5
    circuit_cooldown: float = 5.0
    circuit_max_cooldown: float = 300.0
    connect_timeout: float = 5.0
    first_byte_timeout: float = 60.0
    idle_timeout: float = 60.0
    max_attempts: int = 3
    retry_ratio: float = 0.2
    queue_timeout: float = 30.0
    max_queue: int = 256
    max_header_bytes: int = 16 * 1024
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    header_timeout: float = 10.0
    keepalive_timeout: float = 60.0
    max_connections: int = 4096

    @classmethod
    def from_section(cls, values: Mapping[str, Any]) -> ProxySettings:
        """Build from ``config.section("proxy")``; keys this class does not know are ignored."""
        return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})

    def worker_count(self) -> int:
        """Processes to run: :attr:`workers`, or (0) one per core this process may use."""
        if self.workers > 0:
            return self.workers
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except (AttributeError, OSError):  # no affinity outside Linux
            return max(1, os.cpu_count() or 1)

    def pool_settings(self) -> PoolSettings:
        """The pool's tuning: health thresholds, circuit breaker, safety valves.

        :raises ValueError: when the values do not fit together (a maximum
            cooldown below the first one).
        """
        from inferno_proxy.circuit import CircuitSettings
        from inferno_proxy.health import HealthSettings
        from inferno_proxy.nodes import PoolSettings

        return PoolSettings(
            health=HealthSettings(
                failure_threshold=self.failure_threshold,
                recovery_threshold=self.recovery_threshold,
                removal_threshold=self.removal_threshold,
            ),
            circuit=CircuitSettings(
                failure_threshold=self.circuit_failure_threshold,
                base_cooldown=self.circuit_cooldown,
                max_cooldown=self.circuit_max_cooldown,
            ),
            max_ejection_percent=self.max_ejection_percent,
            slow_start=self.slow_start,
            stall_timeout=self.stall_timeout,
            max_nodes=self.max_nodes,
        )

    def forward_settings(self) -> ForwardSettings:
        """How the data path forwards requests: phase timeouts, attempts, queue, headers."""
        from inferno_proxy.forward import DEFAULT_SECURITY_HEADERS, ForwardSettings

        return ForwardSettings(
            connect_timeout=self.connect_timeout,
            first_byte_timeout=self.first_byte_timeout,
            idle_timeout=self.idle_timeout,
            max_attempts=self.max_attempts,
            queue_timeout=self.queue_timeout,
            max_queue=self.max_queue,
            security_headers=response_fields(
                DEFAULT_SECURITY_HEADERS if self.security_headers else (), self.response_headers
            ),
            trust_forwarded_headers=self.trust_forwarded_headers,
            max_body_bytes=self.max_body_bytes,
        )

    def server_limits(self) -> ServerLimits:
        """Limits of the service port's server (the operations port has its own)."""
        from inferno.http import ServerLimits

        return ServerLimits(
            max_header_bytes=self.max_header_bytes,
            max_body_bytes=self.max_body_bytes,
            header_timeout=self.header_timeout,
            keepalive_timeout=self.keepalive_timeout,
            max_connections=self.max_connections,
        )

    def __repr__(self) -> str:
        # Secrets stay out of logs and tracebacks.
        shown = {
            f.name: "<redacted>"
            if f.name in SECRET_SETTINGS and getattr(self, f.name)
            else getattr(self, f.name)
            for f in fields(self)
        }
        return f"ProxySettings({shown})"
