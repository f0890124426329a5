"""Which node a request goes to, and when it waits for one instead of failing.

:class:`NodeSelection` is the part of :class:`~inferno_proxy.forward.ServiceApp`
that picks nodes: the routing policy among :meth:`Pool.eligible
<inferno_proxy.pool.Pool.eligible>`, the model check, the queue
(:mod:`~inferno_proxy.waitqueue`), the targets of retries.  The forwarding
loop (:mod:`~inferno_proxy.forward`) and the WebSocket relay
(:mod:`~inferno_proxy.wsrelay`) call it.

**Unknown models.**  A model no node in the pool serves (in any state) is 404
``model_not_found`` only when the pool has backends *and* none of them served
it in the last :data:`~inferno_proxy.modelmemory.MODEL_MEMORY_SECONDS` (ten
minutes; :mod:`~inferno_proxy.modelmemory`).  A model served lately, or any
model while the pool has no backend at all (a fleet starting, or every node
gone), waits in the queue like a request whose nodes are all out, so a node
that is starting or restarting can take it: up to ``queue_timeout``, then 503
with ``Retry-After``, or 404 if by then the pool has backends and the model
is still unknown to them.  A node without a model list (a static backend
that has none) takes any model; a request only such nodes serve is routed
there but labelled ``unknown`` in the metrics, since its name is the
client's alone (:meth:`Pool.lists <inferno_proxy.pool.Pool.lists>`).

**No node eligible.**  The request waits in its model's queue, woken by
every pool change, for up to ``queue_timeout``: 503 + ``Retry-After`` then,
429 + ``Retry-After`` when the queue is full.

**Unreachable nodes.**  When every node a request tried failed in transport
(connect refused or timed out, reset) and no attempt is left
(``max_attempts`` spent, or no untried node), the request does not fail at
once: it waits in its model's queue until a node for it is *in rotation*
(healthy, circuit admitting: not merely offered by the panic valve, which
keeps a lone dead node a candidate), woken by pool changes, for what is left
of ``queue_timeout`` since it arrived, and is then sent there
(:meth:`NodeSelection.await_return`).  A node that is restarting thus takes
the request when its checks pass again; none coming back ends in 503
``no_healthy_upstream`` with ``Retry-After``.  Such an attempt is not a retry
(the request waited for a node to come back, as a queued request does): the
retry budget pays only for immediate retries, and a retry it refuses ends the
request at once, as before.  A node that *answered* (429/502/503), or a
first-byte timeout, ends the request at once too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from inferno.errors import HTTPError
from inferno_proxy.budget import RetryBudget, retry_after_header
from inferno_proxy.modelmemory import ModelMemory
from inferno_proxy.nodes import Node
from inferno_proxy.policies import RoutingPolicy
from inferno_proxy.pool import Pool
from inferno_proxy.requestinfo import Exchange, model_not_found
from inferno_proxy.servicemetrics import ServiceMetrics
from inferno_proxy.waitqueue import TIMEOUT_RETRY_AFTER, QueueTimeout, WaitQueue

if TYPE_CHECKING:
    from inferno_proxy.forward import ForwardSettings

__all__ = ["NodeSelection"]


class NodeSelection:
    """Choosing nodes for requests (see the module docstring); a base of
    :class:`~inferno_proxy.forward.ServiceApp`, which sets every attribute below."""

    pool: Pool
    budget: RetryBudget
    queue: WaitQueue
    metrics: ServiceMetrics
    settings: ForwardSettings
    clock: Callable[[], float]
    _policy: RoutingPolicy
    #: The models the pool's backends served lately (see "Unknown models").
    models_seen: ModelMemory

    # --- models -----------------------------------------------------------------------------

    def check_model(self, exchange: Exchange, model: str) -> None:
        """Label the exchange with *model*, or refuse a model no node will serve.

        See "Unknown models" in the module docstring.  The label is a client's
        name only when some node lists that model now or did lately; otherwise
        it is ``unknown`` (a client's name is no bounded label), whether the
        request then waits for a node (the pool has no backend; it is
        relabelled once a node serving it is found, :meth:`label_model`) or goes
        to a node without a model list, which takes any model.

        :raises HTTPError: 404 ``model_not_found`` when the pool has backends,
            none serves *model*, and none served it lately.
        """
        if self.pool.lists(model) or self.models_seen.remembers(model, self.clock()):
            exchange.model = model
            return
        exchange.model = "unknown"
        if len(self.pool) and not self.pool.serves(model):
            raise model_not_found(model)

    def expects(self, model: str) -> bool:
        """Whether a request for *model* may wait for a node rather than be 404."""
        return (
            self.pool.serves(model)
            or self.models_seen.remembers(model, self.clock())
            or not len(self.pool)
        )

    @staticmethod
    def label_model(exchange: Exchange, model: str | None, node: Node) -> None:
        """Label a request that waited for an unknown model with it, once *node*
        lists it (a registered model name: a bounded label)."""
        if model is not None and exchange.model == "unknown" and model in node.models:
            exchange.model = model

    # --- nodes ------------------------------------------------------------------------------

    def choose(self, model: str | None, key: str | None, exclude: list[str]) -> Node | None:
        """The policy's pick among the nodes eligible for *model*, or ``None``."""
        candidates = self.pool.eligible(model).candidates
        if not candidates:
            return None
        return self._policy.choose(candidates, key=key, now=self.clock(), exclude=exclude)

    async def first_node(self, model: str | None, key: str | None) -> Node:
        """The node for a request's first attempt, waiting in the queue when there is none.

        :raises QueueFull: 429 when the model's queue is full.
        :raises QueueTimeout: 503 when no node came within ``queue_timeout``.
        :raises HTTPError: 404 when the wait ends with backends in the pool and
            *model* unknown to them (see :meth:`expects`).
        """
        clock = self.clock
        began = clock()
        node = self.choose(model, key, [])
        self.metrics.selection.observe(clock() - began)
        if node is not None:
            return node
        queued = clock()
        try:
            return await self.queue.wait_for(
                model, lambda: self.choose(model, key, []), self.settings.queue_timeout
            )
        except QueueTimeout:
            if model is not None and not self.expects(model):
                raise model_not_found(model) from None  # nodes came, none serves it
            raise
        finally:
            self.metrics.queue_wait.observe(clock() - queued)

    def untried(self, model: str | None, key: str | None, tried: list[str]) -> Node | None:
        """A node not tried yet, while ``max_attempts`` allows another attempt."""
        if len(tried) >= self.settings.max_attempts:
            return None
        return self.choose(model, key, tried)

    def pay_retry(self) -> bool:
        """Take a retry from the budget; ``False`` (counted) when it is spent."""
        if self.budget.try_retry(self.clock()):
            return True
        self.metrics.budget_exhausted.inc()
        return False

    def choose_in_rotation(self, model: str | None, key: str | None) -> Node | None:
        """The policy's pick among the nodes for *model* that are in rotation (panic's
        extra candidates, the nodes that are out, left aside)."""
        candidates = [n for n in self.pool.eligible(model).candidates if n.in_rotation()]
        if not candidates:
            return None
        return self._policy.choose(candidates, key=key, now=self.clock(), exclude=[])

    async def await_return(
        self, exchange: Exchange, model: str | None, key: str | None, failed: HTTPError
    ) -> Node:
        """Wait for a node in rotation after every node tried was unreachable (see
        "Unreachable nodes" in the module docstring).

        :param failed: the answer the last failure deserves, raised when there
            is no time left to wait (or waiting is off).
        :raises HTTPError: *failed*; or 503 + ``Retry-After`` when no node came
            back within ``queue_timeout`` of the request's arrival.
        :raises QueueFull: 429 when the model's queue is full.
        """
        timeout = self.settings.queue_timeout
        left = exchange.started + timeout - self.clock()
        if left <= 0.0 or self.queue.max_per_model == 0:
            raise failed
        began = self.clock()
        try:
            return await self.queue.wait_for(
                model, lambda: self.choose_in_rotation(model, key), left
            )
        except QueueTimeout:
            raise HTTPError(
                503,
                f"{failed.message}; no node came back within {timeout:g} s",
                code="no_healthy_upstream",
                headers=[("retry-after", retry_after_header(TIMEOUT_RETRY_AFTER))],
            ) from None
        finally:
            self.metrics.queue_wait.observe(self.clock() - began)
