"""Counters, gauges and histograms, exposed as Prometheus text and as JSON.

Every role keeps one :class:`Registry` (``RoleContext.metrics``).  Code on the
request path registers its metrics once at start-up and *binds* labelled series
once where it can::

    requests = registry.counter("inferno_requests_total", "Requests answered.", ("route",))
    chat_requests = requests.labels(route="/v1/chat/completions")   # bind once
    ...
    chat_requests.inc()                                              # per request

An ``inc`` or ``observe`` is plain attribute arithmetic (a histogram adds a
``bisect`` over its bucket bounds); ``labels(...)`` is one dict lookup keyed by
the call's keyword items, so even an unbound lookup per request is cheap (see
``bench/metrics.py`` for the figures).

Not thread-safe, on purpose: Inferno runs each role on one asyncio event loop,
and an ``inc`` never awaits, so no two updates interleave.  Locks would cost
more than the update itself.  Code running in a worker thread must hand its
measurements back to the loop (``anyio.from_thread.run_sync``) rather than
touch a metric directly.

Names are checked when a metric is registered, against the Prometheus naming
conventions that ``promtool check metrics`` enforces (snake_case, counters end
in ``_total``, base units spelled out, no reserved suffixes), so a registry
cannot produce an exposition promtool complains about.  Text exposition is
format 0.0.4 (:data:`PROMETHEUS_CONTENT_TYPE`).

:func:`parse_prometheus` (reading others' exposition text) and
:func:`wants_prometheus` (content negotiation) live in :mod:`inferno.exposition`
and are re-exported here.
"""

from __future__ import annotations

import logging
import math
import re
from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping, Sequence
from itertools import pairwise
from typing import Any, Final, Generic, TypeVar

from inferno.exposition import Sample, parse_prometheus, wants_prometheus

__all__ = [
    "DEFAULT_BUCKETS",
    "JSON_CONTENT_TYPE",
    "PROMETHEUS_CONTENT_TYPE",
    "Counter",
    "CounterSeries",
    "Gauge",
    "GaugeSeries",
    "Histogram",
    "HistogramSeries",
    "Registry",
    "Sample",
    "parse_prometheus",
    "wants_prometheus",
]

log = logging.getLogger("inferno.metrics")

#: Content type of the text exposition format we write (Prometheus 0.0.4).
PROMETHEUS_CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
#: Content type of :meth:`Registry.snapshot` and NodeVitals documents.
JSON_CONTENT_TYPE: Final = "application/json"

#: Histogram bucket upper bounds in seconds.  The usual web range (5 ms .. 10 s)
#: plus 30 s, 60 s and 120 s, because a whole LLM completion often takes that long.
DEFAULT_BUCKETS: Final[tuple[float, ...]] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
)  # fmt: skip

_INF: Final = math.inf

# --- naming rules (the conventions `promtool check metrics` lints) -------------------------

# Lower-case snake_case only: Prometheus also allows upper case and ':', but
# promtool flags camelCase and ':' is reserved for recording rules.
_METRIC_NAME_RE: Final = re.compile(r"[a-z_][a-z0-9_]*")
_LABEL_NAME_RE: Final = re.compile(r"[a-z_][a-z0-9_]*")
_RESERVED_LABELS: Final = frozenset({"le", "quantile"})  # written by histograms and summaries
_RESERVED_SUFFIXES: Final = ("_bucket", "_count", "_sum", "_total")
_TYPE_WORDS: Final = frozenset({"counter", "gauge", "histogram", "summary", "untyped"})
_UNIT_ABBREVIATIONS: Final = frozenset(
    {"s", "ms", "us", "ns", "sec", "b", "kb", "mb", "gb", "tb", "pb", "m", "h", "d"}
)
_BASE_UNITS: Final = {
    "amperes": "amperes", "bytes": "bytes", "celsius": "celsius", "grams": "grams",
    "joules": "joules", "kelvin": "kelvin", "meters": "meters", "metres": "metres",
    "seconds": "seconds", "volts": "volts", "minutes": "seconds", "hours": "seconds",
    "days": "seconds", "weeks": "seconds", "kelvins": "kelvin", "fahrenheit": "celsius",
    "rankine": "celsius", "inches": "meters", "yards": "meters", "miles": "meters",
    "bits": "bytes", "calories": "joules", "pounds": "grams", "ounces": "grams",
}  # fmt: skip
_UNIT_PREFIXES: Final = (
    "pico", "nano", "micro", "milli", "centi", "deci", "deca", "hecto", "kilo", "kibi",
    "mega", "mibi", "giga", "gibi", "tera", "tebi", "peta", "pebi",
)  # fmt: skip


