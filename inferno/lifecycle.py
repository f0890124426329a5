"""Running a role: event loop, signals, graceful stop, reload, lifecycle hooks.

:func:`run_role` is what ``inferno <role>`` ends in.  It imports the role's
code (``Role.entry``), starts an anyio event loop on the asyncio backend
(uvloop when ``runtime.event_loop`` asks for it and it is installed) and runs

1. the ``inferno_startup`` hooks, then the role's ``async run(ctx)``;
2. on the first SIGTERM or SIGINT: ``ctx.stopping`` is set and the role has
   ``runtime.shutdown_timeout`` seconds to return by itself; after that it is
   cancelled;
3. on a second SIGTERM or SIGINT: the process exits at once, without running
   shutdown hooks, with status ``128 + signal number`` (143 for SIGTERM, 130
   for SIGINT: the shell's convention for "killed by this signal"), for the
   operator who has decided not to wait;
4. on SIGHUP: the ``inferno_reload`` hooks, then the callbacks the role gave to
   ``ctx.on_reload``; a failing reload is logged and the role keeps running;
5. when the role has returned: the ``inferno_shutdown`` hooks, bounded by
   their own ``runtime.shutdown_timeout``.

Exit status: 0 when the role returned by itself (after a stop signal or not),
1 when it had to be cancelled at the deadline (:data:`EXIT_STOP_TIMEOUT`).
An exception from the role or a startup hook propagates to the caller (the
CLI maps it to a status) after the shutdown hooks have run.

This module imports anyio only when a role runs, so ``inferno --help`` (which
needs :data:`RUNTIME_SECTION` for its flags) stays fast.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from inferno.config import Duration, Enum, Section, Setting
from inferno.errors import ConfigError, ConfigProblem, PluginError

if TYPE_CHECKING:
    import anyio
    import anyio.abc
    import pluggy

    from inferno.config import Config
    from inferno.metrics import Registry
    from inferno.roles import Role, RoleRunner

__all__ = [
    "CORE_SECTIONS",
    "EXIT_OK",
    "EXIT_STOP_TIMEOUT",
    "RUNTIME_SECTION",
    "ReloadCallback",
    "RoleContext",
    "role_sections",
    "run_role",
]

log = logging.getLogger("inferno.lifecycle")

EXIT_OK = 0
#: The role did not return within ``runtime.shutdown_timeout`` of the stop signal.
EXIT_STOP_TIMEOUT = 1

#: Seconds a role gets to return after the first stop signal; long enough for
#: in-flight inference requests (tens of seconds for long generations) to end.
DEFAULT_SHUTDOWN_TIMEOUT = 30.0

RUNTIME_SECTION = Section(
    "runtime",
    (
        Setting(
            "event_loop",
            Enum("auto", "asyncio", "uvloop"),
            "auto",
            "uvloop (needs the 'speed' extra), asyncio, or auto: uvloop when installed",
        ),
        Setting(
            "shutdown_timeout",
            Duration(),
            DEFAULT_SHUTDOWN_TIMEOUT,
            "how long a role may take to stop after SIGTERM/SIGINT before it is cancelled",
        ),
    ),
    help="how every role runs",
)

#: Sections every role gets, whatever it declares itself.
CORE_SECTIONS: tuple[Section, ...] = (RUNTIME_SECTION,)

#: ``callback()`` run on SIGHUP; may return an awaitable, which is awaited.
ReloadCallback = Callable[[], Awaitable[None] | None]

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def role_sections(role: Role) -> tuple[Section, ...]:
    """The configuration sections of ``role``: the core ones, then its own.

    A role that declares a section of the same name as a core one but different
    settings is refused by the config module when its flags are built.
    """
    return (*CORE_SECTIONS, *role.sections)


@dataclass(eq=False)
class RoleContext:
    """What a role's ``run(ctx)`` receives; also ``app`` in the lifecycle hooks.

    :param role: the role being run.
    :param config: its effective configuration.
    :param plugins: the plugin manager (to ask for engines, providers, ...).
    :param stopping: set on the first SIGTERM/SIGINT: stop accepting work,
        finish what is in flight, return.
    :param shutdown_timeout: seconds the role has to return once ``stopping``
        is set, before it is cancelled.
    :param metrics: the process's metrics registry.
    :param state: free room for the role's own objects, so lifecycle hooks can
        reach them (``ctx.state["app"]``).
    """

    role: Role
    config: Config
    plugins: pluggy.PluginManager
    stopping: anyio.Event
    shutdown_timeout: float
    metrics: Registry
    state: dict[str, Any] = field(default_factory=dict)
    _reload_callbacks: list[ReloadCallback] = field(default_factory=list, repr=False)
    _reload_lock: anyio.Lock | None = field(default=None, repr=False)

    def on_reload(self, callback: ReloadCallback) -> None:
        """Call ``callback()`` on every reload (SIGHUP), after the reload hooks."""
        self._reload_callbacks.append(callback)

    async def reload(self) -> None:
        """Run the ``inferno_reload`` hooks, then the reload callbacks, one at a time.

        Failures are logged and do not stop the others: a bad reload must not
        take a serving process down.  Concurrent reloads run one after another.
        """
        import anyio

        from inferno.plugins import call_impl, hook_impls

        if self._reload_lock is None:
            self._reload_lock = anyio.Lock()
        async with self._reload_lock:
            log.info("reloading", extra={"role": self.role.name})
            for impl in hook_impls(self.plugins, "inferno_reload"):
                try:
                    await _await_if_needed(call_impl(impl, {"role": self.role, "app": self}))
                except Exception:
                    log.exception("inferno_reload hook of plugin %r failed", impl.plugin_name)
            for callback in list(self._reload_callbacks):
                try:
                    await _await_if_needed(callback())
                except Exception:
                    log.exception("reload callback %r failed", callback)


async def _await_if_needed(result: object) -> None:
    if inspect.isawaitable(result):
        await result


def run_role(role: Role, config: Config, plugins: pluggy.PluginManager) -> int:
    """Run ``role`` until it returns or is stopped by a signal; return the exit status.

    Must be called from the main thread (signal handlers live there).

    :raises PluginError: the role's code cannot be imported.
    :raises ConfigError: ``runtime.event_loop = "uvloop"`` but uvloop is not installed.
    """
    import anyio

    try:
        runner = role.load()
    except Exception as exc:
        raise PluginError(
            f"role {role.name!r}: cannot load {role.entry!r}: {type(exc).__name__}: {exc}"
        ) from exc
    options = {"use_uvloop": _wants_uvloop(config)}
    return anyio.run(
        _run, role, runner, config, plugins, backend="asyncio", backend_options=options
    )


def _wants_uvloop(config: Config) -> bool:
    choice = config["runtime.event_loop"]
    installed = importlib.util.find_spec("uvloop") is not None
    if choice == "uvloop" and not installed:
        problem = ConfigProblem(
            "runtime.event_loop",
            config.source("runtime.event_loop"),
            "uvloop is not installed",
            "asyncio, auto, or install the 'speed' extra",
        )
        raise ConfigError([problem])
    return choice == "uvloop" or (choice == "auto" and installed)


async def _run(
    role: Role, runner: RoleRunner, config: Config, plugins: pluggy.PluginManager
) -> int:
    import anyio

    from inferno.metrics import Registry

    ctx = RoleContext(
        role=role,
        config=config,
        plugins=plugins,
        stopping=anyio.Event(),
        shutdown_timeout=float(config["runtime.shutdown_timeout"]),
        metrics=Registry(),
    )
    role_scope = anyio.CancelScope()
    failure: Exception | None = None
    async with anyio.create_task_group() as tg:
        await tg.start(_watch_signals, ctx, role_scope)
        log.info("starting role %s", role.name, extra={"role": role.name, "pid": os.getpid()})
        try:
            with role_scope:
                await _startup(role, ctx)
                await runner(ctx)
        except Exception as exc:  # re-raised below, after the shutdown hooks
            failure = exc
        finally:
            await _shutdown(role, ctx)
            tg.cancel_scope.cancel()  # the signal watcher
    if failure is not None:
        raise failure
    if role_scope.cancelled_caught:
        log.error(
            "role %s did not stop within %ss of the stop signal; it was cancelled",
            role.name,
            ctx.shutdown_timeout,
        )
        return EXIT_STOP_TIMEOUT
    log.info("role %s stopped", role.name)
    return EXIT_OK


async def _startup(role: Role, ctx: RoleContext) -> None:
    from inferno.plugins import call_impl, hook_impls

    for impl in hook_impls(ctx.plugins, "inferno_startup"):
        try:
            await _await_if_needed(call_impl(impl, {"role": role, "app": ctx}))
        except Exception as exc:
            raise PluginError(
                f"plugin {impl.plugin_name!r}: inferno_startup failed: {type(exc).__name__}: {exc}"
            ) from exc


async def _shutdown(role: Role, ctx: RoleContext) -> None:
    import anyio

    from inferno.plugins import call_impl, hook_impls

    ctx.stopping.set()
    with anyio.CancelScope(shield=True) as scope:
        scope.deadline = anyio.current_time() + ctx.shutdown_timeout
        # Reverse order of the startup hooks: the first plugin started is the last stopped.
        for impl in reversed(hook_impls(ctx.plugins, "inferno_shutdown")):
            try:
                await _await_if_needed(call_impl(impl, {"role": role, "app": ctx}))
            except Exception:
                log.exception("inferno_shutdown hook of plugin %r failed", impl.plugin_name)
    if scope.cancelled_caught:
        log.error("shutdown hooks did not finish within %ss", ctx.shutdown_timeout)


async def _watch_signals(
    ctx: RoleContext,
    role_scope: anyio.CancelScope,
    *,
    task_status: anyio.abc.TaskStatus[None],
) -> None:
    import anyio

    stop_signals = 0
    async with anyio.create_task_group() as tg:
        with anyio.open_signal_receiver(*_STOP_SIGNALS, signal.SIGHUP) as received:
            task_status.started()
            async for signum in received:
                name = signal.Signals(signum).name
                if signum == signal.SIGHUP:
                    tg.start_soon(ctx.reload)  # a slow reload must not delay a stop signal
                    continue
                stop_signals += 1
                if stop_signals == 1:
                    log.info(
                        "%s received: stopping (deadline %ss)",
                        name,
                        ctx.shutdown_timeout,
                        extra={"role": ctx.role.name},
                    )
                    ctx.stopping.set()
                    deadline = anyio.current_time() + ctx.shutdown_timeout
                    role_scope.deadline = min(role_scope.deadline, deadline)
                else:
                    log.warning("second %s received: exiting now", name)
                    _exit_now(128 + int(signum))


def _exit_now(status: int) -> None:
    """Leave the process immediately: no hooks, no finally blocks, only flushed output."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # closed pipe: nothing to save
            stream.flush()
    os._exit(status)
