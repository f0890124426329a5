"""Requests that wait for a node: models whose nodes are away, nodes that are down.

Real backends and a real proxy over loopback sockets (``tests/proxy/upstreams.py``).
A node "comes back" by registering again, or, for a node that was down, by a
real server starting on its port and real health checks finding it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import anyio
import pytest
from inferno_proxy.forward import ForwardSettings
from inferno_proxy.modelmemory import ModelMemory

from tests.proxy.upstreams import IO_TIMEOUT, Backend, Harness, echo, proxied

pytestmark = pytest.mark.anyio

JSON = {"content-type": "application/json"}


def body(model: str) -> bytes:
    return json.dumps({"model": model, "prompt": "hello"}).encode()


async def post(h: Harness, model: str = "m") -> tuple[int, str | None, dict[str, object]]:
    response = await h.client.request(
        "POST", f"{h.url}/v1/completions", headers=JSON, body=body(model)
    )
    return response.status, response.headers.get("retry-after"), await response.json()


async def until(condition: Callable[[], bool]) -> None:
    """Wait, bounded, for something the proxy does on its own (no event to wait on)."""
    with anyio.fail_after(IO_TIMEOUT):
        while not condition():  # noqa: ASYNC110
            await anyio.sleep(0.002)


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
