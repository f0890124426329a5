"""Role processes for benchmarks: start ``python -m inferno <role>``, find its ports, measure it.

A role logs where it listens once both its ports are bound::

    proxy listening on 127.0.0.1:PORT (ops 127.0.0.1:PORT)
    backend listening on 127.0.0.1:PORT (ops 127.0.0.1:PORT)

:func:`spawn` starts one with ``--log-format json`` (ports 0 are the
caller's business), a thread keeps reading its stderr (a chatty child must
never block on a full pipe) and keeps the last lines to explain a failure;
:meth:`RoleProcess.wait_listening` waits for that line.  Spawning several
before waiting on any lets their interpreters start in parallel.

CPU and memory come from ``/proc`` so each figure is one process's (or one
process tree's: a proxy with ``--workers N`` forks N workers) alone, without
the load generator's share.  Linux only, as the benchmarks are.

Each child runs in a session of its own, so :meth:`RoleProcess.kill` can end
it and whatever it forked by process group, and a Ctrl-C at the terminal
reaches the benchmark alone, which then stops its children.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import resource
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

ROOT: Final = Path(__file__).resolve().parent.parent
TICKS_PER_SECOND: Final = os.sysconf("SC_CLK_TCK")
PAGE_BYTES: Final = os.sysconf("SC_PAGE_SIZE")
#: ``<role> listening on HOST:PORT (ops HOST:PORT)``, in JSON and pretty logs alike.
LISTENING_RE: Final = re.compile(r"\b(\w+) listening on (\S+):(\d+) \(ops (\S+):(\d+)\)")
#: Longest wait for a role to listen: an interpreter start and plugin imports on a
#: loaded 2-CPU machine take a second or two; several starting at once, more.
START_TIMEOUT: Final = 60.0
#: Longest wait for a role to exit after SIGTERM (it drains) before it is killed.
STOP_TIMEOUT: Final = 10.0
#: Log lines kept per process: to explain a failure, and for what a benchmark reports.
TAIL_LINES: Final = 200


@dataclass
class RoleProcess:
    """One ``inferno <role>`` subprocess and, once it said so, where it listens."""

    name: str
    popen: subprocess.Popen[str]
    command: list[str]
    port: int = 0
    ops_port: int = 0
    log: deque[str] = field(default_factory=lambda: deque(maxlen=TAIL_LINES))
    listening: threading.Event = field(default_factory=threading.Event)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def wait_listening(self, timeout: float = START_TIMEOUT) -> RoleProcess:
        """Block until the listening line; exit the benchmark with the log if it never comes."""
        if not self.listening.wait(timeout) or not self.port:
            self.kill()
            raise SystemExit(
                f"{self.name} did not start ({' '.join(self.command)}):\n" + self.tail()
            )
        return self

    def tail(self) -> str:
        return "\n".join(self.log)

    def cpu_seconds(self) -> float:
        """user + system CPU of this process alone."""
        return cpu_seconds(self.pid)

    def tree_cpu_seconds(self) -> float:
        """user + system CPU of this process and its live descendants (worker processes)."""
        return sum(cpu_seconds(pid) for pid in [self.pid, *descendants(self.pid)])

    def rss_bytes(self) -> int:
        return rss_bytes(self.pid)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self) -> None:
        """SIGTERM (the role drains and exits), then SIGKILL to its group if it lingers."""
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.kill()
        self._reap_group()

    def kill(self) -> None:
        """SIGKILL this process (the way a node dies of an OOM kill or a lost host)."""
        if self.alive():
            self.popen.kill()
        self.popen.wait()
        self._reap_group()

    def _reap_group(self) -> None:
        # The child leads its own process group (start_new_session): what it forked
        # and left behind (workers of a killed proxy) goes with it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)


def spawn(role: str, args: Sequence[str], name: str | None = None) -> RoleProcess:
    """Start ``python -m inferno ROLE ARGS --log-format json``; call ``wait_listening`` next."""
    command = [sys.executable, "-m", "inferno", role, *args, "--log-format", "json"]
    popen = subprocess.Popen(
        command,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    proc = RoleProcess(name or role, popen, command)

    def drain() -> None:
        assert popen.stderr is not None
        for line in popen.stderr:
            proc.log.append(line.rstrip())
            if not proc.listening.is_set():
                match = LISTENING_RE.search(line)
                if match and match.group(1) == role:
                    proc.port, proc.ops_port = int(match.group(3)), int(match.group(5))
                    proc.listening.set()
        proc.listening.set()  # it exited: wake the waiter, which sees no port

    threading.Thread(target=drain, name=f"{proc.name}-stderr", daemon=True).start()
    return proc


def start(role: str, args: Sequence[str], name: str | None = None) -> RoleProcess:
    """:func:`spawn` and wait until it listens."""
    return spawn(role, args, name).wait_listening()


@dataclass
class PlainProcess:
    """A helper server that prints its port on its first stdout line (the h11 baseline)."""

    popen: subprocess.Popen[str]
    port: int

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.popen.pid)

    def stop(self) -> None:
        self.popen.kill()
        self.popen.wait()


def start_bench_server(kind: str, upstream: int | None = None) -> PlainProcess:
    """A server of ``bench/http_server.py`` in its own process, through its ``--serve`` entry.

    ``kind`` ``"baseline"``: the minimal asyncio + h11 server of
    ``bench/_baseline.py``, answering every request with a 78-byte JSON body;
    with ``upstream``, its bare proxy hop to that port.  ``"ours"``: the same
    on Inferno's HTTP server (and pooled client for the hop), with no proxy
    logic: what the HTTP layer alone costs.
    """
    script = Path(__file__).resolve().parent / "http_server.py"
    command = [sys.executable, str(script), "--serve", kind, "--chunks", "0"]
    if upstream is not None:
        command += ["--upstream", str(upstream)]
    popen = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert popen.stdout is not None
    line = popen.stdout.readline()
    if not line.strip():
        popen.kill()
        raise SystemExit(f"bench/http_server.py --serve {kind} did not start")
    return PlainProcess(popen, int(line))


# --------------------------------------------------------------------------- /proc


def _stat_fields(pid: int) -> list[str]:
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stream:
        return stream.read().rpartition(")")[2].split()


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (fields 14 and 15 of ``/proc/<pid>/stat``); 0 once gone."""
    try:
        fields = _stat_fields(pid)
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICKS_PER_SECOND


