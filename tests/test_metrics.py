"""inferno.metrics: exposition text, JSON snapshot, naming rules, labels, parsing."""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import subprocess

import pytest
from hypothesis import given
from hypothesis import strategies as st

from inferno.metrics import (
    DEFAULT_BUCKETS,
    PROMETHEUS_CONTENT_TYPE,
    Registry,
    Sample,
    parse_prometheus,
    wants_prometheus,
)

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool not installed (Debian/Ubuntu: apt-get install prometheus)",
)


def small_registry() -> Registry:
    registry = Registry()
    requests = registry.counter("inferno_requests_total", "Requests answered.", ("route", "status"))
    requests.labels(route="/v1/models", status="200").inc()
    requests.labels(route="/v1/models", status="200").inc(2)
    requests.labels(route="/v1/chat/completions", status="503").inc(0.5)
    registry.gauge("inferno_ready", "1 when the node takes traffic.").set(1)
    latency = registry.histogram(
        "inferno_request_duration_seconds", "Time to answer.", buckets=(0.1, 1.0)
    )
    for value in (0.05, 0.1, 0.7, 3.0):
        latency.observe(value)
    return registry


def test_exposition_exact_text() -> None:
    assert small_registry().render_prometheus() == (
        "# HELP inferno_requests_total Requests answered.\n"
        "# TYPE inferno_requests_total counter\n"
        'inferno_requests_total{route="/v1/models",status="200"} 3\n'
        'inferno_requests_total{route="/v1/chat/completions",status="503"} 0.5\n'
        "# HELP inferno_ready 1 when the node takes traffic.\n"
        "# TYPE inferno_ready gauge\n"
        "inferno_ready 1\n"
        "# HELP inferno_request_duration_seconds Time to answer.\n"
        "# TYPE inferno_request_duration_seconds histogram\n"
        'inferno_request_duration_seconds_bucket{le="0.1"} 2\n'
        'inferno_request_duration_seconds_bucket{le="1.0"} 3\n'
        'inferno_request_duration_seconds_bucket{le="+Inf"} 4\n'
        "inferno_request_duration_seconds_sum 3.85\n"
        "inferno_request_duration_seconds_count 4\n"
    )
    assert PROMETHEUS_CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"


def test_escaping_of_label_values_and_help() -> None:
    registry = Registry()
    family = registry.gauge("odd_values", 'Help with \\ backslash,\nnewline and "quotes".', ("v",))
    family.labels(v='a"b\\c\nd').set(1)
    text = registry.render_prometheus()
    assert '# HELP odd_values Help with \\\\ backslash,\\nnewline and "quotes".\n' in text
    assert 'odd_values{v="a\\"b\\\\c\\nd"} 1\n' in text
    [sample] = parse_prometheus(text, strict=True)
    assert sample.labels == {"v": 'a"b\\c\nd'}


def test_special_values_render() -> None:
    registry = Registry()
    registry.gauge("not_a_number", "x").set(math.nan)
    registry.gauge("huge", "x").set(math.inf)
    registry.gauge("tiny", "x").set(-math.inf)
    registry.gauge("flag", "x").set(True)
    values = [line.split()[-1] for line in registry.render_prometheus().splitlines()[2::3]]
    assert values == ["NaN", "+Inf", "-Inf", "1"]


def test_histogram_buckets_are_inclusive_and_cumulative() -> None:
    registry = Registry()
    histogram = registry.histogram("size_bytes", "x", ("kind",), buckets=(10, 100, 1000))
    series = histogram.labels(kind="a")
    for value in (-5, 10, 10.0001, 100, 1000, 1e9):
        series.observe(value)
    assert histogram.buckets == (10.0, 100.0, 1000.0, math.inf)
    assert series.cumulative() == [(10.0, 2), (100.0, 4), (1000.0, 5), (math.inf, 6)]
    assert series.count == 6
    assert series.sum == pytest.approx(-5 + 10 + 10.0001 + 100 + 1000 + 1e9)
    text = registry.render_prometheus()
    assert 'size_bytes_bucket{kind="a",le="10.0"} 2\n' in text
    assert 'size_bytes_bucket{kind="a",le="+Inf"} 6\n' in text
    assert 'size_bytes_count{kind="a"} 6\n' in text
    with pytest.raises(ValueError, match="NaN"):
        series.observe(math.nan)
    with pytest.raises(ValueError, match="NaN"):
        registry.histogram("other_seconds", "x").observe(math.nan)


