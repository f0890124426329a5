"""Worker processes of ``--workers N`` as the parent sees them: the port they
share, the command that starts one, and the signals that stop it.

The port is reserved before any worker starts (see :func:`reserve_port`);
each worker is this interpreter started again with the flags that decide
what it imports (:func:`worker_command`), so a venv, ``PYTHONPATH`` or a
``--venv`` pex reaches the workers as it reached the parent.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
from typing import Final

import anyio
import anyio.abc

from inferno.errors import InfernoError

__all__ = [
    "WORKER_BOOT",
    "WorkerFailed",
    "describe_exit",
    "end_process",
    "reserve_port",
    "signal_process",
    "worker_command",
]

#: What a worker interpreter runs (``-c``); its arguments follow.
WORKER_BOOT: Final = "from inferno_proxy.workerproc import worker_main; worker_main()"


class WorkerFailed(InfernoError):
    """Raised when a worker cannot start, or dies too often: the proxy stops."""


def reserve_port(host: str, port: int) -> list[socket.socket]:
    """Bind (never listen) a ``SO_REUSEPORT`` socket on each address of *host*, one port.

    :raises OSError: when the port cannot be bound (in use without
        ``SO_REUSEPORT``, not permitted, no such address).
    """
    found = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE | socket.AI_ADDRCONFIG
    )
    reserved: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in found:
            if any(s.family == family and s.getsockname()[0] == address[0] for s in reserved):
                continue  # getaddrinfo repeats an address per protocol
            sock = socket.socket(family, kind, proto)
            reserved.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # as anyio binds
            chosen = reserved[0].getsockname()[1] if len(reserved) > 1 else port
            sock.bind((str(address[0]), chosen, *address[2:]))
    except BaseException:
        for sock in reserved:
            sock.close()
        raise
    return reserved


def worker_command(index: int, fd: int, uvloop: bool) -> list[str]:
    """The command of worker *index*: this interpreter, its import-deciding flags, the boot.

    In a ``--venv`` pex ``sys.executable`` is the pex's venv python, where
    ``inferno_proxy`` is installed; elsewhere the venv or ``PYTHONPATH`` that
    made it importable here does the same there.
    """
    if not sys.executable:
        raise WorkerFailed("cannot start workers: this Python does not know its own executable")
    flags = sys.flags
    options = ["-I"] if flags.isolated else []
    if not flags.isolated:
        options += ["-E"] if flags.ignore_environment else []
        options += ["-s"] if flags.no_user_site else []
        options += ["-P"] if getattr(flags, "safe_path", False) else []
    options += ["-S"] if flags.no_site else []
    options += ["-B"] if flags.dont_write_bytecode else []
    parent = str(os.getpid())
    return [
        sys.executable,
        *options,
        "-c",
        WORKER_BOOT,
        parent,
        str(fd),
        str(index),
        str(int(uvloop)),
    ]


def signal_process(process: anyio.abc.Process, signum: signal.Signals) -> None:
    """Send *signum* to *process* unless it has exited."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signum)


async def end_process(process: anyio.abc.Process, grace: float) -> None:
    """Stop a worker the proxy no longer waits for: SIGTERM, *grace*, SIGKILL."""
    signal_process(process, signal.SIGTERM)
    with anyio.move_on_after(grace):
        await process.wait()
        return
    signal_process(process, signal.SIGKILL)
    await process.wait()


def describe_exit(status: int) -> str:
    """An exit status as a log line says it (``was killed by SIGKILL``)."""
    if status < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-status).name}"
    return f"exited with status {status}"
