"""The ``up`` role: a proxy and N sim backends as child processes, started in order.

Start (``inferno up``)::

    check the settings (loopback only, port ranges) -> start the proxy, wait until it
    logs where it listens -> start N backends with --discovery-lb at the proxy's
    operations port, wait until each listens -> poll the proxy's GET /backends until
    all N are registered and healthy -> print the OpenAI base URL and examples

All of it within ``startup_timeout``.  When a child exits first or the time
runs out, ``up`` logs which child failed and its last lines, stops every
child and exits 1.

Run: children's logs go to ``up``'s stderr, prefixed with their names.  A
child that exits by itself is logged (its status and last lines); nothing is
restarted: that is the governator's job, in a later version.

Stop (``ctx.stopping``: Ctrl-C or SIGTERM)::

    SIGTERM to every backend (each deregisters, drains, frees its ports) -> wait
    -> SIGTERM to the proxy -> wait -> SIGKILL to any child still running -> exit 0

The children's own ``runtime.shutdown_timeout`` is set below ``up``'s, so
each of them stops by itself before ``up`` would kill it, and ``up`` is done
before the core would cancel it (see :func:`stop_budget`).  How the children
are started, and why a SIGKILLed ``up`` leaves no orphans, is in
:mod:`inferno_up.children`.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, TextIO

import anyio

from inferno.errors import InfernoError
from inferno.http import ClientError, HTTPClient, Timeouts
from inferno.lifecycle import RoleContext
from inferno.logs import LEVELS, JSONFormatter
from inferno_up.children import Child, ChildFailed, Children, self_command, supervise
from inferno_up.settings import UpSettings, check_settings

__all__ = ["Cluster", "StopBudget", "banner", "run", "stop_budget"]

logger = logging.getLogger("inferno_up")

#: Seconds between two looks at the proxy's pool while waiting for registrations.
POLL_INTERVAL: Final = 0.2
#: Deadlines of one look at the pool: the proxy is on this machine.
POLL_TIMEOUTS: Final = Timeouts(connect=2.0, read=5.0, write=5.0, pool=2.0, total=5.0)
#: What the printed examples ask.
EXAMPLE_PROMPT: Final = "Hello!"


@dataclass(frozen=True, slots=True)
class StopBudget:
    """How the stop deadline of ``up`` (``runtime.shutdown_timeout``) is shared out.

    :ivar child_shutdown: each child's own ``runtime.shutdown_timeout``.
    :ivar drain: each backend's ``drain_timeout`` (fits its shutdown timeout,
        less the 3 s a backend keeps to close its ports).
    :ivar term_grace: how long ``up`` waits after SIGTERM before SIGKILL.
    :ivar kill_grace: how long it then waits for the kernel to reap them.
    """

    child_shutdown: float
    drain: float
    term_grace: float
    kill_grace: float


def stop_budget(shutdown_timeout: float) -> StopBudget:
    """Share ``up``'s stop deadline: the children stop by themselves first, then ``up``.

    With the default 30 s: children 24 s (backends drain 21 s), SIGKILL after 27 s,
    reaped by 28.8 s.  Short timeouts are shared in the same order, by fractions.
    """
    total = max(0.0, shutdown_timeout)
    child = total - 6.0 if total >= 15.0 else total * 0.6
    term = total - 3.0 if total >= 15.0 else total * 0.8
    backend_stop_reserve = 3.0  # inferno_backend.role.STOP_RESERVE
    return StopBudget(
        child_shutdown=child,
        drain=max(0.0, child - backend_stop_reserve),
        term_grace=term,
        kill_grace=(total - term) * 0.6,
    )


@dataclass(frozen=True, slots=True)
class Cluster:
    """What ``up`` started, once every backend has registered."""

    proxy: Child
    backends: tuple[Child, ...]
    model: str
    host: str

    @property
    def base_url(self) -> str:
        """The OpenAI base URL clients use."""
        return f"http://{self.proxy.address}/v1"


async def run(ctx: RoleContext) -> None:
    """``inferno up``: start the cluster, print how to use it, stop it on a signal.

    :raises ConfigError: naming every bad setting (the CLI exits 2).
    :raises InfernoError: when a child fails to start (the CLI exits 1).
    """
    settings = UpSettings.from_section(ctx.config.section("up"))
    check_settings(settings, ctx.config.source)
    budget = stop_budget(ctx.shutdown_timeout)
    level, log_format = _log_options()
    common = [
        f"--log-level={level}",
        f"--log-format={log_format}",
        f"--runtime-shutdown-timeout={budget.child_shutdown:g}s",
    ]
    async with supervise(
        self_command(),
        log_format=log_format,
        stop_grace=budget.term_grace,
        name_width=len(f"backend-{settings.backends}"),
    ) as children:
        cluster = await _start_or_explain(settings, children, common, budget, ctx.stopping)
        if cluster is None:
            return  # stopped while starting
        children.report_exits = True
        _print(banner(cluster))
        logger.info("cluster up: %s", cluster.base_url)
        await ctx.stopping.wait()
    logger.info("cluster stopped")


def _log_options() -> tuple[str, str]:
    """``up``'s own log level and format, for the children (``auto`` resolved)."""
    root = logging.getLogger()
    level = logging.getLevelName(root.getEffectiveLevel()).lower()
    json_output = any(isinstance(h.formatter, JSONFormatter) for h in root.handlers)
    return (level if level in LEVELS else "info"), ("json" if json_output else "pretty")