def test_default_buckets_and_explicit_inf() -> None:
    registry = Registry()
    assert registry.histogram("a_seconds", "x").buckets == (*DEFAULT_BUCKETS, math.inf)
    assert registry.histogram("b_seconds", "x", buckets=(1, math.inf)).buckets == (1.0, math.inf)


@pytest.mark.parametrize(
    ("buckets", "problem"),
    [
        ((), "at least one"),
        ((1, math.nan), "finite"),
        ((2, 1), "strictly increasing"),
        ((1, 1), "strictly increasing"),
    ],
)
def test_bad_buckets(buckets: tuple[float, ...], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        Registry().histogram("x_seconds", "x", buckets=buckets)


def test_snapshot() -> None:
    registry = small_registry()
    registry.gauge("broken", "x").set(math.nan)
    snapshot = registry.snapshot()
    json.dumps(snapshot, allow_nan=False)  # strict JSON: no NaN or Infinity
    assert snapshot["inferno_requests_total"] == {
        "type": "counter",
        "help": "Requests answered.",
        "series": [
            {"labels": {"route": "/v1/models", "status": "200"}, "value": 3},
            {"labels": {"route": "/v1/chat/completions", "status": "503"}, "value": 0.5},
        ],
    }
    assert snapshot["inferno_ready"]["series"] == [{"labels": {}, "value": 1}]
    assert snapshot["broken"]["series"] == [{"labels": {}, "value": None}]
    [histogram] = snapshot["inferno_request_duration_seconds"]["series"]
    assert histogram == {
        "labels": {},
        "count": 4,
        "sum": pytest.approx(3.85),
        "buckets": {"0.1": 2, "1.0": 3, "+Inf": 4},
    }


@pytest.mark.parametrize(
    ("kind", "name", "problem"),
    [
        ("gauge", "", "lower-case snake_case"),
        ("gauge", "9lives", "lower-case snake_case"),
        ("gauge", "has-dash", "lower-case snake_case"),
        ("gauge", "camelCase", "lower-case snake_case"),
        ("gauge", "rule:recorded", "lower-case snake_case"),
        ("counter", "requests", "must end in '_total': use 'requests_total'"),
        ("gauge", "requests_total", "must not end in"),
        ("gauge", "queue_count", "must not end in"),
        ("histogram", "latency_sum", "must not end in"),
        ("gauge", "latency_bucket", "must not end in"),
        ("gauge", "requests_gauge", "type word 'gauge'"),
        ("counter", "requests_counter_total", "type word 'counter'"),
        ("histogram", "latency_ms", "abbreviates a unit"),
        ("gauge", "memory_mb", "abbreviates a unit"),
        ("gauge", "uptime_s", "abbreviates a unit"),
        ("histogram", "latency_milliseconds", "base unit 'seconds'"),
        ("gauge", "uptime_hours", "base unit 'seconds'"),
        ("gauge", "memory_kilobytes", "base unit 'bytes'"),
    ],
)
def test_bad_metric_names(kind: str, name: str, problem: str) -> None:
    register = getattr(Registry(), kind)
    with pytest.raises(ValueError, match=re.escape(problem)):
        register(name, "help")


GOOD_NAMES = [
    ("counter", "inferno_requests_total"),
    ("counter", "inferno_response_bytes_total"),
    ("gauge", "inferno_tokens_per_second"),
    ("gauge", "inferno_kv_cache_usage_ratio"),
    ("gauge", "_private_level"),
    ("histogram", "inferno_time_to_first_token_seconds"),
    ("gauge", "inferno_thermometers"),  # "meters" inside a longer word is not a unit
]


@pytest.mark.parametrize(("kind", "name"), GOOD_NAMES)
def test_good_metric_names(kind: str, name: str) -> None:
    getattr(Registry(), kind)(name, "help")


@pytest.mark.parametrize(
    ("labels", "problem"),
    [
        ("route", "not the string"),
        (("Route",), "snake_case"),
        (("1st",), "snake_case"),
        (("__name",), "reserved"),
        (("le",), "reserved for histograms"),
        (("quantile",), "reserved for histograms"),
        (("a", "a"), "duplicate"),
    ],
)
def test_bad_label_names(labels: tuple[str, ...], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        Registry().counter("x_total", "help", labels)


def test_duplicate_name_and_missing_help() -> None:
    registry = Registry()
    registry.counter("x_total", "help")
    with pytest.raises(ValueError, match="already registered"):
        registry.counter("x_total", "help")
    with pytest.raises(ValueError, match="help text is required"):
        registry.gauge("y", "  ")
    assert registry.get("y") is None  # a refused registration leaves nothing behind
    registry.unregister("x_total")
    registry.counter("x_total", "help again")


def test_labels_are_cached_and_order_insensitive() -> None:
    family = Registry().counter("r_total", "help", ("route", "status"))
    bound = family.labels(route="/x", status="200")
    assert family.labels(route="/x", status="200") is bound
    assert family.labels(status="200", route="/x") is bound
    assert family.labels("/x", "200") is bound
    assert family.labels("/x", 200) is bound  # values are str()-ed
    assert family.labels(route="/x", status=200) is bound
    assert family.labels(route=["/x"], status="200") is not bound  # unhashable is fine too
    # 1, 1.0 and True are equal as Python dict keys, not as label values.
    assert family.labels(route="/x", status=1) is not family.labels(route="/x", status=True)
    assert family.labels(route="/x", status=1) is not family.labels(route="/x", status=1.0)
    bound.inc()
    family.labels(route="/x", status="200").inc(2)
    assert bound.value == 3
    assert [s.value for s in family.series()][:2] == [3, 0]


@pytest.mark.parametrize(
    ("args", "kwargs", "problem"),
    [
        ((), {"route": "/x"}, "needs exactly"),
        ((), {"route": "/x", "status": "1", "extra": "2"}, "needs exactly"),
        (("/x",), {}, "needs 2 values"),
        (("/x",), {"status": "200"}, "not both"),
    ],
)
def test_wrong_label_sets(args: tuple[str, ...], kwargs: dict[str, str], problem: str) -> None:
    family = Registry().counter("r_total", "help", ("route", "status"))
    with pytest.raises(ValueError, match=problem):
        family.labels(*args, **kwargs)


def test_labelled_family_refuses_direct_updates() -> None:
    registry = Registry()
    families = [
        (registry.counter("c_total", "h", ("a",)), "inc", ()),
        (registry.gauge("g", "h", ("a",)), "set", (1,)),
        (registry.gauge("g2", "h", ("a",)), "inc", ()),
        (registry.histogram("h_seconds", "h", ("a",)), "observe", (1,)),
    ]
    for family, method, args in families:
        with pytest.raises(ValueError, match=r"has labels \['a'\]: use \.labels"):
            getattr(family, method)(*args)


def test_counters_only_go_up() -> None:
    registry = Registry()
    plain = registry.counter("plain_total", "h")
    child = registry.counter("child_total", "h", ("a",)).labels(a="1")
    for counter in (plain, child):
        with pytest.raises(ValueError, match="only go up"):
            counter.inc(-1)
        counter.inc(0)
        counter.inc()
        assert counter.value == 1


def test_remove_and_clear_series() -> None:
    registry = Registry()
    family = registry.gauge("level", "h", ("backend",))
    old = family.labels(backend="a")
    family.labels(backend="b").set(2)
    family.remove(backend="a")
    family.remove(backend="never-seen")
    assert family.labels(backend="a") is not old
    assert 'backend="b"' in registry.render_prometheus()
    family.clear()
    assert list(family.series()) == []
    with pytest.raises(ValueError, match="no labels"):
        registry.gauge("plain", "h").remove()


def test_gauge_operations_and_callbacks(caplog: pytest.LogCaptureFixture) -> None:
    registry = Registry()
    gauge = registry.gauge("in_flight", "h")
    gauge.set(5)
    gauge.inc()
    gauge.dec(2)
    assert gauge.value == 4
    in_flight = {"n": 7}
    gauge.set_function(lambda: in_flight["n"])
    assert "in_flight 7\n" in registry.render_prometheus()
    in_flight["n"] = 8
    assert gauge.value == 8
    for update in (lambda: gauge.set(1), gauge.inc, gauge.dec):
        with pytest.raises(ValueError, match="read from a function"):
            update()
    gauge.set_function(None)
    assert gauge.value == 4

    child = registry.gauge("broken", "h", ("why",))
    child.labels(why="raises").set_function(lambda: 1 / 0)
    child.labels(why="not_a_number").set_function(lambda: "7")  # type: ignore[arg-type,return-value]
    with caplog.at_level(logging.ERROR, logger="inferno.metrics"):
        text = registry.render_prometheus()
    assert 'broken{why="raises"} NaN\n' in text
    assert 'broken{why="not_a_number"} NaN\n' in text
    assert "ZeroDivisionError" in caplog.text
    assert "not a number" in caplog.text


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        (None, False),
        ("", False),
        ("*/*", False),
        ("application/json", False),
        ("text/plain", True),
        ("text/plain; version=0.0.4", True),
        ("TEXT/PLAIN", True),
        ("text/*", True),
        ("application/openmetrics-text; version=1.0.0", True),
        # what Prometheus itself sends:
        (
            "application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
            "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
            True,
        ),
        ("text/plain;q=0", False),
        ("text/plain;q=bogus", False),
        ("application/json, text/plain;q=0.5", False),
        ("application/json;q=0.5, text/plain", True),
        ("application/json, text/plain", False),  # a tie: the first listed wins
        ("text/plain, application/json", True),
        ("text/html, */*;q=0.8", False),  # a browser gets JSON
    ],
)
def test_wants_prometheus(accept: str | None, expected: bool) -> None:
    assert wants_prometheus(accept) is expected


