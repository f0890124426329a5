"""Leases that outlive their node: the SIGKILL-under-load case.

When a node dies under load, passive failures can remove it from the pool
while other requests leased to it are still failing.  Finishing those leases
must only give back their in-flight count; before the fix the removed node's
health machine refused the event (``IllegalTransition``) and the proxy
answered 500 instead of retrying elsewhere.
"""

from __future__ import annotations

from inferno_proxy.nodes import Outcome, PoolSettings
from inferno_proxy.pool import Pool

from inferno.protocol import Registration


def _pool() -> Pool:
    pool = Pool(PoolSettings(slow_start=0.0))
    for name, port in (("a", 20001), ("b", 20002)):
        pool.register(
            Registration(
                id=name, address=f"127.0.0.1:{port}", metrics_port=9000, node_type="backend"
            ),
            0.0,
        )
    return pool


def test_finishing_leases_of_a_node_removed_by_passive_failures_is_quiet() -> None:
    pool = _pool()
    node = pool.get("a")
    assert node is not None
    leases = [pool.start(node, 1.0) for _ in range(15)]
    for lease in leases[:10]:  # ten transport failures remove a registered node
        pool.finish(lease, Outcome.TRANSPORT_FAILURE, 1.1, "reset")
    assert pool.get("a") is None
    for lease in leases[10:]:  # the rest fail after the removal: no exception, no change
        assert pool.finish(lease, Outcome.TRANSPORT_FAILURE, 1.2, "reset") == ()
    assert node.in_flight == 0
    assert [n.id for n in pool.eligible(None).candidates] == ["b"]
