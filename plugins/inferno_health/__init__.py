"""Active health checkers for the ``proxy`` role: ``vitals`` (default), ``http``, ``tcp``.

A first-party plugin registered through the ``inferno`` entry-point group
(``health = "inferno_health.plugin"``), exactly as a third-party checker
plugin would be:

* :mod:`inferno_health.plugin` -- the ``inferno_health_checkers()`` hook
  implementation; light to import, it names factories only.
* :mod:`inferno_health.checkers` -- the checkers, the :class:`CheckTarget` /
  :class:`CheckResult` values they exchange with the proxy and the
  :class:`HealthChecker` protocol a third-party checker implements.

This package module imports nothing, so loading the plugin to build the
command line costs nothing.
"""

from __future__ import annotations

__all__: list[str] = []
