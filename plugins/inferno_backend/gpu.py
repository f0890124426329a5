"""GPU vitals through NVML (the ``pynvml`` module of nvidia-ml-py), sampled off the request path.

:class:`GPUSampler` keeps the latest reading in memory; a vitals request reads
it with :meth:`GPUSampler.snapshot` and never calls into the driver.  Every
NVML call runs in a worker thread (``anyio.to_thread``), because a busy or
wedged driver can take a long time to answer and the event loop must not wait
for it.

A machine without a GPU is normal, not an error: when ``pynvml`` cannot be
imported, ``libnvidia-ml.so.1`` is missing, or ``nvmlInit`` fails, the GPU
fields are ``None``, one info-level line says why, and initialisation is
retried only every :data:`NVML_RETRY_INTERVAL` seconds (never when the module
itself is missing: that does not change while the process runs).  A single
query a device does not support (power on many consumer cards, temperature on
some virtual GPUs) makes only that field ``None``.

``nvidia-ml-py`` ships no type information; :class:`NVMLSession` is the typed
wrapper, and the module object stays ``Any`` inside it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import anyio
from anyio.abc import TaskStatus

__all__ = [
    "DEFAULT_INTERVAL",
    "NVML_RETRY_INTERVAL",
    "GPUDeviceInfo",
    "GPUDeviceSample",
    "GPUInventory",
    "GPUSampler",
    "GPUSnapshot",
    "GPUUnavailable",
    "NVMLSession",
    "aggregate",
    "import_pynvml",
    "main",
]

logger = logging.getLogger("inferno_backend.gpu")  # not __main__ under -m

#: Seconds between two samples.  NVML's own utilisation counter averages over
#: up to one second, so sampling faster than that adds cost and no information.
DEFAULT_INTERVAL = 2.0
#: Seconds between two ``nvmlInit`` attempts after a failure: a driver rarely
#: appears while a process runs, and each failed attempt loads a shared library.
NVML_RETRY_INTERVAL = 60.0
#: A reading older than this many intervals is withheld: a wedged driver must
#: not make a node report the load it had minutes ago.
STALE_AFTER_INTERVALS = 5
#: Seconds ``close`` waits for an abandoned NVML call to return before skipping
#: ``nvmlShutdown`` (the process is usually exiting; the driver cleans up then).
SHUTDOWN_WAIT = 2.0

_MILLI = 1000.0  # NVML reports power in milliwatts


class GPUUnavailable(Exception):
    """Raised when NVML cannot be used at all (no module, no driver, init or device query failed).

    ``reason`` is one line for an operator.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def import_pynvml() -> Any:
    """Import nvidia-ml-py's ``pynvml`` on first use, so importing this module costs nothing."""
    return importlib.import_module("pynvml")


@dataclass(frozen=True, slots=True)
class GPUDeviceInfo:
    """What does not change while a device runs; printed by the GPU report."""

    index: int
    name: str | None
    uuid: str | None
    memory_total_bytes: int | None
    power_limit_w: float | None
    pci_bus_id: str | None


@dataclass(frozen=True, slots=True)
class GPUInventory:
    """The driver and its devices."""

    driver_version: str | None
    cuda_driver_version: str | None  # e.g. "12.4": the newest CUDA the driver supports
    devices: tuple[GPUDeviceInfo, ...]


