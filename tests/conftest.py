"""Fixtures shared by every test package."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from inferno.plugins import get_plugin_manager

#: The pex builds, shared by tests/pex and tests/e2e (see tests/pexbuild.py).
pytest_plugins = ("tests.pexbuild",)


@pytest.fixture
def anyio_backend() -> str:
    """Run async tests on asyncio, the event loop Inferno runs on in production."""
    return "asyncio"


@pytest.fixture
def clean_inferno_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No ``INFERNO_`` variable from the caller's environment; JSON logs; a fresh plugin manager.

    The plugin manager is cached per process and keyed on ``INFERNO_PLUGINS``
    and ``INFERNO_PLUGIN_PATH``, so it is rebuilt before the test (after the
    test's own ``setenv``\\ s in a dependent fixture) and again afterwards.
    """
    for name in list(os.environ):
        if name.startswith("INFERNO_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("INFERNO_LOG_FORMAT", "json")
    get_plugin_manager(refresh=True)
    yield
    get_plugin_manager(refresh=True)
