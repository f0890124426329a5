"""The active health checkers: ``vitals``, ``http`` and ``tcp``.

The proxy checks every node it knows, all at once, every check interval.  For
each node it builds a :class:`CheckTarget` and awaits
``checker.check(target, timeout=...)``; the :class:`CheckResult` it gets back
feeds the node's health state machine.  A checker is made once per proxy
process by its factory (:mod:`inferno_health.plugin`), used for every node and
every interval, and closed with :meth:`HealthChecker.aclose` when the proxy
stops.

What a result means (the contract the proxy relies on):

``ok=True, ready=True or None``
    The check passed: the node is alive and (as far as the checker can tell)
    takes work.  ``ready`` is ``None`` when the checker cannot know (``http``,
    ``tcp``); only ``vitals`` reads it.
``ok=True, ready=False``
    The node answered and says it is *not ready* (starting, or draining
    after SIGTERM): take it out of rotation at once, but do **not** count a
    failure, so a starting or draining node is never removed for it.
    ``reason`` is ``"ready=false"`` and ``vitals`` holds the document.
``ok=False``
    The check failed: ``reason`` says why in a few words an operator reads in
    ``GET /backends`` (``"connect refused"``, ``"timeout after 2s"``,
    ``"HTTP 503"``, ``"invalid vitals: field cpu_usage: ..."``); ``ready`` is
    ``None``.

Rules every checker keeps:

* ``check`` never raises because of what a node did or failed to do: every
  connection, protocol, timeout and content failure becomes ``ok=False`` with
  a reason.  It raises only for the caller's own mistakes (a timeout that is
  not a positive number, a closed checker) and lets cancellation through.
* ``check`` returns within ``timeout`` seconds (plus scheduling noise): the
  whole check, connect to last body byte, runs under one deadline.
* ``check`` is safe to call concurrently for many targets (and for one
  target): checkers hold no per-check state.  The HTTP checkers share one
  keep-alive pool, so a node checked every interval is checked over the
  same connection, as classic proxies do; a connection that broke or timed
  out is closed, never reused.
* Bodies are read with a size bound, reasons are clipped to
  :data:`MAX_REASON_CHARS` printable characters, and nothing is logged (no
  secret can leak through a checker).
"""

from __future__ import annotations

import errno
import json
import math
import socket
import ssl
from dataclasses import dataclass, replace
from typing import Final, Literal, Protocol, runtime_checkable

import anyio

from inferno.errors import ValidationError
from inferno.http.client import HTTPClient, Timeouts
from inferno.http.client_errors import (
    ClientError,
    ClientTimeout,
    ConnectError,
    InvalidURL,
    ReadError,
    RemoteProtocolError,
    ResponseTooLarge,
    TLSError,
    WriteError,
)
from inferno.protocol import NodeVitals, format_address

__all__ = [
    "DEFAULT_HEALTH_PATH",
    "MAX_HEALTH_BODY_BYTES",
    "MAX_REASON_CHARS",
    "MAX_VITALS_BYTES",
    "CheckResult",
    "CheckTarget",
    "HTTPChecker",
    "HealthChecker",
    "PortChoice",
    "TCPChecker",
    "VitalsChecker",
    "describe_failure",
    "judge_vitals",
    "validate_path",
]

DEFAULT_HEALTH_PATH: Final = "/health"  # vLLM, SGLang, llama.cpp server and TGI all answer it
VITALS_PATH: Final = "/metrics"  # DESIGN.md: JSON NodeVitals unless Accept asks for Prometheus
# A vitals document with 1024 model names of 256 characters is ~270 KiB; 1 MiB leaves room
# and stops a broken node from making the proxy buffer an endless body.
MAX_VITALS_BYTES: Final = 1024 * 1024
# /health bodies are a word or a small JSON object; read that much so the connection can
# be reused, and ignore the rest (the status decides).
MAX_HEALTH_BODY_BYTES: Final = 64 * 1024
MAX_REASON_CHARS: Final = 200  # reasons appear in GET /backends and in logs: one short line
# One check per node per interval; a second slot lets a check overlap a slow one still
# being cancelled without waiting for the pool.
CONNECTIONS_PER_NODE: Final = 2
# Longer than the default check interval (5 s) so every check reuses the connection,
# shorter than the server's keep-alive timeout (60 s) so we, not the node, close it.
IDLE_TIMEOUT: Final = 30.0
USER_AGENT: Final = "inferno-health"