@dataclass(frozen=True, slots=True)
class GPUDeviceSample:
    """One reading of one device; a field NVML would not give is ``None``.

    ``utilization_gpu`` is the fraction of the driver's last sampling period
    (1/6 s to 1 s) in which a kernel ran, 0..1.
    """

    index: int
    name: str | None = None
    uuid: str | None = None
    utilization_gpu: float | None = None
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    memory_usage: float | None = None
    temperature_c: float | None = None
    power_w: float | None = None
    power_limit_w: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready mapping."""
        return asdict(self)


def aggregate(devices: Sequence[GPUDeviceSample]) -> tuple[float | None, float | None]:
    """``(gpu_usage, gpu_memory_usage)`` for ``NodeVitals``.

    ``gpu_usage`` is the mean utilisation over the devices that report one;
    ``gpu_memory_usage`` is used over total summed across devices (so a small
    card does not weigh as much as a large one).  ``None`` when nothing is known.
    """
    utils = [d.utilization_gpu for d in devices if d.utilization_gpu is not None]
    sized = [
        (d.memory_used_bytes, d.memory_total_bytes)
        for d in devices
        if d.memory_used_bytes is not None and d.memory_total_bytes
    ]
    usage = sum(utils) / len(utils) if utils else None
    total = sum(t for _, t in sized)
    memory = sum(u for u, _ in sized) / total if total else None
    return usage, memory


@dataclass(frozen=True, slots=True)
class GPUSnapshot:
    """What :meth:`GPUSampler.snapshot` returns: per-device readings and the NodeVitals fields.

    ``reason`` says why there are no numbers (no driver, stale reading, ...).
    """

    devices: tuple[GPUDeviceSample, ...] = ()
    gpu_usage: float | None = None
    gpu_memory_usage: float | None = None
    reason: str | None = "not sampled yet"
    age_seconds: float | None = None

    @property
    def available(self) -> bool:
        """Whether at least one device was read."""
        return bool(self.devices)

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready mapping, devices as a list of mappings."""
        return {
            "available": self.available,
            "reason": self.reason,
            "gpu_usage": self.gpu_usage,
            "gpu_memory_usage": self.gpu_memory_usage,
            "age_seconds": self.age_seconds,
            "devices": [d.as_dict() for d in self.devices],
        }


def _text(value: Any) -> str:
    """Older nvidia-ml-py returns ``bytes`` where newer returns ``str``."""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


