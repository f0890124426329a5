"""CPU and memory usage from /proc: the pure parsers on sample texts, the sampler
on a procfs-shaped directory tree with exact expected numbers, and on this
machine's real /proc."""

from __future__ import annotations

import os
import time
from pathlib import Path

import anyio
import pytest
from inferno_backend.system import (
    MIN_CPU_WINDOW,
    CpuTimes,
    MemInfo,
    SystemSample,
    SystemSampler,
    parse_cgroup_cpu_max,
    parse_cgroup_memory_max,
    parse_cgroup_v2_path,
    parse_flat_keyed,
    parse_meminfo,
    parse_mountinfo_cgroup2,
    parse_pid_stat_cpu_ticks,
    parse_pid_stat_start_ticks,
    parse_proc_stat_cpu,
    parse_statm_rss_pages,
    parse_uptime_seconds,
    process_age_seconds,
)

MiB = 1024 * 1024
TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

PROC_STAT = """\
cpu  7672 10 3162 234238 499 0 190 2451 300 0
cpu0 2381 0 1388 118892 57 0 91 1259 0 0
intr 1234 0 0
ctxt 99
"""

MEMINFO = """\
MemTotal:       24684096 kB
MemFree:        20000000 kB
MemAvailable:   18513072 kB
Buffers:            4624 kB
Cached:           158300 kB
HugePages_Total:       0
"""


# --- pure parsers -----------------------------------------------------------------


def test_proc_stat_sums_first_eight_fields_and_counts_iowait_as_idle() -> None:
    total = 7672 + 10 + 3162 + 234238 + 499 + 0 + 190 + 2451  # guest (300) is inside user
    assert parse_proc_stat_cpu(PROC_STAT) == CpuTimes(busy=total - 234238 - 499, total=total)


def test_proc_stat_from_an_old_kernel_with_four_fields() -> None:
    assert parse_proc_stat_cpu("cpu 10 0 5 85\n") == CpuTimes(busy=15, total=100)


@pytest.mark.parametrize("text", ["", "cpu0 1 2 3 4\n", "cpu 1 2\n", "cpu a b c d\n"])
def test_proc_stat_rejects_what_it_cannot_read(text: str) -> None:
    with pytest.raises(ValueError, match="/proc/stat"):
        parse_proc_stat_cpu(text)


def test_meminfo_reads_kib_values_as_bytes() -> None:
    assert parse_meminfo(MEMINFO) == MemInfo(24684096 * 1024, 18513072 * 1024)


def test_meminfo_without_memavailable_falls_back_to_free_buffers_cached() -> None:
    text = "MemTotal: 1000 kB\nMemFree: 100 kB\nBuffers: 20 kB\nCached: 300 kB\n"
    assert parse_meminfo(text) == MemInfo(1000 * 1024, 420 * 1024)


def test_meminfo_without_memtotal_is_an_error() -> None:
    with pytest.raises(ValueError, match="MemTotal"):
        parse_meminfo("MemFree: 100 kB\n")


def test_pid_stat_counts_fields_after_the_last_parenthesis() -> None:
    # A command name may hold spaces and parentheses; utime=41, stime=17.
    text = "4242 (my (odd) proc) S 1 4242 4242 0 -1 4194560 900 0 3 0 41 17 0 0 20 0 4 0 77 0 0\n"
    assert parse_pid_stat_cpu_ticks(text) == 58


@pytest.mark.parametrize("text", ["", "1 (x) S 1 2 3", "1 (x) S 1 1 1 0 -1 0 0 0 0 0 u s 0\n"])
def test_pid_stat_rejects_short_or_garbled_lines(text: str) -> None:
    with pytest.raises(ValueError, match="stat"):
        parse_pid_stat_cpu_ticks(text)


def test_pid_stat_start_ticks_is_field_22() -> None:
    line = "7 (a (b) c) S 1 7 7 0 -1 4194560 100 0 0 0 10 5 0 0 20 0 1 0 123456 9000 300"
    assert parse_pid_stat_start_ticks(line) == 123456
    with pytest.raises(ValueError, match="too short"):
        parse_pid_stat_start_ticks("7 (x) S 1 2 3")


def test_uptime_seconds() -> None:
    assert parse_uptime_seconds("350735.47 234388.90\n") == 350735.47
    with pytest.raises(ValueError, match="/proc/uptime"):
        parse_uptime_seconds("")


