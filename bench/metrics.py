"""How much a metric update costs on the request path, and how long a scrape takes.

Run by hand (not a test): ``.venv/bin/python bench/metrics.py [--quick]``.
Prints nanoseconds per operation (best of several timeit repeats, minus the
cost of an empty loop, so the figure is the operation and not the noise
around it) and the render/snapshot/parse time of a registry of 1,000 series.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import timeit
from typing import Any

from inferno.metrics import Registry, parse_prometheus

REPEATS = 5  # best-of: the minimum is the least disturbed run


def per_call_ns(statement: str, namespace: dict[str, Any], number: int) -> float:
    """Best-of-REPEATS cost of *statement* in nanoseconds, net of the timing loop itself."""
    best = min(timeit.repeat(statement, number=number, repeat=REPEATS, globals=namespace))
    empty = min(timeit.repeat("pass", number=number, repeat=REPEATS))
    return max(best - empty, 0.0) / number * 1e9


def build_scrape_registry() -> Registry:
    """1,000 series: 100 routes x 5 statuses counters, 100 x 4 gauges, 100 histograms."""
    registry = Registry()
    requests = registry.counter(
        "bench_requests_total", "Requests by route and status.", ("route", "status")
    )
    in_flight = registry.gauge("bench_in_flight_requests", "In flight.", ("route", "backend"))
    latency = registry.histogram("bench_request_duration_seconds", "Latency.", ("route",))
    for r in range(100):
        route = f"/v1/route/{r}"
        for s, status in enumerate(("200", "400", "429", "500", "503")):
            requests.labels(route=route, status=status).inc(r * 5 + s)
        for b in range(4):
            in_flight.labels(route=route, backend=f"node-{b}").set(b)
        for i in range(20):
            latency.labels(route=route).observe(i * 0.37)
    return registry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Cost of inferno.metrics operations.")
    parser.add_argument("--quick", action="store_true", help="fewer iterations (a smoke run)")
    args = parser.parse_args(argv)
    n = 20_000 if args.quick else 1_000_000

    print(f"python {sys.version.split()[0]} ({platform.python_implementation()})")
    print(f"machine {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}")

    registry = Registry()
    labelled_histogram = registry.histogram(
        "labelled_latency_seconds", "Labelled histogram.", ("route",)
    )
    ns: dict[str, Any] = {
        "plain": registry.counter("plain_total", "Unlabelled counter."),
        "labelled": registry.counter("labelled_total", "Labelled counter.", ("route", "status")),
        "gauge": registry.gauge("level", "A gauge."),
        "histogram": registry.histogram("latency_seconds", "A histogram (15 buckets)."),
        "bound_histogram": labelled_histogram.labels(route="/v1/chat/completions"),
    }
    ns["bound"] = ns["labelled"].labels(route="/v1/chat/completions", status="200")
    rows = [
        ("counter.inc(), unlabelled", "plain.inc()"),
        ("counter bound child .inc()", "bound.inc()"),
        (
            "counter .labels(route=, status=).inc()",
            'labelled.labels(route="/v1/chat/completions", status="200").inc()',
        ),
        (
            'counter .labels("/v1/..", "200").inc()',
            'labelled.labels("/v1/chat/completions", "200").inc()',
        ),
        ("gauge.set(3), unlabelled", "gauge.set(3)"),
        ("histogram.observe(0.3), unlabelled", "histogram.observe(0.3)"),
        ("histogram bound child .observe(0.3)", "bound_histogram.observe(0.3)"),
    ]
    for label, statement in rows:
        print(f"{label:<44} {per_call_ns(statement, ns, n):8.1f} ns")

    scrape = build_scrape_registry()
    text = scrape.render_prometheus()
    families = [scrape.get(name) for name in scrape.snapshot()]
    series = sum(len(list(f.series())) for f in families if f is not None)
    samples = sum(1 for line in text.splitlines() if not line.startswith("#"))
    runs = 5 if args.quick else 50

    def best_ms(statement: str) -> float:
        names = {"scrape": scrape, "text": text, "parse_prometheus": parse_prometheus}
        return (
            min(timeit.repeat(statement, number=runs, repeat=REPEATS, globals=names)) / runs * 1e3
        )

    print(f"registry of {series} series ({samples} sample lines, {len(text)} bytes):")
    print(f"  render_prometheus()  {best_ms('scrape.render_prometheus()'):8.3f} ms")
    print(f"  snapshot()           {best_ms('scrape.snapshot()'):8.3f} ms")
    print(f"  parse_prometheus()   {best_ms('parse_prometheus(text)'):8.3f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
