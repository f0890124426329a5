"""The child processes of ``inferno up``: start Inferno again, forward logs, watch, stop.

**Starting the same program again.**  A child is this interpreter, with the
flags it runs with (``-I`` in a pex's venv, ``-E``/``-s``/``-P``...), running
:func:`child_main` through ``-c``::

    <sys.executable> [-I ...] -c "from inferno_up.children import child_main; child_main()"
        <parent pid> proxy --port ...

Whatever made ``inferno_up`` importable here makes it importable there: the
virtual environment's ``site-packages`` (console script, editable checkout),
``PYTHONPATH`` (inherited), or the venv a ``--venv`` pex unpacked itself into
(``sys.executable`` is that venv's python; every baked-in plugin is in its
``site-packages``).  Re-running ``sys.argv[0]`` would not do: it is a
directory in a pex venv and ``-m`` is not in argv under ``python -m inferno``.

**No orphans.**  Each child runs in its own session (``start_new_session``):
a Ctrl-C at the terminal reaches ``up`` alone, which then stops every child
once, with SIGTERM, so each drains gracefully (a child that also got the
terminal's SIGINT would take ``up``'s SIGTERM as a second signal and exit at
once).  Stopping is SIGTERM to each child's process group (the backends
first, then the proxy they deregister from), a deadline, then SIGKILL.

For the case where ``up`` itself dies without stopping them (SIGKILL, an OOM
kill, a crash, a second Ctrl-C), each child asks Linux at start to SIGKILL it
when its parent dies (``prctl(PR_SET_PDEATHSIG)`` through ctypes), then
checks that the parent has not already gone.  This runs in the child's
own first lines, not in a ``preexec_fn``, which is unsafe in a process with
threads (anyio's worker threads, asyncio's child watcher).  The death signal
follows the *thread* that forked the child: the children are forked by the
event loop, which ``inferno.lifecycle`` runs on the main thread, so it fires
when ``up`` exits and not before.  Off Linux there is no such signal and a
SIGKILLed ``up`` leaves its children running.

**Logs.**  A child's stdout and stderr are read line by line (lines are
bounded), kept in a short tail for failure reports, and written to ``up``'s
stderr: prefixed with the child's name (``backend-1 | ...``) in the pretty
format, or with a ``"child"`` field added to each JSON object in the JSON
format.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Final, TextIO

import anyio
import anyio.abc

from inferno.errors import InfernoError

__all__ = [
    "CHILD_BOOT",
    "Child",
    "ChildFailed",
    "Children",
    "child_main",
    "describe_status",
    "interpreter_flags",
    "self_command",
    "supervise",
]

logger = logging.getLogger("inferno_up")

#: What the child interpreter runs (``-c``); its argv follows.
CHILD_BOOT: Final = "from inferno_up.children import child_main; child_main()"
#: Lines of each child's output kept to explain a failure.
TAIL_LINES: Final = 20
#: Longest output line kept whole; longer ones are cut (a runaway line must not grow memory).
MAX_LINE_BYTES: Final = 64 * 1024
#: Seconds to wait, after a child exited, for the last of its output to be read.
OUTPUT_GRACE: Final = 1.0
#: Seconds of the stop deadline kept for the last wave (the proxy), at most a fifth of it.
LAST_WAVE_RESERVE: Final = 3.0
#: Seconds to wait for the kernel to reap children after SIGKILL.
KILL_GRACE: Final = 2.0
#: ``<role> listening on HOST:PORT (ops HOST:PORT)``: what the proxy and the backend log.
LISTENING: Final = re.compile(r"\b[a-z]+ listening on (\S+) \(ops ([^)\s]+)\)")
_PR_SET_PDEATHSIG: Final = 1  # from <linux/prctl.h>


# -- the child's side ---------------------------------------------------------------------------


def child_main() -> None:
    """Entry of a child: die with the parent, then run ``inferno`` with the rest of argv.

    ``sys.argv`` is ``["-c", <parent pid>, <inferno arguments>...]``.
    """
    parent = int(sys.argv[1])
    _die_with_parent(parent)
    from inferno.cli import main

    sys.exit(main(sys.argv[2:]))


def _die_with_parent(parent: int) -> None:
    """SIGKILL this process when ``parent`` exits (Linux); exit now if it already has."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):  # no libc symbols (a static build): no safety net
            pass
    if os.getppid() != parent:  # the parent died before prctl: nobody will stop us
        print("inferno up exited before this node started", file=sys.stderr)
        sys.exit(1)


