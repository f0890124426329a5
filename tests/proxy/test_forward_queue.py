"""Requests that wait for a node: models whose nodes are away, nodes that are down.

Real backends and a real proxy over loopback sockets (``tests/proxy/upstreams.py``).
A node "comes back" by registering again, or, for a node that was down, by a
real server starting on its port and real health checks finding it.
"""

from __future__ import annotations

import functools
import json
import time

import anyio
import pytest
from inferno_proxy.budget import RetryBudget
from inferno_proxy.forward import ForwardSettings
from inferno_proxy.modelmemory import ModelMemory

from inferno.http import serve
from tests.proxy.upstreams import (
    IO_TIMEOUT,
    Backend,
    Harness,
    echo,
    health_checks,
    proxied,
    refused_address,
    reserved_port,
    until,
)

pytestmark = pytest.mark.anyio

JSON = {"content-type": "application/json"}


def body(model: str) -> bytes:
    return json.dumps({"model": model, "prompt": "hello"}).encode()


async def post(h: Harness, model: str = "m") -> tuple[int, str | None, dict[str, object]]:
    response = await h.client.request(
        "POST", f"{h.url}/v1/completions", headers=JSON, body=body(model)
    )
    return response.status, response.headers.get("retry-after"), await response.json()


Answer = tuple[int, str | None, dict[str, object]]


async def post_into(answers: list[Answer], h: Harness, model: str = "m") -> None:
    answers.append(await post(h, model))


def error(answer: dict[str, object]) -> dict[str, str]:
    found = answer["error"]
    assert isinstance(found, dict)
    return found


# --- models whose nodes are away -------------------------------------------------------------


async def test_with_no_node_at_all_a_request_waits_for_one_that_registers() -> None:
    late = Backend("late", echo, models=("m",))
    settings = ForwardSettings(queue_timeout=IO_TIMEOUT)
    async with proxied(settings=settings, unregistered=[late]) as h:
        answers: list[Answer] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(post_into, answers, h)
            await until(lambda: h.app.queue.depth("m") == 1)
            h.register("late", late.address, ("m",))
        [(code, _, answer)] = answers
        assert code == 200
        assert answer["node"] == "late"
        assert h.metric("inferno_proxy_requests_total", status="200", model="m") == 1


async def test_with_no_node_at_all_the_wait_ends_in_503_with_retry_after() -> None:
    async with proxied(settings=ForwardSettings(queue_timeout=0.05)) as h:
        code, retry_after, answer = await post(h, "anything")
        assert code == 503
        assert retry_after == "5"
        assert error(answer)["code"] == "no_healthy_upstream"
        assert h.metric("inferno_proxy_requests_total", status="503", model="unknown") == 1


async def test_a_model_whose_nodes_left_lately_waits_for_them_to_come_back() -> None:
    a = Backend("a", echo, models=("m",))
    other = Backend("other", echo, models=("n",))
    async with proxied(a, other, settings=ForwardSettings(queue_timeout=IO_TIMEOUT)) as h:
        h.pool.deregister("a", time.monotonic())  # a restart: it leaves, then comes back
        h.app.pool_changed()
        assert h.pool.get("a") is None
        answers: list[Answer] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(post_into, answers, h)
            await until(lambda: h.app.queue.depth("m") == 1)
            h.register("a", a.address, ("m",))
        [(code, _, answer)] = answers
        assert code == 200
        assert answer["node"] == "a"
        code, _, answer = await post(h, "never-served")  # the fleet does not know it
        assert code == 404
        assert error(answer)["code"] == "model_not_found"


async def test_a_model_named_in_an_empty_pool_is_404_once_nodes_came_without_it() -> None:
    b = Backend("b", echo, models=("other",))
    async with proxied(settings=ForwardSettings(queue_timeout=0.2), unregistered=[b]) as h:
        answers: list[Answer] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(post_into, answers, h, "typo")
            await until(lambda: h.app.queue.depth("typo") == 1)
            h.register("b", b.address, ("other",))
        [(code, _, answer)] = answers
        assert code == 404
        assert error(answer)["code"] == "model_not_found"
        assert b.seen == []