def _check_metric_name(name: str, kind: str) -> None:
    """Raise ValueError unless *name* is a conventional Prometheus name for a *kind* metric."""
    if not isinstance(name, str) or not _METRIC_NAME_RE.fullmatch(name):
        raise ValueError(
            f"metric name {name!r} is invalid: use lower-case snake_case "
            "(letters a-z, digits, '_'; not starting with a digit)"
        )
    if kind == "counter" and not name.endswith("_total"):
        raise ValueError(f"counter name {name!r} must end in '_total': use {name + '_total'!r}")
    if kind != "counter" and name.endswith(_RESERVED_SUFFIXES):
        raise ValueError(
            f"{kind} name {name!r} must not end in _bucket, _count, _sum or _total "
            "(Prometheus reserves them for counters and histogram series)"
        )
    for position, word in enumerate(name.split("_")):
        # Like promtool, look for type words and abbreviations after an '_' only
        # ("m_..." or "gauge_..." as a leading namespace is fine).
        if position and word in _TYPE_WORDS:
            raise ValueError(f"metric name {name!r} must not contain the type word {word!r}")
        if position and word in _UNIT_ABBREVIATIONS:
            raise ValueError(
                f"metric name {name!r} abbreviates a unit ({word!r}): spell it out, "
                "in base units (seconds, bytes)"
            )
        for prefix in ("", *_UNIT_PREFIXES):
            if word.startswith(prefix) and (base := _BASE_UNITS.get(word[len(prefix) :])):
                if word != base:
                    raise ValueError(
                        f"metric name {name!r} uses unit {word!r}: use the base unit {base!r}"
                    )
                break


def _check_label_names(name: str, labelnames: Sequence[str]) -> tuple[str, ...]:
    if isinstance(labelnames, str):  # ("route") instead of ("route",): a classic slip
        raise ValueError(
            f"{name}: labels must be a sequence of names, not the string {labelnames!r}"
        )
    names = tuple(labelnames)
    for label in names:
        if not isinstance(label, str) or not _LABEL_NAME_RE.fullmatch(label):
            raise ValueError(f"{name}: label name {label!r} is invalid: use lower-case snake_case")
        if label.startswith("__"):
            raise ValueError(f"{name}: label name {label!r}: names starting '__' are reserved")
        if label in _RESERVED_LABELS:
            raise ValueError(f"{name}: label name {label!r} is reserved for histograms/summaries")
    if len(set(names)) != len(names):
        raise ValueError(f"{name}: duplicate label names in {names!r}")
    return names


# --- text helpers ---------------------------------------------------------------------------

_LABEL_VALUE_ESCAPES: Final = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": "\\n"})
_HELP_ESCAPES: Final = str.maketrans({"\\": "\\\\", "\n": "\\n"})


def _format_value(value: float) -> str:
    """Render a sample value the way Prometheus parses it (ints stay ints)."""
    if isinstance(value, int):  # also bool, which would otherwise print as "True"
        return str(int(value))
    if value != value:
        return "NaN"
    if value in (_INF, -_INF):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _json_number(value: float) -> float | None:
    """JSON has no NaN or infinities: those become null."""
    if isinstance(value, int) or math.isfinite(value):
        return value
    return None


def _label_block(pairs: Sequence[tuple[str, str]]) -> str:
    if not pairs:
        return ""
    inner = ",".join(f'{k}="{v.translate(_LABEL_VALUE_ESCAPES)}"' for k, v in pairs)
    return "{" + inner + "}"


# --- series (one labelled time series each) -------------------------------------------------


class CounterSeries:
    """One counter time series: a number that only goes up (until the process restarts)."""

    __slots__ = ("_labels", "_value")

    def __init__(self, labels: tuple[tuple[str, str], ...]) -> None:
        self._labels = labels
        self._value: float = 0

    def inc(self, amount: float = 1) -> None:
        """Add *amount* (>= 0; a counter never goes down)."""
        if amount < 0:
            raise ValueError(f"counters only go up: inc({amount!r})")
        self._value += amount

    @property
    def value(self) -> float:
        return self._value