PortChoice = Literal["service", "metrics"]


@dataclass(frozen=True, slots=True)
class CheckTarget:
    """The node to check.

    :ivar node_id: the node's id (for the caller's bookkeeping; never sent).
    :ivar host: host name or IP address (IPv6 without brackets).
    :ivar port: the service port (inference API).
    :ivar metrics_port: the operations port serving ``/metrics``, or ``None``
        for a node that has none (a static vLLM or llama.cpp server).
    :ivar scheme: ``"http"`` or ``"https"``, for both ports.
    """

    node_id: str
    host: str
    port: int
    metrics_port: int | None
    scheme: str = "http"


@dataclass(frozen=True, slots=True)
class CheckResult:
    """The outcome of one check (see the module docstring for what each combination means).

    :ivar ok: whether the node answered as a healthy node does.
    :ivar reason: why it failed or is not ready, in a few words; ``None`` for a plain pass.
    :ivar latency: seconds the check took, failed ones included.
    :ivar vitals: the node's vitals, when the checker read them.
    :ivar ready: what the node says about taking work (``False``: out of rotation
        at once, without counting a failure); ``None`` when unknown.
    """

    ok: bool
    reason: str | None = None
    latency: float = 0.0
    vitals: NodeVitals | None = None
    ready: bool | None = None


@runtime_checkable
class HealthChecker(Protocol):
    """What a checker factory returns and the proxy drives."""

    #: The name it is offered under (``"vitals"``, ``"http"``, ``"tcp"``).
    name: str

    async def check(self, target: CheckTarget, *, timeout: float) -> CheckResult:  # noqa: ASYNC109
        """Check ``target`` within ``timeout`` seconds; never raises for the node's failure."""
        ...

    async def aclose(self) -> None:
        """Release what the checker holds (its connection pool)."""
        ...


# --- pure decisions: what a response or a failure means ---------------------------------------


def judge_vitals(status: int, body: bytes | None) -> CheckResult:
    """What a ``GET /metrics`` answer means (``body`` is ``None`` when it was too large).

    A non-2xx status fails; so does a body that is not JSON or not valid
    :class:`~inferno.protocol.NodeVitals` (the reason names the field).
    Valid vitals pass, with ``ready`` taken from the document.
    """
    if not 200 <= status < 300:
        return CheckResult(False, f"HTTP {status}")
    if body is None:
        return CheckResult(False, f"invalid vitals: document over {MAX_VITALS_BYTES} bytes")
    try:
        document = json.loads(body)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, absurd nesting
        detail = exc.msg if isinstance(exc, json.JSONDecodeError) else type(exc).__name__
        return CheckResult(False, _clip(f"invalid vitals: not JSON ({detail})"))
    try:
        vitals = NodeVitals.from_json(document)
    except ValidationError as exc:
        return CheckResult(False, _clip(f"invalid vitals: field {exc.field}: {exc.problem}"))
    if not vitals.ready:
        return CheckResult(True, "ready=false", vitals=vitals, ready=False)
    return CheckResult(True, vitals=vitals, ready=True)


def describe_failure(exc: BaseException, timeout: float) -> str:
    """A short reason for a failed check, from the exception the attempt raised.

    :param timeout: the check's deadline, named in timeout reasons.
    """
    if isinstance(exc, (ClientTimeout, TimeoutError)):
        return f"timeout after {timeout:g}s"
    if isinstance(exc, TLSError):
        return "TLS handshake failed"
    if isinstance(exc, ConnectError):
        cause = _os_error(exc)
        return _describe_os_error(cause) if cause is not None else "connect failed"
    if isinstance(exc, (ReadError, WriteError)):
        return "connection lost"
    if isinstance(exc, RemoteProtocolError):
        return _clip(f"bad HTTP response: {exc}")
    if isinstance(exc, InvalidURL):
        return _clip(f"invalid address: {exc}")
    if isinstance(exc, OSError):
        return _describe_os_error(_os_error(exc) or exc)
    return _clip(f"{type(exc).__name__}: {exc}")