def interpreter_flags() -> list[str]:
    """The flags of this interpreter that decide what a child can import."""
    flags = sys.flags
    found: list[str] = []
    if flags.isolated:
        found.append("-I")  # implies -E, -s and (3.11+) -P
    else:
        if flags.ignore_environment:
            found.append("-E")
        if flags.no_user_site:
            found.append("-s")
        if getattr(flags, "safe_path", False):
            found.append("-P")
    if flags.no_site:
        found.append("-S")
    if flags.dont_write_bytecode:
        found.append("-B")
    if flags.optimize:
        found.append("-" + "O" * flags.optimize)
    return found


def self_command(parent_pid: int | None = None) -> list[str]:
    """The command that runs ``inferno <arguments>`` as a child of this process.

    Append the ``inferno`` arguments (``proxy --port 0 ...``).

    :raises InfernoError: when the interpreter cannot say where it is.
    """
    if not sys.executable:
        raise InfernoError("cannot start nodes: this Python does not know its own executable")
    parent = os.getpid() if parent_pid is None else parent_pid
    return [sys.executable, *interpreter_flags(), "-c", CHILD_BOOT, str(parent)]


# -- the parent's side --------------------------------------------------------------------------


class ChildFailed(InfernoError):
    """Raised when a child exits, or does not get ready, while ``up`` waits on it."""

    def __init__(self, child: Child, problem: str) -> None:
        super().__init__(f"{child.name} {problem}")
        self.child = child
        self.problem = problem


def describe_status(returncode: int | None) -> str:
    """``exited with status 2``, ``was killed by SIGKILL``, or ``is running``."""
    if returncode is None:
        return "is running"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}"
    return f"exited with status {returncode}"


class Child:
    """One child process: its name, output tail, the addresses it listens on, its exit."""

    def __init__(self, name: str, process: anyio.abc.Process, *, stop_last: bool = False) -> None:
        self.name = name
        self.process = process
        self.stop_last = stop_last
        self.pid: int = process.pid
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        #: ``host:port`` of its service and ops ports, once it logged them.
        self.address: str | None = None
        self.ops: str | None = None
        self.listening = anyio.Event()
        self.exited = anyio.Event()
        self.output_done = anyio.Event()
        #: Set once ``up`` asked it to stop: its exit is then expected.
        self.stopping = False

    @property
    def returncode(self) -> int | None:
        """Its exit status (negative: killed by that signal), ``None`` while it runs."""
        return self.process.returncode

    def signal(self, signum: signal.Signals) -> None:
        """Send ``signum`` to its process group (it leads one), unless it was reaped."""
        if self.process.returncode is not None:
            return  # reaped: its pid may belong to someone else by now
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signum)

    def last_lines(self) -> str:
        """Its latest output lines, indented, for a failure report."""
        return "\n".join(f"    {line}" for line in self.tail) or "    (no output)"

    def __repr__(self) -> str:
        return f"Child({self.name!r}, pid={self.pid}, {describe_status(self.returncode)})"


