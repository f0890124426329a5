"""The wait queue: alone (wake, bound, timeout, cancellation) and behind the proxy."""

from __future__ import annotations

import json

import anyio
import pytest
from inferno_proxy.forward import ForwardSettings
from inferno_proxy.waitqueue import QueueFull, QueueTimeout, WaitQueue

from tests.proxy.upstreams import IO_TIMEOUT, Backend, Harness, echo, not_ready, proxied

pytestmark = pytest.mark.anyio

JSON = {"content-type": "application/json"}
BODY = json.dumps({"model": "m", "prompt": "hello"}).encode()


async def until(condition: object) -> None:
    """Poll a state the code under test reaches on its own (no event to wait on)."""
    assert callable(condition)
    with anyio.fail_after(IO_TIMEOUT):
        while not condition():  # noqa: ASYNC110  # the queue has no event for "joined"
            await anyio.sleep(0.002)


# --- the queue alone ------------------------------------------------------------------------


async def test_a_waiter_gets_what_find_returns_after_a_wake() -> None:
    queue = WaitQueue(4)
    found: list[str] = []
    results: list[str] = []

    async def wait() -> None:
        results.append(await queue.wait_for("m", lambda: found[0] if found else None, 10.0))

    async with anyio.create_task_group() as tg:
        tg.start_soon(wait)
        await until(lambda: queue.depth("m") == 1)
        queue.wake()  # nothing yet: it waits again
        await anyio.wait_all_tasks_blocked()
        assert queue.depth("m") == 1
        found.append("node")
        queue.wake()
    assert results == ["node"]
    assert queue.total() == 0
    assert queue.depth("m") == 0


async def test_a_full_queue_refuses_with_429_and_retry_after() -> None:
    queue = WaitQueue(1)
    async with anyio.create_task_group() as tg:
        tg.start_soon(queue.wait_for, "m", lambda: None, 10.0)
        await until(lambda: queue.depth("m") == 1)
        with pytest.raises(QueueFull) as caught:
            await queue.wait_for("m", lambda: None, 10.0)
        assert caught.value.status == 429
        assert ("retry-after", "1") in caught.value.headers
        # Other models have their own room.
        with pytest.raises(QueueTimeout):
            await queue.wait_for("other", lambda: None, 0.01)
        tg.cancel_scope.cancel()
    assert queue.total() == 0  # the cancelled waiter left


async def test_a_timeout_is_503_with_retry_after() -> None:
    queue = WaitQueue(1)
    with pytest.raises(QueueTimeout) as caught:
        await queue.wait_for(None, lambda: None, 0.01)
    assert caught.value.status == 503
    assert caught.value.headers[0][0] == "retry-after"
    assert queue.total() == 0


async def test_no_waiting_when_disabled() -> None:
    for queue, wait in ((WaitQueue(0), 10.0), (WaitQueue(5), 0.0)):
        with pytest.raises(QueueTimeout):
            await queue.wait_for("m", lambda: "never asked", wait)


async def test_other_processes_waiters_count_against_the_bound() -> None:
    queue = WaitQueue(3)
    queue.peer_depths = {"m": 2}
    async with anyio.create_task_group() as tg:
        tg.start_soon(queue.wait_for, "m", lambda: None, 10.0)
        await until(lambda: queue.depth("m") == 1)
        assert queue.depths() == {"m": 1}  # its own only: what it reports to the parent
        with pytest.raises(QueueFull, match=r"\(3\)"):
            await queue.wait_for("m", lambda: None, 10.0)
        queue.peer_depths = {}  # the others' waiters left
        tg.start_soon(queue.wait_for, "m", lambda: None, 10.0)
        await until(lambda: queue.depth("m") == 2)
        tg.cancel_scope.cancel()
    assert queue.depths() == {}


def test_a_negative_bound_is_refused() -> None:
    with pytest.raises(ValueError, match="max_per_model"):
        WaitQueue(-1)


# --- behind the proxy ---------------------------------------------------------------------


async def post(h: Harness) -> tuple[int, str | None, dict[str, object]]:
    response = await h.client.request("POST", f"{h.url}/v1/completions", headers=JSON, body=BODY)
    return response.status, response.headers.get("retry-after"), await response.json()


async def test_no_node_means_waiting_then_503_with_retry_after() -> None:
    starting = Backend("starting", echo, models=("m",))
    async with proxied(starting, settings=ForwardSettings(queue_timeout=0.05)) as h:
        not_ready(h, "starting")
        code, retry_after, answer = await post(h)
        assert code == 503
        assert retry_after == "5"
        assert answer["error"]["code"] == "no_healthy_upstream"  # type: ignore[index]
        assert starting.seen == []
        assert h.app.queue.total() == 0


async def test_a_full_queue_is_429_and_a_node_that_joins_serves_the_waiter() -> None:
    starting = Backend("starting", echo, models=("m",))
    late = Backend("late", echo, models=("m",))
    settings = ForwardSettings(queue_timeout=IO_TIMEOUT, max_queue=1)
    async with proxied(starting, settings=settings, unregistered=[late]) as h:
        not_ready(h, "starting")
        answers: list[tuple[int, str | None, dict[str, object]]] = []

        async def first() -> None:
            answers.append(await post(h))

        async with anyio.create_task_group() as tg:
            tg.start_soon(first)
            await until(lambda: h.app.queue.depth("m") == 1)
            assert h.metric("inferno_proxy_queued_requests") == 1
            code, retry_after, answer = await post(h)  # the queue is full
            assert code == 429
            assert retry_after == "1"
            assert answer["error"]["code"] == "queue_full"  # type: ignore[index]
            h.register("late", late.address, ("m",))  # calls app.pool_changed()
        assert answers[0][0] == 200
        assert answers[0][2]["node"] == "late"
        assert h.app.queue.total() == 0
        assert h.metric("inferno_proxy_queued_requests") == 0
        assert starting.seen == []
