"""The ``backend`` role: drain in process, a real process under SIGTERM, the command line.

In process, a step clock holds the sim's generations where the test wants
them, so "in flight when the drain starts" is certain; the process test sends
a real SIGTERM to ``python -m inferno backend`` under load.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import openai
import pytest
from anyio.lowlevel import checkpoint
from inferno_backend.admission import Admission
from inferno_backend.api import InferenceAPI
from inferno_backend.engines.openai import OpenAIEngine
from inferno_backend.engines.sim import SimEngine
from inferno_backend.gpu import GPUSampler
from inferno_backend.plugin import BACKEND_ROLE
from inferno_backend.profiles import load_profile
from inferno_backend.role import BackendInfo, make_openai_engine, run, serve_backend
from inferno_backend.settings import BACKEND_SECTION, BackendSettings
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam

from inferno.cli import main
from inferno.config import HostPort, load_config
from inferno.errors import HTTPError
from inferno.http import (
    Request,
    Response,
    ServerInfo,
    WebSocketClosed,
    connect_websocket,
    serve,
)
from inferno.http.client import HTTPClient
from inferno.lifecycle import RoleContext, role_sections
from inferno.metrics import Registry
from inferno.plugins import get_plugin_manager

WAIT = 20.0
MODEL = "sim-tiny"
HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Write a long story."}]
LISTENING = re.compile(r"backend listening on ([\d.]+):(\d+) \(ops ([\d.]+):(\d+)\)")
ROOT = Path(__file__).resolve().parents[2]


def no_nvml() -> Any:
    raise ImportError("no nvidia-ml-py in this test")


class StepClock:
    """A sim clock that advances one engine step per permit the test grants."""

    def __init__(self) -> None:
        self._now = 0.0
        self._permits = 0
        self._granted: anyio.Event | None = None

    def now(self) -> float:
        return self._now

    async def sleep_until(self, deadline: float) -> None:
        await checkpoint()
        if deadline <= self._now:
            return
        while self._permits == 0:
            self._granted = anyio.Event()
            await self._granted.wait()
        self._permits -= 1
        self._now = deadline

    def allow(self, steps: int) -> None:
        self._permits += steps
        if self._granted is not None:
            self._granted.set()


class LoadBalancer:
    """Records /register and /deregister bodies, as a proxy's ops port would receive them."""

    def __init__(self) -> None:
        self.registered: list[dict[str, Any]] = []
        self.deregistered: list[dict[str, Any]] = []
        self.authorization: set[str | None] = set()
        self._changed = anyio.Event()

    async def handle(self, request: Request) -> Response:
        self.authorization.add(request.headers.get("authorization"))
        body = await request.json()
        if request.path == "/register":
            self.registered.append(body)
        elif request.path == "/deregister":
            self.deregistered.append(body)
        else:
            raise HTTPError(404, "no such route")
        self._changed.set()
        self._changed = anyio.Event()
        return Response.json({"status": "ok", "peers": []})

    async def until(self, what: str) -> None:
        with anyio.fail_after(WAIT):
            while not getattr(self, what):
                await self._changed.wait()


@asynccontextmanager
async def load_balancer() -> AsyncIterator[tuple[LoadBalancer, HostPort]]:
    lb = LoadBalancer()
    async with anyio.create_task_group() as tg:
        stop = anyio.Event()
        info = await tg.start(functools.partial(serve, lb.handle, shutdown=stop))
        try:
            yield lb, HostPort("127.0.0.1", info.port)
        finally:
            stop.set()


async def health(http: HTTPClient, info: BackendInfo) -> tuple[int, Any]:
    response = await http.request("GET", f"{info.ops.url}/health")
    return response.status, await response.json()


def in_engine(engine: SimEngine) -> int:
    stats = engine.stats()
    return (stats.running or 0) + (stats.waiting or 0)


async def eventually(condition: Callable[[], bool]) -> None:
    """Wait (bounded) for a condition that has no event to wait on."""
    with anyio.fail_after(WAIT):
        while True:
            if condition():
                return
            await anyio.sleep(0.002)