VLLM_TEXT = """\
# HELP vllm:num_requests_running Number of requests currently running on GPU.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="meta-llama/Llama-3.1-8B-Instruct"} 3.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.0
# HELP vllm:gpu_cache_usage_perc GPU KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.4217
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{le="0.001",model_name="m"} 0.0
vllm:time_to_first_token_seconds_bucket{le="+Inf",model_name="m"} 12.0
vllm:time_to_first_token_seconds_count{model_name="m"} 12.0
vllm:time_to_first_token_seconds_sum{model_name="m"} 1.3390000000000002
"""

TGI_TEXT = """\
# TYPE tgi_queue_size gauge
tgi_queue_size 2
# TYPE tgi_batch_current_size gauge
tgi_batch_current_size 4
# TYPE tgi_request_duration histogram
tgi_request_duration_bucket{le="0.5"} 1
tgi_request_duration_bucket{le="+Inf"} 9
tgi_request_duration_sum 41.25
tgi_request_duration_count 9
"""


def test_parse_vllm_text() -> None:
    samples = parse_prometheus(VLLM_TEXT, strict=True)
    assert samples[0] == Sample(
        "vllm:num_requests_running", {"model_name": "meta-llama/Llama-3.1-8B-Instruct"}, 3.0
    )
    assert samples[2].value == pytest.approx(0.4217)
    assert samples[4] == Sample(
        "vllm:time_to_first_token_seconds_bucket", {"le": "+Inf", "model_name": "m"}, 12.0
    )
    assert len(samples) == 7


