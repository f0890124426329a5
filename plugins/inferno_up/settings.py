"""The ``up`` configuration section, declared once, and its typed view.

Every setting derives its TOML key (``[up] backends = 3``), its environment
variable (``INFERNO_UP_BACKENDS``) and its flag (``inferno up --backends 3``)
from the table below; see :mod:`inferno.config`.  ``inferno --help`` imports
this module to build the command line, so it imports nothing heavier than
:mod:`inferno.config`.

``up`` is a local cluster for one person's machine: its proxy enrols any node
that reaches its operations port and takes requests without API keys, so
every port it opens is on a loopback address.  :func:`check_settings`
refuses anything else, and refuses port ranges that cannot hold every node.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, Final

from inferno.config import Duration, Float, Int, Section, Setting, Str
from inferno.errors import ConfigError, ConfigProblem

__all__ = [
    "DEFAULT_BACKENDS",
    "DEFAULT_OPS_PORT",
    "DEFAULT_PORT",
    "DEFAULT_STARTUP_TIMEOUT",
    "MAX_BACKENDS",
    "UP_SECTION",
    "UpSettings",
    "check_settings",
    "is_loopback",
]

DEFAULT_BACKENDS: Final = 2  # two nodes: the smallest pool where routing and failover show
#: Each backend is a process of ~60 MB; beyond this a laptop is the wrong place.
MAX_BACKENDS: Final = 64
#: As ``inferno proxy --workers`` allows.
MAX_PROXY_WORKERS: Final = 1024
DEFAULT_PORT: Final = 8080  # the proxy's service port, as `inferno proxy` uses
DEFAULT_OPS_PORT: Final = 6100  # the proxy's operations port, as `inferno proxy` uses
#: Seconds from start until every backend has registered: a cold pex start
#: unpacks itself first (seconds on a slow disk), then each node imports.
DEFAULT_STARTUP_TIMEOUT: Final = 60.0
_LOCAL_NAMES: Final = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})

UP_SECTION: Final = Section(
    "up",
    (
        Setting(
            "backends",
            Int(min=1, max=MAX_BACKENDS),
            DEFAULT_BACKENDS,
            "how many sim backends to start",
        ),
        Setting(
            "model",
            Str(),
            None,
            "model name the backends serve (default: the sim profile's model)",
        ),
        Setting(
            "sim_profile",
            Str(),
            None,
            "sim profile of every backend (cpu-tiny, a10g-llama3-8b, h100-llama3-8b) or .toml path",
        ),
        Setting(
            "sim_speed",
            Float(min=0.001, max=1_000_000.0),
            1.0,
            "the backends' simulators run this many times faster than their profile says",
        ),
        Setting(
            "host",
            Str(),
            "127.0.0.1",
            "loopback address every node listens on (127.0.0.1, ::1 or localhost)",
        ),
        Setting(
            "port",
            Int(min=0, max=65535),
            DEFAULT_PORT,
            "the proxy's service port: the OpenAI base URL (0: any free port)",
        ),
        Setting(
            "ops_port",
            Int(min=0, max=65535),
            DEFAULT_OPS_PORT,
            "the proxy's operations port, where backends register (0: any free port)",
        ),
        Setting(
            "backend_port",
            Int(min=0, max=65535),
            0,
            "first backend's service port, the next ones follow (0: any free ports)",
        ),
        Setting(
            "backend_ops_port",
            Int(min=0, max=65535),
            0,
            "first backend's operations port, the next ones follow (0: any free ports)",
        ),
        Setting(
            "proxy_workers",
            Int(min=0, max=MAX_PROXY_WORKERS),
            1,
            "the proxy's processes (0: one per core); one serves far more than local sim"
            " backends can answer, and leaves the cores to them",
        ),
        Setting(
            "announce_interval",
            Duration(min=0.1),
            30.0,
            "seconds between the backends' re-registrations with the proxy",
        ),
        Setting(
            "startup_timeout",
            Duration(min=0.1),
            DEFAULT_STARTUP_TIMEOUT,
            "how long the proxy and every backend may take to start and register",
        ),
    ),
    help="a whole local cluster in one command: a proxy and sim backends on loopback",
)


@dataclass(frozen=True, slots=True)
class UpSettings:
    """The ``[up]`` section as typed values (see :data:`UP_SECTION` for meanings).

    Defaults match the section's, except the proxy's ports: 0 (any free port)
    suits code that builds settings by hand, such as tests.
    """

    backends: int = DEFAULT_BACKENDS
    model: str | None = None
    sim_profile: str | None = None
    sim_speed: float = 1.0
    host: str = "127.0.0.1"
    port: int = 0
    ops_port: int = 0
    backend_port: int = 0
    backend_ops_port: int = 0
    proxy_workers: int = 1
    announce_interval: float = 30.0
    startup_timeout: float = DEFAULT_STARTUP_TIMEOUT

    @classmethod
    def from_section(cls, values: Mapping[str, Any]) -> UpSettings:
        """Build from ``config.section("up")``; keys this class does not know are ignored."""
        return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})

    def backend_ports(self, index: int) -> tuple[int, int]:
        """``(service, ops)`` ports of backend ``index`` (0-based); 0 means any free port."""
        service = self.backend_port + index if self.backend_port else 0
        ops = self.backend_ops_port + index if self.backend_ops_port else 0
        return service, ops


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps a port on this machine (``127.0.0.0/8``, ``::1``)."""
    name = host.strip().strip("[]").lower()
    if name in _LOCAL_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # another host name, or a wildcard: reachable from elsewhere


def check_settings(settings: UpSettings, source: Callable[[str], str]) -> None:
    """Refuse settings ``up`` must not or cannot run with.

    :param source: where a dotted key's value came from (``Config.source``).
    :raises ConfigError: naming every problem at once.
    """
    problems: list[ConfigProblem] = []

    def problem(key: str, what: str, allowed: str) -> None:
        dotted = f"up.{key}"
        problems.append(ConfigProblem(dotted, source(dotted), what, allowed))

    if not is_loopback(settings.host):
        problem(
            "host",
            f"{settings.host!r} is not a loopback address: up's proxy takes any node that "
            "registers and any client, so it stays on this machine",
            "127.0.0.1, ::1 or localhost",
        )
    for key in ("backend_port", "backend_ops_port"):
        first = getattr(settings, key)
        last = first + settings.backends - 1
        if first and last > 65535:
            problem(
                key,
                f"{settings.backends} backends from port {first} would need port {last}",
                f"at most {65536 - settings.backends}, or 0 for any free ports",
            )
    if problems:
        raise ConfigError(problems)
