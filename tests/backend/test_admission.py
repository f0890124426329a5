"""Admission control: the limiter itself, then through the API with the ``openai`` client."""

from __future__ import annotations

import functools
import json
import socket
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import openai
import pytest
from inferno_backend.admission import Admission, AdmissionRejected, Lease
from inferno_backend.engines.sim import SimEngine
from inferno_backend.gpu import GPUSampler
from inferno_backend.profiles import load_profile
from inferno_backend.role import BackendInfo, serve_backend
from inferno_backend.settings import BackendSettings
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam

from inferno.http.client import HTTPClient
from inferno.metrics import Registry

pytestmark = pytest.mark.anyio

WAIT = 10.0
POLL = 0.005  # seconds between two looks at a condition in wait_until
MODEL = "sim-tiny"
HELLO: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "Count to a thousand, slowly."}
]


async def wait_until(condition: Callable[[], bool]) -> None:
    """Return once ``condition()`` holds (bounded by WAIT): it proves the previous step."""
    with anyio.fail_after(WAIT):
        while True:
            if condition():
                return
            await anyio.sleep(POLL)


# -- the limiter --------------------------------------------------------------------------------


async def test_grants_up_to_the_limit_then_queues_then_refuses() -> None:
    admission = Admission(max_concurrency=2, max_queue=1)
    first, second = await admission.acquire(), await admission.acquire()
    assert (admission.running, admission.queued) == (2, 0)
    granted: list[Lease] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(_append, admission, granted)
        await wait_until(lambda: admission.queued == 1)
        with pytest.raises(AdmissionRejected) as caught:
            await admission.acquire()
        assert caught.value.reason == "full"
        first.release()
        first.release()  # a second release does nothing
    assert len(granted) == 1
    assert (admission.running, admission.queued) == (2, 0)
    second.release()
    granted[0].release()
    assert admission.idle
    assert admission.running == 0


async def _append(admission: Admission, granted: list[Lease]) -> None:
    granted.append(await admission.acquire())


async def test_queue_is_first_come_first_served() -> None:
    admission = Admission(max_concurrency=1, max_queue=5)
    holder = await admission.acquire()
    order: list[int] = []

    async def wait(n: int) -> None:
        with await admission.acquire():
            order.append(n)

    async with anyio.create_task_group() as tg:
        for n in range(5):
            tg.start_soon(wait, n)
            await wait_until(lambda n=n: admission.queued == n + 1)  # type: ignore[misc]
        holder.release()
    assert order == [0, 1, 2, 3, 4]
    assert admission.idle


async def test_cancelled_waiter_leaves_the_queue_at_once() -> None:
    admission = Admission(max_concurrency=1, max_queue=1)
    holder = await admission.acquire()
    with anyio.move_on_after(0.01):
        await admission.acquire()
    assert admission.queued == 0
    # Its place is free: another request can queue, and gets the slot.
    granted: list[Lease] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(_append, admission, granted)
        await wait_until(lambda: admission.queued == 1)
        holder.release()
    assert (admission.running, admission.queued) == (1, 0)
    granted[0].release()
    assert admission.idle


async def test_slot_handed_to_a_cancelled_waiter_is_passed_on() -> None:
    admission = Admission(max_concurrency=1, max_queue=2)
    holder = await admission.acquire()
    granted: list[Lease] = []
    with anyio.fail_after(WAIT):
        async with anyio.create_task_group() as tg:
            doomed = anyio.CancelScope()
            tg.start_soon(_acquire_in, admission, doomed, granted)
            await wait_until(lambda: admission.queued == 1)
            tg.start_soon(_append, admission, granted)
            await wait_until(lambda: admission.queued == 2)
            # Cancelled, then handed the slot before it runs again: it must pass it on.
            doomed.cancel()
            holder.release()
    assert len(granted) == 1
    granted[0].release()
    assert admission.idle


async def _acquire_in(admission: Admission, scope: anyio.CancelScope, out: list[Lease]) -> None:
    with scope:
        out.append(await admission.acquire())


