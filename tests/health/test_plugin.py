"""The health plugin as the proxy meets it: through the hook, with a real RoleContext.

The proxy's own settings are not declared here (they belong to the proxy
role); a stand-in ``proxy`` section with the two keys the ``http`` factory
reads drives the real configuration loader, so values and their sources
arrive exactly as they will in production.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping

import anyio
import inferno_health.plugin
import pytest
from inferno_health.checkers import HealthChecker, HTTPChecker, TCPChecker, VitalsChecker

from inferno.config import Section, Setting, Str, load_config
from inferno.errors import ConfigError
from inferno.lifecycle import RoleContext
from inferno.metrics import Registry
from inferno.plugins import (
    ENTRY_POINT_GROUP,
    InfernoPluginManager,
    PluginInfo,
    collect_named,
    find_entry_points,
)
from inferno.roles import Role

pytestmark = pytest.mark.anyio

#: Stand-in for the proxy's section: plain strings, so the factory's own checks run.
PROXY_SECTION = Section(
    "proxy",
    (
        Setting("health_path", Str(), None, "path the http checker GETs"),
        Setting("health_port", Str(), None, "service or metrics"),
    ),
)
ROLE = Role(name="proxy", help="test proxy", entry="inferno_proxy.role:run")


def _manager() -> InfernoPluginManager:
    pm = InfernoPluginManager()
    info = PluginInfo(name="health", source="test", module="inferno_health.plugin")
    assert pm.load_plugin(inferno_health.plugin, info), pm.failures
    return pm


def _context(environ: Mapping[str, str], *, declared: bool = True) -> RoleContext:
    config = load_config([PROXY_SECTION] if declared else [], environ=environ, role="proxy")
    return RoleContext(
        role=ROLE,
        config=config,
        plugins=_manager(),
        stopping=anyio.Event(),
        shutdown_timeout=1.0,
        metrics=Registry(),
    )


def test_hook_offers_three_checkers() -> None:
    table = collect_named(_manager(), "inferno_health_checkers")
    assert list(table) == ["http", "tcp", "vitals"]
    assert {named.plugin for named in table.values()} == {"health"}


@pytest.mark.parametrize("declared", [True, False])
async def test_factories_build_named_checkers(declared: bool) -> None:
    """With the settings declared but unset, or not declared at all: defaults."""
    ctx = _context({}, declared=declared)
    table = collect_named(ctx.plugins, "inferno_health_checkers")
    expected = {"vitals": VitalsChecker, "http": HTTPChecker, "tcp": TCPChecker}
    for name, named in table.items():
        checker = named.factory(ctx)
        try:
            assert isinstance(checker, expected[name])
            assert isinstance(checker, HealthChecker)
            assert checker.name == name
            if isinstance(checker, HTTPChecker):
                assert (checker.path, checker.port) == ("/health", "service")
        finally:
            await checker.aclose()


async def test_http_factory_reads_proxy_settings() -> None:
    ctx = _context({"INFERNO_PROXY_HEALTH_PATH": "/ready", "INFERNO_PROXY_HEALTH_PORT": "metrics"})
    checker = collect_named(ctx.plugins, "inferno_health_checkers")["http"].factory(ctx)
    try:
        assert isinstance(checker, HTTPChecker)
        assert (checker.path, checker.port) == ("/ready", "metrics")
    finally:
        await checker.aclose()


async def test_http_factory_names_every_bad_setting_and_its_source() -> None:
    ctx = _context({"INFERNO_PROXY_HEALTH_PATH": "ready", "INFERNO_PROXY_HEALTH_PORT": "admin"})
    factory = collect_named(ctx.plugins, "inferno_health_checkers")["http"].factory
    with pytest.raises(ConfigError) as caught:
        factory(ctx)
    lines = str(caught.value).splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("proxy.health_path (env INFERNO_PROXY_HEALTH_PATH): ")
    assert "must start with '/'" in lines[0]
    assert lines[1] == (
        "proxy.health_port (env INFERNO_PROXY_HEALTH_PORT): "
        "'admin' is not a port choice; allowed: service, metrics"
    )


async def test_factories_accept_a_context_without_config() -> None:
    table = collect_named(_manager(), "inferno_health_checkers")
    for named in table.values():
        checker = named.factory(object())
        assert isinstance(checker, HealthChecker)
        await checker.aclose()


def test_importing_the_plugin_stays_light() -> None:
    """``inferno --help`` loads every plugin: this one must not pull in the HTTP stack."""
    heavy = ("anyio", "h11", "inferno.http.client", "inferno_health.checkers")
    code = (
        "import sys, inferno_health.plugin; "
        f"print(','.join(m for m in {heavy!r} if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
        env=dict(os.environ),
    )
    assert result.stdout.strip() == ""


def test_registered_as_an_entry_point() -> None:
    """The wheel declares the plugin the way a third party would."""
    points = {ep.name: ep.value for ep in find_entry_points(ENTRY_POINT_GROUP)}
    assert points.get("health") == "inferno_health.plugin"
