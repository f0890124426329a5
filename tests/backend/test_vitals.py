"""The ops port: NodeVitals JSON, Prometheus by Accept, /telemetry, /health, GPU fields."""

from __future__ import annotations

import ctypes
import functools
import json
import logging
import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import SimpleNamespace
from typing import Any

import anyio
import openai
import pytest
from inferno_backend.engines.base import EngineStats
from inferno_backend.engines.sim import SimEngine, SimFaults
from inferno_backend.gpu import GPUDeviceSample, GPUSampler, GPUSnapshot
from inferno_backend.profiles import load_profile
from inferno_backend.role import BackendInfo, serve_backend
from inferno_backend.settings import BackendSettings
from inferno_backend.system import SystemSample
from inferno_backend.vitals import node_vitals
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam

from inferno import __version__
from inferno.http.client import HTTPClient
from inferno.metrics import Registry, parse_prometheus
from inferno.protocol import NodeVitals

pytestmark = pytest.mark.anyio

WAIT = 10.0
MODEL = "sim-tiny"
HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "How are you?"}]
GiB = 1024**3
#: This module's import: the test process had started by then.
IMPORTED = time.monotonic()


def driver_present() -> bool:
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return False
    return True


def no_nvml() -> Any:
    raise ImportError("no nvidia-ml-py in this test")


class OneGPU:
    """Stands in for the NVIDIA driver behind ``pynvml``: one device, fixed readings."""

    class NVMLError(Exception):
        pass

    NVML_TEMPERATURE_GPU = 0

    def nvmlInit(self) -> None:
        pass

    def nvmlShutdown(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        return 1

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetName(self, handle: int) -> str:
        return "NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> Any:
        return SimpleNamespace(gpu=75, memory=0)

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:
        return SimpleNamespace(used=20 * GiB, total=80 * GiB, free=60 * GiB)

    def nvmlDeviceGetTemperature(self, handle: int, sensor: int) -> int:
        return 55

    def nvmlDeviceGetPowerUsage(self, handle: int) -> int:
        return 400_000  # milliwatts


@asynccontextmanager
async def backend(
    engine: SimEngine | None = None, gpu: GPUSampler | None = None, **options: Any
) -> AsyncIterator[BackendInfo]:
    if engine is None:
        engine = SimEngine(load_profile("cpu-tiny"), speed=50.0)
    async with anyio.create_task_group() as tg:
        start = functools.partial(
            serve_backend,
            BackendSettings(port=0, ops_port=0, **options),
            engine,
            registry=Registry(),
            stopping=anyio.Event(),
            gpu=gpu or GPUSampler(load_nvml=no_nvml),
        )
        info = await tg.start(start)
        try:
            yield info
        finally:
            tg.cancel_scope.cancel()


async def get(http: HTTPClient, url: str, accept: str | None = None) -> tuple[int, str, bytes]:
    headers = [("accept", accept)] if accept else None
    response = await http.request("GET", url, headers=headers)
    return response.status, response.headers.get("content-type", ""), await response.read()


def client(info: BackendInfo) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=f"{info.service.url}/v1", api_key="x", max_retries=0)


# -- the document, pure ------------------------------------------------------------------------


def test_node_vitals_clamps_and_fills_unknowns() -> None:
    vitals = node_vitals(
        ready=True,
        running=3,
        queued=2,
        engine=EngineStats(running=3, waiting=4, kv_cache_usage=1.02, tokens_per_second=math.nan),
        system=SystemSample(cpu_usage=None, memory_usage=-0.01),
        gpu=GPUSnapshot(),
        failed_responses=1,
        backoff_requests=5,
        connected_peers=2,
        uptime_seconds=12.5,
        models=["a", "b", "a"],
        version="9.9",
    )
    assert vitals.requests_in_progress == 3
    assert vitals.requests_queued == 6  # ours and the engine's own queue
    assert (vitals.cpu_usage, vitals.memory_usage) == (0.0, 0.0)
    assert vitals.kv_cache_usage == 1.0
    assert vitals.tokens_per_second == 0.0
    assert (vitals.gpu_usage, vitals.gpu_memory_usage) == (None, None)
    assert vitals.models == ("a", "b")
    assert NodeVitals.from_json(vitals.to_json()) == vitals


# -- over the ops port -------------------------------------------------------------------------


async def test_metrics_json_is_valid_node_vitals() -> None:
    async with backend() as info, HTTPClient() as http:
        status, content_type, body = await get(http, f"{info.ops.url}/metrics")
        assert status == 200
        assert content_type.startswith("application/json")
        vitals = NodeVitals.from_json(json.loads(body))
        assert vitals.ready is True
        assert vitals.models == (MODEL,)
        assert vitals.version == __version__
        assert (vitals.gpu_usage, vitals.gpu_memory_usage) == (None, None)
        assert 0.0 <= vitals.cpu_usage <= 1.0
        assert 0.0 < vitals.memory_usage <= 1.0  # this test machine has /proc
        assert vitals.kv_cache_usage == 0.0
        assert (vitals.requests_in_progress, vitals.requests_queued) == (0, 0)
        assert vitals.connected_peers == 0
        assert vitals.uptime_seconds >= 0.0
        health = await get(http, f"{info.ops.url}/health")
        assert health[0] == 200
        assert (await get(http, f"{info.ops.url}/nope"))[0] == 404