@dataclass(slots=True)
class NVMLSession:
    """An initialised NVML and its device handles.  Every method blocks in the driver:
    call them from a worker thread.  A lock serialises them, so :meth:`close`
    cannot shut NVML down under a call still running in an abandoned thread.
    """

    nvml: Any
    handles: list[Any]
    lock: threading.Lock = field(default_factory=threading.Lock)
    closed: bool = False

    @classmethod
    def open(cls, load: Callable[[], Any] = import_pynvml) -> NVMLSession:
        """Import ``pynvml``, ``nvmlInit`` and get every device handle.

        :raises GPUUnavailable: with a one-line reason when any step fails.
        """
        try:
            nvml = load()
        except ImportError as exc:
            raise GPUUnavailable(f"nvidia-ml-py (pynvml) is not importable: {exc}") from exc
        # Broad catches: whatever a driver or an odd pynvml does, vitals must not stop a node.
        try:
            nvml.nvmlInit()
        except Exception as exc:
            raise GPUUnavailable(_describe_init_error(nvml, exc)) from exc
        session = cls(nvml=nvml, handles=[])
        try:
            count = nvml.nvmlDeviceGetCount()
            session.handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        except Exception as exc:
            session.close()
            raise GPUUnavailable(f"NVML could not list devices: {exc}") from exc
        return session

    def _get(self, call: str, *args: Any) -> Any:
        """One NVML query; ``None`` when the device or the installed pynvml cannot answer it."""
        try:
            return getattr(self.nvml, call)(*args)
        except (self.nvml.NVMLError, AttributeError):
            return None

    def inventory(self) -> GPUInventory:
        """Driver versions and the static facts of every device."""
        with self.lock:
            cuda = self._get("nvmlSystemGetCudaDriverVersion")
            devices = []
            for index, handle in enumerate(self.handles):
                memory = self._get("nvmlDeviceGetMemoryInfo", handle)
                pci = self._get("nvmlDeviceGetPciInfo", handle)
                limit_mw = self._get("nvmlDeviceGetEnforcedPowerLimit", handle)
                devices.append(
                    GPUDeviceInfo(
                        index=index,
                        name=self._text("nvmlDeviceGetName", handle),
                        uuid=self._text("nvmlDeviceGetUUID", handle),
                        memory_total_bytes=int(memory.total) if memory is not None else None,
                        power_limit_w=limit_mw / _MILLI if limit_mw is not None else None,
                        pci_bus_id=_text(pci.busId) if pci is not None else None,
                    )
                )
            return GPUInventory(
                driver_version=self._text("nvmlSystemGetDriverVersion"),
                cuda_driver_version=f"{cuda // 1000}.{cuda % 1000 // 10}" if cuda else None,
                devices=tuple(devices),
            )

    def _text(self, call: str, *args: Any) -> str | None:
        value = self._get(call, *args)
        return _text(value) if value is not None else None

    def sample(self) -> tuple[GPUDeviceSample, ...]:
        """Read every device now."""
        with self.lock:
            if self.closed:
                raise GPUUnavailable("NVML session is closed")
            try:
                return tuple(self._sample_device(i, h) for i, h in enumerate(self.handles))
            except Exception as exc:  # beyond the per-field errors _get absorbs
                raise GPUUnavailable(f"NVML sampling failed: {exc!r}") from exc

    def _sample_device(self, index: int, handle: Any) -> GPUDeviceSample:
        nvml = self.nvml
        util = self._get("nvmlDeviceGetUtilizationRates", handle)
        memory = self._get("nvmlDeviceGetMemoryInfo", handle)
        temperature = self._get("nvmlDeviceGetTemperature", handle, nvml.NVML_TEMPERATURE_GPU)
        power_mw = self._get("nvmlDeviceGetPowerUsage", handle)
        limit_mw = self._get("nvmlDeviceGetEnforcedPowerLimit", handle)
        used = int(memory.used) if memory is not None else None
        total = int(memory.total) if memory is not None else None
        return GPUDeviceSample(
            index=index,
            name=self._text("nvmlDeviceGetName", handle),
            uuid=self._text("nvmlDeviceGetUUID", handle),
            utilization_gpu=util.gpu / 100.0 if util is not None else None,
            memory_used_bytes=used,
            memory_total_bytes=total,
            memory_usage=used / total if used is not None and total else None,
            temperature_c=float(temperature) if temperature is not None else None,
            power_w=power_mw / _MILLI if power_mw is not None else None,
            power_limit_w=limit_mw / _MILLI if limit_mw is not None else None,
        )

    def close(self, wait: float = SHUTDOWN_WAIT) -> None:
        """``nvmlShutdown``, once; skipped if a running call holds the lock past ``wait`` s."""
        if not self.lock.acquire(timeout=wait):
            logger.debug("NVML call still running after %.1f s; skipping nvmlShutdown", wait)
            return
        try:
            if not self.closed:
                self.closed = True
                self.nvml.nvmlShutdown()
        except Exception as exc:
            logger.debug("nvmlShutdown failed: %s", exc)
        finally:
            self.lock.release()


def _describe_init_error(nvml: Any, exc: Exception) -> str:
    """Turn the usual ``nvmlInit`` failures into a sentence an operator can act on."""
    code = getattr(exc, "value", None)
    if code is not None and code == getattr(nvml, "NVML_ERROR_LIBRARY_NOT_FOUND", None):
        return "libnvidia-ml.so.1 not found: no NVIDIA driver installed"
    if code is not None and code == getattr(nvml, "NVML_ERROR_DRIVER_NOT_LOADED", None):
        return "the NVIDIA kernel driver is not loaded"
    return f"nvmlInit failed: {exc}"