def test_parse_tgi_text() -> None:
    samples = {(s.name, s.labels.get("le")): s.value for s in parse_prometheus(TGI_TEXT)}
    assert samples[("tgi_queue_size", None)] == 2
    assert samples[("tgi_request_duration_bucket", "+Inf")] == 9
    assert samples[("tgi_request_duration_sum", None)] == 41.25


def test_parse_edge_cases() -> None:
    text = (
        "  \n"
        "# a free comment\n"
        "plain 1 1700000000000\n"
        'spaced { a = "1" , b="2", } -Inf\n'
        'escaped{path="C:\\\\dir\\"x\\"\\nnext",odd="\\t"} +Inf\n'
        "nan_value NaN\n"
        "sci 1.5e-3\r\n"
        'om_exemplar_total{a="b"} 7 # {trace_id="abc"} 1.0 1700000000.1\n'
        '{"my.dotted.metric", "label.name"="v"} 2\n'
        "# EOF\n"
    )
    samples = parse_prometheus(text, strict=True)
    assert samples[0] == Sample("plain", {}, 1.0, 1700000000000.0)
    assert samples[1] == Sample("spaced", {"a": "1", "b": "2"}, -math.inf)
    assert samples[2].labels == {"path": 'C:\\dir"x"\nnext', "odd": "\\t"}
    assert samples[2].value == math.inf
    assert math.isnan(samples[3].value)
    assert samples[4].value == 0.0015
    assert samples[5] == Sample("om_exemplar_total", {"a": "b"}, 7.0)
    assert samples[6] == Sample("my.dotted.metric", {"label.name": "v"}, 2.0)
    assert len(samples) == 7