class GaugeSeries:
    """One gauge time series: a value that goes up and down, or is read from a callback."""

    __slots__ = ("_function", "_labels", "_value")

    def __init__(self, labels: tuple[tuple[str, str], ...]) -> None:
        self._labels = labels
        self._value: float = 0
        self._function: Callable[[], float] | None = None

    def set(self, value: float) -> None:
        if self._function is not None:
            raise ValueError("this gauge is read from a function; set_function(None) first")
        self._value = value

    def inc(self, amount: float = 1) -> None:
        if self._function is not None:
            raise ValueError("this gauge is read from a function; set_function(None) first")
        self._value += amount

    def dec(self, amount: float = 1) -> None:
        self.inc(-amount)

    def set_function(self, function: Callable[[], float] | None) -> None:
        """Read the value from *function* at collection time (``None``: back to set/inc).

        For values that already live elsewhere (in-flight count, queue length),
        so the request path does not pay to mirror them.  The function runs on
        the event loop during a scrape: keep it quick and non-blocking.  If it
        raises, the sample reads NaN and the error is logged.
        """
        self._function = function

    @property
    def value(self) -> float:
        function = self._function
        if function is None:
            return self._value
        try:
            value: object = function()
        except Exception:
            log.exception("gauge callback %r failed; reporting NaN", function)
            return math.nan
        if not isinstance(value, (int, float)):
            log.error("gauge callback %r returned %r, not a number; reporting NaN", function, value)
            return math.nan
        return value


