"""Benchmark: what a backend with the ``openai`` engine adds in front of its engine server.

Run by hand (not a test): ``.venv/bin/python bench/backend_overhead.py [--quick]``.

Two backends run as subprocesses (``python -m inferno backend``), each found
through its ``backend listening on HOST:PORT (ops HOST:PORT)`` log line:

* **direct**: a ``sim`` backend, sped up (``--sim-speed``) so the simulated
  model is cheap next to the HTTP work;
* **through**: a second backend with ``--engine openai --engine-url`` pointing
  at the first one, the way an operator fronts vLLM or llama.cpp server.

A lean load generator in this process (raw asyncio sockets, HTTP/1.1
keep-alive, just enough chunked-encoding parsing to see each SSE event) keeps
``--streams`` streaming completions in flight against one of them at a time,
alternating direct and through over ``--rounds`` rounds.  Printed per mode:
requests/s, time to first token (TTFT: request sent to the first ``data:``
event) and total time at p50/p99, SSE events per answer, and CPU
milliseconds per request of each backend process (``/proc/<pid>/stat``) and
of the load generator; then the difference, which is the fronting backend's
cost.

Everything here shares the machine's CPUs (the load generator too), so on a
small machine the figures measure CPU contention as much as latency: read
the CPU-per-request column first.  Numbers are printed, never asserted;
record them in docs/performance.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")
#: How a backend says where it listens (inferno_backend.role); JSON and pretty logs alike.
LISTENING_RE = re.compile(r"backend listening on (\S+):(\d+) \(ops (\S+):(\d+)\)")
#: Longest wait for a backend to listen, and for the fronting one to see its engine.
START_TIMEOUT = 30.0
#: Longest wait for a backend to exit after SIGTERM before it is killed.
STOP_TIMEOUT = 10.0
PROMPT = "Tell me how a fleet of inference nodes heals itself."


# --------------------------------------------------------------------------- backends


@dataclass
class Backend:
    """One ``inferno backend`` subprocess and where it listens."""

    name: str
    process: subprocess.Popen[str]
    port: int
    ops_port: int
    log: deque[str] = field(default_factory=lambda: deque(maxlen=50))

    def cpu_seconds(self) -> float:
        """utime + stime of the process so far (fields 14 and 15 of /proc/<pid>/stat)."""
        with open(f"/proc/{self.process.pid}/stat", encoding="ascii") as stream:
            fields = stream.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / TICKS_PER_SECOND

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_backend(name: str, args: Sequence[str]) -> Backend:
    """Start ``python -m inferno backend ARGS`` and wait for its listening line."""
    command = [sys.executable, "-m", "inferno", "backend", "--log-format", "json", *args]
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    log: deque[str] = deque(maxlen=50)
    found: list[tuple[int, int]] = []
    listening = threading.Event()

    def drain() -> None:  # keep reading, or a chatty child blocks on a full pipe
        assert process.stderr is not None
        for line in process.stderr:
            log.append(line.rstrip())
            match = LISTENING_RE.search(line)
            if match and not found:
                found.append((int(match.group(2)), int(match.group(4))))
                listening.set()
        listening.set()  # the process ended

    threading.Thread(target=drain, name=f"{name}-stderr", daemon=True).start()
    if not listening.wait(START_TIMEOUT) or not found:
        process.kill()
        process.wait()
        tail = "\n".join(log)
        raise SystemExit(f"{name} backend did not start ({' '.join(command)}):\n{tail}")
    port, ops_port = found[0]
    return Backend(name, process, port, ops_port, log)


def wait_ready(backend: Backend) -> None:
    """Poll the ops port's /health until the backend takes requests (a bench may poll)."""
    deadline = time.monotonic() + START_TIMEOUT
    url = f"http://127.0.0.1:{backend.ops_port}/health"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.05)
    raise SystemExit(f"{backend.name} backend never became ready:\n" + "\n".join(backend.log))


def completion_tokens(port: int, model: str, max_tokens: int) -> int:
    """One non-streaming request: the usage the backend reports (a sanity check)."""
    body = json.dumps(
        {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "ignore_eos": True}
    ).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions", body, {"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        return int(json.load(answer)["usage"]["completion_tokens"])


# --------------------------------------------------------------------------- load


@dataclass
class Load:
    """What one run of the load generator saw."""

    seconds: float = 0.0
    ttft: list[float] = field(default_factory=list)
    total: list[float] = field(default_factory=list)
    events: int = 0
    errors: dict[int, int] = field(default_factory=dict)

    @property
    def requests(self) -> int:
        return len(self.total)

    def add(self, other: Load) -> None:
        self.seconds += other.seconds
        self.ttft += other.ttft
        self.total += other.total
        self.events += other.events
        for status, count in other.errors.items():
            self.errors[status] = self.errors.get(status, 0) + count


