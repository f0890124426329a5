"""CPU and memory usage of this process and of the machine, read from ``/proc``.

No native dependency: everything comes from the text files Linux exposes.  The
parsers below are pure (file text in, numbers out, :class:`ValueError` on text
they cannot read) so they are tested on sample texts; :class:`SystemSampler`
reads the files and turns two readings into usage fractions.

What the numbers mean (they feed ``NodeVitals``):

``machine_cpu_usage``
    busy fraction of every CPU of the machine, 0..1, from the ``cpu`` line of
    ``/proc/stat`` between two samples (idle and iowait count as not busy).
``machine_memory_usage``
    ``1 - MemAvailable / MemTotal`` from ``/proc/meminfo``: page cache the
    kernel can drop does not count as used, which is what "can we still fit
    work here" needs.
``process_cpu_usage``
    this process's ``utime + stime`` (``/proc/self/stat``) over wall time,
    divided by the CPUs the process may use, 0..1; ``process_cpu_cores`` is
    the same before the division (1.5 = one and a half cores busy).
``process_rss_bytes``
    resident set size from ``/proc/self/statm``.
``cgroup_*``
    inside a container (cgroup v2), usage against the container's own limits:
    ``memory.current - inactive_file`` (the "working set", reclaimable page
    cache left out, as the kubelet counts it) over ``memory.max``, and
    ``cpu.stat`` ``usage_usec`` over the ``cpu.max`` quota.  Limits may sit on
    any ancestor cgroup, so every level from ours up to the mount root is
    read and the tightest one wins.  cgroup v1 is not read (legacy; its
    limits show up only through the machine figures).
``cpu_usage`` / ``memory_usage``
    the values for ``NodeVitals``: the tightest of the machine and cgroup
    figures, because a node is as full as its most constrained limit.

Every field is ``None`` when it cannot be known (no ``/proc``, an unreadable
file, no previous sample to take a difference from); nothing raises.

**Measurement windows.**  CPU figures are rates between two readings, and a
rate over a few milliseconds is noise: a handful of clock ticks (10 ms each)
land on one side or the other and the result reads 0 or 1.  So a reading
less than :data:`MIN_CPU_WINDOW` after the previous one keeps the previous
CPU figures (``None`` before the first full window) and the earlier
baseline; memory figures are always fresh.  :meth:`SystemSampler.run` takes
its second reading one such window after the first, so CPU figures exist
about 250 ms after start, then every ``interval``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import TaskStatus

__all__ = [
    "DEFAULT_INTERVAL",
    "MIN_CPU_WINDOW",
    "CgroupLevel",
    "CpuTimes",
    "MemInfo",
    "SystemSample",
    "SystemSampler",
    "parse_cgroup_cpu_max",
    "parse_cgroup_memory_max",
    "parse_cgroup_v2_path",
    "parse_flat_keyed",
    "parse_meminfo",
    "parse_mountinfo_cgroup2",
    "parse_pid_stat_cpu_ticks",
    "parse_pid_stat_start_ticks",
    "parse_proc_stat_cpu",
    "parse_statm_rss_pages",
    "parse_uptime_seconds",
    "process_age_seconds",
]

#: Seconds between two samples taken by :meth:`SystemSampler.run`.  At the
#: kernel's usual 100 ticks/s this resolves CPU use to 0.5 % of one core.
DEFAULT_INTERVAL = 2.0
#: Shortest window, in seconds, a CPU rate is taken over: 25 ticks of the
#: usual 100/s clock, so one tick more or less moves a core's figure by 4 %.
MIN_CPU_WINDOW = 0.25


@dataclass(frozen=True, slots=True)
class CpuTimes:
    """Cumulative CPU time of the whole machine, in clock ticks (USER_HZ)."""

    busy: int
    total: int


@dataclass(frozen=True, slots=True)
class MemInfo:
    """Machine memory, in bytes."""

    total_bytes: int
    available_bytes: int


@dataclass(frozen=True, slots=True)
class CgroupLevel:
    """One cgroup v2 directory on the way from ours to the mount root."""

    path: str
    memory_max_bytes: int | None  # None: no limit ("max") or not readable
    memory_working_set_bytes: int | None
    cpu_quota_cores: float | None  # None: no quota
    cpu_usage_usec: int | None


def parse_proc_stat_cpu(text: str) -> CpuTimes:
    """Read the aggregate ``cpu`` line of ``/proc/stat``.

    Fields are user, nice, system, idle, iowait, irq, softirq, steal, guest,
    guest_nice.  guest time is already included in user (and guest_nice in
    nice), so only the first eight are summed.  Old kernels print fewer.
    """
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            try:
                ticks = [int(f) for f in fields[1:9]]
            except ValueError as exc:
                raise ValueError(f"/proc/stat cpu line is not numeric: {line!r}") from exc
            if len(ticks) < 4:
                raise ValueError(f"/proc/stat cpu line has too few fields: {line!r}")
            idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
            total = sum(ticks)
            return CpuTimes(busy=total - idle, total=total)
    raise ValueError("/proc/stat has no aggregate cpu line")


def parse_meminfo(text: str) -> MemInfo:
    """Read MemTotal and MemAvailable (both in KiB, printed as ``kB``) from ``/proc/meminfo``.

    Kernels before 3.14 have no MemAvailable; there MemFree + Buffers + Cached
    is the usual approximation of memory that can be had without swapping.
    """
    values: dict[str, int] = {}
    for line in text.splitlines():
        name, sep, rest = line.partition(":")
        parts = rest.split()
        if not sep or not parts:
            continue
        try:
            amount = int(parts[0])
        except ValueError:
            continue
        unit = 1024 if len(parts) > 1 and parts[1] == "kB" else 1
        values[name.strip()] = amount * unit
    if "MemTotal" not in values:
        raise ValueError("/proc/meminfo has no MemTotal")
    available = values.get("MemAvailable")
    if available is None:
        available = sum(values.get(k, 0) for k in ("MemFree", "Buffers", "Cached"))
    return MemInfo(total_bytes=values["MemTotal"], available_bytes=available)


def parse_pid_stat_cpu_ticks(text: str) -> int:
    """Return utime + stime (clock ticks) from a ``/proc/<pid>/stat`` line.

    The command name (field 2) is in parentheses and may itself contain spaces
    and parentheses, so the fields are counted from the *last* ``)``: the
    first after it is field 3 (state); utime and stime are fields 14 and 15.
    """
    _, paren, rest = text.rpartition(")")
    fields = rest.split()
    if not paren or len(fields) < 13:
        raise ValueError("/proc/<pid>/stat is too short")
    try:
        return int(fields[11]) + int(fields[12])
    except ValueError as exc:
        raise ValueError("/proc/<pid>/stat utime/stime are not numeric") from exc


def parse_pid_stat_start_ticks(text: str) -> int:
    """Return starttime (field 22: clock ticks after boot) from a ``/proc/<pid>/stat`` line."""
    _, paren, rest = text.rpartition(")")
    fields = rest.split()
    if not paren or len(fields) < 20:
        raise ValueError("/proc/<pid>/stat is too short for starttime")
    try:
        return int(fields[19])
    except ValueError as exc:
        raise ValueError("/proc/<pid>/stat starttime is not numeric") from exc


def parse_uptime_seconds(text: str) -> float:
    """Return the seconds since boot, the first field of ``/proc/uptime``."""
    try:
        return float(text.split()[0])
    except (IndexError, ValueError) as exc:
        raise ValueError(f"/proc/uptime is not 'seconds idle': {text[:80]!r}") from exc


def process_age_seconds(proc_root: str | os.PathLike[str] = "/proc") -> float | None:
    """Seconds since this process started (``/proc/uptime`` less its starttime), or ``None``.

    Both readings count from boot, so their difference does not depend on
    when the caller asks; ticks are USER_HZ (10 ms on every usual kernel).
    """
    root = Path(proc_root)
    try:
        uptime = parse_uptime_seconds((root / "uptime").read_text(encoding="ascii"))
        start = parse_pid_stat_start_ticks((root / "self" / "stat").read_text(encoding="ascii"))
    except (OSError, ValueError):
        return None
    return max(0.0, uptime - start / _sysconf("SC_CLK_TCK", 100))


def parse_statm_rss_pages(text: str) -> int:
    """Return the resident page count (second field) of ``/proc/<pid>/statm``."""
    fields = text.split()
    try:
        return int(fields[1])
    except (IndexError, ValueError) as exc:
        raise ValueError(f"/proc/<pid>/statm is not 'size resident ...': {text[:80]!r}") from exc


def parse_cgroup_v2_path(text: str) -> str:
    """Return our cgroup v2 path from ``/proc/self/cgroup`` (the ``0::<path>`` line)."""
    for line in text.splitlines():
        if line.startswith("0::"):
            return line[3:].strip() or "/"
    raise ValueError("/proc/self/cgroup has no cgroup v2 (0::) line")


def _unescape_mount_field(field: str) -> str:
    """Undo mountinfo's octal escapes (a space is written ``\\040``)."""
    out: list[str] = []
    i = 0
    while i < len(field):
        chunk = field[i : i + 4]
        if len(chunk) == 4 and chunk[0] == "\\" and chunk[1:].isdigit():
            out.append(chr(int(chunk[1:], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo_cgroup2(text: str) -> tuple[str, str]:
    """Return ``(mount_point, root)`` of the cgroup2 mount in ``/proc/self/mountinfo``.

    ``root`` is the cgroup shown at the mount point: ``/`` on a host or in a
    container with its own cgroup namespace.  A hybrid host mounts cgroup2
    somewhere else than ``/sys/fs/cgroup`` (e.g. ``/sys/fs/cgroup/unified``),
    which is why the mount table is read rather than the path assumed.
    """
    for line in text.splitlines():
        before, sep, after = line.partition(" - ")
        fields = before.split()
        if sep and after.split()[:1] == ["cgroup2"] and len(fields) >= 5:
            return _unescape_mount_field(fields[4]), _unescape_mount_field(fields[3])
    raise ValueError("no cgroup2 mount in /proc/self/mountinfo")


def parse_cgroup_memory_max(text: str) -> int | None:
    """Read ``memory.max``: bytes, or ``None`` for ``max`` (no limit)."""
    value = text.strip()
    if value == "max":
        return None
    try:
        return int(value)
    except ValueError as exc:
        raise ValueError(f"memory.max is neither 'max' nor bytes: {value!r}") from exc


def parse_cgroup_cpu_max(text: str) -> float | None:
    """Read ``cpu.max`` (``"$QUOTA $PERIOD"`` in µs) as cores, or ``None`` for no quota."""
    fields = text.split()
    if not fields or fields[0] == "max":
        return None
    try:
        quota = int(fields[0])
        period = int(fields[1]) if len(fields) > 1 else 100_000  # the kernel's default period
    except ValueError as exc:
        raise ValueError(f"cpu.max is not '$QUOTA $PERIOD': {text.strip()!r}") from exc
    if period <= 0:
        raise ValueError(f"cpu.max period must be positive: {text.strip()!r}")
    return quota / period


def parse_flat_keyed(text: str) -> dict[str, int]:
    """Read a cgroup "flat keyed" file (``memory.stat``, ``cpu.stat``): ``key value`` lines."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) == 2:
            try:
                values[fields[0]] = int(fields[1])
            except ValueError:
                continue
    return values


@dataclass(frozen=True, slots=True)
class SystemSample:
    """One reading of the machine and this process; see the module docstring for meanings."""

    cpu_usage: float | None = None
    memory_usage: float | None = None
    machine_cpu_usage: float | None = None
    machine_memory_usage: float | None = None
    cgroup_cpu_usage: float | None = None
    cgroup_memory_usage: float | None = None
    process_cpu_usage: float | None = None
    process_cpu_cores: float | None = None
    process_rss_bytes: int | None = None
    #: Memory this node may use: MemTotal, or a cgroup ``memory.max`` below it.
    memory_limit_bytes: int | None = None
    #: CPUs this process may use: its affinity mask, or a cgroup quota below it.
    cpu_limit_cores: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready mapping."""
        return asdict(self)


def _fraction(numerator: float, denominator: float) -> float | None:
    """``numerator / denominator`` clamped to 0..1; ``None`` without a positive denominator.

    Clamped because counters read a few microseconds apart can overshoot.
    """
    if denominator <= 0:
        return None
    return min(1.0, max(0.0, numerator / denominator))


def _tightest(*values: float | None) -> float | None:
    known = [v for v in values if v is not None]
    return max(known) if known else None


def _affinity_cpu_count() -> int | None:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count()


def _sysconf(name: str, fallback: int) -> int:
    try:
        value = os.sysconf(name)
    except (ValueError, OSError, AttributeError):
        return fallback
    return value if value > 0 else fallback


class SystemSampler:
    """Reads ``/proc`` (and cgroup v2 files) and reports usage between two readings.

    :meth:`sample` reads now and compares with the previous reading (the first
    comparison is against the reading taken at construction), if that is at
    least :data:`MIN_CPU_WINDOW` old; otherwise it repeats the CPU figures it
    had (see the module docstring).  :meth:`run`
    samples every ``interval`` seconds in the background so that
    :meth:`snapshot` answers a vitals request without touching files, and two
    pollers do not shorten each other's measurement windows.

    :param proc_root: where procfs is mounted (another directory in tests).
    :param clock: monotonic seconds, for the wall time between readings.
    """

    def __init__(
        self,
        *,
        interval: float = DEFAULT_INTERVAL,
        proc_root: str | os.PathLike[str] = "/proc",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval <= 0:
            raise ValueError(f"interval must be positive, got {interval!r}")
        self.interval = interval
        self._proc = Path(proc_root)
        self._clock = clock
        self._ticks_per_second = _sysconf("SC_CLK_TCK", 100)  # USER_HZ, 100 on every usual kernel
        self._page_size = _sysconf("SC_PAGE_SIZE", 4096)
        self._prev_time = clock()
        self._prev_machine = self._read(self._proc / "stat", parse_proc_stat_cpu)
        self._prev_process = self._read(self._proc / "self" / "stat", parse_pid_stat_cpu_ticks)
        self._prev_cgroup_usage = {
            level.path: level.cpu_usage_usec for level in self._read_cgroup_levels()
        }
        self._latest = SystemSample()

    @staticmethod
    def _read(path: Path, parse: Callable[[str], Any]) -> Any:
        """Read and parse one file; ``None`` when it is missing, unreadable or unparsable."""
        try:
            return parse(path.read_text(encoding="ascii", errors="replace"))
        except (OSError, ValueError):
            return None

    def _cgroup_dirs(self) -> list[Path]:
        """Our cgroup v2 directory and each parent up to the mount point, leaf first."""
        mount = self._read(self._proc / "self" / "mountinfo", parse_mountinfo_cgroup2)
        ours = self._read(self._proc / "self" / "cgroup", parse_cgroup_v2_path)
        if mount is None or ours is None:
            return []
        mount_point, mount_root = Path(mount[0]), mount[1].rstrip("/")
        relative = ours
        if mount_root and ours.startswith(mount_root):
            relative = ours[len(mount_root) :]
        leaf = mount_point / relative.lstrip("/")
        if not leaf.is_dir():
            leaf = mount_point  # a namespace we cannot map: the mount point is ours
        dirs = [leaf]
        while dirs[-1] != mount_point and mount_point in dirs[-1].parents:
            dirs.append(dirs[-1].parent)
        return dirs

    def _read_cgroup_levels(self) -> list[CgroupLevel]:
        levels = []
        for directory in self._cgroup_dirs():
            current = self._read(directory / "memory.current", lambda t: int(t.strip()))
            stat = self._read(directory / "memory.stat", parse_flat_keyed) or {}
            working_set = None
            if current is not None:
                working_set = max(0, current - stat.get("inactive_file", 0))
            cpu_stat = self._read(directory / "cpu.stat", parse_flat_keyed) or {}
            levels.append(
                CgroupLevel(
                    path=str(directory),
                    memory_max_bytes=self._read(directory / "memory.max", parse_cgroup_memory_max),
                    memory_working_set_bytes=working_set,
                    cpu_quota_cores=self._read(directory / "cpu.max", parse_cgroup_cpu_max),
                    cpu_usage_usec=cpu_stat.get("usage_usec"),
                )
            )
        return levels

    def sample(self) -> SystemSample:
        """Read every source now and return usage since the previous reading."""
        now = self._clock()
        elapsed = now - self._prev_time
        machine: CpuTimes | None = self._read(self._proc / "stat", parse_proc_stat_cpu)
        memory: MemInfo | None = self._read(self._proc / "meminfo", parse_meminfo)
        process: int | None = self._read(self._proc / "self" / "stat", parse_pid_stat_cpu_ticks)
        rss_pages: int | None = self._read(self._proc / "self" / "statm", parse_statm_rss_pages)
        levels = self._read_cgroup_levels()

        machine_cpu = None
        if machine is not None and self._prev_machine is not None:
            machine_cpu = _fraction(
                machine.busy - self._prev_machine.busy, machine.total - self._prev_machine.total
            )
        machine_memory = None
        if memory is not None:
            used = memory.total_bytes - memory.available_bytes
            machine_memory = _fraction(used, memory.total_bytes)

        cgroup_memory, memory_limit = self._cgroup_memory(levels)
        if memory is not None:
            memory_limit = min(memory_limit or memory.total_bytes, memory.total_bytes)
        cgroup_cpu, cpu_limit = self._cgroup_cpu(levels, elapsed)
        affinity = _affinity_cpu_count()
        if affinity is not None:
            cpu_limit = (
                min(cpu_limit, float(affinity)) if cpu_limit is not None else float(affinity)
            )

        process_cores = process_cpu = None
        if process is not None and self._prev_process is not None and elapsed > 0:
            process_cores = (process - self._prev_process) / self._ticks_per_second / elapsed
            if cpu_limit:
                process_cpu = _fraction(process_cores, cpu_limit)

        if elapsed >= MIN_CPU_WINDOW:
            self._prev_time = now
            self._prev_machine = machine
            self._prev_process = process
            self._prev_cgroup_usage = {level.path: level.cpu_usage_usec for level in levels}
        else:  # too short to be a rate: keep the last figures and the older baseline
            previous = self._latest
            machine_cpu, cgroup_cpu = previous.machine_cpu_usage, previous.cgroup_cpu_usage
            process_cpu, process_cores = previous.process_cpu_usage, previous.process_cpu_cores
        self._latest = SystemSample(
            cpu_usage=_tightest(machine_cpu, cgroup_cpu),
            memory_usage=_tightest(machine_memory, cgroup_memory),
            machine_cpu_usage=machine_cpu,
            machine_memory_usage=machine_memory,
            cgroup_cpu_usage=cgroup_cpu,
            cgroup_memory_usage=cgroup_memory,
            process_cpu_usage=process_cpu,
            process_cpu_cores=process_cores,
            process_rss_bytes=rss_pages * self._page_size if rss_pages is not None else None,
            memory_limit_bytes=memory_limit,
            cpu_limit_cores=cpu_limit,
        )
        return self._latest

    @staticmethod
    def _cgroup_memory(levels: list[CgroupLevel]) -> tuple[float | None, int | None]:
        """Highest working-set/limit fraction over the levels with a limit, and the lowest limit."""
        usage: float | None = None
        limit: int | None = None
        for level in levels:
            if level.memory_max_bytes is None:
                continue
            limit = min(limit, level.memory_max_bytes) if limit else level.memory_max_bytes
            if level.memory_working_set_bytes is not None:
                fraction = _fraction(level.memory_working_set_bytes, level.memory_max_bytes)
                usage = _tightest(usage, fraction)
        return usage, limit

    def _cgroup_cpu(
        self, levels: list[CgroupLevel], elapsed: float
    ) -> tuple[float | None, float | None]:
        """Highest usage/quota fraction over the levels with a quota, and the lowest quota."""
        usage: float | None = None
        quota: float | None = None
        for level in levels:
            if level.cpu_quota_cores is None:
                continue
            quota = min(quota, level.cpu_quota_cores) if quota else level.cpu_quota_cores
            before = self._prev_cgroup_usage.get(level.path)
            if level.cpu_usage_usec is not None and before is not None and elapsed > 0:
                used_cores = (level.cpu_usage_usec - before) / 1e6 / elapsed
                usage = _tightest(usage, _fraction(used_cores, level.cpu_quota_cores))
        return usage, quota

    def snapshot(self) -> SystemSample:
        """The latest reading (all ``None`` before the first), without touching files."""
        return self._latest

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Sample every ``interval`` seconds until cancelled.

        Reports started after the first sample, so :meth:`snapshot` has memory
        figures from then on; CPU figures follow one :data:`MIN_CPU_WINDOW`
        later (the first sample is too close to the baseline for a rate).
        Reading procfs never blocks on a disk, so it runs on the event loop
        rather than paying for a thread hop.
        """
        self.sample()
        task_status.started()
        await anyio.sleep(min(self.interval, MIN_CPU_WINDOW))
        while True:
            self.sample()
            await anyio.sleep(self.interval)