async def test_uptime_counts_from_the_process_start() -> None:
    async with backend() as info, HTTPClient() as http:
        before = time.monotonic()
        status, _, body = await get(http, f"{info.ops.url}/metrics")
    assert status == 200
    # The process started before this module was imported, which was before the
    # backend set its vitals up: uptime covers at least that much.
    assert json.loads(body)["uptime_seconds"] >= before - IMPORTED


async def test_prometheus_by_accept_and_telemetry() -> None:
    async with backend() as info, HTTPClient() as http, client(info) as openai_client:
        for _ in range(2):
            await openai_client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4)
        with pytest.raises(openai.NotFoundError):
            await openai_client.chat.completions.create(model="other", messages=HELLO)
        status, content_type, body = await get(
            http, f"{info.ops.url}/metrics", accept="text/plain;version=0.0.4"
        )
        assert status == 200
        assert content_type.startswith("text/plain; version=0.0.4")
        samples = parse_prometheus(body.decode(), strict=True)
        by_name = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in samples}
        assert by_name[("inferno_backend_ready", ())] == 1.0
        assert by_name[("inferno_backend_requests_in_progress", ())] == 0.0
        chat = "/v1/chat/completions"
        assert (
            by_name[("inferno_backend_requests_total", (("route", chat), ("status", "200")))] == 2
        )
        assert (
            by_name[("inferno_backend_requests_total", (("route", chat), ("status", "404")))] == 1
        )
        ttft = by_name[("inferno_backend_time_to_first_token_seconds_count", (("route", chat),))]
        assert ttft == 2
        assert by_name[("inferno_backend_completion_tokens_total", ())] == 8
        assert math.isnan(by_name[("inferno_backend_gpu_usage_ratio", ())])
        telemetry = await get(http, f"{info.ops.url}/telemetry")
        assert telemetry[0] == 200
        assert parse_prometheus(telemetry[2].decode(), strict=True)


async def test_failures_are_counted() -> None:
    engine = SimEngine(
        load_profile("cpu-tiny"), speed=50.0, faults=SimFaults(failure_rate=1.0, failure_status=500)
    )
    async with backend(engine) as info, HTTPClient() as http, client(info) as openai_client:
        with pytest.raises(openai.InternalServerError):
            await openai_client.chat.completions.create(model=MODEL, messages=HELLO)
        with pytest.raises(openai.InternalServerError):
            await openai_client.completions.create(model=MODEL, prompt="x", stream=True)
        _, _, body = await get(http, f"{info.ops.url}/metrics")
        vitals = NodeVitals.from_json(json.loads(body))
        assert vitals.failed_responses == 2
        assert vitals.backoff_requests == 0


async def test_gpu_fields_and_per_device_series_with_a_gpu() -> None:
    gpu = GPUSampler(load_nvml=OneGPU)
    async with backend(gpu=gpu) as info, HTTPClient() as http:
        with anyio.fail_after(WAIT):
            while not gpu.snapshot().available:  # the sampler starts in the background
                await gpu.refresh()
        _, _, body = await get(http, f"{info.ops.url}/metrics")
        vitals = NodeVitals.from_json(json.loads(body))
        assert vitals.gpu_usage == pytest.approx(0.75)
        assert vitals.gpu_memory_usage == pytest.approx(0.25)
        _, _, text = await get(http, f"{info.ops.url}/telemetry")
        samples = {s.name: s for s in parse_prometheus(text.decode(), strict=True)}
        assert samples["inferno_gpu_temperature_celsius"].value == 55
        assert samples["inferno_gpu_power_watts"].value == 400
        assert samples["inferno_gpu_utilization_ratio"].labels == {
            "gpu": "0",
            "name": "NVIDIA H100 80GB HBM3",
        }


@pytest.mark.skipif(driver_present(), reason="this machine has an NVIDIA driver")
async def test_real_nvml_without_a_driver_leaves_gpu_fields_null(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    async with backend(gpu=GPUSampler()) as info, HTTPClient() as http:
        _, _, body = await get(http, f"{info.ops.url}/metrics")
        vitals = NodeVitals.from_json(json.loads(body))
        assert (vitals.gpu_usage, vitals.gpu_memory_usage) == (None, None)
        _, _, text = await get(http, f"{info.ops.url}/telemetry")
        assert "inferno_gpu_power_watts{" not in text.decode()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_gpu_snapshot_sample_type_is_what_vitals_reads() -> None:
    # The per-device gauges read these fields by name: keep them in step with gpu.py.
    fields = set(GPUDeviceSample.__dataclass_fields__)
    assert {"utilization_gpu", "memory_used_bytes", "memory_total_bytes"} <= fields
    assert {"temperature_c", "power_w", "index", "name"} <= fields