class GPUSampler:
    """Samples every GPU every ``interval`` seconds in the background; see the module docstring.

    :param load_nvml: returns the ``pynvml`` module (a stand-in in tests).
    :param clock: monotonic seconds, for retry timing and the age of a reading.
    """

    def __init__(
        self,
        *,
        interval: float = DEFAULT_INTERVAL,
        retry_interval: float = NVML_RETRY_INTERVAL,
        load_nvml: Callable[[], Any] = import_pynvml,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval <= 0 or retry_interval <= 0:
            raise ValueError("interval and retry_interval must be positive")
        self.interval = interval
        self.retry_interval = retry_interval
        self._load = load_nvml
        self._clock = clock
        self._session: NVMLSession | None = None
        self._next_init = -math.inf
        self._reported: str | None = None  # the reason already logged at info level
        self._devices: tuple[GPUDeviceSample, ...] = ()
        self._sampled_at: float | None = None
        self._reason: str | None = "not sampled yet"
        # One NVML call at a time, on a thread of its own rather than the shared pool.
        self._limiter = anyio.CapacityLimiter(1)

    async def _in_thread(self, call: Callable[[], Any]) -> Any:
        return await anyio.to_thread.run_sync(call, limiter=self._limiter, abandon_on_cancel=True)

    def _unavailable(self, reason: str, *, retry: bool = True) -> None:
        self._reason = reason
        self._devices = ()
        self._next_init = self._clock() + self.retry_interval if retry else math.inf
        if reason != self._reported:
            self._reported = reason
            suffix = f"; retrying every {self.retry_interval:g} s" if retry else ""
            logger.info("GPU vitals unavailable: %s%s", reason, suffix)
        else:
            logger.debug("GPU vitals still unavailable: %s", reason)

    async def refresh(self) -> GPUSnapshot:
        """Take one sample now (initialising NVML first if due) and return the new snapshot."""
        if self._session is None and self._clock() >= self._next_init:
            try:
                self._session = await self._in_thread(lambda: NVMLSession.open(self._load))
            except GPUUnavailable as exc:
                missing_module = isinstance(exc.__cause__, ImportError)
                self._unavailable(exc.reason, retry=not missing_module)
            else:
                self._reported = None
                logger.info("GPU vitals from NVML: %d device(s)", len(self._session.handles))
        session = self._session
        if session is not None:
            try:
                devices: tuple[GPUDeviceSample, ...] = await self._in_thread(session.sample)
            except GPUUnavailable as exc:
                await self.aclose()
                self._unavailable(exc.reason)
            else:
                self._devices = devices
                self._sampled_at = self._clock()
                self._reason = None if devices else "NVML reports no GPU"
        return self.snapshot()

    def snapshot(self) -> GPUSnapshot:
        """The latest reading, without calling NVML; aggregates ``None`` when stale or absent."""
        if not self._devices or self._sampled_at is None:
            return GPUSnapshot(reason=self._reason)
        age = self._clock() - self._sampled_at
        if age > STALE_AFTER_INTERVALS * self.interval:
            return GPUSnapshot(reason=f"last NVML reading is {age:.0f} s old", age_seconds=age)
        usage, memory = aggregate(self._devices)
        return GPUSnapshot(self._devices, usage, memory, reason=None, age_seconds=age)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Sample every ``interval`` seconds until cancelled, then ``nvmlShutdown``.

        Reports started after the first attempt, so :meth:`snapshot` already
        holds numbers (or the reason there are none).  NVML init can take
        seconds on a GPU without persistence mode; a caller that will not wait
        starts this with ``start_soon``.
        """
        try:
            await self.refresh()
            task_status.started()
            while True:
                await anyio.sleep(self.interval)
                await self.refresh()
        finally:
            with anyio.CancelScope(shield=True):
                await self.aclose()

    async def aclose(self) -> None:
        """Shut NVML down (in a worker thread; it waits for a running call at most briefly)."""
        session, self._session = self._session, None
        if session is not None:
            await anyio.to_thread.run_sync(session.close)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m inferno_backend.gpu``: print one snapshot as JSON (what vitals would report)."""
    parser = argparse.ArgumentParser(
        prog="python -m inferno_backend.gpu", description="Print one NVML GPU snapshot as JSON."
    )
    parser.parse_args(argv)

    async def sample_once() -> GPUSnapshot:
        sampler = GPUSampler()
        try:
            return await sampler.refresh()
        finally:
            await sampler.aclose()

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    snapshot = anyio.run(sample_once)
    json.dump(snapshot.as_dict(), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