def build_request(port: int, model: str, max_tokens: int) -> bytes:
    body = json.dumps(
        {
            "model": model,
            "prompt": PROMPT,
            "max_tokens": max_tokens,
            "stream": True,
            "ignore_eos": True,  # every answer has exactly max_tokens tokens
        },
        separators=(",", ":"),
    ).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _fill(reader: asyncio.StreamReader, buf: bytearray) -> None:
    data = await reader.read(65536)
    if not data:
        raise ConnectionError("the backend closed the connection")
    buf += data


async def _one_stream(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    request: bytes,
    buf: bytearray,
    load: Load,
) -> None:
    """Send one streaming request and read its answer to the end, recording its times."""
    start = time.perf_counter()
    writer.write(request)
    while (end := buf.find(b"\r\n\r\n")) < 0:
        await _fill(reader, buf)
    head = bytes(buf[:end]).lower()
    del buf[: end + 4]
    status = int(head[9:12])
    if b"transfer-encoding: chunked" not in head:  # an error answer, in one piece
        index = head.find(b"content-length:")
        length = int(head[index + 15 :].split(b"\r\n", 1)[0]) if index >= 0 else 0
        while len(buf) < length:
            await _fill(reader, buf)
        del buf[:length]
        load.errors[status] = load.errors.get(status, 0) + 1
        return
    first: float | None = None
    events = 0
    while True:
        while (line_end := buf.find(b"\r\n")) < 0:
            await _fill(reader, buf)
        size = int(bytes(buf[:line_end]).split(b";", 1)[0], 16)
        need = line_end + 2 + size + 2
        while len(buf) < need:
            await _fill(reader, buf)
        if size == 0:
            del buf[:need]
            break
        events += buf.count(b"data: ", line_end + 2, line_end + 2 + size)
        if first is None:
            first = time.perf_counter()
        del buf[:need]
    done = time.perf_counter()
    if status != 200 or first is None:
        load.errors[status] = load.errors.get(status, 0) + 1
        return
    load.ttft.append(first - start)
    load.total.append(done - start)
    load.events += events


async def _worker(port: int, request: bytes, deadline: float, load: Load) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray()
    try:
        while time.perf_counter() < deadline:
            await _one_stream(reader, writer, request, buf, load)
    finally:
        writer.close()


async def _drive(port: int, request: bytes, streams: int, seconds: float) -> Load:
    load = Load()
    started = time.perf_counter()
    deadline = started + seconds
    await asyncio.gather(*(_worker(port, request, deadline, load) for _ in range(streams)))
    load.seconds = time.perf_counter() - started  # the last answers end after the deadline
    return load


def run_load(port: int, request: bytes, streams: int, seconds: float) -> Load:
    """``streams`` keep-alive connections, each sending one request after another."""
    return asyncio.run(_drive(port, request, streams, seconds))


# --------------------------------------------------------------------------- report


@dataclass
class Mode:
    """Totals of one mode (direct or through) over every round."""

    name: str
    load: Load = field(default_factory=Load)
    rates: list[float] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)  # process -> CPU seconds


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def _machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as stream:
            for line in stream:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    load1, load5, _ = os.getloadavg()
    return (
        f"{platform.machine()}, {os.cpu_count()} cpus, {model}, "
        f"load average {load1:.1f}/{load5:.1f} at start"
    )


def _measure(
    mode: Mode, port: int, request: bytes, watched: Sequence[Backend], args: argparse.Namespace
) -> None:
    before = {b.name: b.cpu_seconds() for b in watched}
    client_before = time.process_time()
    load = run_load(port, request, args.streams, args.duration)
    mode.cpu["client"] = mode.cpu.get("client", 0.0) + time.process_time() - client_before
    for backend in watched:
        used = backend.cpu_seconds() - before[backend.name]
        mode.cpu[backend.name] = mode.cpu.get(backend.name, 0.0) + used
    mode.load.add(load)
    mode.rates.append(load.requests / load.seconds)