class Children:
    """Starts and watches children in a task group; :func:`supervise` stops them.

    :param tg: where the output pumps and exit watchers run.
    :param command: the command prefix (:func:`self_command`).
    :param log_format: ``"json"`` or ``"pretty"``: how child lines are forwarded.
    :param out: where child lines go (``up``'s stderr).
    :param on_exit: called with a child that exited without being asked to.
    :param name_width: pad names to this width, so forwarded lines align from the start.
    """

    def __init__(
        self,
        tg: anyio.abc.TaskGroup,
        command: Sequence[str],
        *,
        log_format: str,
        out: TextIO | None = None,
        env: dict[str, str] | None = None,
        on_exit: Callable[[Child], None] | None = None,
        name_width: int = 0,
    ) -> None:
        self._tg = tg
        self._command = list(command)
        self._json = log_format == "json"
        self._out = out
        self._env = env
        self._on_exit = on_exit
        self._width = name_width
        self.all: list[Child] = []
        #: Whether an exit nobody asked for is an error to report (set once started).
        self.report_exits = False

    async def start(self, name: str, args: Sequence[str], *, stop_last: bool = False) -> Child:
        """Start ``inferno <args>`` as ``name``; its output is forwarded from now on.

        :param stop_last: stop it only once the others have stopped (see :meth:`stop`).
        """
        process = await anyio.open_process(
            [*self._command, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=self._env,
            start_new_session=True,
        )
        child = Child(name, process, stop_last=stop_last)
        self.all.append(child)
        self._width = max(self._width, len(name))
        logger.info("started %s (pid %d)", name, child.pid)
        self._tg.start_soon(self._pump, child, name=f"output of {name}")
        self._tg.start_soon(self._watch, child, name=f"exit of {name}")
        return child

    async def until_listening(self, child: Child) -> None:
        """Wait until ``child`` logged where it listens.

        :raises ChildFailed: when it exits first.
        """
        await _first(child.listening, child.exited)
        if not child.listening.is_set():
            with anyio.move_on_after(OUTPUT_GRACE):
                await child.output_done.wait()
            raise ChildFailed(child, f"{describe_status(child.returncode)} while starting")

    def check_running(self) -> None:
        """:raises ChildFailed: naming the first child that has exited."""
        for child in self.all:
            if child.exited.is_set():
                raise ChildFailed(child, f"{describe_status(child.returncode)} while starting")

    async def stop(self, grace: float, kill_grace: float = KILL_GRACE) -> None:
        """SIGTERM every running child, SIGKILL those still running after ``grace`` seconds.

        Two waves: first the children started without ``stop_last``, then,
        once they have exited, those started with it (the proxy, so that the
        backends can still deregister from it and finish the requests it
        relays).  The last wave keeps :data:`LAST_WAVE_RESERVE` of ``grace``
        even when the first one takes all of its share.

        Waits on the processes themselves, not on the watcher tasks, so it
        works while the caller is being cancelled (call it shielded).
        """
        running = [child for child in self.all if child.returncode is None]
        for child in self.all:
            child.stopping = True
        waves = [
            wave
            for wave in (
                [child for child in running if not child.stop_last],
                [child for child in running if child.stop_last],
            )
            if wave
        ]
        deadline = anyio.current_time() + grace
        reserve = min(LAST_WAVE_RESERVE, grace * 0.2)
        for number, wave in enumerate(waves, start=1):
            logger.info("stopping %s", ", ".join(child.name for child in wave))
            for child in wave:
                child.signal(signal.SIGTERM)
            until = deadline if number == len(waves) else deadline - reserve
            await _wait_all(wave, until - anyio.current_time())
        left = [child for child in running if child.returncode is None]
        if not left:
            return
        for child in left:
            logger.warning("%s did not stop within %gs: killing it", child.name, grace)
            child.signal(signal.SIGKILL)
        if not await _wait_all(left, kill_grace):
            still = ", ".join(f"{c.name} (pid {c.pid})" for c in left if c.returncode is None)
            logger.error("still running after SIGKILL: %s", still)

    async def until_output_done(self, grace: float = OUTPUT_GRACE) -> None:
        """Wait up to ``grace`` seconds until every exited child's output has been forwarded."""
        with anyio.move_on_after(grace):
            for child in self.all:
                await child.output_done.wait()

    # -- the tasks of one child ----------------------------------------------------------------

    async def _pump(self, child: Child) -> None:
        stream = child.process.stdout
        try:
            if stream is not None:
                async for line in _lines(stream):
                    self._forward(child, line)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass  # the pipe went away with the process
        finally:
            child.output_done.set()

    async def _watch(self, child: Child) -> None:
        returncode = await child.process.wait()
        child.exited.set()
        if child.stopping or not self.report_exits:
            # Expected, or the start sequence explains it (ChildFailed) with the same tail.
            logger.info("%s %s", child.name, describe_status(returncode))
            return
        with anyio.move_on_after(OUTPUT_GRACE):
            await child.output_done.wait()
        logger.error(
            "%s (pid %d) %s unexpectedly; its last lines:\n%s",
            child.name,
            child.pid,
            describe_status(returncode),
            child.last_lines(),
        )
        if self._on_exit is not None:
            self._on_exit(child)

    def _forward(self, child: Child, line: str) -> None:
        child.tail.append(line)
        if not child.listening.is_set():
            found = LISTENING.search(line)
            if found:
                child.address, child.ops = found.group(1), found.group(2)
                child.listening.set()
        out = self._out if self._out is not None else sys.stderr
        try:
            out.write(self._format(child.name, line) + "\n")
            out.flush()
        except (OSError, ValueError):  # up's stderr is closed: keep the children's logs flowing
            pass

    def _format(self, name: str, line: str) -> str:
        if not self._json:
            return f"{name:<{self._width}} | {line}"
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
            record = {"ts": f"{stamp}Z", "level": "info", "logger": "output", "message": line}
        record["child"] = name
        return json.dumps(record, ensure_ascii=False, default=str)


@contextlib.asynccontextmanager
async def supervise(
    command: Sequence[str],
    *,
    log_format: str,
    stop_grace: float,
    out: TextIO | None = None,
    env: dict[str, str] | None = None,
    on_exit: Callable[[Child], None] | None = None,
    name_width: int = 0,
) -> AsyncIterator[Children]:
    """Children that are all stopped (and reaped) when the block is left, however it is left.

    :param stop_grace: seconds the children get to stop after SIGTERM, before SIGKILL.
    Other parameters are :class:`Children`'s.
    """
    failure: Exception | None = None
    async with anyio.create_task_group() as tg:
        children = Children(
            tg,
            command,
            log_format=log_format,
            out=out,
            env=env,
            on_exit=on_exit,
            name_width=name_width,
        )
        try:
            yield children
        except Exception as exc:  # raised below, outside the task group: not in a group
            failure = exc
        finally:
            with anyio.CancelScope(shield=True):
                await children.stop(stop_grace)
                await children.until_output_done()
            tg.cancel_scope.cancel()
    if failure is not None:
        raise failure


# -- helpers ------------------------------------------------------------------------------------


async def _lines(stream: anyio.abc.ByteReceiveStream) -> AsyncIterator[str]:
    """Decoded lines of ``stream`` without their newline; a line over the bound is cut."""
    buffer = b""
    async for data in stream:
        buffer += data
        *complete, buffer = buffer.split(b"\n")
        if len(buffer) > MAX_LINE_BYTES:
            complete.append(buffer[:MAX_LINE_BYTES] + b" [cut]")
            buffer = b""
        for raw in complete:
            yield raw.rstrip(b"\r").decode("utf-8", "replace")
    if buffer:
        yield buffer.decode("utf-8", "replace")


async def _first(*events: anyio.Event) -> None:
    """Return once any of ``events`` is set."""
    async with anyio.create_task_group() as tg:

        async def wait(event: anyio.Event) -> None:
            await event.wait()
            tg.cancel_scope.cancel()

        for event in events:
            tg.start_soon(wait, event)


async def _wait_all(children: Sequence[Child], grace: float) -> bool:
    """Wait up to ``grace`` seconds for every child to be reaped; whether they all were."""
    with anyio.move_on_after(grace):
        for child in children:
            await child.process.wait()
    return all(child.returncode is not None for child in children)