class HistogramSeries:
    """One histogram time series: observation counts per bucket, their sum and count."""

    __slots__ = ("_bounds", "_counts", "_labels", "_sum")

    def __init__(self, labels: tuple[tuple[str, str], ...], bounds: tuple[float, ...]) -> None:
        self._labels = labels
        self._bounds = bounds  # ascending upper bounds, the last one +Inf
        self._counts = [0] * len(bounds)  # per bucket, not cumulative
        self._sum: float = 0

    def observe(self, value: float) -> None:
        """Record one observation (in the metric's unit, usually seconds)."""
        if value != value:
            raise ValueError("cannot observe NaN")
        # Bucket i counts bounds[i-1] < value <= bounds[i] ("le" is inclusive).
        self._counts[bisect_left(self._bounds, value)] += 1
        self._sum += value

    @property
    def count(self) -> int:
        return sum(self._counts)

    @property
    def sum(self) -> float:
        return self._sum

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound, observations <= bound)`` per bucket, ending with +Inf."""
        total = 0
        result = []
        for bound, count in zip(self._bounds, self._counts, strict=True):
            total += count
            result.append((bound, total))
        return result


# --- families (a metric name with its help, label names and series) -------------------------

S = TypeVar("S", CounterSeries, GaugeSeries, HistogramSeries)


class _Family(Generic[S]):
    """What the three metric types share: identity, label handling, series storage."""

    __slots__ = ("_by_call", "_only", "_series", "help", "labelnames", "name")
    kind: str = ""

    def __init__(self, name: str, help: str, labelnames: tuple[str, ...]) -> None:
        self.name = name
        self.help = help
        self.labelnames = labelnames
        # Canonical store: label values in labelnames order -> series.
        self._series: dict[tuple[object, ...], S] = {}  # keys hold str only
        # Fast path for labels(): the call's own keyword items -> series.  A
        # call site passes its keywords in a fixed order, so this hits at once.
        self._by_call: dict[tuple[tuple[str, object], ...], S] = {}
        self._only: S | None = None if labelnames else self._create(())

    def _new_series(self, labels: tuple[tuple[str, str], ...]) -> S:
        raise NotImplementedError

    def _create(self, values: tuple[str, ...]) -> S:
        series = self._new_series(tuple(zip(self.labelnames, values, strict=True)))
        self._series[values] = series
        return series

    def labels(self, *values: object, **named: object) -> S:
        """The series for these label values, created on first use and cached.

        Give every label, by name (``labels(route="/x", status="200")``) or by
        position in ``labelnames`` order (``labels("/x", "200")``, the faster
        lookup); values are converted with ``str()`` (pass ``str`` for speed).
        The same values return the same object, so bind it once where you can.
        Each distinct value set is a time series kept until :meth:`remove`:
        never use unbounded values (user ids, raw paths) as labels.
        """
        if named:
            if values:
                raise ValueError(f"{self.name}: give label values by name or by position, not both")
            try:
                return self._by_call[tuple(named.items())]
            except (KeyError, TypeError):
                return self._labels_slow(named)
        try:
            return self._series[values]
        except (KeyError, TypeError):
            return self._positional_slow(values)

    def _positional_slow(self, values: tuple[object, ...]) -> S:
        if len(values) != len(self.labelnames):
            raise ValueError(
                f"{self.name}: labels() needs {len(self.labelnames)} values "
                f"({', '.join(self.labelnames) or 'none'}), got {len(values)}"
            )
        key = tuple(str(v) for v in values)
        series = self._series.get(key)
        return self._create(key) if series is None else series

    def _labels_slow(self, values: dict[str, object]) -> S:
        key = self._key(values)
        series = self._series.get(key)
        if series is None:
            series = self._create(key)
        # Cache the call's own items only when every value is a str: 1, 1.0 and
        # True are equal dict keys in Python but are different label values.
        if all(type(v) is str for v in values.values()):
            self._by_call[tuple(values.items())] = series
        return series

    def _key(self, values: Mapping[str, object]) -> tuple[str, ...]:
        if values.keys() != set(self.labelnames):
            raise ValueError(
                f"{self.name}: labels() needs exactly {list(self.labelnames)}, got {sorted(values)}"
            )
        return tuple(str(values[n]) for n in self.labelnames)

    def remove(self, **values: object) -> None:
        """Forget one series (a backend that left the pool, say); absent is fine.

        A bound series object that was removed keeps counting but is no longer
        exposed; ``labels()`` with the same values starts a fresh one.
        """
        if not self.labelnames:
            raise ValueError(f"{self.name} has no labels: nothing to remove")
        series = self._series.pop(self._key(values), None)
        if series is not None:
            self._by_call = {k: s for k, s in self._by_call.items() if s is not series}

    def clear(self) -> None:
        """Forget every labelled series."""
        if self.labelnames:
            self._series.clear()
            self._by_call.clear()

    def series(self) -> Iterator[S]:
        """Every series in creation order."""
        return iter(list(self._series.values()))

    def _unlabelled(self) -> S:
        only = self._only
        if only is None:
            raise ValueError(f"{self.name} has labels {list(self.labelnames)}: use .labels(...)")
        return only

    def _render(self, out: list[str]) -> None:
        out.append(f"# HELP {self.name} {self.help.translate(_HELP_ESCAPES)}\n")
        out.append(f"# TYPE {self.name} {self.kind}\n")
        self._render_samples(out)

    def _render_samples(self, out: list[str]) -> None:
        raise NotImplementedError

    def _snapshot(self) -> dict[str, Any]:
        return {
            "type": self.kind,
            "help": self.help,
            "series": [
                {"labels": dict(s._labels), **self._snapshot_values(s)} for s in self.series()
            ],
        }

    def _snapshot_values(self, series: S) -> dict[str, Any]:
        raise NotImplementedError


V = TypeVar("V", CounterSeries, GaugeSeries)


class _ValueFamily(_Family[V]):
    """Counters and gauges: one number per series."""

    __slots__ = ()

    def _render_samples(self, out: list[str]) -> None:
        name = self.name
        for series in self.series():
            out.append(f"{name}{_label_block(series._labels)} {_format_value(series.value)}\n")

    def _snapshot_values(self, series: V) -> dict[str, Any]:
        return {"value": _json_number(series.value)}


class Counter(_ValueFamily[CounterSeries]):
    """A counter family.  Unlabelled: ``inc()`` it directly; labelled: ``labels(...).inc()``."""

    __slots__ = ()
    kind = "counter"

    def _new_series(self, labels: tuple[tuple[str, str], ...]) -> CounterSeries:
        return CounterSeries(labels)

    def inc(self, amount: float = 1) -> None:
        """Add *amount* (>= 0) to the unlabelled counter."""
        only = self._only
        if only is None or amount < 0:
            self._unlabelled().inc(amount)  # raises the right error
            return
        only._value += amount

    @property
    def value(self) -> float:
        return self._unlabelled().value


class Gauge(_ValueFamily[GaugeSeries]):
    """A gauge family: ``set``/``inc``/``dec``/``set_function`` (directly when unlabelled)."""

    __slots__ = ()
    kind = "gauge"

    def _new_series(self, labels: tuple[tuple[str, str], ...]) -> GaugeSeries:
        return GaugeSeries(labels)

    # The unlabelled fast paths inline the series' update; anything unusual
    # (labelled family, callback gauge) goes through the series for its error.
    def set(self, value: float) -> None:
        only = self._only
        if only is None or only._function is not None:
            self._unlabelled().set(value)
            return
        only._value = value

    def inc(self, amount: float = 1) -> None:
        only = self._only
        if only is None or only._function is not None:
            self._unlabelled().inc(amount)
            return
        only._value += amount

    def dec(self, amount: float = 1) -> None:
        self._unlabelled().inc(-amount)

    def set_function(self, function: Callable[[], float] | None) -> None:
        """See :meth:`GaugeSeries.set_function`."""
        self._unlabelled().set_function(function)

    @property
    def value(self) -> float:
        return self._unlabelled().value


class Histogram(_Family[HistogramSeries]):
    """A histogram family with fixed bucket bounds; ``observe(v)`` (directly when unlabelled)."""

    __slots__ = ("_bounds", "_le")
    kind = "histogram"

    def __init__(
        self, name: str, help: str, labelnames: tuple[str, ...], buckets: Sequence[float]
    ) -> None:
        bounds = [float(b) for b in buckets if b != _INF]
        if not bounds or any(not math.isfinite(b) for b in bounds):
            raise ValueError(f"{name}: buckets must be finite numbers, at least one")
        if any(a >= b for a, b in pairwise(bounds)):
            raise ValueError(f"{name}: buckets must be strictly increasing, got {list(buckets)}")
        self._bounds = (*bounds, _INF)
        self._le = tuple(_format_value(b) for b in self._bounds)
        super().__init__(name, help, labelnames)

    def _new_series(self, labels: tuple[tuple[str, str], ...]) -> HistogramSeries:
        return HistogramSeries(labels, self._bounds)

    def observe(self, value: float) -> None:
        """Record one observation in the unlabelled histogram (see HistogramSeries.observe)."""
        only = self._only
        if only is None or value != value:
            self._unlabelled().observe(value)  # raises the right error
            return
        only._counts[bisect_left(self._bounds, value)] += 1
        only._sum += value

    @property
    def buckets(self) -> tuple[float, ...]:
        """The upper bounds, ending with +Inf."""
        return self._bounds

    def _render_samples(self, out: list[str]) -> None:
        name = self.name
        for series in self.series():
            block = _label_block(series._labels)
            head = f"{name}_bucket{{{block[1:-1]},le=" if block else f"{name}_bucket{{le="
            total = 0
            for le, count in zip(self._le, series._counts, strict=True):
                total += count
                out.append(f'{head}"{le}"}} {total}\n')
            out.append(f"{name}_sum{block} {_format_value(series._sum)}\n")
            out.append(f"{name}_count{block} {total}\n")

    def _snapshot_values(self, series: HistogramSeries) -> dict[str, Any]:
        cumulative = series.cumulative()
        return {
            "count": cumulative[-1][1],
            "sum": _json_number(series.sum),
            "buckets": {le: count for le, (_, count) in zip(self._le, cumulative, strict=True)},
        }


class Registry:
    """The metrics of one process, rendered in registration order."""

    def __init__(self) -> None:
        self._families: dict[str, _Family[Any]] = {}

    def _add(self, family: _Family[S]) -> None:
        if family.name in self._families:
            raise ValueError(f"metric {family.name!r} is already registered")
        if not isinstance(family.help, str) or not family.help.strip():
            raise ValueError(f"{family.name}: help text is required (operators read it)")
        self._families[family.name] = family

    def counter(self, name: str, help: str, labels: Sequence[str] = ()) -> Counter:
        """Register a counter; *name* must end in ``_total``."""
        _check_metric_name(name, "counter")
        family = Counter(name, help, _check_label_names(name, labels))
        self._add(family)
        return family

    def gauge(self, name: str, help: str, labels: Sequence[str] = ()) -> Gauge:
        """Register a gauge."""
        _check_metric_name(name, "gauge")
        family = Gauge(name, help, _check_label_names(name, labels))
        self._add(family)
        return family

    def histogram(
        self,
        name: str,
        help: str,
        labels: Sequence[str] = (),
        buckets: Sequence[float] = DEFAULT_BUCKETS,
    ) -> Histogram:
        """Register a histogram; +Inf is appended to *buckets* (ascending upper bounds)."""
        _check_metric_name(name, "histogram")
        family = Histogram(name, help, _check_label_names(name, labels), buckets)
        self._add(family)
        return family

    def get(self, name: str) -> Counter | Gauge | Histogram | None:
        """The family registered as *name*, if any."""
        return self._families.get(name)  # type: ignore[return-value]

    def unregister(self, name: str) -> None:
        """Remove a family (absent is fine)."""
        self._families.pop(name, None)

    def render_prometheus(self) -> str:
        """The whole registry in Prometheus text format 0.0.4."""
        out: list[str] = []
        for family in list(self._families.values()):
            family._render(out)
        return "".join(out)

    def snapshot(self) -> dict[str, Any]:
        """The whole registry as a JSON-ready dict (non-finite numbers become null).

        ``{name: {"type", "help", "series": [{"labels": {...}, "value": v}]}}``;
        a histogram series has ``"count"``, ``"sum"`` and cumulative
        ``"buckets"`` (``{"0.005": n, ..., "+Inf": count}``) instead of ``"value"``.
        """
        return {name: family._snapshot() for name, family in list(self._families.items())}
