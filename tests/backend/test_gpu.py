"""GPU vitals through NVML, and the GPU report.

Two kinds of test: the real nvidia-ml-py on this machine, where it is
installed but no NVIDIA driver exists (the path every CPU-only node takes),
and ``FakeNVML`` below, which stands in for the *driver* behind the
third-party ``pynvml`` module so that per-field errors, aggregation, lost
devices and shutdown can be exercised without a GPU; ``FakeTorch`` likewise
stands in for PyTorch on a CUDA machine.  Our own code is never replaced.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
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
from inferno_backend.gpureport import gpu_report
from inferno_backend.gpureport import main as gpureport_main

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


# --- the GPU report ---------------------------------------------------------------


class FakeCUDAEvent:
    def __init__(self, torch: FakeTorch) -> None:
        self.torch = torch
        self.at = 0

    def record(self) -> None:
        self.at = self.torch.products

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end: FakeCUDAEvent) -> float:
        return (end.at - self.at) * FakeTorch.MS_PER_PRODUCT


class FakeTorch:
    """Stands in for PyTorch on a CUDA machine: each matmul "takes" 0.2 ms of GPU time.

    ``fail_dtype`` makes allocations of that dtype fail as CUDA would when out of memory.
    """

    MS_PER_PRODUCT = 0.2
    __version__ = "2.5.0+stand-in"
    bfloat16 = "bfloat16"
    float16 = "float16"

    def __init__(self, uuids: list[str], fail_dtype: str | None = None) -> None:
        self.uuids = uuids
        self.fail_dtype = fail_dtype
        self.products = 0
        self.version = SimpleNamespace(cuda="12.4")
        self.cuda = SimpleNamespace(
            is_available=lambda: True,
            device_count=lambda: len(uuids),
            get_device_properties=lambda i: SimpleNamespace(name=f"Card {i}", uuid=uuids[i]),
            device=lambda device: contextlib.nullcontext(),
            Event=lambda enable_timing: FakeCUDAEvent(self),
            empty_cache=lambda: None,
        )

    def device(self, kind: str, index: int) -> tuple[str, int]:
        return kind, index

    def randn(self, *shape: int, device: Any, dtype: str) -> object:
        if dtype == self.fail_dtype:
            raise RuntimeError("CUDA error: out of memory")
        return object()

    def empty_like(self, tensor: object) -> object:
        return object()

    def matmul(self, a: object, b: object, out: object) -> None:
        self.products += 1


def no_torch() -> Any:
    raise ImportError("No module named 'torch'")


async def report(**kwargs: Any) -> tuple[int, str]:
    out = io.StringIO()
    status = await gpu_report(0.01, out, samples=2, **kwargs)
    return status, out.getvalue()


@no_driver
@pytest.mark.anyio
async def test_report_without_a_driver_says_so_and_succeeds() -> None:
    status, text = await report()
    assert status == 0
    assert "No NVIDIA GPU/driver found: libnvidia-ml.so.1 not found" in text


@pytest.mark.anyio
async def test_report_without_pynvml_says_so_and_succeeds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)
    status, text = await report()
    assert status == 0
    assert "No NVIDIA GPU/driver found: nvidia-ml-py (pynvml) is not importable" in text


@pytest.mark.anyio
async def test_report_prints_inventory_and_samples() -> None:
    nvml = FakeNVML(two_devices())
    status, text = await report(load_nvml=lambda: nvml, load_torch=no_torch)
    assert status == 0
    lines = text.splitlines()
    assert "driver 550.54.15, CUDA driver 12.4, 2 device(s)" in lines
    assert "GPU 1: NVIDIA A10G" in lines
    assert "  memory       80.0 GiB" in lines
    assert "  power limit  700 W" in lines
    assert "  power limit  n/a" in lines
    assert "  pci bus id   00000000:3B:00.0" in lines
    rows = [line for line in lines if "GiB (" in line]
    assert len(rows) == 4  # 2 samples x 2 devices
    assert " 50%  10.0/40.0 GiB (25%)" in rows[0]
    assert rows[0].endswith("41 C  350/700 W")
    assert rows[1].endswith("n/a  n/a/n/a")
    assert lines[-1].startswith("PyTorch not importable")
    assert nvml.shutdown_calls == 1


@pytest.mark.anyio
async def test_report_measures_matmul_throughput_per_device() -> None:
    torch = FakeTorch(["0000", "1111"])
    status, text = await report(load_nvml=lambda: FakeNVML(two_devices()), load_torch=lambda: torch)
    assert status == 0
    assert "Matmul throughput, 4096x4096x4096 (PyTorch 2.5.0+stand-in, CUDA 12.4):" in text
    tflops = 2 * 4096**3 / (FakeTorch.MS_PER_PRODUCT / 1000) / 1e12
    for line in ("cuda:0 Card 0 bf16", "cuda:0 Card 0 fp16", "cuda:1 Card 1 bf16"):
        assert f"  {line}: {tflops:.1f} TFLOP/s" in text


@pytest.mark.anyio
async def test_report_fails_when_a_measurement_fails() -> None:
    torch = FakeTorch(["0000"], fail_dtype="float16")
    status, text = await report(load_nvml=lambda: FakeNVML(two_devices()), load_torch=lambda: torch)
    assert status == 1
    assert "cuda:0 Card 0 fp16: FAILED: RuntimeError('CUDA error: out of memory')" in text
    assert "cuda:0 Card 0 bf16: " in text


@pytest.mark.anyio
async def test_report_with_nvml_but_no_gpu() -> None:
    status, text = await report(load_nvml=lambda: FakeNVML([]))
    assert status == 0
    assert text.splitlines()[-1] == "NVML reports no GPU."


def test_report_main(capsys: pytest.CaptureFixture[str]) -> None:
    assert gpureport_main(["--window", "0.01", "--samples", "1", "--no-matmul"]) == 0
    assert capsys.readouterr().out.startswith("Inferno GPU report\n")
    with pytest.raises(SystemExit) as exited:
        gpureport_main(["--window", "soon"])
    assert exited.value.code == 2
    assert "--window: not a number: 'soon'" in capsys.readouterr().err
