"""The service port's metrics, registered once and bound where the request path needs them.

=============================================  =========  ==========================
name                                           type       labels
=============================================  =========  ==========================
``inferno_proxy_requests_total``               counter    route, status, model
``inferno_proxy_request_duration_seconds``     histogram  route
``inferno_proxy_time_to_first_byte_seconds``   histogram  route
``inferno_proxy_upstream_selection_seconds``   histogram  (none)
``inferno_proxy_queue_wait_seconds``           histogram  (none)
``inferno_proxy_queued_requests``              gauge      (none)
``inferno_proxy_retries_total``                counter    reason
``inferno_proxy_retry_budget_exhausted_total`` counter    (none)
``inferno_proxy_upstream_failures_total``      counter    reason
``inferno_proxy_node_in_flight_requests``      gauge      node
=============================================  =========  ==========================

Label values are bounded: ``route`` is one of the known OpenAI paths or
``other``, ``model`` a model some node serves or served lately (``unknown``
for a 404 or a model no node had named yet, empty for a request naming
none), ``reason`` one of a few failure kinds, ``node`` a node in the pool
(its series leaves with it).  The gauges read the pool and the queue when
scraped, so the request path pays nothing for them.
"""

from __future__ import annotations

from functools import partial
from typing import Final

from inferno.metrics import Histogram, Registry
from inferno_proxy.pool import Pool
from inferno_proxy.waitqueue import WaitQueue

__all__ = ["SELECTION_BUCKETS", "RouteMetrics", "ServiceMetrics"]

#: Choosing a node is pure computation over the candidates: microseconds, not milliseconds.
SELECTION_BUCKETS: Final = (
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
)  # fmt: skip


class RouteMetrics:
    """The histograms of one route, bound once."""

    __slots__ = ("duration", "first_byte")

    def __init__(self, duration: Histogram, first_byte: Histogram, route: str) -> None:
        self.duration = duration.labels(route)
        self.first_byte = first_byte.labels(route)


class ServiceMetrics:
    """Every metric of the service port, in *registry*.

    :raises ValueError: when they are already registered there (one app per registry).
    """

    def __init__(self, registry: Registry, pool: Pool, queue: WaitQueue) -> None:
        self._pool = pool
        self.requests = registry.counter(
            "inferno_proxy_requests_total",
            "Client requests answered by the service port, by route, status and model.",
            ("route", "status", "model"),
        )
        self._duration = registry.histogram(
            "inferno_proxy_request_duration_seconds",
            "Time from a request's arrival to the end of its response body.",
            ("route",),
        )
        self._first_byte = registry.histogram(
            "inferno_proxy_time_to_first_byte_seconds",
            "Time from a request's arrival until its response could start (for a stream: "
            "its first chunk had arrived from the node).",
            ("route",),
        )
        self.selection = registry.histogram(
            "inferno_proxy_upstream_selection_seconds",
            "Time to choose a node for a request (eligibility and policy), queueing excluded.",
            buckets=SELECTION_BUCKETS,
        )
        self.queue_wait = registry.histogram(
            "inferno_proxy_queue_wait_seconds",
            "Time requests waited in the queue because no node was available.",
        )
        registry.gauge(
            "inferno_proxy_queued_requests",
            "Requests waiting for a node now, all models together.",
        ).set_function(queue.total)
        self.retries = registry.counter(
            "inferno_proxy_retries_total",
            "Requests sent to another node after a failure before their first byte, by reason.",
            ("reason",),
        )
        self.budget_exhausted = registry.counter(
            "inferno_proxy_retry_budget_exhausted_total",
            "Retries not made because the retry budget was spent.",
        )
        self.upstream_failures = registry.counter(
            "inferno_proxy_upstream_failures_total",
            "Attempts that failed at a node (connect, timeout, reset, status_NNN, mid_stream).",
            ("reason",),
        )
        self._node_in_flight = registry.gauge(
            "inferno_proxy_node_in_flight_requests",
            "Requests this proxy has in flight at each node.",
            ("node",),
        )
        self._nodes: set[str] = set()
        self._routes: dict[str, RouteMetrics] = {}

    def route(self, route: str) -> RouteMetrics:
        """The bound histograms of *route* (a bounded name, see the module docstring)."""
        bound = self._routes.get(route)
        if bound is None:
            bound = self._routes[route] = RouteMetrics(self._duration, self._first_byte, route)
        return bound

    def sync_nodes(self) -> None:
        """Follow the pool's node set: a series per backend, read from the pool when scraped."""
        current = {node.id for node in self._pool.backends()}
        if current == self._nodes:
            return
        for gone in self._nodes - current:
            self._node_in_flight.remove(node=gone)
        for new in current - self._nodes:
            self._node_in_flight.labels(node=new).set_function(partial(self._in_flight, new))
        self._nodes = current

    def _in_flight(self, node_id: str) -> float:
        node = self._pool.get(node_id)
        return node.in_flight if node is not None else 0