async def until_vitals(http: HTTPClient, ops_url: str, key: str, value: object) -> None:
    with anyio.fail_after(WAIT):
        while True:
            document = await (await http.request("GET", f"{ops_url}/metrics")).json()
            if document[key] == value:
                return
            await anyio.sleep(0.005)


# -- drain, in process --------------------------------------------------------------------------


@pytest.mark.anyio
async def test_drain_finishes_running_and_queued_refuses_new_and_closes_idle_sockets() -> None:
    clock = StepClock()
    engine = SimEngine(load_profile("cpu-tiny"), clock=clock)
    settings = BackendSettings(
        port=0, ops_port=0, max_concurrency=2, max_queue=4, drain_timeout=WAIT
    )
    stopping = anyio.Event()
    finished: dict[int, Any] = {}
    async with (
        anyio.create_task_group() as tg,
        HTTPClient() as http,
    ):
        info: BackendInfo = await tg.start(
            functools.partial(
                serve_backend,
                settings,
                engine,
                registry=Registry(),
                stopping=stopping,
                shutdown_timeout=2 * WAIT,
                gpu=GPUSampler(load_nvml=no_nvml),
            )
        )
        client = AsyncOpenAI(base_url=f"{info.service.url}/v1", api_key="x", max_retries=0)
        async with client, anyio.create_task_group() as requests:
            first_chunk = [anyio.Event() for _ in range(3)]

            async def stream(n: int) -> None:
                answer = await client.chat.completions.create(
                    model=MODEL,
                    messages=HELLO,
                    max_tokens=20,
                    stream=True,
                    extra_body={"ignore_eos": True},
                )
                chunks = []
                async for chunk in answer:
                    chunks.append(chunk)
                    first_chunk[n].set()
                finished[n] = chunks

            with anyio.fail_after(WAIT):
                for n in range(2):  # two running
                    requests.start_soon(stream, n)
                    await eventually(lambda n=n: in_engine(engine) == n + 1)  # type: ignore[misc]
                    # The first needs its prefill step; the second comes after a decode
                    # step of the first that was planned before it arrived.
                    clock.allow(1 if n == 0 else 2)
                    await first_chunk[n].wait()
                requests.start_soon(stream, 2)  # one queued
                await until_vitals(http, info.ops.url, "requests_queued", 1)
                ws = await connect_websocket(f"ws://127.0.0.1:{info.service.port}/v1/ws")

                stopping.set()
                with pytest.raises(WebSocketClosed) as closed:
                    await ws.receive()  # an idle socket is told to go away
                assert closed.value.code == 1001
                assert await health(http, info) == (503, {"status": "draining"})
                with pytest.raises(openai.InternalServerError) as refused:
                    await client.completions.create(model=MODEL, prompt="late")
                assert refused.value.status_code == 503
                assert refused.value.code == "draining"
                assert refused.value.response.headers["retry-after"] == "1"
                clock.allow(10_000)
        assert sorted(finished) == [0, 1, 2]
        for chunks in finished.values():
            assert chunks[-1].choices[0].finish_reason == "length"
    # serve_backend returned by itself: the task group above ended without being cancelled.
    assert not tg.cancel_scope.cancel_called


