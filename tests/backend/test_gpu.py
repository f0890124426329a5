"""GPU vitals through NVML.

Two kinds of test: the real nvidia-ml-py on this machine, where it is
installed but no NVIDIA driver exists (the path every CPU-only node takes),
and ``FakeNVML`` below, which stands in for the *driver* behind the
third-party ``pynvml`` module so that per-field errors, aggregation, lost
devices and shutdown can be exercised without a GPU.  Our own code is never
replaced.
"""

from __future__ import annotations

import ctypes
import json
import logging
import sys
import threading
from types import SimpleNamespace
from typing import Any

import anyio
import pytest
from inferno_backend.gpu import (
    STALE_AFTER_INTERVALS,
    GPUDeviceSample,
    GPUSampler,
    NVMLSession,
    aggregate,
    import_pynvml,
    main,
)

GiB = 1024**3
LOGGER = "inferno_backend.gpu"


def driver_present() -> bool:
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return False
    return True


no_driver = pytest.mark.skipif(driver_present(), reason="this machine has an NVIDIA driver")


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def info_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno >= logging.INFO
    ]


# --- a stand-in for the NVIDIA driver behind pynvml's API -------------------------


class FakeNVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(f"NVML error {value}")
        self.value = value


class FakeNVML:
    """Answers pynvml's calls as a driver with the given devices would.

    Each device is a dict; a key mapped to an exception class makes that query
    raise it (``FakeNVMLError`` is what the real driver does for "not supported").
    """

    NVMLError = FakeNVMLError
    NVML_TEMPERATURE_GPU = 0
    NVML_ERROR_NOT_SUPPORTED = 3
    NVML_ERROR_DRIVER_NOT_LOADED = 9
    NVML_ERROR_LIBRARY_NOT_FOUND = 12

    def __init__(self, devices: list[dict[str, Any]], init_error: int | None = None) -> None:
        self.devices = devices
        self.init_error = init_error
        self.init_calls = 0
        self.shutdown_calls = 0
        self.threads: set[int] = set()

    def _answer(self, handle: int, key: str) -> Any:
        self.threads.add(threading.get_ident())
        value = self.devices[handle][key]
        if isinstance(value, type) and issubclass(value, BaseException):
            raise value(self.NVML_ERROR_NOT_SUPPORTED)
        return value

    def nvmlInit(self) -> None:
        self.threads.add(threading.get_ident())
        self.init_calls += 1
        if self.init_error is not None:
            raise FakeNVMLError(self.init_error)

    def nvmlShutdown(self) -> None:
        self.shutdown_calls += 1

    def nvmlSystemGetDriverVersion(self) -> str:
        return "550.54.15"

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        return 12040

    def nvmlDeviceGetCount(self) -> int:
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetName(self, handle: int) -> Any:
        return self._answer(handle, "name")

    def nvmlDeviceGetUUID(self, handle: int) -> Any:
        return self._answer(handle, "uuid")

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> Any:
        return SimpleNamespace(gpu=self._answer(handle, "util_percent"), memory=0)

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:
        used, total = self._answer(handle, "memory")
        return SimpleNamespace(used=used, total=total, free=total - used)

    def nvmlDeviceGetTemperature(self, handle: int, sensor: int) -> Any:
        assert sensor == self.NVML_TEMPERATURE_GPU
        return self._answer(handle, "temperature")

    def nvmlDeviceGetPowerUsage(self, handle: int) -> Any:
        return self._answer(handle, "power_mw")

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: int) -> Any:
        return self._answer(handle, "limit_mw")

    def nvmlDeviceGetPciInfo(self, handle: int) -> Any:
        return SimpleNamespace(busId=self._answer(handle, "bus_id"))


def two_devices() -> list[dict[str, Any]]:
    """An H100 that answers everything and a card without power or temperature sensors."""
    return [
        {
            "name": "NVIDIA H100 80GB HBM3",
            "uuid": "GPU-0000",
            "util_percent": 50,
            "memory": (10 * GiB, 40 * GiB),
            "temperature": 41,
            "power_mw": 350_000,
            "limit_mw": 700_000,
            "bus_id": "00000000:18:00.0",
        },
        {
            "name": b"NVIDIA A10G",  # older nvidia-ml-py returns bytes
            "uuid": b"GPU-1111",
            "util_percent": 25,
            "memory": (30 * GiB, 80 * GiB),
            "temperature": FakeNVMLError,
            "power_mw": FakeNVMLError,
            "limit_mw": FakeNVMLError,
            "bus_id": b"00000000:3B:00.0",
        },
    ]