def _os_error(exc: BaseException) -> OSError | None:
    """The most specific ``OSError`` behind ``exc``: one with an errno, found through
    ``__cause__`` and exception groups (anyio's connect wraps every attempt's error).
    """
    pending: list[BaseException] = [exc]
    fallback: OSError | None = None
    seen = 0
    while pending and seen < 16:  # bounded: a cause chain is short, a cycle is not
        current = pending.pop(0)
        seen += 1
        if isinstance(current, OSError):
            if current.errno is not None or isinstance(current, socket.gaierror):
                return current
            fallback = fallback or current
        nested = getattr(current, "exceptions", None)
        if isinstance(nested, (list, tuple)):
            pending.extend(e for e in nested if isinstance(e, BaseException))
        if current.__cause__ is not None:
            pending.append(current.__cause__)
    return fallback


def _describe_os_error(exc: OSError) -> str:
    if isinstance(exc, socket.gaierror):
        return "cannot resolve host"
    if isinstance(exc, ConnectionRefusedError) or exc.errno == errno.ECONNREFUSED:
        return "connect refused"
    if isinstance(exc, TimeoutError) or exc.errno == errno.ETIMEDOUT:
        return "connect timed out"
    if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return "host unreachable"
    if isinstance(exc, ConnectionError):
        return "connection lost"
    text = exc.strerror or str(exc) or type(exc).__name__
    return _clip(f"connect failed: {text}")


def _clip(text: str) -> str:
    """One printable line of at most :data:`MAX_REASON_CHARS` characters."""
    line = "".join(c if c.isprintable() else " " for c in text)
    if len(line) <= MAX_REASON_CHARS:
        return line
    return line[: MAX_REASON_CHARS - 3] + "..."


def _check_timeout(timeout: float) -> None:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout must be a number of seconds, not {type(timeout).__name__}")
    if not (timeout > 0 and math.isfinite(timeout)):
        raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")


async def _timed(probe: _Probe, target: CheckTarget, *, seconds: float) -> CheckResult:
    """Run ``probe`` under one deadline ``seconds`` away, map its failures, time it.

    The one place every checker's deadline and failure mapping live.  Only
    the expected failures (:class:`ClientError`, :class:`OSError`) become
    results; anything else is a bug in the checker and propagates.
    """
    _check_timeout(seconds)
    started = anyio.current_time()
    result: CheckResult | None = None
    with anyio.move_on_after(seconds):
        try:
            result = await probe(target, seconds)
        except (ClientError, OSError) as exc:
            result = CheckResult(False, describe_failure(exc, seconds))
    if result is None:
        result = CheckResult(False, f"timeout after {seconds:g}s")
    return replace(result, latency=anyio.current_time() - started)


class _Probe(Protocol):
    async def __call__(self, target: CheckTarget, seconds: float, /) -> CheckResult: ...


# --- the HTTP checkers ------------------------------------------------------------------------