@pytest.mark.anyio
async def test_the_drain_deadline_answers_unstarted_and_queued_requests_503_at_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = StepClock()  # grants no step: the running request never gets its first token
    engine = SimEngine(load_profile("cpu-tiny"), clock=clock)
    settings = BackendSettings(  # no drain time: the deadline passes at once
        port=0, ops_port=0, max_concurrency=1, max_queue=1, drain_timeout=0.0
    )
    stopping = anyio.Event()
    answers: dict[str, tuple[int, Any, str | None]] = {}
    async with anyio.create_task_group() as tg, HTTPClient() as http:
        info: BackendInfo = await tg.start(
            functools.partial(
                serve_backend,
                settings,
                engine,
                registry=Registry(),
                stopping=stopping,
                shutdown_timeout=2 * WAIT,
                gpu=GPUSampler(load_nvml=no_nvml),
            )
        )

        async def whole(name: str) -> None:
            body = {"model": MODEL, "prompt": "x", "max_tokens": 50, "ignore_eos": True}
            response = await http.request(
                "POST", f"{info.service.url}/v1/completions", body=json.dumps(body).encode()
            )
            document = await response.json()
            answers[name] = (response.status, document, response.headers.get("retry-after"))

        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as requests:
                requests.start_soon(whole, "running")  # admitted, waits for its first token
                await eventually(lambda: in_engine(engine) == 1)
                requests.start_soon(whole, "queued")
                await until_vitals(http, info.ops.url, "requests_queued", 1)
                stopping.set()
    assert not tg.cancel_scope.cancel_called  # serve_backend returned by itself
    for name in ("running", "queued"):  # nothing sent yet: a retryable 503
        status, document, retry_after = answers[name]
        assert (status, document["error"]["code"], retry_after) == (503, "draining", "1")
    # Every answer ended before the ports closed: none had to be cancelled.
    assert "still busy" not in caplog.text
    assert "drain timeout: cutting 1 running generations and 1 queued requests\n" in (caplog.text)


@asynccontextmanager
async def inference_api(
    engine: SimEngine,
) -> AsyncIterator[tuple[InferenceAPI, ServerInfo]]:
    """The service port's handler alone, so a test drives the drain and the cut itself."""
    api = InferenceAPI(engine, Admission(4, 4), Registry())
    async with engine, anyio.create_task_group() as tg:
        stop = anyio.Event()
        info = await tg.start(functools.partial(serve, api.handle, shutdown=stop))
        try:
            yield api, info
        finally:
            stop.set()


@pytest.mark.anyio
async def test_a_cut_stream_ends_at_once_with_a_draining_error_event() -> None:
    clock = StepClock()
    engine = SimEngine(load_profile("cpu-tiny"), clock=clock)
    events: list[str] = []
    arrived = anyio.Event()

    async def stream(http: HTTPClient, url: str) -> None:
        nonlocal arrived
        body = {"model": MODEL, "prompt": "x", "max_tokens": 50, "stream": True}
        body["ignore_eos"] = True
        async with http.stream("POST", url, body=json.dumps(body).encode()) as response:
            assert response.status == 200
            buffer = ""
            async for data in response.iter_bytes():
                buffer += data.decode()
                *complete, buffer = buffer.split("\n\n")
                events.extend(event.removeprefix("data: ") for event in complete)
                arrived.set()
                arrived = anyio.Event()
            assert buffer == ""

    async with inference_api(engine) as (api, info), HTTPClient() as http:
        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as tg:
                tg.start_soon(stream, http, f"{info.url}/v1/completions")
                await eventually(lambda: in_engine(engine) == 1)
                clock.allow(1)  # the first token
                await eventually(lambda: len(events) == 1)
                api.start_draining()
                clock.allow(1)  # one more token, then the engine stays silent
                await eventually(lambda: len(events) == 2)
                assert api.cut_generations() == (1, 0)  # the drain deadline, as the role calls it
        assert api.admission.idle
        assert api.failed_responses == 1
    *chunks, last = events
    assert [json.loads(chunk)["object"] for chunk in chunks] == ["text_completion"] * 2
    error = json.loads(last)["error"]
    assert (error["type"], error["code"]) == ("server_error", "draining")


@pytest.mark.anyio
async def test_a_stream_silent_since_before_the_drain_is_cut_at_its_next_chunk() -> None:
    clock = StepClock()
    engine = SimEngine(load_profile("cpu-tiny"), clock=clock)
    received: list[bytes] = []

    async def stream(http: HTTPClient, url: str) -> None:
        body = {"model": MODEL, "prompt": "x", "max_tokens": 50, "stream": True}
        body["ignore_eos"] = True
        async with http.stream("POST", url, body=json.dumps(body).encode()) as response:
            async for data in response.iter_bytes():
                received.append(data)

    async with inference_api(engine) as (api, info), HTTPClient() as http:
        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as tg:
                tg.start_soon(stream, http, f"{info.url}/v1/completions")
                await eventually(lambda: in_engine(engine) == 1)
                clock.allow(1)
                await eventually(lambda: len(received) > 0)
                api.start_draining()  # its engine read began before: no cancel scope
                assert api.cut_generations() == (1, 1)
                clock.allow(1)  # the engine speaks again: the stream ends there
        assert api.admission.idle
    assert b"".join(received).endswith(b'"code":"draining","param":null}}\n\n')