# --- aggregation ------------------------------------------------------------------


def test_aggregate_means_utilisation_and_sums_memory() -> None:
    devices = [
        GPUDeviceSample(0, utilization_gpu=0.5, memory_used_bytes=10, memory_total_bytes=40),
        GPUDeviceSample(1, utilization_gpu=0.25, memory_used_bytes=30, memory_total_bytes=80),
        GPUDeviceSample(2),  # a device that answered nothing does not count
    ]
    usage, memory = aggregate(devices)
    assert usage == pytest.approx(0.375)
    assert memory == pytest.approx(40 / 120)
    assert aggregate([]) == (None, None)
    assert aggregate([GPUDeviceSample(0)]) == (None, None)


# --- the real nvidia-ml-py without a driver ---------------------------------------


@no_driver
@pytest.mark.anyio
async def test_without_a_driver_gpu_fields_are_null_and_nothing_fails(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    sampler = GPUSampler(interval=0.01)
    async with anyio.create_task_group() as tg:
        await tg.start(sampler.run)
        snapshot = sampler.snapshot()
        tg.cancel_scope.cancel()
    assert snapshot.gpu_usage is None
    assert snapshot.gpu_memory_usage is None
    assert snapshot.devices == ()
    assert not snapshot.available
    assert snapshot.reason is not None
    assert "libnvidia-ml.so.1 not found" in snapshot.reason
    assert len(info_lines(caplog)) == 1


@pytest.mark.anyio
async def test_without_pynvml_it_says_so_once_and_never_retries(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` fail
    attempts: list[int] = []

    def load() -> Any:
        attempts.append(1)
        return import_pynvml()

    clock = FakeClock()
    sampler = GPUSampler(load_nvml=load, clock=clock, retry_interval=60)
    first = await sampler.refresh()
    clock.now += 3600
    second = await sampler.refresh()
    assert first.reason is not None
    assert "not importable" in first.reason
    assert second.gpu_usage is None
    assert len(attempts) == 1
    assert len(info_lines(caplog)) == 1


# --- through the stand-in driver --------------------------------------------------


@pytest.mark.anyio
async def test_failed_init_is_retried_only_after_the_retry_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    nvml = FakeNVML(two_devices(), init_error=FakeNVML.NVML_ERROR_DRIVER_NOT_LOADED)
    clock = FakeClock()
    sampler = GPUSampler(load_nvml=lambda: nvml, clock=clock, retry_interval=60)
    for now in (0, 1, 30, 59.9):
        clock.now = now
        snapshot = await sampler.refresh()
    assert nvml.init_calls == 1
    assert snapshot.reason == "the NVIDIA kernel driver is not loaded"
    clock.now = 60.5
    await sampler.refresh()
    assert nvml.init_calls == 2
    assert len(info_lines(caplog)) == 1

    nvml.init_error = None  # the driver got loaded
    clock.now = 121
    snapshot = await sampler.refresh()
    assert snapshot.available
    assert any("2 device(s)" in line for line in info_lines(caplog))
    await sampler.aclose()


@pytest.mark.anyio
async def test_snapshot_per_device_fields_and_aggregates() -> None:
    nvml = FakeNVML(two_devices())
    sampler = GPUSampler(load_nvml=lambda: nvml)
    snapshot = await sampler.refresh()
    await sampler.aclose()

    h100, a10g = snapshot.devices
    assert h100.as_dict() == {
        "index": 0,
        "name": "NVIDIA H100 80GB HBM3",
        "uuid": "GPU-0000",
        "utilization_gpu": 0.5,
        "memory_used_bytes": 10 * GiB,
        "memory_total_bytes": 40 * GiB,
        "memory_usage": 0.25,
        "temperature_c": 41.0,
        "power_w": 350.0,
        "power_limit_w": 700.0,
    }
    assert (a10g.name, a10g.uuid) == ("NVIDIA A10G", "GPU-1111")
    assert (a10g.temperature_c, a10g.power_w, a10g.power_limit_w) == (None, None, None)
    assert a10g.utilization_gpu == 0.25
    assert snapshot.gpu_usage == pytest.approx(0.375)
    assert snapshot.gpu_memory_usage == pytest.approx(40 / 120)
    assert snapshot.reason is None
    assert json.loads(json.dumps(snapshot.as_dict()))["devices"][1]["power_w"] is None


@pytest.mark.anyio
async def test_nvml_is_called_from_a_worker_thread_never_the_event_loop() -> None:
    nvml = FakeNVML(two_devices())
    sampler = GPUSampler(load_nvml=lambda: nvml)
    await sampler.refresh()
    await sampler.aclose()
    assert nvml.threads
    assert threading.get_ident() not in nvml.threads


@pytest.mark.anyio
async def test_a_stale_reading_is_withheld() -> None:
    clock = FakeClock()
    sampler = GPUSampler(load_nvml=lambda: FakeNVML(two_devices()), clock=clock, interval=2)
    await sampler.refresh()
    clock.now += STALE_AFTER_INTERVALS * 2 - 0.5
    assert sampler.snapshot().gpu_usage is not None
    clock.now += 1
    stale = sampler.snapshot()
    assert stale.gpu_usage is None
    assert stale.devices == ()
    assert stale.reason is not None
    assert "old" in stale.reason
    await sampler.aclose()


@pytest.mark.anyio
async def test_a_failing_driver_closes_nvml_and_reinitialises_later() -> None:
    devices = two_devices()
    nvml = FakeNVML(devices)
    clock = FakeClock()
    sampler = GPUSampler(load_nvml=lambda: nvml, clock=clock, retry_interval=60)
    assert (await sampler.refresh()).available
    devices[0]["name"] = RuntimeError  # not an NVMLError: the driver misbehaves
    failed = await sampler.refresh()
    assert failed.gpu_usage is None
    assert failed.reason is not None
    assert "sampling failed" in failed.reason
    assert nvml.shutdown_calls == 1
    devices[0]["name"] = "NVIDIA H100 80GB HBM3"
    clock.now = 30
    assert not (await sampler.refresh()).available
    assert nvml.init_calls == 1
    clock.now = 61
    assert (await sampler.refresh()).available
    assert nvml.init_calls == 2
    await sampler.aclose()


@pytest.mark.anyio
async def test_run_shuts_nvml_down_when_cancelled() -> None:
    nvml = FakeNVML(two_devices())
    sampler = GPUSampler(load_nvml=lambda: nvml, interval=0.01)
    async with anyio.create_task_group() as tg:
        await tg.start(sampler.run)
        assert sampler.snapshot().available
        tg.cancel_scope.cancel()
    assert nvml.shutdown_calls == 1
    await sampler.aclose()  # idempotent
    assert nvml.shutdown_calls == 1


@pytest.mark.anyio
async def test_a_machine_with_nvml_but_no_gpu() -> None:
    sampler = GPUSampler(load_nvml=lambda: FakeNVML([]))
    snapshot = await sampler.refresh()
    await sampler.aclose()
    assert snapshot.gpu_usage is None
    assert snapshot.reason == "NVML reports no GPU"


def test_inventory_reads_versions_and_static_facts() -> None:
    session = NVMLSession.open(lambda: FakeNVML(two_devices()))
    inventory = session.inventory()
    session.close()
    assert inventory.driver_version == "550.54.15"
    assert inventory.cuda_driver_version == "12.4"
    h100, a10g = inventory.devices
    assert (h100.memory_total_bytes, h100.power_limit_w) == (40 * GiB, 700.0)
    assert a10g.pci_bus_id == "00000000:3B:00.0"
    assert a10g.power_limit_w is None


def test_constructor_rejects_non_positive_intervals() -> None:
    with pytest.raises(ValueError, match="interval"):
        GPUSampler(interval=0)
    with pytest.raises(ValueError, match="interval"):
        GPUSampler(retry_interval=-1)


def test_module_main_prints_one_snapshot_as_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed) == {
        "available",
        "reason",
        "gpu_usage",
        "gpu_memory_usage",
        "age_seconds",
        "devices",
    }
    if not driver_present():
        assert printed["gpu_usage"] is None
        assert printed["available"] is False
