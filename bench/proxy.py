"""Benchmark: what the proxy adds between clients and nodes, against direct-to-backend in one run.

Run by hand (not a test): ``.venv/bin/python bench/proxy.py [--quick]``.
Every node and proxy is a real process (``python -m inferno ...``, see
``bench/_procs.py``); the load generators run in this process on raw
asyncio sockets, so the CPU read from ``/proc`` for a proxy or a node is
that process's alone.  Scenarios:

1. **small JSON**, ``--connections`` keep-alive connections (64): requests/s,
   p50/p99 latency direct and through the proxy, the added latency, and the
   proxy's CPU per request.  The upstream is the bare asyncio + h11 server of
   ``bench/_baseline.py`` as a static backend (``--backends``, ``tcp``
   checker: it has no ``/health``), so the upstream's own cost is as small
   as it gets and the difference is the proxy's.  For scale, the same load
   through ``bench/http_server.py``'s bare hop on ``inferno.http`` (server
   and pooled client, no proxy logic).  Load generator: ``bench/_loadgen.py``.
2. **SSE streams**, one stream at a time (the path's own latency), then
   ``--streams`` concurrent streams (200) of ``--stream-tokens`` tokens (32)
   from a ``sim`` backend (profile ``h100-llama3-8b``, so 256 sequences
   batch together as on a GPU) that registered with the proxy: time to first
   token and the gap between two tokens, p50/p99, direct and through.
   Tokens that arrive in one socket read count as a gap of 0.  The sim runs
   at ``--sse-speed`` 0.25 (a token every ~50 ms per stream at 200 streams):
   faster, and a 2-CPU machine spends the run queueing for CPU.
3. **idle connections**: the proxy's RSS growth per idle keep-alive client
   connection, ``--idle`` (1,000) of them, each after one request.
4. **workers**: requests/s as in 1, with ``--workers 1`` against
   ``--workers N`` (N: the machine's cores), when this build has workers.
5. **failover**: three sim backends registered with a proxy, constant load
   (non-streaming requests, plus a few streams), one backend SIGKILLed: the
   client requests that failed, and, from the proxy's ``/backends`` and
   ``/telemetry`` polled every ``--poll-ms``, how long until the node left
   rotation and when the proxy last tried it (its failed upstream attempts:
   the only node that can fail here is the dead one); then what the proxy
   logged about that node after the kill, and any errors it logged.

Everything shares the machine's CPUs, the load generator too: on a small
machine the latencies include CPU contention, and the CPU-per-request
figures are the steadiest.  Numbers are printed, never asserted; record them
in docs/performance.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Final

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _loadgen import hold_idle, run_load
from _procs import (
    PlainProcess,
    RoleProcess,
    descendants,
    get_json,
    get_text,
    machine_line,
    raise_fd_limit,
    spawn,
    start_bench_server,
    wait_for,
)

#: The sim profile of scenarios 2 and 5: batches of up to 256 sequences (vLLM's
#: default on an H100), so 200 streams decode together instead of queueing.
SIM_PROFILE: Final = "h100-llama3-8b"
PROMPT: Final = "Tell me how a fleet of inference nodes heals itself."
#: Connections of non-streaming / streaming requests during the failover run.
FAILOVER_REQUEST_CONNECTIONS: Final = 48
FAILOVER_STREAM_CONNECTIONS: Final = 8
FAILOVER_REQUEST_TOKENS: Final = 16
FAILOVER_STREAM_TOKENS: Final = 64
#: A gap between two failed attempts longer than this ends the burst after a kill
#: (what comes later is a circuit breaker's probe, not routing that had not noticed).
BURST_GAP: Final = 0.5
FAILURE_RE: Final = re.compile(
    r'^inferno_proxy_upstream_failures_total\{[^}]*reason="([^"]+)"[^}]*\} (\S+)$', re.M
)
RETRIES_RE: Final = re.compile(r"^inferno_proxy_retries_total\{[^}]*\} (\S+)$", re.M)


def quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


# --------------------------------------------------------------------------- processes


def proxy_args(workers: int | None, *extra: str) -> list[str]:
    args = ["--port", "0", "--ops-port", "0", *extra]
    return [*args, "--workers", str(workers)] if workers is not None else args


def backend_args(ops_port: int, speed: float, capacity: int) -> list[str]:
    return [
        "--engine", "sim", "--sim-profile", SIM_PROFILE, "--sim-speed", f"{speed:g}",
        "--port", "0", "--ops-port", "0", "--discovery-lb", f"127.0.0.1:{ops_port}",
        "--max-concurrency", str(capacity), "--max-queue", str(2 * capacity),
    ]  # fmt: skip


def wait_in_rotation(proxy: RoleProcess, count: int) -> list[dict[str, Any]]:
    """Poll the proxy's ``/backends`` until ``count`` nodes are in rotation."""
    url = f"http://127.0.0.1:{proxy.ops_port}/backends"
    wait_for(
        lambda: sum(b["healthy"] for b in get_json(url)["backends"]) >= count,
        f"{count} node(s) in rotation at the proxy",
    )
    backends: list[dict[str, Any]] = get_json(url)["backends"]
    return backends