@pytest.mark.anyio
async def test_a_cut_websocket_generation_ends_with_a_draining_error_message() -> None:
    clock = StepClock()
    engine = SimEngine(load_profile("cpu-tiny"), clock=clock)
    async with inference_api(engine) as (api, info):
        with anyio.fail_after(WAIT):
            ws = await connect_websocket(f"ws://127.0.0.1:{info.port}/v1/ws")
            request = {"model": MODEL, "prompt": "x", "max_tokens": 50, "ignore_eos": True}
            await ws.send(json.dumps(request))
            await eventually(lambda: in_engine(engine) == 1)
            clock.allow(1)
            assert json.loads(await ws.receive())["object"] == "text_completion"
            api.start_draining()
            clock.allow(1)
            assert json.loads(await ws.receive())["object"] == "text_completion"
            assert api.cut_generations() == (1, 0)
            terminal = json.loads(await ws.receive())
            with pytest.raises(WebSocketClosed) as closed:
                await ws.receive()
    assert (terminal["status"], terminal["error"]["code"]) == (503, "draining")
    assert closed.value.code == 1001  # the node drains: the socket is told to go away


# -- the role's run(ctx), in process ----------------------------------------------------------


async def run_then_set(ctx: RoleContext, done: anyio.Event) -> None:
    await run(ctx)
    done.set()


def role_context(flags: dict[str, str]) -> RoleContext:
    """The context ``inferno backend`` would build, with these ``backend.*`` values as flags."""
    config = load_config(
        role_sections(BACKEND_ROLE),
        role="backend",
        environ={},
        flags={f"backend.{key}": value for key, value in flags.items()},
    )
    return RoleContext(
        role=BACKEND_ROLE,
        config=config,
        plugins=get_plugin_manager(),
        stopping=anyio.Event(),
        shutdown_timeout=WAIT,
        metrics=Registry(),
    )


@pytest.mark.anyio
@pytest.mark.usefixtures("backend_plugin")
async def test_the_openai_engine_fronts_another_backend() -> None:
    sim = SimEngine(load_profile("cpu-tiny"), speed=50.0)
    upstream_stopping, front_done = anyio.Event(), anyio.Event()
    async with anyio.create_task_group() as tg, HTTPClient() as http:
        upstream: BackendInfo = await tg.start(
            functools.partial(
                serve_backend,
                BackendSettings(port=0, ops_port=0),
                sim,
                registry=Registry(),
                stopping=upstream_stopping,
                gpu=GPUSampler(load_nvml=no_nvml),
            )
        )
        ctx = role_context(
            {"engine": "openai", "engine_url": upstream.service.url, "port": "0", "ops_port": "0"}
        )
        tg.start_soon(run_then_set, ctx, front_done)
        await eventually(lambda: "backend" in ctx.state)
        front: BackendInfo = ctx.state["backend"]
        await until_vitals(http, front.ops.url, "ready", True)
        body = json.dumps({"model": MODEL, "messages": HELLO, "max_tokens": 12}).encode()
        direct = await (
            await http.request("POST", f"{upstream.service.url}/v1/chat/completions", body=body)
        ).json()
        async with AsyncOpenAI(
            base_url=f"{front.service.url}/v1", api_key="x", max_retries=0
        ) as client:
            models = await client.models.list()
            fronted = await client.chat.completions.create(
                model=MODEL, messages=HELLO, max_tokens=12
            )
        assert [m.id for m in models.data] == [MODEL]  # discovered from the upstream backend
        assert fronted.choices[0].message.content == direct["choices"][0]["message"]["content"]
        assert fronted.usage is not None
        assert fronted.usage.completion_tokens == direct["usage"]["completion_tokens"]
        ctx.stopping.set()
        with anyio.fail_after(WAIT):
            await front_done.wait()  # the role drained and returned by itself
        upstream_stopping.set()