async def test_close_refuses_newcomers_but_serves_the_queue() -> None:
    admission = Admission(max_concurrency=1, max_queue=1)
    holder = await admission.acquire()
    granted: list[Lease] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(_append, admission, granted)
        await wait_until(lambda: admission.queued == 1)
        admission.close()
        with pytest.raises(AdmissionRejected) as caught:
            await admission.acquire()
        assert caught.value.reason == "draining"
        holder.release()
    assert len(granted) == 1
    with anyio.fail_after(WAIT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(admission.wait_idle)
            granted[0].release()


def test_limits_are_checked() -> None:
    with pytest.raises(ValueError, match="max_concurrency"):
        Admission(0, 1)
    with pytest.raises(ValueError, match="max_queue"):
        Admission(1, -1)


# -- through the API ---------------------------------------------------------------------------


@asynccontextmanager
async def backend(**options: Any) -> AsyncIterator[BackendInfo]:
    # Slower than real time: a cpu-tiny step (about 2 ms) takes 8 ms, so a generation
    # of thousands of tokens keeps streaming, and writing, for longer than WAIT.
    engine = SimEngine(load_profile("cpu-tiny"), speed=0.25)
    settings = BackendSettings(port=0, ops_port=0, **options)
    async with anyio.create_task_group() as tg:
        start = functools.partial(
            serve_backend,
            settings,
            engine,
            registry=Registry(),
            stopping=anyio.Event(),
            gpu=GPUSampler(load_nvml=_no_nvml),
        )
        info = await tg.start(start)
        try:
            yield info
        finally:
            tg.cancel_scope.cancel()


def _no_nvml() -> Any:
    raise ImportError("no nvidia-ml-py in this test")


async def vitals(http: HTTPClient, info: BackendInfo) -> dict[str, Any]:
    response = await http.request("GET", f"{info.ops.url}/metrics")
    document: dict[str, Any] = await response.json()
    return document


async def test_queue_429_and_a_disconnect_frees_the_slot() -> None:
    async with (
        backend(max_concurrency=1, max_queue=1) as info,
        AsyncOpenAI(base_url=f"{info.service.url}/v1", api_key="x", max_retries=0) as client,
        HTTPClient() as http,
    ):
        state: dict[str, Any] = {}
        with anyio.fail_after(WAIT):
            # A: a long stream holding the only slot (it would run for longer than WAIT).
            long = await client.chat.completions.create(
                model=MODEL,
                messages=HELLO,
                max_tokens=3000,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            first = await long.__aiter__().__anext__()
            assert first.choices[0].delta.content

            async def queued() -> None:  # B: waits for the slot
                stream = await client.chat.completions.create(
                    model=MODEL, messages=HELLO, max_tokens=2, stream=True
                )
                state["b"] = [chunk async for chunk in stream]

            async with anyio.create_task_group() as tg:
                tg.start_soon(queued)
                await _until_vitals(http, info, lambda v: v["requests_queued"] == 1)
                # C: no slot, no room in the queue.
                with pytest.raises(openai.RateLimitError) as caught:
                    await client.chat.completions.create(model=MODEL, messages=HELLO)
                assert caught.value.response.headers["retry-after"] == "1"
                assert "b" not in state
                await long.close()  # A's client goes away: its slot must go to B now
            assert state["b"][-1].choices[0].finish_reason is not None
            after = await _until_vitals(http, info, lambda v: v["requests_in_progress"] == 0)
        assert after["backoff_requests"] == 1
        assert after["requests_queued"] == 0
        assert after["failed_responses"] == 0


async def test_a_client_gone_before_its_answer_starts_does_not_keep_its_slot() -> None:
    async with (
        backend(max_concurrency=1, max_queue=1) as info,
        AsyncOpenAI(base_url=f"{info.service.url}/v1", api_key="x", max_retries=0) as client,
        HTTPClient() as http,
    ):
        with anyio.fail_after(WAIT):
            long = await client.chat.completions.create(
                model=MODEL,
                messages=HELLO,
                max_tokens=3000,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            await long.__aiter__().__anext__()
            # B queues, then its client resets the connection before any answer.
            body = json.dumps(
                {"model": MODEL, "messages": HELLO, "max_tokens": 2, "stream": True}
            ).encode()
            gone = socket.create_connection(("127.0.0.1", info.service.port))
            gone.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
                b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                % (len(body), body)
            )
            await _until_vitals(http, info, lambda v: v["requests_queued"] == 1)
            gone.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            gone.close()  # RST
            await long.close()  # B gets the slot and its first token, but cannot answer
            idle = await _until_vitals(
                http, info, lambda v: v["requests_in_progress"] + v["requests_queued"] == 0
            )
            after = await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
        assert after.choices[0].finish_reason is not None
        assert idle["failed_responses"] == 0


def _reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # RST


def _post(port: int, document: dict[str, Any]) -> socket.socket:
    body = json.dumps(document).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
        b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
    )
    return sock


async def test_a_client_gone_while_queued_or_generating_frees_its_place_at_once() -> None:
    async with backend(max_concurrency=1, max_queue=1) as info, HTTPClient() as http:
        with anyio.fail_after(WAIT):
            # A: a non-streaming generation that would run for longer than WAIT.
            running = _post(
                info.service.port,
                {"model": MODEL, "messages": HELLO, "max_tokens": 3000, "ignore_eos": True},
            )
            await _until_vitals(http, info, lambda v: v["requests_in_progress"] == 1)
            queued = _post(info.service.port, {"model": MODEL, "messages": HELLO})  # B
            await _until_vitals(http, info, lambda v: v["requests_queued"] == 1)
            _reset(queued)  # B leaves the queue while A still runs
            after_b = await _until_vitals(http, info, lambda v: v["requests_queued"] == 0)
            assert after_b["requests_in_progress"] == 1
            _reset(running)  # A's generation stops long before its 3,000 tokens
            idle = await _until_vitals(http, info, lambda v: v["requests_in_progress"] == 0)
        assert (idle["failed_responses"], idle["backoff_requests"]) == (0, 0)


async def _until_vitals(
    http: HTTPClient, info: BackendInfo, condition: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    while True:
        document = await vitals(http, info)
        if condition(document):
            return document
        await anyio.sleep(POLL)
