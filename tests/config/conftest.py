"""Sections shared by the configuration tests: a small proxy-like role."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from inferno.config import (
    Address,
    Bool,
    Duration,
    Enum,
    Int,
    ListOf,
    Section,
    Setting,
    Size,
    Str,
)

PROXY = Section(
    "proxy",
    (
        Setting("port", Int(min=0, max=65535), 8080, "Port of the service."),
        Setting("listen", Address(), ("127.0.0.1", 8080), "Where to listen."),
        Setting("timeout", Duration(), 30.0, "Read timeout."),
        Setting("max_body_bytes", Size(), 8 * 1024 * 1024, "Largest request body."),
        Setting("tls", Bool(), False, "Serve TLS."),
        Setting("policy", Enum("round_robin", "least_loaded"), "round_robin", "Routing policy."),
        Setting("backends", ListOf(Address()), (), "Static backends."),
        Setting("secret", Str(), None, "Shared enrolment secret.", secret=True),
    ),
    help="The load balancer.",
)

HEALTH = Section(
    "health",
    (
        Setting("interval", Duration(), 5.0, "Time between active checks."),
        Setting("failure_threshold", Int(min=1), 3, "Failures before unhealthy."),
    ),
)

SECTIONS = (PROXY, HEALTH)

WriteToml = Callable[..., str]


@pytest.fixture
def sections() -> tuple[Section, ...]:
    """A proxy-like role's sections: ``[proxy]`` (its own) and ``[health]``."""
    return SECTIONS


@pytest.fixture
def write_toml(tmp_path: Path) -> WriteToml:
    """Write TOML text to a file under tmp_path and return its path as a string."""

    def write(text: str, name: str = "inferno.toml") -> str:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return str(path)

    return write