async def _start_or_explain(
    settings: UpSettings,
    children: Children,
    common: Sequence[str],
    budget: StopBudget,
    stopping: anyio.Event,
) -> Cluster | None:
    """Start the cluster within ``startup_timeout``; ``None`` when a stop signal came first.

    :raises InfernoError: naming the child that failed, after logging its last lines.
    """
    progress = _Progress()
    cluster: Cluster | None = None
    failure: ChildFailed | None = None
    async with anyio.create_task_group() as tg:

        async def stop_on_signal() -> None:
            await stopping.wait()
            tg.cancel_scope.cancel()

        tg.start_soon(stop_on_signal)
        try:
            with anyio.move_on_after(settings.startup_timeout):
                cluster = await _start(settings, children, common, budget, progress)
        except ChildFailed as exc:
            failure = exc
        tg.cancel_scope.cancel()
    if failure is not None:
        logger.error("%s; its last lines:\n%s", failure, failure.child.last_lines())
        raise InfernoError(f"up: {failure}; stopping the others")
    if cluster is None and not stopping.is_set():
        late = progress.waiting or children.all
        for child in late:
            logger.error(
                "%s did not %s within %gs; its last lines:\n%s",
                child.name,
                progress.step,
                settings.startup_timeout,
                child.last_lines(),
            )
        names = ", ".join(child.name for child in late)
        raise InfernoError(
            f"up: {names} did not {progress.step} within {settings.startup_timeout:g}s "
            "(see --startup-timeout); stopping the others"
        )
    return cluster


class _Progress:
    """What the start is waiting for, to explain a timeout."""

    def __init__(self) -> None:
        self.step = "start"
        self.waiting: list[Child] = []

    def now(self, step: str, waiting: Sequence[Child]) -> None:
        self.step = step
        self.waiting = list(waiting)


async def _start(
    settings: UpSettings,
    children: Children,
    common: Sequence[str],
    budget: StopBudget,
    progress: _Progress,
) -> Cluster:
    host = settings.host
    proxy_args = [
        "proxy",
        f"--host={host}",
        f"--port={settings.port}",
        f"--ops-host={host}",
        f"--ops-port={settings.ops_port}",
        f"--workers={settings.proxy_workers or 'auto'}",
        *common,
    ]
    proxy = await children.start("proxy", proxy_args, stop_last=True)
    progress.now("start listening", [proxy])
    await children.until_listening(proxy)
    assert proxy.ops is not None

    backends: list[Child] = []
    for index in range(settings.backends):
        name = f"backend-{index + 1}"
        service_port, ops_port = settings.backend_ports(index)
        args = [
            "backend",
            "--engine=sim",
            f"--node-id={name}",
            f"--host={host}",
            f"--port={service_port}",
            f"--ops-port={ops_port}",
            f"--discovery-lb={proxy.ops}",
            f"--announce-interval={settings.announce_interval:g}s",
            f"--drain-timeout={budget.drain:g}s",
            f"--sim-speed={settings.sim_speed:g}",
            *common,
        ]
        if settings.model:
            args.append(f"--model={settings.model}")
        if settings.sim_profile:
            args.append(f"--sim-profile={settings.sim_profile}")
        backends.append(await children.start(name, args))
    for backend in backends:
        progress.now("start listening", [backend])
        await children.until_listening(backend)

    models = await _until_registered(f"http://{proxy.ops}/backends", children, backends, progress)
    model = settings.model or next(iter(models), "")
    return Cluster(proxy, tuple(backends), model, host)