def _print_modes(modes: Sequence[Mode], max_tokens: int) -> None:
    print(
        f"{'mode':<8} {'req/s':>8} {'ttft p50':>9} {'ttft p99':>9} {'total p50':>10}"
        f" {'total p99':>10} {'events/req':>10} {'sim cpu ms/req':>14} {'front cpu ms/req':>16}"
        f" {'client cpu ms/req':>17}  errors"
    )
    for mode in modes:
        load = mode.load
        n = max(1, load.requests)
        front = mode.cpu.get("front")
        print(
            f"{mode.name:<8} {statistics.median(mode.rates):>8.1f}"
            f" {_quantile(load.ttft, 0.5) * 1e3:>7.2f}ms {_quantile(load.ttft, 0.99) * 1e3:>7.2f}ms"
            f" {_quantile(load.total, 0.5) * 1e3:>8.2f}ms"
            f" {_quantile(load.total, 0.99) * 1e3:>8.2f}ms"
            f" {load.events / n:>10.1f} {mode.cpu['sim'] / n * 1e3:>14.3f}"
            f" {'-' if front is None else f'{front / n * 1e3:.3f}':>16}"
            f" {mode.cpu['client'] / n * 1e3:>17.3f}  {load.errors or 'none'}"
        )
    direct, through = modes
    d, t = direct.load, through.load
    rate_d, rate_t = statistics.median(direct.rates), statistics.median(through.rates)
    print(
        f"through - direct: req/s {rate_t - rate_d:+.1f} ({(rate_t / rate_d - 1) * 100:+.1f}%),"
        f" ttft p50 {(_quantile(t.ttft, 0.5) - _quantile(d.ttft, 0.5)) * 1e3:+.2f}ms,"
        f" ttft p99 {(_quantile(t.ttft, 0.99) - _quantile(d.ttft, 0.99)) * 1e3:+.2f}ms,"
        f" total p50 {(_quantile(t.total, 0.5) - _quantile(d.total, 0.5)) * 1e3:+.2f}ms"
    )
    front_ms = through.cpu["front"] / max(1, t.requests) * 1e3
    print(
        f"fronting backend: {front_ms:.3f} ms CPU per request of {max_tokens} tokens"
        f" ({front_ms / max_tokens * 1e3:.1f} us per token)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    parser.add_argument("--streams", type=int, default=64, help="concurrent streams (64)")
    parser.add_argument("--duration", type=float, help="seconds per mode per round (10; quick 1)")
    parser.add_argument("--rounds", type=int, help="direct/through rounds (3; quick 1)")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per answer (32)")
    parser.add_argument("--sim-speed", type=float, default=100.0, help="sim speed factor (100)")
    parser.add_argument("--sim-profile", default="cpu-tiny", help="sim profile (cpu-tiny)")
    args = parser.parse_args(argv)
    args.duration = args.duration or (1.0 if args.quick else 10.0)
    args.rounds = args.rounds or (1 if args.quick else 3)
    warmup = 0.3 if args.quick else 2.0

    print(f"python {platform.python_version()} ({platform.python_implementation()}), {_machine()}")
    print(
        f"{args.streams} streams, {args.max_tokens} tokens per answer, sim profile"
        f" {args.sim_profile} x{args.sim_speed:g}, {args.rounds} round(s) of {args.duration:g} s"
        f" per mode"
    )
    capacity = str(max(64, args.streams))
    limits = ["--max-concurrency", capacity, "--max-queue", capacity, "--host", "127.0.0.1"]
    sim = start_backend(
        "sim",
        [
            "--engine", "sim", "--sim-profile", args.sim_profile,
            "--sim-speed", str(args.sim_speed), "--port", "0", "--ops-port", "0", *limits,
        ],
    )  # fmt: skip
    backends = [sim]
    try:
        front = start_backend(
            "front",
            [
                "--engine", "openai", "--engine-url", f"http://127.0.0.1:{sim.port}",
                "--port", "0", "--ops-port", "0", *limits,
            ],
        )  # fmt: skip
        backends.append(front)
        wait_ready(sim)
        wait_ready(front)
        with urllib.request.urlopen(f"http://127.0.0.1:{sim.port}/v1/models") as answer:
            model = json.load(answer)["data"][0]["id"]
        for backend in backends:
            got = completion_tokens(backend.port, model, args.max_tokens)
            if got != args.max_tokens:
                print(f"note: {backend.name} answered {got} tokens, not {args.max_tokens}")
        direct, through = Mode("direct"), Mode("through")
        requests = {
            "direct": build_request(sim.port, model, args.max_tokens),
            "through": build_request(front.port, model, args.max_tokens),
        }
        run_load(sim.port, requests["direct"], args.streams, warmup)
        run_load(front.port, requests["through"], args.streams, warmup)
        for _ in range(args.rounds):
            _measure(direct, sim.port, requests["direct"], [sim], args)
            _measure(through, front.port, requests["through"], [sim, front], args)
        _print_modes([direct, through], args.max_tokens)
    finally:
        for backend in reversed(backends):
            backend.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
