"""The operations port of a multi-process proxy: the workers' metrics, gathered.

Each worker sends its registry's :meth:`~inferno.metrics.Registry.snapshot`
every second, and at once when the parent asks (it does before answering
``/telemetry`` and ``/metrics``, so a scrape counts every request answered
so far); the parent's ``/telemetry`` adds them to its own metrics, each
series labelled ``worker="N"`` (sum them in queries: ``sum by (route)``), and
its vitals count failed and backed-off answers over all workers.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from inferno.http import Request, Response
from inferno_proxy.ops import OpsApp

__all__ = ["WorkersOpsApp", "count_backoff", "render_worker_metrics"]

#: Routes that report the workers' counts (``/metrics``: failed and backed-off answers).
_FRESH_PATHS = frozenset({"/telemetry", "/metrics"})


class WorkersOpsApp(OpsApp):
    """The operations port of a multi-process proxy: ``/telemetry`` adds each worker's
    metrics, labelled ``worker="N"``."""

    #: Each worker's latest metrics snapshot, by worker index (set by the role).
    worker_metrics: Callable[[], Mapping[int, Mapping[str, Any]]] | None = None
    #: Waits until every worker applied the pool as it is now (set by the role).
    sync: Callable[[], Awaitable[None]] | None = None
    #: Waits until every worker sent its metrics as they are now (set by the role).
    refresh: Callable[[], Awaitable[None]] | None = None

    async def handle(self, request: Request) -> Response:
        """As :meth:`OpsApp.handle`; ``/telemetry`` and ``/metrics`` read the workers'
        current metrics, and a registration or deregistration is answered once
        every worker's pool has it."""
        if self.refresh is not None and request.path in _FRESH_PATHS:
            await self.refresh()
        response = await super().handle(request)
        if (
            self.sync is not None
            and response.status == 200
            and request.path in ("/register", "/deregister")
        ):
            await self.sync()
        return response

    def render_prometheus(self) -> str:
        text = super().render_prometheus()
        if self.worker_metrics is None:
            return text
        return text + render_worker_metrics(self.worker_metrics())


def count_backoff(snapshot: Mapping[str, Any]) -> tuple[int, int]:
    """``(failed, backoff)`` answers in a data path's metrics snapshot: 5xx other than
    503, and 429/503 (answered with Retry-After)."""
    failed = backoff = 0
    family = snapshot.get("inferno_proxy_requests_total", {})
    for series in family.get("series", ()):
        status = str(series.get("labels", {}).get("status", ""))
        count = int(series.get("value") or 0)
        if status in ("429", "503"):
            backoff += count
        elif status.startswith("5"):
            failed += count
    return failed, backoff


def render_worker_metrics(snapshots: Mapping[int, Mapping[str, Any]]) -> str:
    """Prometheus text of the workers' :meth:`Registry.snapshot` documents, each
    series labelled with its worker; one ``HELP``/``TYPE`` per family."""
    families: dict[str, tuple[str, str, list[str]]] = {}
    for index, snapshot in snapshots.items():
        for name, family in snapshot.items():
            kind, help_text = family.get("type", "untyped"), family.get("help", "")
            lines = families.setdefault(name, (kind, help_text, []))[2]
            for series in family.get("series", ()):
                labels = {**series.get("labels", {}), "worker": str(index)}
                if kind == "histogram":
                    for bound, count in series.get("buckets", {}).items():
                        lines.append(_sample(f"{name}_bucket", {**labels, "le": bound}, count))
                    lines.append(_sample(f"{name}_sum", labels, series.get("sum")))
                    lines.append(_sample(f"{name}_count", labels, series.get("count")))
                else:
                    lines.append(_sample(name, labels, series.get("value")))
    out: list[str] = []
    for name, (kind, help_text, lines) in families.items():
        escaped = help_text.replace("\\", "\\\\").replace("\n", "\\n")
        out.append(f"# HELP {name} {escaped}\n# TYPE {name} {kind}\n")
        out.extend(line for line in lines if line)
    return "".join(out)


def _sample(name: str, labels: Mapping[str, Any], value: object) -> str:
    if not isinstance(value, (int, float)):
        return ""  # a non-finite number (null in the snapshot): left out
    block = ",".join(f'{key}="{_escape(str(v))}"' for key, v in labels.items())
    number = float(value)
    text = str(int(number)) if number.is_integer() else repr(number)
    return f"{name}{{{block}}} {text}\n"


def _escape(label: str) -> str:
    """A label value as the text format quotes it (backslash, quote, newline escaped)."""
    return label.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