@pytest.mark.anyio
@pytest.mark.usefixtures("backend_plugin")
async def test_a_model_the_engine_server_does_not_serve_means_not_ready() -> None:
    async with (
        anyio.create_task_group() as tg,
        HTTPClient() as http,
        load_balancer() as (lb, lb_address),
    ):
        upstream_stopping = anyio.Event()
        upstream: BackendInfo = await tg.start(
            functools.partial(
                serve_backend,
                BackendSettings(port=0, ops_port=0),
                SimEngine(load_profile("cpu-tiny")),  # serves sim-tiny
                registry=Registry(),
                stopping=upstream_stopping,
                gpu=GPUSampler(load_nvml=no_nvml),
            )
        )
        ctx = role_context(
            {"engine": "openai", "engine_url": upstream.service.url, "model": "llama3"}
            | {"port": "0", "ops_port": "0", "discovery_lb": str(lb_address)}
        )
        tg.start_soon(run, ctx)
        await eventually(lambda: "backend" in ctx.state)
        front: BackendInfo = ctx.state["backend"]  # the engine was polled once before this
        assert await health(http, front) == (503, {"status": "engine not ready"})
        ctx.stopping.set()
        upstream_stopping.set()
    assert lb.registered == []  # never announced under a name nobody serves


@pytest.mark.anyio
@pytest.mark.usefixtures("backend_plugin")
async def test_an_unreachable_engine_server_means_not_ready() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        nobody = probe.getsockname()[1]
    ctx = role_context(
        {"engine": "openai", "engine_url": f"http://127.0.0.1:{nobody}", "model": "m"}
        | {"port": "0", "ops_port": "0"}
    )
    async with anyio.create_task_group() as tg, HTTPClient() as http:
        tg.start_soon(run, ctx)
        await eventually(lambda: "backend" in ctx.state)
        info: BackendInfo = ctx.state["backend"]
        status, document = await health(http, info)
        assert (status, document) == (503, {"status": "engine not ready"})
        refused = await http.request(
            "POST",
            f"{info.service.url}/v1/completions",
            body=json.dumps({"model": "m", "prompt": "x"}).encode(),
        )
        assert refused.status == 503
        assert (await refused.json())["error"]["code"] == "engine_unavailable"
        for _ in range(2):  # the service port's own probe
            answer = await http.request("GET", f"{info.service.url}/health")
            assert answer.status == 503
        vitals = await (await http.request("GET", f"{info.ops.url}/metrics")).json()
        assert vitals["failed_responses"] == 1  # the refused request; health probes never count
        ctx.stopping.set()


@pytest.mark.anyio
@pytest.mark.usefixtures("backend_plugin")
@pytest.mark.parametrize("max_concurrency", [8, 150])
async def test_the_openai_engine_has_a_connection_per_admitted_request(
    max_concurrency: int,
) -> None:
    ctx = role_context(
        {"engine": "openai", "engine_url": "http://127.0.0.1:9"}
        | {"max_concurrency": str(max_concurrency)}
    )
    engine = make_openai_engine(ctx)
    try:
        assert isinstance(engine, OpenAIEngine)
        # Every admitted request streams over a connection of its own, beyond the
        # client's default of 100 per origin too.
        assert max_concurrency <= engine.max_connections <= max_concurrency + 16
    finally:
        await engine.aclose()


# -- a real process -----------------------------------------------------------------------------


def backend_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERNO_")}
    env["INFERNO_PLUGINS"] = "inferno_backend.plugin"
    env["INFERNO_LOG_FORMAT"] = "json"
    return env


async def read_lines(
    stream: anyio.abc.ByteReceiveStream, lines: list[dict[str, Any]], listening: anyio.Event
) -> None:
    buffer = b""
    async for data in stream:
        buffer += data
        *complete, buffer = buffer.split(b"\n")
        for raw in complete:
            try:
                record = json.loads(raw)
            except ValueError:
                record = {"message": raw.decode(errors="replace")}
            lines.append(record)
            if LISTENING.search(str(record.get("message", ""))):
                listening.set()