def supports_workers() -> bool:
    """Whether this build's proxy has ``--workers`` (another change adds it)."""
    found = subprocess.run(
        [sys.executable, "-m", "inferno", "proxy", "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    return "--workers" in found.stdout


# --------------------------------------------------------------------------- small JSON


@dataclass
class Sample:
    """Requests of one mode over every round, and the CPU of the watched processes."""

    requests: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def cpu_us(self, name: str) -> float:
        return self.cpu.get(name, 0.0) * 1e6 / max(1, self.requests)


def measure_json(
    sample: Sample,
    port: int,
    connections: int,
    seconds: float,
    watched: dict[str, Callable[[], float]],
) -> None:
    before = {name: read() for name, read in watched.items()}
    started = time.perf_counter()
    count, latencies = asyncio.run(run_load(port, connections, seconds))
    sample.seconds += time.perf_counter() - started
    sample.requests += count
    sample.latencies += latencies
    for name, read in watched.items():
        sample.cpu[name] = sample.cpu.get(name, 0.0) + read() - before[name]


def print_json_rows(rows: Sequence[tuple[str, Sample, str]]) -> None:
    print(f"  {'mode':<22} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'CPU µs/req':>11}  (of)")
    for name, s, cpu_of in rows:
        print(
            f"  {name:<22} {s.rate:>8.0f} {ms(quantile(s.latencies, 0.5)):>8}"
            f" {ms(quantile(s.latencies, 0.99)):>8} {s.cpu_us(cpu_of):>11.1f}  ({cpu_of})"
        )


def small_json(args: argparse.Namespace, upstream: PlainProcess, proxy: RoleProcess) -> None:
    print(
        f"\n1. small JSON, {args.connections} keep-alive connections, {args.rounds} round(s) of"
        f" {args.duration:g}s per mode; upstream: the bare h11 server (bench/_baseline.py),"
        " a static backend with the tcp checker; 'HTTP hop': bench/http_server.py's hop on"
        " inferno.http with no proxy logic, for scale"
    )
    hop = start_bench_server("ours", upstream.port)
    try:
        for port in (upstream.port, proxy.port, hop.port):
            asyncio.run(run_load(port, args.connections, args.warmup))
        direct, through, bare = Sample(), Sample(), Sample()
        for _ in range(args.rounds):
            for sample, port, watched in (
                (direct, upstream.port, {"upstream": upstream.cpu_seconds}),
                (through, proxy.port, {"proxy": proxy.cpu_seconds}),
                (bare, hop.port, {"hop": hop.cpu_seconds}),
            ):
                measure_json(sample, port, args.connections, args.duration, watched)
    finally:
        hop.stop()
    print_json_rows(
        [
            ("direct", direct, "upstream"),
            ("through the proxy", through, "proxy"),
            ("through the HTTP hop", bare, "hop"),
        ]
    )
    p50 = quantile(through.latencies, 0.5) - quantile(direct.latencies, 0.5)
    p99 = quantile(through.latencies, 0.99) - quantile(direct.latencies, 0.99)
    print(
        f"  added by the proxy: p50 {p50 * 1e3:+.2f} ms, p99 {p99 * 1e3:+.2f} ms;"
        f" req/s {(through.rate / direct.rate - 1) * 100:+.0f}%;"
        f" proxy CPU {through.cpu_us('proxy'):.0f} µs per request,"
        f" {through.cpu_us('proxy') / bare.cpu_us('hop'):.2f}x the bare HTTP hop's"
    )


# --------------------------------------------------------------------------- idle connections


def idle_rss(args: argparse.Namespace, proxy: RoleProcess) -> None:
    print(f"\n3. idle keep-alive client connections on the proxy: {args.idle}, one request each")

    async def hold() -> tuple[int, int, float]:
        before = proxy.rss_bytes()
        started = time.perf_counter()
        # hold_idle opens its connections one after another: ten of them at once.
        share = [args.idle // 10 + (i < args.idle % 10) for i in range(10)]
        groups = await asyncio.gather(*(hold_idle(proxy.port, n) for n in share if n))
        writers = [writer for group in groups for writer in group]
        opened = time.perf_counter() - started
        await asyncio.sleep(0.5)  # let the proxy settle (its reads, its GC)
        after = proxy.rss_bytes()
        for writer in writers:
            writer.close()
        return before, after, opened

    before, after, opened = asyncio.run(hold())
    print(
        f"  proxy RSS {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB:"
        f" {(after - before) / args.idle / 1024:.1f} KiB per idle connection"
        f" (opened in {opened:.1f}s)"
    )


# --------------------------------------------------------------------------- workers


def workers(
    args: argparse.Namespace, upstream: PlainProcess, one: RoleProcess, available: bool
) -> None:
    count = args.workers or os.cpu_count() or 1
    print(f"\n4. requests/s with --workers 1 vs --workers {count}, small JSON as in 1")
    if not available:
        print("  workers > 1 not available in this build")
        return
    if count < 2:
        print("  one core: nothing to compare (pass --workers N to force)")
        return
    many = spawn("proxy", proxy_args(count, "--backends", f"127.0.0.1:{upstream.port}",
                 "--static-health-checker", "tcp"), name=f"proxy-workers-{count}")  # fmt: skip
    try:
        try:
            many.wait_listening()
        except SystemExit as exc:
            print(f"  workers > 1 not available in this build: {str(exc).splitlines()[0]}")
            return
        wait_in_rotation(many, 1)
        print(f"  processes of the {count}-worker proxy: 1 + {len(descendants(many.pid))}")
        for port in (one.port, many.port):
            asyncio.run(run_load(port, args.connections, args.warmup))
        single, multi = Sample(), Sample()
        for _ in range(args.rounds):
            measure_json(
                single, one.port, args.connections, args.duration, {"proxy": one.tree_cpu_seconds}
            )
            measure_json(
                multi, many.port, args.connections, args.duration, {"proxy": many.tree_cpu_seconds}
            )
        print_json_rows([("--workers 1", single, "proxy"), (f"--workers {count}", multi, "proxy")])
        print(
            f"  {count} workers / 1 worker: {multi.rate / single.rate:.2f}x requests/s"
            f" (the load generator and the upstream share the same {os.cpu_count()} CPUs)"
        )
    finally:
        many.stop()


# --------------------------------------------------------------------------- HTTP exchanges


@dataclass
class Answer:
    status: int
    sent: float
    done: float
    tokens: list[float]  # arrival time of each token event
    close: bool


async def _fill(reader: asyncio.StreamReader, buf: bytearray) -> float:
    data = await reader.read(65536)
    if not data:
        raise ConnectionError("closed by the server")
    buf += data
    return time.perf_counter()


async def exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes, buf: bytearray
) -> Answer:
    """Send one request and read its whole answer: content-length, or chunked SSE events."""
    sent = arrived = time.perf_counter()
    writer.write(request)
    while (end := buf.find(b"\r\n\r\n")) < 0:
        arrived = await _fill(reader, buf)
    head = bytes(buf[:end]).lower()
    del buf[: end + 4]
    status = int(head[9:12])
    close = b"connection: close" in head
    tokens: list[float] = []
    if b"transfer-encoding: chunked" not in head:
        index = head.find(b"content-length:")
        length = int(head[index + 15 :].split(b"\r\n", 1)[0]) if index >= 0 else 0
        while len(buf) < length:
            await _fill(reader, buf)
        del buf[:length]
        return Answer(status, sent, time.perf_counter(), tokens, close)
    while True:  # every complete chunk in buf arrived with the latest read
        while (line_end := buf.find(b"\r\n")) < 0:
            arrived = await _fill(reader, buf)
        size = int(bytes(buf[:line_end]).split(b";", 1)[0], 16)
        need = line_end + 2 + size + 2
        while len(buf) < need:
            arrived = await _fill(reader, buf)
        if size == 0:
            del buf[:need]
            return Answer(status, sent, time.perf_counter(), tokens, close)
        payload = bytes(buf[line_end + 2 : line_end + 2 + size])
        tokens += [arrived] * (payload.count(b"data: ") - payload.count(b"data: [DONE]"))
        del buf[:need]


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return reader, writer


def completion_request(port: int, model: str, tokens: int, stream: bool) -> bytes:
    body = json.dumps(
        {"model": model, "prompt": PROMPT, "max_tokens": tokens, "stream": stream,
         "ignore_eos": True},  # every answer has exactly max_tokens tokens
        separators=(",", ":"),
    ).encode()  # fmt: skip
    head = (
        f"POST /v1/completions HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


# --------------------------------------------------------------------------- SSE streams


@dataclass
class Streams:
    seconds: float = 0.0
    completed: int = 0
    tokens: int = 0
    ttft: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)


async def _stream_worker(port: int, request: bytes, deadline: float, out: Streams) -> None:
    reader, writer = await connect(port)
    buf = bytearray()
    try:
        while time.perf_counter() < deadline:
            answer = await exchange(reader, writer, request, buf)
            if answer.status != 200 or not answer.tokens:
                out.errors[str(answer.status)] = out.errors.get(str(answer.status), 0) + 1
                continue
            out.completed += 1
            out.tokens += len(answer.tokens)
            out.ttft.append(answer.tokens[0] - answer.sent)
            out.gaps += [b - a for a, b in zip(answer.tokens, answer.tokens[1:], strict=False)]
    finally:
        writer.close()


async def _drive_streams(
    port: int, request: bytes, streams: int, seconds: float, ramp: float, out: Streams
) -> None:
    """``streams`` connections, each streaming one answer after another for ``seconds``.

    The connections start spread over ``ramp`` seconds: 200 prompts arriving
    in the same millisecond would batch into one long prefill step and the
    first tokens would measure that, not the path.
    """

    async def one(delay: float, deadline: float) -> None:
        await asyncio.sleep(delay)
        await _stream_worker(port, request, deadline, out)

    started = time.perf_counter()
    deadline = started + max(seconds, ramp)
    await asyncio.gather(*(one(i * ramp / streams, deadline) for i in range(streams)))
    out.seconds += time.perf_counter() - started


def measure_streams(
    out: Streams,
    port: int,
    request: bytes,
    streams: int,
    args: argparse.Namespace,
    watched: dict[str, Callable[[], float]],
) -> None:
    before = {name: read() for name, read in watched.items()}
    ramp = args.ramp if streams > 1 else 0.0
    asyncio.run(_drive_streams(port, request, streams, args.duration, ramp, out))
    for name, read in watched.items():
        out.cpu[name] = out.cpu.get(name, 0.0) + read() - before[name]


def sse_streams(args: argparse.Namespace, workers_flag: int | None) -> None:
    print(
        f"\n2. SSE: 1, then {args.streams} concurrent streams of {args.stream_tokens} tokens, sim"
        " profile"
        f" {SIM_PROFILE} x{args.sse_speed:g}, registered with the proxy (vitals checker),"
        f" streams starting over {args.ramp:g}s;"
        f" {args.rounds} round(s) of {args.duration:g}s per mode"
    )
    proxy = spawn("proxy", proxy_args(workers_flag)).wait_listening()
    backend = None
    try:
        backend = spawn("backend", backend_args(proxy.ops_port, args.sse_speed, 256), "sim")
        backend.wait_listening()
        wait_in_rotation(proxy, 1)
        model = get_json(f"http://127.0.0.1:{backend.port}/v1/models")["data"][0]["id"]
        requests = {
            port: completion_request(port, model, args.stream_tokens, stream=True)
            for port in (backend.port, proxy.port)
        }
        for port, request in requests.items():
            asyncio.run(
                _drive_streams(port, request, args.streams, args.warmup, args.ramp, Streams())
            )
        print(
            f"  {'mode':<26} {'streams/s':>9} {'ttft p50':>9} {'ttft p99':>9} {'gap p50':>8}"
            f" {'gap p99':>8} {'tok/stream':>10} {'sim CPU µs/tok':>14} {'proxy CPU µs/tok':>16}"
            "  errors"
        )
        # The uncontended figures first: one stream at a time shows the path's own latency.
        for streams in (1, args.streams):
            direct, through = Streams(), Streams()
            sim, front = {"sim": backend.cpu_seconds}, {"proxy": proxy.cpu_seconds}
            for _ in range(args.rounds):
                measure_streams(direct, backend.port, requests[backend.port], streams, args, sim)
                measure_streams(
                    through, proxy.port, requests[proxy.port], streams, args, sim | front
                )
            print_streams(f"{streams} stream(s)", direct, through, cpu=streams > 1)
    finally:
        if backend is not None:
            backend.stop()
        proxy.stop()


def print_streams(label: str, direct: Streams, through: Streams, cpu: bool) -> None:
    """Rows of a direct/through pair; CPU per token only when ``cpu`` (at one stream,
    the processes' fixed background work would dominate it)."""
    for name, s in ((f"{label}, direct", direct), (f"{label}, through", through)):
        per_token = 1e6 / max(1, s.tokens)
        sim_cpu = f"{s.cpu['sim'] * per_token:.1f}" if cpu else "-"
        proxy_cpu = f"{s.cpu['proxy'] * per_token:.1f}" if cpu and "proxy" in s.cpu else "-"
        print(
            f"  {name:<26} {s.completed / s.seconds:>9.1f} {ms(quantile(s.ttft, 0.5)):>7}ms"
            f" {ms(quantile(s.ttft, 0.99)):>7}ms {ms(quantile(s.gaps, 0.5)):>6}ms"
            f" {ms(quantile(s.gaps, 0.99)):>6}ms {s.tokens / max(1, s.completed):>10.1f}"
            f" {sim_cpu:>14} {proxy_cpu:>16}  {s.errors or 'none'}"
        )

    def added(values: Callable[[Streams], list[float]], q: float) -> str:
        return f"{(quantile(values(through), q) - quantile(values(direct), q)) * 1e3:+.2f} ms"

    print(
        f"  {label}, added by the proxy: ttft p50 {added(lambda s: s.ttft, 0.5)},"
        f" p99 {added(lambda s: s.ttft, 0.99)}; inter-token gap p50"
        f" {added(lambda s: s.gaps, 0.5)}, p99 {added(lambda s: s.gaps, 0.99)}"
    )


# --------------------------------------------------------------------------- failover


@dataclass
class Look:
    """One poll of the proxy: the killed node's entry and the failure counters."""

    at: float
    node: dict[str, Any] | None
    failures: dict[str, float]
    retries: float


@dataclass
class Traffic:
    ok: int = 0
    ok_after_kill: int = 0
    errors: list[tuple[float, str]] = field(default_factory=list)


async def _traffic_worker(
    port: int, request: bytes, deadline: float, out: Traffic, killed_at: list[float]
) -> None:
    reader, writer = await connect(port)
    buf = bytearray()
    try:
        while time.perf_counter() < deadline:
            try:
                answer = await exchange(reader, writer, request, buf)
            except (ConnectionError, OSError) as exc:
                out.errors.append((time.perf_counter(), f"connection: {exc}"))
                writer.close()
                reader, writer = await connect(port)
                buf.clear()
                continue
            if answer.status == 200:
                out.ok += 1
                out.ok_after_kill += bool(killed_at) and answer.sent > killed_at[0]
            else:
                out.errors.append((answer.done, f"status {answer.status}"))
            if answer.close:
                writer.close()
                reader, writer = await connect(port)
                buf.clear()
    finally:
        writer.close()


def _look(ops_port: int, address: str) -> Look:
    base = f"http://127.0.0.1:{ops_port}"
    backends = get_json(f"{base}/backends")["backends"]
    at = time.perf_counter()  # the state is at most this recent
    telemetry = get_text(f"{base}/telemetry")
    node = next((b for b in backends if b["address"] == address), None)
    failures: dict[str, float] = {}
    for reason, value in FAILURE_RE.findall(telemetry):
        failures[reason] = failures.get(reason, 0.0) + float(value)
    retries = sum(float(v) for v in RETRIES_RE.findall(telemetry))
    return Look(at, node, failures, retries)


async def _watch(ops_port: int, address: str, poll: float, until: float, looks: list[Look]) -> None:
    while time.perf_counter() < until:
        looks.append(await asyncio.to_thread(_look, ops_port, address))
        await asyncio.sleep(poll)


async def _failover_run(
    args: argparse.Namespace, proxy: RoleProcess, model: str, victim: RoleProcess
) -> tuple[Traffic, Traffic, list[Look], float, float]:
    """Load through ``proxy``, ``victim`` SIGKILLed midway: what clients and the proxy saw.

    :returns: the two kinds of traffic, the looks at the proxy, and when the
        kill happened (``perf_counter`` and epoch seconds).
    """
    requests, streams, looks = Traffic(), Traffic(), list[Look]()
    killed_at: list[float] = []
    killed_wall: list[float] = []
    started = time.perf_counter()
    end = started + args.failover_before + args.failover_after
    plain = completion_request(proxy.port, model, FAILOVER_REQUEST_TOKENS, stream=False)
    stream = completion_request(proxy.port, model, FAILOVER_STREAM_TOKENS, stream=True)

    async def kill() -> None:
        await asyncio.sleep(args.failover_before)
        killed_at.append(time.perf_counter())
        killed_wall.append(time.time())
        os.kill(victim.pid, signal.SIGKILL)

    await asyncio.gather(
        kill(),
        _watch(proxy.ops_port, f"127.0.0.1:{victim.port}", args.poll_ms / 1e3, end, looks),
        *(_traffic_worker(proxy.port, plain, end, requests, killed_at)
          for _ in range(FAILOVER_REQUEST_CONNECTIONS)),
        *(_traffic_worker(proxy.port, stream, end, streams, killed_at)
          for _ in range(FAILOVER_STREAM_CONNECTIONS)),
    )  # fmt: skip
    return requests, streams, looks, killed_at[0], killed_wall[0]


def failover(args: argparse.Namespace, workers_flag: int | None) -> None:
    print(
        f"\n5. failover: 3 sim backends ({SIM_PROFILE} x{args.sim_speed:g}) registered with the"
        f" proxy (defaults but --slow-start 0), {FAILOVER_REQUEST_CONNECTIONS} connections of"
        f" non-streaming requests ({FAILOVER_REQUEST_TOKENS} tokens) and"
        f" {FAILOVER_STREAM_CONNECTIONS} of streams ({FAILOVER_STREAM_TOKENS} tokens);"
        f" SIGKILL one after {args.failover_before:g}s, watch {args.failover_after:g}s more,"
        f" polling the proxy every {args.poll_ms:g} ms"
    )
    proxy = spawn("proxy", proxy_args(workers_flag, "--slow-start", "0")).wait_listening()
    nodes: list[RoleProcess] = []
    try:
        nodes = [
            spawn("backend", backend_args(proxy.ops_port, args.sim_speed, 64), f"sim-{i}")
            for i in range(3)
        ]
        for node in nodes:
            node.wait_listening()
        wait_in_rotation(proxy, 3)
        model = get_json(f"http://127.0.0.1:{nodes[0].port}/v1/models")["data"][0]["id"]
        victim = nodes[1]
        requests, streams, looks, killed, wall = asyncio.run(
            _failover_run(args, proxy, model, victim)
        )
        victim.kill()
        report_failover(requests, streams, looks, killed, args)
        print_log_after(proxy, wall, f"127.0.0.1:{victim.port}")
    finally:
        for node in nodes:
            node.stop()
        proxy.stop()


def report_failover(
    requests: Traffic, streams: Traffic, looks: list[Look], killed: float, args: argparse.Namespace
) -> None:
    after = args.failover_after
    for name, traffic in (("non-streaming requests", requests), ("streams", streams)):
        kinds: dict[str, int] = {}
        for _at, kind in traffic.errors:
            kinds[kind] = kinds.get(kind, 0) + 1
        when = ", ".join(f"{(at - killed) * 1e3:+.0f}ms" for at, _ in traffic.errors[:8])
        print(
            f"  {name}: {traffic.ok} answered 200 ({traffic.ok_after_kill / after:.0f}/s after"
            f" the kill); client-visible errors: {len(traffic.errors)}"
            + (f" {kinds} at {when}" if traffic.errors else "")
        )
    before = [look for look in looks if look.at <= killed]
    later = [look for look in looks if look.at > killed]
    if not before or not later:
        print("  the proxy was not polled on both sides of the kill")
        return
    base, final = before[-1], later[-1]
    print(
        f"  {len(looks)} looks at the proxy, {(final.at - base.at) / len(later) * 1e3:.0f} ms"
        " apart on average after the kill (times below: when a look's answer came)"
    )
    seen_in = "before the kill"
    for look in later:
        if look.node is not None and look.node["healthy"]:
            seen_in = f"at +{(look.at - killed) * 1e3:.0f} ms"
            continue
        reasons = [r["reason"] for r in look.node["out"]] if look.node else ["removed from pool"]
        print(
            f"  killed node out of rotation by +{(look.at - killed) * 1e3:.0f} ms"
            f" (last look showing it in: {seen_in}): {', '.join(reasons)}"
        )
        break
    else:
        print(f"  the killed node was still in rotation {after:g}s after the kill")
    failed = {
        reason: int(final.failures[reason] - base.failures.get(reason, 0.0))
        for reason in final.failures
        if final.failures[reason] > base.failures.get(reason, 0.0)
    }
    print(
        f"  failed upstream attempts since the kill (all at the killed node): "
        f"{sum(failed.values())} {failed or ''}, retried on another node:"
        f" {final.retries - base.retries:.0f}"
    )
    steps: list[tuple[float, float, float]] = []  # (previous look, this look, new failures)
    previous, previous_at = sum(base.failures.values()), 0.0
    for look in later:
        total = sum(look.failures.values())
        if total > previous:
            steps.append((previous_at, look.at - killed, total - previous))
        previous, previous_at = total, look.at - killed
    if not steps:
        return
    last = 0
    while last + 1 < len(steps) and steps[last + 1][1] - steps[last][1] <= BURST_GAP:
        last += 1
    probes = ", ".join(f"+{at:.1f}s x{n:.0f}" for _, at, n in steps[last + 1 :]) or "none"
    print(
        f"  last failed attempt of the first burst: between +{steps[last][0] * 1e3:.0f} and"
        f" +{steps[last][1] * 1e3:.0f} ms; later attempts (probes): {probes}"
    )


def print_log_after(proc: RoleProcess, wall: float, needle: str) -> None:
    """What ``proc`` logged after ``wall`` (epoch seconds): lines naming ``needle``, errors.

    Errors are counted, with the first one's message and the last line of its
    traceback (an error logged by the proxy is a bug or an operator's problem).
    """
    errors: list[dict[str, Any]] = []
    for line in list(proc.log):
        try:
            record = json.loads(line)
            stamp = datetime.fromisoformat(record["ts"].replace("Z", "+00:00")).timestamp()
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
        if stamp < wall - 0.001:
            continue
        if record.get("level") in ("error", "critical"):
            errors.append(record)
        elif needle in line:
            print(f"    proxy log +{(stamp - wall) * 1e3:.0f}ms: {record.get('message')}")
    if errors:
        first = errors[0]
        cause = str(first.get("exc", "")).strip().splitlines()[-1:] or [""]
        print(
            f"    proxy logged {len(errors)} error(s) after the kill; the first:"
            f" {first.get('message')}: {cause[0]}"
        )


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run (~30 s)")
    parser.add_argument("--duration", type=float, help="seconds per mode per round (5; quick 1)")
    parser.add_argument("--rounds", type=int, help="direct/through rounds (2; quick 1)")
    parser.add_argument("--connections", type=int, default=64, help="scenario 1 (64)")
    parser.add_argument("--streams", type=int, default=200, help="scenario 2 (200)")
    parser.add_argument("--stream-tokens", type=int, default=32, help="scenario 2 (32)")
    parser.add_argument(
        "--sse-speed", type=float, default=0.25, help="sim speed factor of scenario 2 (0.25)"
    )
    parser.add_argument(
        "--sim-speed", type=float, default=1.0, help="sim speed factor of scenario 5 (1)"
    )
    parser.add_argument("--idle", type=int, default=1000, help="scenario 3 (1000)")
    parser.add_argument("--workers", type=int, default=0, help="scenario 4 (0: one per core)")
    parser.add_argument("--failover-before", type=float, help="load before the kill (3; quick 1)")
    parser.add_argument("--failover-after", type=float, help="load after the kill (10; quick 2)")
    parser.add_argument("--poll-ms", type=float, default=25.0, help="proxy polls in scenario 5")
    parser.add_argument("--only", type=int, action="append", help="run only scenario N (repeat)")
    args = parser.parse_args(argv)
    args.duration = args.duration or (1.0 if args.quick else 5.0)
    args.rounds = args.rounds or (1 if args.quick else 2)
    args.warmup = 0.3 if args.quick else 1.0
    args.ramp = 0.5 if args.quick else 1.0  # scenario 2: streams start spread over this
    args.failover_before = args.failover_before or (1.0 if args.quick else 3.0)
    args.failover_after = args.failover_after or (2.0 if args.quick else 10.0)
    only = set(args.only or range(1, 6))
    limit = raise_fd_limit()  # the children inherit it: 1,000 idle clients need fds

    print(machine_line())
    has_workers = supports_workers()
    print(
        f"open files limit {limit}; proxy --workers: "
        f"{'available' if has_workers else 'not in this build'}; event loop asyncio"
        " everywhere (uvloop not installed); load generators in this process"
    )
    # The 1-worker proxy is the comparison point, named explicitly where the flag exists.
    workers_flag = 1 if has_workers else None
    started = time.perf_counter()
    upstream = start_bench_server("baseline")  # scenarios 1, 3 and 4; idle during 2
    proxy = spawn("proxy", proxy_args(workers_flag, "--backends", f"127.0.0.1:{upstream.port}",
                  "--static-health-checker", "tcp"))  # fmt: skip
    try:
        proxy.wait_listening()
        wait_in_rotation(proxy, 1)
        if 1 in only:
            small_json(args, upstream, proxy)
        if 2 in only:
            sse_streams(args, workers_flag)
        if 3 in only:
            idle_rss(args, proxy)
        if 4 in only:
            workers(args, upstream, proxy, has_workers)
    finally:
        proxy.stop()
        upstream.stop()
    if 5 in only:
        failover(args, workers_flag)
    print(f"\ntotal {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