def rss_bytes(pid: int) -> int:
    """Resident set size of one process (``/proc/<pid>/statm``); 0 once gone."""
    try:
        with open(f"/proc/{pid}/statm", encoding="ascii") as stream:
            return int(stream.read().split()[1]) * PAGE_BYTES
    except OSError:
        return 0


def descendants(pid: int) -> list[int]:
    """Live descendants of ``pid`` (``/proc/<pid>/task/*/children``), depth first."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children", encoding="ascii") as stream:
                children = [int(word) for word in stream.read().split()]
        except OSError:
            continue
        for child in children:
            found.append(child)
            found.extend(descendants(child))
    return found


# --------------------------------------------------------------------------- environment


def raise_fd_limit() -> int:
    """Raise this process's (and so its children's) open-file limit to the hard limit."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def machine_line() -> str:
    """Python, machine, CPU model and load average: what a reader needs to weigh the numbers."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as stream:
            for line in stream:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    load1, load5, load15 = os.getloadavg()
    return (
        f"python {platform.python_version()} ({platform.python_implementation()}), "
        f"{platform.machine()}, {os.cpu_count()} cpus, {model}, "
        f"load average {load1:.2f}/{load5:.2f}/{load15:.2f} at start"
    )


# --------------------------------------------------------------------------- polling


def get_text(url: str, timeout: float = 5.0) -> str:
    """GET a text document (``/telemetry``'s Prometheus text)."""
    with urllib.request.urlopen(url, timeout=timeout) as answer:
        text: str = answer.read().decode("utf-8")
        return text


def get_json(url: str, timeout: float = 5.0) -> Any:
    """GET a JSON document (a benchmark's look at another process's state)."""
    return json.loads(get_text(url, timeout))


def wait_for(check: Callable[[], bool], what: str, timeout: float = START_TIMEOUT) -> None:
    """Poll ``check`` until true; exit the benchmark saying ``what`` did not happen.

    Benchmarks may poll: the state is another process's, and nothing here is asserted.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (urllib.error.URLError, OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    raise SystemExit(f"timed out after {timeout:g}s waiting for {what}")