MALFORMED = [
    "no_value",
    "bad_value abc",
    "underscored_value 1_000",
    "too many tokens 1 2",
    'unterminated{a="b" 1',
    "unquoted{a=b} 1",
    'no_equals{a "b"} 1',
    'dup{a="1",a="2"} 1',
    'dup_fast{a="1",a="2"} 1',
    "{} 1",
    'missing_comma{a="1" b="2"} 1',
    "9starts_with_digit 1",
    "glued-1",
    '{"a", "b"} 1',
]


@pytest.mark.parametrize("line", MALFORMED)
def test_malformed_lines_are_skipped_or_reported(line: str) -> None:
    text = f"good 1\n{line}\nalso_good 2\n"
    assert [s.name for s in parse_prometheus(text)] == ["good", "also_good"]
    with pytest.raises(ValueError, match="line 2: "):
        parse_prometheus(text, strict=True)


@pytest.mark.parametrize(
    "comment", ["# TYPE", "# TYPE x", "# TYPE x histogramz", "# HELP", "# HELP 1bad text"]
)
def test_strict_mode_checks_help_and_type(comment: str) -> None:
    assert parse_prometheus(comment + "\n") == []
    with pytest.raises(ValueError, match="line 1"):
        parse_prometheus(comment + "\n", strict=True)


def rich_registry() -> Registry:
    """Every metric type, labelled and not, with awkward values, for structure checks."""
    registry = small_registry()
    registry.counter("empty_total", "Declared, never used.", ("x",))
    gauges = registry.gauge("weird", "Odd label values.", ("v",))
    for i, value in enumerate(["", " ", "}", "{", ",", "=", '"', "\\", "\n", "ünï©ødé", "#"]):
        gauges.labels(v=value).set(i)
    latency = registry.histogram("by_route_seconds", "Latency by route.", ("route",))
    for i, route in enumerate(("/a", "/b", "/a")):
        latency.labels(route=route).observe(i * 0.3)
    return registry


