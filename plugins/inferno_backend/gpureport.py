"""``inferno backend --gpu-report`` / ``inferno doctor``: this machine's GPUs and how they behave.

Prints, for hardware sampling and support requests:

1. the inventory NVML reports: driver and CUDA driver versions, and per device
   its name, UUID, memory, enforced power limit and PCI bus id;
2. NVML samples over a window (utilisation, memory, temperature, power);
3. when PyTorch is importable (it is not a dependency: imported lazily), a
   short matmul throughput measurement per device in bf16 and fp16, timed
   with CUDA events, with the peak NVML readings seen while it ran.

A machine without a GPU, driver or nvidia-ml-py gets one clear line saying
so and exit status 0: ``doctor`` on a CPU node is not a failure.  Status 1
means a GPU was found but the measurement failed (a CUDA error is worth a
look).  Run directly with ``python -m inferno_backend.gpureport``.
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

import anyio

from inferno_backend.gpu import (
    GPUDeviceSample,
    GPUInventory,
    GPUUnavailable,
    NVMLSession,
    import_pynvml,
)

__all__ = ["format_inventory", "format_sample", "gpu_report", "import_torch", "main"]

GiB = 1024**3
#: Matrix side for the throughput test: 4096³ is large enough to reach the
#: tensor cores' steady state on every current datacentre GPU, small enough
#: (32 MiB per bf16 operand) to fit next to a running model.
MATMUL_SIZE = 4096
#: Seconds of matmuls per device and dtype: long enough for clocks and power to settle.
MATMUL_SECONDS = 1.0
#: Seconds between NVML readings while the matmuls run (for the peaks).
LOAD_SAMPLE_INTERVAL = 0.2


def import_torch() -> Any:
    """Import PyTorch on demand; it is optional and heavy."""
    return importlib.import_module("torch")


def _na(value: float | None, fmt: str, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:{fmt}}{unit}"


def _percent(fraction: float | None) -> float | None:
    return None if fraction is None else fraction * 100


def format_inventory(inventory: GPUInventory) -> list[str]:
    """The inventory as printed lines."""
    lines = [
        f"driver {inventory.driver_version or 'n/a'}, "
        f"CUDA driver {inventory.cuda_driver_version or 'n/a'}, "
        f"{len(inventory.devices)} device(s)"
    ]
    for device in inventory.devices:
        memory = None if device.memory_total_bytes is None else device.memory_total_bytes / GiB
        lines += [
            f"GPU {device.index}: {device.name or 'n/a'}",
            f"  uuid         {device.uuid or 'n/a'}",
            f"  memory       {_na(memory, '.1f', ' GiB')}",
            f"  power limit  {_na(device.power_limit_w, '.0f', ' W')}",
            f"  pci bus id   {device.pci_bus_id or 'n/a'}",
        ]
    return lines


SAMPLE_HEADER = f"  t(s)  gpu  util  {'memory used/total':<26}  {'temp':>5}  power/limit"


def format_sample(seconds: float, device: GPUDeviceSample) -> str:
    """One device reading as a table row under :data:`SAMPLE_HEADER`."""
    util = _percent(device.utilization_gpu)
    if device.memory_used_bytes is None or device.memory_total_bytes is None:
        memory = "n/a"
    else:
        memory = (
            f"{device.memory_used_bytes / GiB:.1f}/{device.memory_total_bytes / GiB:.1f} GiB"
            f" ({_na(_percent(device.memory_usage), '.0f', '%')})"
        )
    power = f"{_na(device.power_w, '.0f')}/{_na(device.power_limit_w, '.0f', ' W')}"
    return (
        f"{seconds:6.1f}  {device.index:>3}  {_na(util, '3.0f', '%'):>4}  {memory:<26}"
        f"  {_na(device.temperature_c, '.0f', ' C'):>5}  {power}"
    )


def _run_matmuls(torch: Any, index: int, dtype: Any, size: int) -> tuple[int, float]:
    """``(products, seconds)`` of ``size``³ matmuls on CUDA device ``index``.

    A short calibration picks how many products fill :data:`MATMUL_SECONDS`;
    CUDA events time the GPU work itself, not Python's launch loop.
    """
    device = torch.device("cuda", index)
    with torch.cuda.device(device):
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        c = torch.empty_like(a)

        def timed(iterations: int) -> float:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iterations):
                torch.matmul(a, b, out=c)
            end.record()
            end.synchronize()
            return float(start.elapsed_time(end)) / 1000.0  # ms -> s

        timed(3)  # warm-up: cuBLAS picks its kernels here
        calibration = 10
        per_product = timed(calibration) / calibration
        iterations = max(calibration, math.ceil(MATMUL_SECONDS / max(per_product, 1e-6)))
        return iterations, timed(iterations)


def _time_matmul(torch: Any, index: int, dtype: Any, size: int) -> float:
    """TFLOP/s of ``size``³ matmuls on CUDA device ``index`` (blocks; run it in a thread)."""
    try:
        iterations, seconds = _run_matmuls(torch, index, dtype, size)
    finally:
        torch.cuda.empty_cache()  # the operands are gone; give their memory back to the driver
    return 2 * size**3 * iterations / seconds / 1e12


async def _matmul_section(
    session: NVMLSession,
    uuids: list[str | None],
    write: Callable[[str], None],
    size: int,
    torch: Any,
) -> int:
    """Measure every CUDA device PyTorch sees; returns 1 if any measurement failed."""
    versions = f"PyTorch {torch.__version__}, CUDA {torch.version.cuda}"
    write(f"Matmul throughput, {size}x{size}x{size} ({versions}):")
    if not torch.cuda.is_available():
        write("  PyTorch sees no CUDA device; skipped")
        return 0
    status = 0
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        # CUDA may number devices differently from NVML; the UUID ties them together.
        cuda_uuid = str(getattr(props, "uuid", "") or "")
        nvml_index = next(
            (i for i, u in enumerate(uuids) if u and cuda_uuid and cuda_uuid in u), None
        )
        dtypes = [("bf16", torch.bfloat16), ("fp16", torch.float16)]
        for label, dtype in dtypes:
            peaks: list[GPUDeviceSample] = []
            failure: Exception | None = None
            tflops = 0.0
            async with anyio.create_task_group() as tg:
                if nvml_index is not None:
                    tg.start_soon(_watch, session, nvml_index, peaks)
                try:
                    tflops = await anyio.to_thread.run_sync(_time_matmul, torch, index, dtype, size)
                except Exception as exc:  # a CUDA error is a finding, not a crash of doctor
                    failure = exc
                tg.cancel_scope.cancel()
            if failure is not None:
                write(f"  cuda:{index} {props.name} {label}: FAILED: {failure!r}")
                status = 1
            else:
                write(f"  cuda:{index} {props.name} {label}: {tflops:.1f} TFLOP/s{_peaks(peaks)}")
    return status


async def _watch(session: NVMLSession, index: int, into: list[GPUDeviceSample]) -> None:
    """Collect readings of one device until cancelled."""
    while True:
        try:
            devices = await anyio.to_thread.run_sync(session.sample)
        except GPUUnavailable:
            return  # the peaks are a nicety; the throughput figure still stands
        into.append(devices[index])
        await anyio.sleep(LOAD_SAMPLE_INTERVAL)


def _peaks(samples: list[GPUDeviceSample]) -> str:
    def peak(values: list[float | None]) -> float | None:
        known = [v for v in values if v is not None]
        return max(known) if known else None

    if not samples:
        return ""
    util = peak([s.utilization_gpu for s in samples])
    return (
        f" (peak util {_na(_percent(util), '.0f', '%')}, "
        f"power {_na(peak([s.power_w for s in samples]), '.0f', ' W')}, "
        f"temp {_na(peak([s.temperature_c for s in samples]), '.0f', ' C')})"
    )


async def gpu_report(
    window: float = 5.0,
    out: TextIO | None = None,
    *,
    samples: int = 5,
    matmul: bool = True,
    matmul_size: int = MATMUL_SIZE,
    load_nvml: Callable[[], Any] = import_pynvml,
    load_torch: Callable[[], Any] = import_torch,
) -> int:
    """Print the report to ``out`` (``sys.stdout`` when ``None``); return the exit status.

    :param window: seconds over which ``samples`` NVML readings are taken.
    :param matmul: run the PyTorch throughput test when PyTorch is importable.
    :returns: 0, also when there is no GPU; 1 when a throughput measurement failed.
    """
    stream = out if out is not None else sys.stdout

    def write(line: str) -> None:
        stream.write(line + "\n")
        stream.flush()  # lines appear while the window runs

    write("Inferno GPU report")
    try:
        session = await anyio.to_thread.run_sync(NVMLSession.open, load_nvml)
    except GPUUnavailable as exc:
        write(f"No NVIDIA GPU/driver found: {exc.reason}.")
        return 0
    try:
        inventory = await anyio.to_thread.run_sync(session.inventory)
        for line in format_inventory(inventory):
            write(line)
        if not inventory.devices:
            write("NVML reports no GPU.")
            return 0

        write(f"NVML samples over {window:g} s:")
        write(SAMPLE_HEADER)
        start = time.monotonic()
        for k in range(samples):
            await anyio.sleep(max(0.0, start + k * window / samples - time.monotonic()))
            elapsed = time.monotonic() - start
            for device in await anyio.to_thread.run_sync(session.sample):
                write(format_sample(elapsed, device))

        if not matmul:
            return 0
        try:
            torch = load_torch()
        except ImportError as exc:
            write(f"PyTorch not importable ({exc}); matmul throughput skipped.")
            return 0
        uuids = [d.uuid for d in inventory.devices]
        return await _matmul_section(session, uuids, write, matmul_size, torch)
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(session.close)


def _positive(kind: Callable[[str], float]) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
        return value

    return parse


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m inferno_backend.gpureport [--window S] [--samples N] [--no-matmul]``."""
    parser = argparse.ArgumentParser(
        prog="python -m inferno_backend.gpureport",
        description="Print the NVIDIA GPU inventory, NVML samples and matmul throughput.",
    )
    parser.add_argument("--window", type=_positive(float), default=5.0, help="seconds (5)")
    parser.add_argument("--samples", type=_positive(int), default=5, help="readings (5)")
    parser.add_argument("--no-matmul", action="store_true", help="skip the PyTorch test")
    parser.add_argument(
        "--matmul-size", type=_positive(int), default=MATMUL_SIZE, help=f"({MATMUL_SIZE})"
    )
    args = parser.parse_args(argv)
    return anyio.run(
        lambda: gpu_report(
            args.window,
            samples=int(args.samples),
            matmul=not args.no_matmul,
            matmul_size=int(args.matmul_size),
        )
    )


if __name__ == "__main__":
    sys.exit(main())
