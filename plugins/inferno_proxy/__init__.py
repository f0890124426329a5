"""The ``proxy`` role: a load balancer in front of inference nodes.

The decision logic is pure (no I/O, no clock: every function takes ``now`` in
monotonic seconds) so it can be tested exactly and shared by every driver:

* :mod:`inferno_proxy.pool` -- the pool of nodes: registration, what is eligible
  for a request (panic mode), in-flight leases, stall detection.
* :mod:`inferno_proxy.nodes` -- one node's routing state (slow start, why it is
  out) and the values the pool trades in.
* :mod:`inferno_proxy.health` -- the per-node active/passive health state machine.
* :mod:`inferno_proxy.circuit` -- the per-node circuit breaker.
* :mod:`inferno_proxy.policies` -- routing policies (round robin, least requests,
  weighted, affinity).
* :mod:`inferno_proxy.budget` -- the retry budget and per-client rate limits.
* :mod:`inferno_proxy.fsm` -- the transition-table machinery both state machines use.

A first-party plugin: it reaches the core only through hooks and the core's
public API, exactly as a third-party plugin would.
"""