@pytest.mark.anyio
async def test_sigterm_under_load_completes_in_flight_deregisters_and_exits_0() -> None:
    lines: list[dict[str, Any]] = []
    listening = anyio.Event()
    async with load_balancer() as (lb, lb_address), HTTPClient() as http:
        command = [
            sys.executable,
            "-m",
            "inferno",
            "backend",
            "--port=0",
            "--ops-port=0",
            f"--discovery-lb={lb_address}",
            "--shared-secret=process-secret",
            "--sim-speed=1",
            "--drain-timeout=15s",
        ]
        async with await anyio.open_process(command, env=backend_env(), cwd=ROOT) as process:
            assert process.stderr is not None
            async with anyio.create_task_group() as tg:
                tg.start_soon(read_lines, process.stderr, lines, listening)
                try:
                    with anyio.fail_after(WAIT):
                        await listening.wait()
                        (found,) = [
                            m for r in lines if (m := LISTENING.search(str(r.get("message"))))
                        ]
                        service = f"http://127.0.0.1:{found.group(2)}"
                        ops = f"http://127.0.0.1:{found.group(4)}"
                        await lb.until("registered")
                        await sigterm_under_load(process, service, ops, http)
                        await lb.until("deregistered")
                        status = await process.wait()
                finally:
                    if process.returncode is None:
                        process.kill()
                tg.cancel_scope.cancel()
    log = "\n".join(str(r.get("message")) for r in lines)
    assert status == 0, log
    assert lb.registered[0]["address"] == f"127.0.0.1:{found.group(2)}"
    assert lb.registered[0]["metrics_port"] == int(found.group(4))
    assert lb.deregistered == [{"id": lb.registered[0]["id"]}]
    assert lb.authorization == {"Bearer process-secret"}
    assert "process-secret" not in log
    assert "draining" in log


async def sigterm_under_load(
    process: anyio.abc.Process, service: str, ops: str, http: HTTPClient
) -> None:
    """Four long streams in flight, then SIGTERM: each must complete in full."""
    results: list[str | None] = []
    started = [anyio.Event() for _ in range(4)]
    async with (
        AsyncOpenAI(base_url=f"{service}/v1", api_key="x", max_retries=0) as client,
        anyio.create_task_group() as tg,
    ):

        async def stream(n: int) -> None:
            answer = await client.completions.create(
                model=MODEL,
                prompt=f"story {n}",
                max_tokens=500,  # about a second at speed 1
                stream=True,
                extra_body={"ignore_eos": True},
            )
            started[n].set()
            last = None
            async for chunk in answer:
                last = chunk.choices[0].finish_reason
            results.append(last)

        for n in range(4):
            tg.start_soon(stream, n)
        for event in started:
            await event.wait()
        process.send_signal(signal.SIGTERM)
        await until_vitals(http, ops, "ready", False)
        with pytest.raises(openai.InternalServerError):  # 503 while draining
            await client.completions.create(model=MODEL, prompt="late")
    assert results == ["length"] * 4


# -- the command line -----------------------------------------------------------------------------


