"""The ``up`` role: a whole local cluster (a proxy and sim backends) in one command.

A first-party plugin registered through the ``inferno`` entry-point group
(``up = "inferno_up.plugin"``), as a third-party one would be:

* :mod:`inferno_up.plugin` -- the ``inferno_roles()`` hook; light to import.
* :mod:`inferno_up.settings` -- the ``[up]`` configuration section.
* :mod:`inferno_up.role` -- the role: start in order, wait for registration, stop.
* :mod:`inferno_up.children` -- child processes: re-running Inferno, logs, no orphans.

This package module imports nothing, so loading the plugin costs nothing.
"""

from __future__ import annotations

__all__: list[str] = []