def check_exposition(text: str) -> None:
    """Our own strict checker of 0.0.4 text (complements promtool, runs everywhere)."""
    assert text.endswith("\n")
    families: dict[str, str] = {}
    current: str | None = None
    seen_series: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
    lines = text.split("\n")[:-1]  # not splitlines(): \x1e, \x85 are fine inside values
    for number, line in enumerate(lines):
        if line.startswith("# HELP "):
            name = line.split(" ", 3)[2]
            assert name not in families, f"{name} declared twice"
            assert lines[number + 1].startswith(f"# TYPE {name} "), "TYPE follows HELP"
            current = name
            families[name] = lines[number + 1].split(" ")[3]
            continue
        if line.startswith("# TYPE "):
            continue
        [sample] = parse_prometheus(line, strict=True)
        assert current is not None
        kind = families[current]
        allowed = {current}
        if kind == "histogram":
            allowed = {current + "_bucket", current + "_sum", current + "_count"}
        assert sample.name in allowed, f"{sample.name} outside family {current}"
        key = (sample.name, tuple(sorted(sample.labels.items())))
        assert key not in seen_series, f"duplicate series {key}"
        seen_series.add(key)
    samples = parse_prometheus(text, strict=True)
    for name, kind in families.items():
        if kind == "counter":
            assert name.endswith("_total")
        if kind != "histogram":
            continue
        buckets: dict[tuple[tuple[str, str], ...], list[tuple[float, float]]] = {}
        counts: dict[tuple[tuple[str, str], ...], float] = {}
        for s in samples:
            rest = tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
            if s.name == name + "_bucket":
                buckets.setdefault(rest, []).append((float(s.labels["le"]), s.value))
            elif s.name == name + "_count":
                counts[rest] = s.value
        assert buckets.keys() == counts.keys()
        for rest, series in buckets.items():
            bounds = [b for b, _ in series]
            values = [v for _, v in series]
            assert bounds == sorted(bounds)
            assert bounds[-1] == math.inf
            assert values == sorted(values), "bucket counts are cumulative"
            assert values[-1] == counts[rest], "+Inf bucket equals _count"


def test_own_exposition_passes_strict_structure_check() -> None:
    check_exposition(rich_registry().render_prometheus())


@needs_promtool
def test_promtool_check_metrics() -> None:
    assert PROMTOOL is not None
    result = subprocess.run(
        [PROMTOOL, "check", "metrics"],
        input=rich_registry().render_prometheus(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def promtool_objects(name: str, kind: str) -> bool:
    """Whether promtool finds a problem with a one-sample family of this name and type."""
    assert PROMTOOL is not None
    sample = f"{name}_count 1\n" if kind == "histogram" else f"{name} 1\n"
    text = f"# HELP {name} help\n# TYPE {name} {kind}\n{sample}"
    result = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    return result.returncode != 0


@needs_promtool
@pytest.mark.parametrize(
    ("kind", "name"),
    [
        *GOOD_NAMES,
        ("counter", "requests"),
        ("gauge", "requests_total"),
        ("gauge", "queue_count"),
        ("gauge", "requests_gauge"),
        ("histogram", "latency_ms"),
        ("gauge", "memory_mb"),
        ("histogram", "latency_milliseconds"),
        ("gauge", "memory_kilobytes"),
        ("gauge", "camelCase"),
    ],
)
def test_registration_rules_agree_with_promtool(kind: str, name: str) -> None:
    try:
        getattr(Registry(), kind)(name, "help")
        we_object = False
    except ValueError:
        we_object = True
    assert we_object == promtool_objects(name, kind)


@given(
    values=st.lists(st.text(max_size=20), min_size=1, max_size=8, unique=True),
    help_text=st.text(min_size=1, max_size=40).filter(str.strip),
)
def test_any_label_value_and_help_round_trip(values: list[str], help_text: str) -> None:
    registry = Registry()
    family = registry.counter("any_total", help_text, ("v",))
    for i, value in enumerate(values):
        family.labels(v=value).inc(i)
    text = registry.render_prometheus()
    check_exposition(text)
    assert [(s.labels["v"], s.value) for s in parse_prometheus(text, strict=True)] == [
        (value, float(i)) for i, value in enumerate(values)
    ]


@given(st.text(max_size=200))
def test_parser_never_crashes(text: str) -> None:
    for sample in parse_prometheus(text):
        assert isinstance(sample.value, float)