def test_process_age_from_proc(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    write(proc / "uptime", "1000.50 1900.00\n")
    stat = f"7 (python3) S 1 7 7 0 -1 0 0 0 0 0 10 5 0 0 20 0 1 0 {900 * TICKS} 9000 300\n"
    write(proc / "self" / "stat", stat)
    assert process_age_seconds(proc) == pytest.approx(100.5)
    assert process_age_seconds(tmp_path / "absent") is None
    real = process_age_seconds()
    assert real is not None
    assert real > 0


def test_statm_resident_pages() -> None:
    assert parse_statm_rss_pages("765 422 394 5 0 123 0\n") == 422
    with pytest.raises(ValueError, match="statm"):
        parse_statm_rss_pages("765\n")


def test_cgroup_v2_path_on_hybrid_and_unified_hosts() -> None:
    hybrid = "4:memory:/process_api/8be0\n1:cpu:/\n0::/\n"
    assert parse_cgroup_v2_path(hybrid) == "/"
    assert parse_cgroup_v2_path("0::/kubepods/pod1/ctr\n") == "/kubepods/pod1/ctr"
    with pytest.raises(ValueError, match="cgroup v2"):
        parse_cgroup_v2_path("4:memory:/docker/abc\n")


def test_mountinfo_finds_the_cgroup2_mount_and_unescapes_it() -> None:
    text = (
        "24 1 0:22 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"
        "25 24 0:23 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
        "35 24 0:30 /kube /mnt/my\\040cgroups rw,nosuid shared:9 - cgroup2 cgroup2 rw\n"
    )
    assert parse_mountinfo_cgroup2(text) == ("/mnt/my cgroups", "/kube")
    with pytest.raises(ValueError, match="cgroup2"):
        parse_mountinfo_cgroup2(text.splitlines()[0])


def test_cgroup_limits() -> None:
    assert parse_cgroup_memory_max("max\n") is None
    assert parse_cgroup_memory_max("536870912\n") == 512 * MiB
    assert parse_cgroup_cpu_max("max 100000\n") is None
    assert parse_cgroup_cpu_max("150000 100000\n") == 1.5
    assert parse_cgroup_cpu_max("50000\n") == 0.5
    with pytest.raises(ValueError, match=r"memory\.max"):
        parse_cgroup_memory_max("lots\n")
    with pytest.raises(ValueError, match=r"cpu\.max"):
        parse_cgroup_cpu_max("half 100000\n")
    with pytest.raises(ValueError, match=r"cpu\.max"):
        parse_cgroup_cpu_max("1000 0\n")


def test_flat_keyed_files() -> None:
    text = "anon 4096\nfile 8192\ninactive_file 1024\nbogus line here\nodd x\n"
    assert parse_flat_keyed(text) == {"anon": 4096, "file": 8192, "inactive_file": 1024}


# --- the sampler on a procfs-shaped tree ------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def build_tree(tmp_path: Path, *, cgroup_path: str = "/kubepods/pod1/ctr") -> Path:
    """A container's view: a pod-level cgroup holds the limits, the leaf has none."""
    proc, cgroup = tmp_path / "proc", tmp_path / "cgroup"
    write(proc / "stat", "cpu  100 0 100 800 0 0 0 0 0 0\n")
    write(proc / "meminfo", "MemTotal: 4000000 kB\nMemAvailable: 3000000 kB\n")
    write(proc / "self" / "stat", "7 (python3) R 1 7 7 0 -1 0 0 0 0 0 10 5 0 0 20 0 1 0 5\n")
    write(proc / "self" / "statm", "5000 1200 300 1 0 900 0\n")
    write(proc / "self" / "cgroup", f"0::{cgroup_path}\n")
    write(proc / "self" / "mountinfo", f"35 24 0:30 / {cgroup} rw - cgroup2 cgroup2 rw\n")
    pod, leaf = cgroup / "kubepods" / "pod1", cgroup / "kubepods" / "pod1" / "ctr"
    write(pod / "memory.max", f"{1000 * MiB}\n")
    write(pod / "memory.current", f"{900 * MiB}\n")
    write(pod / "memory.stat", f"anon {500 * MiB}\ninactive_file {150 * MiB}\n")
    write(pod / "cpu.max", "50000 100000\n")
    write(pod / "cpu.stat", "usage_usec 1000000\nuser_usec 800000\n")
    write(leaf / "memory.max", "max\n")
    write(leaf / "memory.current", f"{100 * MiB}\n")
    write(leaf / "cpu.max", "max 100000\n")
    write(leaf / "cpu.stat", "usage_usec 1000000\n")
    return proc


def advance(proc: Path, cgroup_pod: Path) -> None:
    """One second later: machine 20 % busy, 0.25 core used by the pod and by us."""
    write(proc / "stat", "cpu  200 0 200 1400 200 0 0 0 0 0\n")
    write(proc / "self" / "stat", f"7 (python3) R 1 7 7 0 -1 0 0 0 0 0 {10 + TICKS // 4} 5 0 0\n")
    write(cgroup_pod / "cpu.stat", "usage_usec 1250000\n")


def test_sampler_reports_the_tightest_of_machine_and_cgroup_limits(tmp_path: Path) -> None:
    proc = build_tree(tmp_path)
    clock = FakeClock()
    sampler = SystemSampler(proc_root=proc, clock=clock)
    advance(proc, tmp_path / "cgroup" / "kubepods" / "pod1")
    clock.now += 1.0
    sample = sampler.sample()

    assert sample.machine_cpu_usage == pytest.approx(0.2)
    assert sample.machine_memory_usage == pytest.approx(0.25)
    assert sample.cgroup_memory_usage == pytest.approx(0.75)  # (900 - 150) / 1000 MiB
    assert sample.cgroup_cpu_usage == pytest.approx(0.5)  # 0.25 core of a 0.5 core quota
    assert sample.cpu_usage == pytest.approx(0.5)
    assert sample.memory_usage == pytest.approx(0.75)
    assert sample.memory_limit_bytes == 1000 * MiB
    assert sample.cpu_limit_cores == pytest.approx(0.5)
    assert sample.process_cpu_cores == pytest.approx((TICKS // 4) / TICKS)
    assert sample.process_cpu_usage == pytest.approx((TICKS // 4) / TICKS / 0.5)
    assert sample.process_rss_bytes == 1200 * PAGE
    assert sampler.snapshot() is sample


def test_no_cpu_rate_over_a_window_shorter_than_the_minimum(tmp_path: Path) -> None:
    proc = build_tree(tmp_path)
    clock = FakeClock()
    sampler = SystemSampler(proc_root=proc, clock=clock)  # the baseline
    # A few milliseconds later one tick has landed, and it was busy: over that
    # window the machine would read 100 % busy.
    write(proc / "stat", "cpu  101 0 100 800 0 0 0 0 0 0\n")
    clock.now += 0.01
    early = sampler.sample()
    assert (early.cpu_usage, early.machine_cpu_usage, early.cgroup_cpu_usage) == (None,) * 3
    assert (early.process_cpu_usage, early.process_cpu_cores) == (None, None)
    assert early.memory_usage == pytest.approx(0.75)  # memory needs no window

    advance(proc, tmp_path / "cgroup" / "kubepods" / "pod1")
    clock.now += 0.99
    full = sampler.sample()  # over the whole second since the baseline
    assert full.machine_cpu_usage == pytest.approx(0.2)
    assert full.cgroup_cpu_usage == pytest.approx(0.5)
    assert full.cpu_usage == pytest.approx(0.5)

    clock.now += MIN_CPU_WINDOW / 2  # too soon again: the last figures stand
    again = sampler.sample()
    assert (again.machine_cpu_usage, again.cpu_usage) == (full.machine_cpu_usage, full.cpu_usage)
    assert again.process_cpu_cores == full.process_cpu_cores


def test_sampler_uses_the_mount_point_when_our_cgroup_path_is_not_under_it(
    tmp_path: Path,
) -> None:
    proc = build_tree(tmp_path, cgroup_path="/from/another/namespace")
    cgroup = tmp_path / "cgroup"
    write(cgroup / "memory.max", f"{2000 * MiB}\n")
    write(cgroup / "memory.current", f"{1000 * MiB}\n")
    sample = SystemSampler(proc_root=proc).sample()
    assert sample.cgroup_memory_usage == pytest.approx(0.5)
    assert sample.memory_limit_bytes == 2000 * MiB


def test_sampler_without_proc_reports_nothing_and_raises_nothing(tmp_path: Path) -> None:
    sampler = SystemSampler(proc_root=tmp_path / "absent")
    assert sampler.snapshot() == SystemSample()
    sample = sampler.sample()
    assert sample.cpu_usage is None
    assert sample.memory_usage is None
    assert sample.process_rss_bytes is None
    assert sample.process_cpu_usage is None


def test_sampler_with_garbled_files_reports_nothing(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    for name in ("stat", "meminfo", "self/stat", "self/statm", "self/cgroup", "self/mountinfo"):
        write(proc / name, "\x00garbage\n")
    sample = SystemSampler(proc_root=proc).sample()
    assert sample.as_dict() == {
        **SystemSample().as_dict(),
        "cpu_limit_cores": sample.cpu_limit_cores,
    }


def test_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="interval"):
        SystemSampler(interval=0)


# --- the real /proc of this machine -----------------------------------------------


def burn_cpu(seconds: float) -> None:
    """Spin for ``seconds`` of wall time, and until this process has used some CPU time."""
    start, deadline = os.times(), time.monotonic() + seconds
    while time.monotonic() < deadline or os.times().user + os.times().system == (
        start.user + start.system
    ):
        sum(range(10_000))


def test_sampler_on_this_machine_gives_values_in_range() -> None:
    sampler = SystemSampler()
    burn_cpu(MIN_CPU_WINDOW)  # a full window
    sample = sampler.sample()
    for value in (sample.cpu_usage, sample.memory_usage, sample.process_cpu_usage):
        assert value is not None
        assert 0.0 <= value <= 1.0
    assert sample.process_cpu_cores is not None
    assert sample.process_cpu_cores > 0
    assert sample.process_rss_bytes is not None
    assert sample.process_rss_bytes > 1 * MiB
    assert sample.memory_limit_bytes is not None
    assert sample.cpu_limit_cores is not None
    assert sample.cpu_limit_cores >= 1
    assert set(sample.as_dict()) >= {"cpu_usage", "memory_usage"}


@pytest.mark.anyio
async def test_run_has_a_sample_once_started() -> None:
    sampler = SystemSampler(interval=0.01)
    async with anyio.create_task_group() as tg:
        await tg.start(sampler.run)
        assert sampler.snapshot().memory_usage is not None
        tg.cancel_scope.cancel()