async def _until_registered(
    url: str, children: Children, backends: Sequence[Child], progress: _Progress
) -> list[str]:
    """Poll the proxy's pool until every backend is in it and healthy; their models.

    :raises ChildFailed: when a child exits meanwhile.
    """
    names = {backend.name: backend for backend in backends}
    async with HTTPClient(timeouts=POLL_TIMEOUTS) as client:
        while True:
            children.check_running()
            entries = await _pool(client, url)
            healthy = {
                str(entry.get("id")): entry
                for entry in entries
                if entry.get("healthy") is True and entry.get("id") in names
            }
            waiting = [backend for name, backend in names.items() if name not in healthy]
            progress.now("register with the proxy", waiting)
            if not waiting:
                models = (m for entry in healthy.values() for m in entry.get("models") or ())
                return list(dict.fromkeys(str(m) for m in models))
            await anyio.sleep(POLL_INTERVAL)


async def _pool(client: HTTPClient, url: str) -> list[dict[str, Any]]:
    """The proxy's ``GET /backends`` entries; none when it cannot answer now."""
    try:
        response = await client.request("GET", url)
        document = await response.json()
    except (ClientError, ValueError) as exc:
        logger.debug("GET %s: %s", url, exc)
        return []
    if response.status != 200 or not isinstance(document, dict):
        return []
    entries = document.get("backends")
    if not isinstance(entries, list):
        return []
    return [entry for entry in entries if isinstance(entry, dict)]


def banner(cluster: Cluster) -> str:
    """What ``up`` prints once the cluster is ready: where it is and how to call it."""
    base = cluster.base_url
    model = cluster.model or "MODEL"
    count = len(cluster.backends)
    width = max(len(child.name) for child in (cluster.proxy, *cluster.backends))
    nodes = "\n".join(
        f"    {child.name:<{width}}  http://{child.address}  ops {child.ops}  pid {child.pid}"
        for child in (cluster.proxy, *cluster.backends)
    )
    body = (
        f'{{"model": "{model}", "messages": [{{"role": "user", "content": "{EXAMPLE_PROMPT}"}}], '
        '"stream": true}'
    )
    return f"""\
Inferno is up: a proxy and {count} sim backend{"s" if count != 1 else ""} on {cluster.host}.

  OpenAI base URL: {base}
  model:           {model}
  pool:            http://{cluster.proxy.ops}/backends
  nodes:
{nodes}

The backends run the sim engine: a simulator of an LLM server, not a model.

With curl:

  curl -N {base}/chat/completions \\
    -H 'Content-Type: application/json' \\
    -d '{body}'

With the openai package (pip install openai):

  from openai import OpenAI

  client = OpenAI(base_url="{base}", api_key="unused")
  stream = client.chat.completions.create(
      model="{model}",
      messages=[{{"role": "user", "content": "{EXAMPLE_PROMPT}"}}],
      stream=True,
  )
  for chunk in stream:
      if chunk.choices:
          print(chunk.choices[0].delta.content or "", end="", flush=True)
  print()

Ctrl-C stops every node.
"""


def _print(text: str, out: TextIO | None = None) -> None:
    stream = out if out is not None else sys.stdout
    try:
        stream.write(text)
        stream.flush()
    except (OSError, ValueError):  # stdout closed (piped into a pager that quit): keep running
        logger.info("%s", text)
