"""Engine servers' Prometheus metrics read as EngineStats (pure; fixtures in fixtures/metrics)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from inferno_backend.engines.base import EngineStats
from inferno_backend.engines.enginemetrics import (
    EngineMetricsReader,
    EngineReading,
    read_engine_metrics,
)

from inferno.metrics import Sample, parse_prometheus

FIXTURES = Path(__file__).parent / "fixtures" / "metrics"


def fixture_text(name: str) -> str:
    return (FIXTURES / name).read_text(encoding="utf-8")


def samples_of(name: str) -> list[Sample]:
    return parse_prometheus(fixture_text(name))


@pytest.mark.parametrize("name", sorted(p.name for p in FIXTURES.glob("*.txt")))
def test_fixtures_are_valid_exposition_text(name: str) -> None:
    # strict parsing raises on any line a real scraper would reject
    assert parse_prometheus(fixture_text(name), strict=True)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        # two data-parallel engines: counts and counters summed, the fraction averaged
        ("vllm.txt", EngineReading("vllm", 5, 1, 0.30, 20000.0, None)),
        ("vllm_v0.txt", EngineReading("vllm", 12, 7, 0.8734, 684210.0, 431.7)),
        ("sglang.txt", EngineReading("sglang", 24, 9, 0.62, 931022.0, 1487.35)),
        ("llamacpp.txt", EngineReading("llama.cpp", 2, 4, 0.125, 9342.0, 39.42)),
        ("tgi.txt", EngineReading("tgi", 17, 6, None, 187455.0, None)),
        ("generic.txt", EngineReading()),
    ],
)
def test_each_server_family_reads_to_its_numbers(name: str, expected: EngineReading) -> None:
    reading = read_engine_metrics(samples_of(name))
    assert reading.family == expected.family
    assert reading.running == expected.running
    assert reading.waiting == expected.waiting
    assert reading.generated_tokens == expected.generated_tokens
    assert reading.throughput == expected.throughput
    if expected.kv_cache_usage is None:
        assert reading.kv_cache_usage is None
    else:
        assert reading.kv_cache_usage == pytest.approx(expected.kv_cache_usage)


def test_newer_vllm_kv_name_wins_over_the_deprecated_one() -> None:
    labels = {"model_name": "m"}
    samples = [
        Sample("vllm:gpu_cache_usage_perc", labels, 0.9),
        Sample("vllm:kv_cache_usage_perc", labels, 0.4),
        Sample("vllm:num_requests_running", labels, 1.0),
    ]
    assert read_engine_metrics(samples).kv_cache_usage == pytest.approx(0.4)
    # an older server publishes only the old name, which is then read
    assert read_engine_metrics(samples[:1]).kv_cache_usage == pytest.approx(0.9)


def test_a_fraction_outside_zero_to_one_is_not_guessed_at() -> None:
    assert read_engine_metrics([Sample("sglang:token_usage", {}, 62.0)]).kv_cache_usage is None
    # rounding just above 1 is full, not unknown
    assert read_engine_metrics([Sample("sglang:token_usage", {}, 1.0000001)]).kv_cache_usage == 1.0


def test_nan_samples_are_ignored() -> None:
    reading = read_engine_metrics(
        [
            Sample("llamacpp:requests_processing", {}, math.nan),
            Sample("llamacpp:requests_deferred", {}, 3.0),
        ]
    )
    assert reading.family == "llama.cpp"
    assert reading.running is None
    assert reading.waiting == 3


def test_the_family_matching_most_fields_wins() -> None:
    samples = [
        Sample("tgi_queue_size", {}, 1.0),
        Sample("sglang:num_running_reqs", {}, 2.0),
        Sample("sglang:num_queue_reqs", {}, 3.0),
    ]
    reading = read_engine_metrics(samples)
    assert (reading.family, reading.running, reading.waiting) == ("sglang", 2, 3)


def bump_counter(text: str, name: str, old: str, new: str) -> str:
    """The same scrape with one counter series moved on (the fixture line must exist)."""
    line_old = next(line for line in text.splitlines() if line.startswith(name))
    assert line_old.endswith(" " + old)
    return text.replace(line_old, line_old[: -len(old)] + new)


def test_rate_is_derived_from_the_counter_between_two_scrapes() -> None:
    reader = EngineMetricsReader()
    text = fixture_text("llamacpp.txt")
    first = reader.update(parse_prometheus(text), now=100.0)
    assert first.tokens_per_second == pytest.approx(39.42)  # only the gauge so far
    later = bump_counter(text, "llamacpp:tokens_predicted_total", "9342", "9842")
    second = reader.update(parse_prometheus(later), now=104.0)
    assert second == EngineStats(
        running=2, waiting=4, kv_cache_usage=0.125, tokens_per_second=pytest.approx(125.0)
    )


def test_tgi_rate_comes_from_its_generated_tokens_histogram_sum() -> None:
    reader = EngineMetricsReader()
    text = fixture_text("tgi.txt")
    assert reader.update(parse_prometheus(text), now=0.0).tokens_per_second is None
    later = bump_counter(text, "tgi_request_generated_tokens_sum", "187455", "188455")
    assert reader.update(parse_prometheus(later), now=2.0).tokens_per_second == pytest.approx(500)


def test_a_counter_that_went_down_restarts_the_rate() -> None:
    reader = EngineMetricsReader()
    text = fixture_text("vllm_v0.txt")
    reader.update(parse_prometheus(text), now=0.0)
    restarted = bump_counter(text, "vllm:generation_tokens_total", "684210.0", "10.0")
    # the server restarted: no negative rate, the gauge stands in
    assert reader.update(parse_prometheus(restarted), now=2.0).tokens_per_second == 431.7
    again = bump_counter(text, "vllm:generation_tokens_total", "684210.0", "110.0")
    assert reader.update(parse_prometheus(again), now=4.0).tokens_per_second == pytest.approx(50)


def test_reset_and_another_server_forget_the_previous_counter() -> None:
    reader = EngineMetricsReader()
    text = fixture_text("sglang.txt")
    later = bump_counter(text, "sglang:generation_tokens_total", "931022.0", "932022.0")
    reader.update(parse_prometheus(text), now=0.0)
    reader.reset()
    assert reader.family is None
    # no previous scrape: the gauge, not a rate over the gap
    assert reader.update(parse_prometheus(later), now=1.0).tokens_per_second == 1487.35
    # a vLLM answering where SGLang did: its counter is not compared with SGLang's
    assert reader.update(samples_of("vllm.txt"), now=2.0).tokens_per_second is None
    assert reader.family == "vllm"


def test_a_server_without_known_names_reads_as_unknown() -> None:
    reader = EngineMetricsReader()
    assert reader.update(samples_of("generic.txt"), now=0.0) == EngineStats()
    assert reader.family is None
