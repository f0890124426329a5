"""Read an engine server's own Prometheus metrics as :class:`~.base.EngineStats`.

The ``openai`` engine fronts vLLM, SGLang, llama.cpp server or TGI; each
publishes its load under its own names.  This module knows those names and
turns one scrape into a :class:`EngineReading` and successive scrapes into
:class:`~.base.EngineStats`.  It is pure: samples and a monotonic time in,
values out (the engine does the HTTP).

What each server calls things (units matter more than names: every KV-cache
figure below is a 0..1 fraction):

- **vLLM**: ``vllm:num_requests_running``, ``vllm:num_requests_waiting``;
  KV cache ``vllm:kv_cache_usage_perc`` (older releases:
  ``vllm:gpu_cache_usage_perc``; ``_perc`` notwithstanding, 1.0 means full);
  counter ``vllm:generation_tokens_total``; V0's gauge
  ``vllm:avg_generation_throughput_toks_per_s``.  Labelled ``model_name``
  (and ``engine`` in V1).
- **SGLang**: ``sglang:num_running_reqs``, ``sglang:num_queue_reqs``; KV cache
  ``sglang:token_usage`` (share of the KV token pool in use); counter
  ``sglang:generation_tokens_total``; gauge ``sglang:gen_throughput``.
- **llama.cpp server** (``--metrics``): ``llamacpp:requests_processing``,
  ``llamacpp:requests_deferred``; KV cache ``llamacpp:kv_cache_usage_ratio``
  (dropped by newer builds); counter ``llamacpp:tokens_predicted_total``;
  gauge ``llamacpp:predicted_tokens_seconds``.
- **TGI**: ``tgi_batch_current_size`` (running), ``tgi_queue_size``
  (waiting); no KV-cache figure; generated tokens from the histogram sum
  ``tgi_request_generated_tokens_sum`` (grows when a request finishes, so its
  rate is lumpier).

Aggregation: a server with several engines or data-parallel ranks (vLLM's
``engine`` label, SGLang's ``dp_rank``) publishes one series per engine; counts
and token totals are summed over the series, fractions averaged (every rank
has a KV pool of the same size).  A name the server does not publish reads as
``None`` ("cannot tell"), never as 0.

Tokens per second: a rate derived from the generated-tokens counter between
two scrapes is preferred (it is the server's real aggregate output); until
two scrapes exist, or for a server with no counter, the server's own
throughput gauge is used.  (llama.cpp's gauge is the average speed of one
slot, not the node's throughput: one more reason to prefer the counter.)
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from inferno.metrics import Sample
from inferno_backend.engines.base import EngineStats

__all__ = [
    "FAMILIES",
    "EngineMetricsReader",
    "EngineReading",
    "MetricNames",
    "read_engine_metrics",
]

#: A fraction this little above 1 is rounding in the server (reported as 1.0);
#: anything further outside 0..1 is not the unit we expect and is ignored.
FRACTION_SLACK: Final = 1e-6


@dataclass(frozen=True, slots=True)
class MetricNames:
    """The metric names of one engine server family, each field in order of preference.

    When a server renamed a metric, both names are listed, newest first, and
    only the first one present is read (servers in transition publish both,
    which must not be counted twice).
    """

    family: str
    running: tuple[str, ...] = ()
    waiting: tuple[str, ...] = ()
    #: Gauges of the fraction (0..1) of the KV cache in use.
    kv_cache_usage: tuple[str, ...] = ()
    #: Monotonic counters of generated (completion) tokens.
    generated_tokens: tuple[str, ...] = ()
    #: Gauges of generation throughput in tokens per second.
    throughput: tuple[str, ...] = ()


VLLM: Final = MetricNames(
    family="vllm",
    running=("vllm:num_requests_running",),
    waiting=("vllm:num_requests_waiting",),
    kv_cache_usage=("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
    generated_tokens=("vllm:generation_tokens_total",),
    throughput=("vllm:avg_generation_throughput_toks_per_s",),
)
SGLANG: Final = MetricNames(
    family="sglang",
    running=("sglang:num_running_reqs",),
    waiting=("sglang:num_queue_reqs",),
    kv_cache_usage=("sglang:token_usage",),
    generated_tokens=("sglang:generation_tokens_total",),
    throughput=("sglang:gen_throughput",),
)
LLAMACPP: Final = MetricNames(
    family="llama.cpp",
    running=("llamacpp:requests_processing",),
    waiting=("llamacpp:requests_deferred",),
    kv_cache_usage=("llamacpp:kv_cache_usage_ratio",),
    generated_tokens=("llamacpp:tokens_predicted_total",),
    throughput=("llamacpp:predicted_tokens_seconds",),
)
TGI: Final = MetricNames(
    family="tgi",
    running=("tgi_batch_current_size",),
    waiting=("tgi_queue_size",),
    generated_tokens=("tgi_request_generated_tokens_sum",),
)

#: Every family understood, in the order ties are broken.
FAMILIES: Final[tuple[MetricNames, ...]] = (VLLM, SGLANG, LLAMACPP, TGI)


@dataclass(frozen=True, slots=True)
class EngineReading:
    """What one scrape says; ``None`` where the server publishes no such metric.

    ``family`` is the server family whose names matched (``None``: none did).
    ``generated_tokens`` is the counter's value, meaningful only as a
    difference between two scrapes.
    """

    family: str | None = None
    running: int | None = None
    waiting: int | None = None
    kv_cache_usage: float | None = None
    generated_tokens: float | None = None
    throughput: float | None = None


def read_engine_metrics(
    samples: Iterable[Sample], families: Iterable[MetricNames] = FAMILIES
) -> EngineReading:
    """Read one scrape's samples with the names of the family that matches best.

    The family with the most of its fields present wins (the first listed
    on a tie); samples whose value is NaN or infinite are ignored.
    """
    values: dict[str, list[float]] = {}
    for sample in samples:
        if math.isfinite(sample.value):
            values.setdefault(sample.name, []).append(sample.value)
    best: MetricNames | None = None
    best_score = 0
    for names in families:
        score = sum(
            1
            for field in (
                names.running,
                names.waiting,
                names.kv_cache_usage,
                names.generated_tokens,
                names.throughput,
            )
            if _first(values, field) is not None
        )
        if score > best_score:
            best, best_score = names, score
    if best is None:
        return EngineReading()
    return EngineReading(
        family=best.family,
        running=_count(_first(values, best.running)),
        waiting=_count(_first(values, best.waiting)),
        kv_cache_usage=_fraction(_first(values, best.kv_cache_usage)),
        generated_tokens=_nonnegative_sum(_first(values, best.generated_tokens)),
        throughput=_nonnegative_sum(_first(values, best.throughput)),
    )


def _first(values: dict[str, list[float]], names: tuple[str, ...]) -> list[float] | None:
    """The series of the first name in ``names`` the scrape has."""
    for name in names:
        found = values.get(name)
        if found:
            return found
    return None


def _count(series: list[float] | None) -> int | None:
    if series is None:
        return None
    total = sum(series)
    return max(0, round(total))


def _nonnegative_sum(series: list[float] | None) -> float | None:
    if series is None:
        return None
    total = sum(series)
    return total if total >= 0 else None


def _fraction(series: list[float] | None) -> float | None:
    if series is None:
        return None
    mean = sum(series) / len(series)
    if mean < -FRACTION_SLACK or mean > 1 + FRACTION_SLACK:
        return None  # not a 0..1 fraction: a unit we do not know, better unknown than wrong
    return min(1.0, max(0.0, mean))


class EngineMetricsReader:
    """Turns successive scrapes into :class:`~.base.EngineStats`.

    It remembers the previous generated-tokens counter and its time, to
    derive tokens per second; a counter that went down (the server
    restarted) starts the rate over.  ``now`` is any monotonic clock in
    seconds.
    """

    __slots__ = ("_families", "_last", "family")

    def __init__(self, families: Iterable[MetricNames] = FAMILIES) -> None:
        self._families = tuple(families)
        self._last: tuple[float, float] | None = None  # (counter, time) of the previous scrape
        #: The family of the last scrape (``None`` until one matched).
        self.family: str | None = None

    def update(self, samples: Iterable[Sample], now: float) -> EngineStats:
        """Read one scrape taken at ``now``."""
        reading = read_engine_metrics(samples, self._families)
        if reading.family != self.family:
            self._last = None  # another server answers now: its counter is not comparable
        self.family = reading.family
        rate = self._derive_rate(reading.generated_tokens, now)
        return EngineStats(
            running=reading.running,
            waiting=reading.waiting,
            kv_cache_usage=reading.kv_cache_usage,
            tokens_per_second=rate if rate is not None else reading.throughput,
        )

    def reset(self) -> None:
        """Forget the previous scrape (the metrics went away)."""
        self._last = None
        self.family = None

    def _derive_rate(self, counter: float | None, now: float) -> float | None:
        last = self._last
        if counter is None:
            self._last = None
            return None
        self._last = (counter, now)
        if last is None:
            return None
        previous, then = last
        if now <= then or counter < previous:
            return None
        return (counter - previous) / (now - then)