def test_the_memory_forgets_after_its_window_and_beyond_its_limit() -> None:
    memory = ModelMemory(window=600.0, limit=2)
    memory.observe({"a", "b", "c"}, 0.0)
    assert memory.remembers("a", 0.0)
    assert not memory.remembers("z", 0.0)
    memory.observe({"c"}, 10.0)  # a and b lost their nodes
    assert memory.remembers("a", 609.0)
    assert not memory.remembers("a", 610.0)
    memory.observe({"b"}, 20.0)  # b is back, c left
    assert memory.departed() == 2
    memory.observe(set(), 30.0)  # b left again: three departed, the oldest (a) forgotten
    assert memory.departed() == 2
    assert not memory.remembers("a", 31.0)
    assert memory.remembers("b", 31.0)
    assert memory.remembers("c", 31.0)
    memory.observe(set(), 700.0)
    assert memory.departed() == 0
    with pytest.raises(ValueError, match="window"):
        ModelMemory(window=-1.0)


# --- nodes that are down ---------------------------------------------------------------------


@pytest.mark.parametrize("source", ["static", "registered"])
async def test_a_lone_node_down_at_first_takes_the_request_once_it_is_back(source: str) -> None:
    """With one node, the panic valve keeps it a candidate while it is out: the request
    tries it, finds it down and waits for it, not for a retry (the budget allows none)."""
    node = Backend("node", echo, models=("m",))
    placeholder = reserved_port()
    port = placeholder.getsockname()[1]
    address = f"127.0.0.1:{port}"
    no_retries = RetryBudget(ratio=0.0, min_per_second=0.0)
    settings = ForwardSettings(queue_timeout=IO_TIMEOUT)
    answers: list[Answer] = []
    with placeholder:
        async with proxied(settings=settings, budget=no_retries) as h:
            if source == "static":
                h.pool.add_static(address, time.monotonic())
                h.app.pool_changed()
            else:
                h.register("node", address, ("m",))
            async with health_checks(h), anyio.create_task_group() as tg:
                tg.start_soon(post_into, answers, h)
                await until(lambda: h.app.queue.depth("m") == 1)  # tried, found down: waits
                found = h.pool.get(address if source == "static" else "node")
                assert found is not None
                assert found.health.last_failure is not None
                await tg.start(functools.partial(serve, node.handle, port=port, reuse_port=True))
                placeholder.close()
                await until(lambda: bool(answers))
                tg.cancel_scope.cancel()
    [(code, _, answer)] = answers
    assert code == 200
    assert answer["node"] == "node"
    checks = ("/health", "/v1/models")  # the health loop's (a static node's model list)
    assert [seen.target for seen in node.seen if seen.target not in checks] == ["/v1/completions"]


async def test_a_lone_node_that_stays_down_is_503_with_retry_after_after_the_queue_timeout() -> (
    None
):
    settings = ForwardSettings(queue_timeout=0.3)
    async with proxied(settings=settings, extra_nodes=[("dead", refused_address(), ("m",))]) as h:
        code, retry_after, answer = await post(h)
        assert code == 503
        assert retry_after == "5"
        found = error(answer)
        assert found["code"] == "no_healthy_upstream"
        assert "cannot reach dead" in found["message"]
        assert "no node came back within 0.3 s" in found["message"]
        assert h.metric("inferno_proxy_queue_wait_seconds") == 1
        dead = h.pool.get("dead")
        assert dead is not None
        assert dead.health.consecutive_failures == 1  # tried once: nothing woke the request
        assert h.metric("inferno_proxy_retries_total", reason="connect") == 0


async def test_retries_come_first_within_max_attempts_then_the_wait() -> None:
    settings = ForwardSettings(queue_timeout=0.3, max_attempts=2)
    dead = [(f"first-{i}", refused_address(), ("m",)) for i in range(3)]
    async with proxied(settings=settings, extra_nodes=dead) as h:
        code, retry_after, _ = await post(h)
        assert (code, retry_after) == (503, "5")
        failures = []
        for name, _, _ in dead:
            node = h.pool.get(name)
            assert node is not None
            failures.append(node.health.consecutive_failures)
        assert failures == [1, 1, 0]  # max_attempts nodes, then waiting, not a third
        assert h.metric("inferno_proxy_retries_total", reason="connect") == 1
        assert h.metric("inferno_proxy_queue_wait_seconds") == 1
