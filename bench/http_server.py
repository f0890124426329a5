"""Benchmark: Inferno's HTTP server and one pooled proxy hop against a plain asyncio + h11 baseline.

Run ``python bench/http_server.py`` (``--quick`` for a smoke run).  Each
server under test runs in its own process; the load generator runs in this
one, so the CPU time read from ``/proc/<pid>/stat`` is the server's alone.
Printed per scenario: requests/s, CPU microseconds per request (or per streamed
chunk), p50/p99 latency, and the ratio ours/baseline.  Numbers are printed,
never asserted; record them in docs/performance.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _baseline import CHUNK, PAYLOAD, serve_baseline, serve_baseline_hop  # noqa: E402
from _loadgen import hold_idle, run_load  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def _raise_fd_limit() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# --------------------------------------------------------------------------- servers


def _serve_ours(port: int, chunks: int, upstream: int | None) -> None:
    import anyio

    from inferno.http.client import HTTPClient
    from inferno.http.server import Request, Response, ServerLimits, serve

    limits = ServerLimits(max_connections=100_000)

    async def echo(request: Request) -> Response:
        await request.read()
        if chunks:

            async def stream() -> object:
                for _ in range(chunks):
                    yield CHUNK

            return Response(200, [("content-type", "text/event-stream")], stream())
        return Response(200, [("content-type", "application/json")], PAYLOAD)

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            if upstream is None:
                info = await tg.start(
                    lambda task_status: serve(
                        echo, port=port, limits=limits, task_status=task_status
                    )
                )
            else:
                client = HTTPClient()
                base = f"http://127.0.0.1:{upstream}"

                async def hop(request: Request) -> Response:
                    body = await request.read()
                    ctx = client.stream(
                        request.method,
                        base + request.target,
                        headers=[("content-type", "application/json")],
                        body=body,
                    )
                    resp = await ctx.__aenter__()

                    async def relay() -> object:
                        try:
                            async for piece in resp.iter_bytes():
                                yield piece
                        finally:
                            await ctx.__aexit__(None, None, None)

                    headers = [
                        (k, v)
                        for k, v in resp.headers.items()
                        if k not in ("content-length", "transfer-encoding", "connection")
                    ]
                    return Response(resp.status, headers, relay())

                info = await tg.start(
                    lambda task_status: serve(
                        hop, port=port, limits=limits, task_status=task_status
                    )
                )
            print(info.port, flush=True)

    anyio.run(main)


def _serve_baseline(port: int, chunks: int, upstream: int | None) -> None:
    async def main() -> None:
        ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        if upstream is None:
            task = asyncio.ensure_future(serve_baseline(port, chunks, ready))
        else:
            task = asyncio.ensure_future(serve_baseline_hop(port, upstream, ready))
        print(await ready, flush=True)
        await task

    asyncio.run(main())


# --------------------------------------------------------------------------- harness


@dataclass
class Proc:
    popen: subprocess.Popen[str]
    port: int

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.popen.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICKS

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.popen.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def stop(self) -> None:
        self.popen.kill()
        self.popen.wait()


def start(kind: str, chunks: int = 0, upstream: int | None = None) -> Proc:
    cmd = [sys.executable, str(Path(__file__)), "--serve", kind, "--chunks", str(chunks)]
    if upstream is not None:
        cmd += ["--upstream", str(upstream)]
    popen = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert popen.stdout is not None
    line = popen.stdout.readline()
    if not line:
        raise SystemExit(f"server {kind} failed to start")
    return Proc(popen, int(line))


@dataclass
class Result:
    name: str
    requests: int
    seconds: float
    cpu_us_per_unit: float
    p50_ms: float
    p99_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


def measure(
    name: str,
    target: Proc,
    measured: Proc,
    connections: int,
    duration: float,
    units_per_request: int = 1,
) -> Result:
    asyncio.run(run_load(target.port, connections, min(1.0, duration / 3)))  # warm-up
    cpu0 = measured.cpu_seconds()
    t0 = time.perf_counter()
    count, latencies = asyncio.run(run_load(target.port, connections, duration))
    elapsed = time.perf_counter() - t0
    cpu = measured.cpu_seconds() - cpu0
    latencies.sort()
    return Result(
        name,
        count,
        elapsed,
        cpu * 1e6 / max(1, count * units_per_request),
        statistics.median(latencies) * 1e3,
        latencies[int(len(latencies) * 0.99)] * 1e3,
    )


def idle_bytes(kind: str, count: int) -> float:
    proc = start(kind)
    try:
        asyncio.run(run_load(proc.port, 4, 0.3))
        before = proc.rss_bytes()

        async def hold() -> float:
            writers = await hold_idle(proc.port, count)
            await asyncio.sleep(0.5)
            after = proc.rss_bytes()
            for w in writers:
                w.close()
            return (after - before) / count

        return asyncio.run(hold())
    finally:
        proc.stop()


def pex_help_ms(runs: int) -> float | None:
    pex = HERE.parent / "dist" / "inferno.pex"
    if not pex.exists():
        return None
    subprocess.run([str(pex), "--help"], capture_output=True, check=True)  # warm the cache
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([str(pex), "--help"], capture_output=True, check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", choices=["ours", "baseline"], help=argparse.SUPPRESS)
    parser.add_argument("--chunks", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--upstream", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per scenario")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--stream-chunks", type=int, default=50)
    parser.add_argument("--idle", type=int, default=1000, help="idle connections for RSS")
    parser.add_argument("--quick", action="store_true", help="short smoke run")
    args = parser.parse_args()
    _raise_fd_limit()
    if args.serve == "ours":
        return _serve_ours(0, args.chunks, args.upstream)
    if args.serve == "baseline":
        return _serve_baseline(0, args.chunks, args.upstream)
    if args.quick:
        args.duration, args.idle = 1.0, 100

    from importlib.metadata import version

    print(
        f"python {platform.python_version()} ({platform.python_implementation()}), "
        f"anyio {version('anyio')}, h11 {version('h11')}, "
        f"event loop asyncio, {platform.machine()}, {os.cpu_count()} cpus, "
        f"{platform.processor() or platform.platform()}"
    )
    print(
        f"{args.connections} keep-alive connections, {args.duration:g}s per scenario; "
        "server/hop in its own process, CPU from /proc\n"
    )
    rows: list[tuple[Result, Result]] = []

    scenarios = (("small JSON", 0), (f"SSE {args.stream_chunks} chunks", args.stream_chunks))
    for label, chunks in scenarios:
        units = max(1, chunks)
        results = []
        for kind in ("baseline", "ours"):
            proc = start(kind, chunks)
            try:
                results.append(
                    measure(
                        f"server {kind}: {label}",
                        proc,
                        proc,
                        args.connections,
                        args.duration,
                        units,
                    )
                )
            finally:
                proc.stop()
        rows.append((results[0], results[1]))
        results = []
        upstream = start("baseline", chunks)
        try:
            for kind in ("baseline", "ours"):
                hop = start(kind, 0, upstream.port)
                try:
                    results.append(
                        measure(
                            f"hop {kind}: {label}", hop, hop, args.connections, args.duration, units
                        )
                    )
                finally:
                    hop.stop()
        finally:
            upstream.stop()
        rows.append((results[0], results[1]))

    print(f"{'scenario':<40} {'req/s':>9} {'CPU µs/unit':>12} {'p50 ms':>8} {'p99 ms':>8}")
    for base, ours in rows:
        for r in (base, ours):
            print(
                f"{r.name:<40} {r.rps:>9.0f} {r.cpu_us_per_unit:>12.1f} "
                f"{r.p50_ms:>8.2f} {r.p99_ms:>8.2f}"
            )
        print(
            f"{'  ratio ours/baseline (CPU per unit)':<40} "
            f"{ours.cpu_us_per_unit / base.cpu_us_per_unit:>22.2f}"
        )
    print()
    for kind in ("baseline", "ours"):
        print(
            f"idle keep-alive connection, {kind}: "
            f"{idle_bytes(kind, args.idle) / 1024:.1f} KiB RSS each ({args.idle} connections)"
        )
    help_ms = pex_help_ms(3 if args.quick else 10)
    if help_ms is None:
        print("dist/inferno.pex not built: skipped the --help start-up timing")
    else:
        print(f"dist/inferno.pex --help, warm: {help_ms:.0f} ms (median)")
    print(f"payload {len(PAYLOAD)} bytes, chunk {len(CHUNK)} bytes")


if __name__ == "__main__":
    main()