@pytest.fixture
def backend_plugin(clean_inferno_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERNO_PLUGINS", "inferno_backend.plugin")
    get_plugin_manager(refresh=True)
    yield
    get_plugin_manager(refresh=True)


@pytest.mark.usefixtures("backend_plugin")
@pytest.mark.parametrize(
    ("args", "key"),
    [
        (["--engine", "nope"], "backend.engine"),
        (["--sim-profile", "no-such-profile"], "backend.sim_profile"),
        (["--sim-faults", "explode=1"], "backend.sim_faults"),
        (["--engine", "openai"], "backend.engine_url"),
        (["--engine", "openai", "--engine-url", "ftp://x"], "backend.engine_url"),
        (["--max-queue", "-1"], "backend.max_queue"),
    ],
)
def test_bad_settings_exit_2_naming_the_key(
    args: list[str], key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["backend", "--port=0", "--ops-port=0", *args]) == 2
    err = capsys.readouterr().err
    assert f"{key} (" in err
    assert "Traceback" not in err


@pytest.mark.usefixtures("backend_plugin")
@pytest.mark.parametrize("flag", ["--port", "--ops-port"])
def test_a_port_in_use_is_one_clear_line(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["backend", "--port=0", "--ops-port=0", f"{flag}={port}"]) == 1
    err = capsys.readouterr().err
    key = "backend.port" if flag == "--port" else "backend.ops_port"
    assert f"inferno: error: cannot listen on 127.0.0.1:{port} ({key}): " in err
    assert "Traceback" not in err
    assert "ExceptionGroup" not in err


@pytest.mark.usefixtures("backend_plugin")
def test_a_node_id_load_balancers_would_refuse_is_a_config_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["backend", "--port=0", "--ops-port=0", "--node-id", "no spaces allowed"]) == 2
    err = capsys.readouterr().err
    assert "backend.node_id (effective value): " in err
    assert "Traceback" not in err


@pytest.mark.usefixtures("backend_plugin")
def test_a_bad_profile_file_says_what_is_wrong_in_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shipped = (ROOT / "plugins/inferno_backend/profiles/cpu-tiny.toml").read_text()
    broken = tmp_path / "broken.toml"
    broken.write_text(re.sub(r"decode_base_ms = .*", 'decode_base_ms = "fast"', shipped))
    assert main(["backend", "--port=0", "--ops-port=0", "--sim-profile", str(broken)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "sim_profile" in line]
    assert lines == [
        f"backend.sim_profile (flag --sim-profile): {broken}: timing.decode_base_ms: "
        "must be a number >= 0, got 'fast'"
    ]  # and no list of shipped profiles: they are not what is wrong


@pytest.mark.usefixtures("backend_plugin")
def test_an_unknown_profile_name_lists_the_shipped_ones_once(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["backend", "--port=0", "--ops-port=0", "--sim-profile", "h200"]) == 2
    err = capsys.readouterr().err
    assert "h200: no such profile (shipped: " in err
    assert err.count("cpu-tiny") == 1


@pytest.mark.usefixtures("backend_plugin")
def test_config_shows_settings_and_hides_the_secret(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "backend", "--shared-secret", "hush", "--max-queue", "7"]) == 0
    out = capsys.readouterr().out
    assert "max_queue = 7  # from flag --max-queue" in out
    assert "hush" not in out
    assert "[backend]" in out


@pytest.mark.usefixtures("backend_plugin")
@pytest.mark.parametrize(
    "args",
    [
        ["doctor", "--window", "0.05s", "--samples", "1", "--no-matmul"],
        ["backend", "--gpu-report"],
    ],
)
def test_gpu_report_commands(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(args) == 0
    assert "Inferno GPU report" in capsys.readouterr().out


@pytest.mark.usefixtures("backend_plugin")
def test_settings_come_from_toml_and_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    toml = tmp_path / "inferno.toml"
    toml.write_text('[backend]\nsim_speed = 3.5\ndiscovery_lb = ["10.0.0.1:6100"]\n')
    monkeypatch.setenv("INFERNO_BACKEND_MAX_CONCURRENCY", "5")
    assert main(["config", "backend", "--config", str(toml), "--drain-timeout", "9s"]) == 0
    out = capsys.readouterr().out
    assert "sim_speed = 3.5  # from " in out
    assert "max_concurrency = 5  # from env INFERNO_BACKEND_MAX_CONCURRENCY" in out
    assert 'discovery_lb = ["10.0.0.1:6100"]' in out
    assert "drain_timeout = " in out
    assert "flag --drain-timeout" in out


def test_the_typed_settings_default_to_what_the_setting_table_says() -> None:
    # The command line's defaults (3000, 6101) and the typed view's are the same;
    # tests that want any free port say port=0 themselves.
    table = {setting.key: setting.default for setting in BACKEND_SECTION.settings}
    typed = {field.name: field.default for field in dataclasses.fields(BackendSettings)}
    assert typed == table