class _HTTPCheckerBase:
    """A pooled :class:`~inferno.http.client.HTTPClient` and one bounded ``GET``."""

    name = "http"
    _accept = "*/*"

    def __init__(
        self, *, client: HTTPClient | None = None, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        if client is not None and ssl_context is not None:
            raise ValueError("give either a client or an ssl_context, not both")
        self._owns_client = client is None
        self._client = client or HTTPClient(
            max_connections_per_origin=CONNECTIONS_PER_NODE,
            idle_timeout=IDLE_TIMEOUT,
            ssl_context=ssl_context,
        )
        self._headers = [("accept", self._accept), ("user-agent", USER_AGENT)]

    async def _get(
        self, target: CheckTarget, port: int, path: str, seconds: float, max_bytes: int
    ) -> tuple[int, bytes | None]:
        """``GET`` ``path``; the status and the body (``None`` when over ``max_bytes``)."""
        url = f"{target.scheme}://{format_address(target.host, port)}{path}"
        # Every phase gets the whole deadline; the caller's move_on_after bounds the sum.
        phase = Timeouts(connect=seconds, read=seconds, write=seconds, pool=seconds, total=seconds)
        async with self._client.stream("GET", url, headers=self._headers, timeouts=phase) as resp:
            try:
                body: bytes | None = await resp.read(max_bytes=max_bytes)
            except ResponseTooLarge:
                body = None  # the connection is closed; the status still stands
            return resp.status, body

    async def aclose(self) -> None:
        """Close the connection pool (unless it was the caller's ``client``)."""
        if self._owns_client:
            await self._client.aclose()


class VitalsChecker(_HTTPCheckerBase):
    """``vitals``: read the node's ``GET /metrics`` JSON and judge it (:func:`judge_vitals`).

    The default checker for registered nodes: besides alive-or-not it brings
    the node's readiness, queue depth and model list to the proxy.  A target
    without a ``metrics_port`` fails with ``"no metrics port"``.

    :param client: a client to share (the checker then does not close it);
        by default the checker makes and owns its own pool.
    :param ssl_context: for ``https`` targets, when the checker makes its own
        client (default: the system trust store with host name checks).
    """

    name = "vitals"
    _accept = "application/json"

    async def check(self, target: CheckTarget, *, timeout: float) -> CheckResult:  # noqa: ASYNC109
        """``GET http(s)://host:metrics_port/metrics`` within ``timeout`` seconds."""
        return await _timed(self._probe, target, seconds=timeout)

    async def _probe(self, target: CheckTarget, seconds: float) -> CheckResult:
        if target.metrics_port is None:
            return CheckResult(False, "no metrics port")
        status, body = await self._get(
            target, target.metrics_port, VITALS_PATH, seconds, MAX_VITALS_BYTES
        )
        return judge_vitals(status, body)


class HTTPChecker(_HTTPCheckerBase):
    """``http``: ``GET`` a path and expect a 2xx status (the body is not judged).

    For nodes without Inferno vitals: vLLM, SGLang, llama.cpp server and TGI
    answer ``/health`` with 200 once their model is loaded.

    :param path: the request target, starting with ``/`` (a query is allowed).
    :param port: ``"service"`` (the inference port, default) or ``"metrics"``
        (the operations port; a target without one fails with ``"no metrics port"``).
    :param client: a client to share (not closed by :meth:`aclose`).
    :param ssl_context: for ``https`` targets when the checker makes its own client.
    :raises ValueError: a path that is not ``/...`` printable ASCII, or an
        unknown ``port`` choice.
    """

    name = "http"

    def __init__(
        self,
        *,
        path: str = DEFAULT_HEALTH_PATH,
        port: PortChoice = "service",
        client: HTTPClient | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.path = validate_path(path)
        if port not in ("service", "metrics"):
            raise ValueError(f"port must be 'service' or 'metrics', not {port!r}")
        self.port: PortChoice = port
        super().__init__(client=client, ssl_context=ssl_context)

    async def check(self, target: CheckTarget, *, timeout: float) -> CheckResult:  # noqa: ASYNC109
        """``GET`` :attr:`path` on the chosen port within ``timeout`` seconds."""
        return await _timed(self._probe, target, seconds=timeout)

    async def _probe(self, target: CheckTarget, seconds: float) -> CheckResult:
        port = target.port if self.port == "service" else target.metrics_port
        if port is None:
            return CheckResult(False, "no metrics port")
        status, _ = await self._get(target, port, self.path, seconds, MAX_HEALTH_BODY_BYTES)
        if 200 <= status < 300:
            return CheckResult(True)
        return CheckResult(False, f"HTTP {status}")


def validate_path(path: object) -> str:
    """``path`` if it can be a request target (``/`` then printable ASCII, no spaces).

    :raises ValueError: saying what is wrong.
    """
    if not isinstance(path, str):
        raise ValueError(f"a health check path must be a string, not {type(path).__name__}")
    if not path.startswith("/"):
        raise ValueError(f"a health check path must start with '/', got {path!r}")
    if not all("\x21" <= c <= "\x7e" for c in path) or "#" in path:
        raise ValueError(
            f"a health check path may hold printable ASCII without spaces or '#', got {path!r}"
        )
    return path


# --- the TCP checker --------------------------------------------------------------------------


class TCPChecker:
    """``tcp``: connect to the service port within the timeout, then close.

    The least a node can do: it proves the process listens, not that it
    serves.  Use it for backends that have no health endpoint at all.
    """

    name = "tcp"

    async def check(self, target: CheckTarget, *, timeout: float) -> CheckResult:  # noqa: ASYNC109
        """Open and close a TCP connection to ``host:port`` within ``timeout`` seconds."""
        return await _timed(self._probe, target, seconds=timeout)

    async def _probe(self, target: CheckTarget, seconds: float) -> CheckResult:
        stream = await anyio.connect_tcp(target.host, target.port)
        # Closing is local (no handshake to wait for) and must not be cut short.
        with anyio.CancelScope(shield=True):
            await stream.aclose()
        return CheckResult(True)

    async def aclose(self) -> None:
        """Nothing to release: every check closes its own connection."""
