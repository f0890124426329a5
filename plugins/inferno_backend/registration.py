"""Registration with the load balancers: announce, re-announce, back off, deregister.

For each load balancer of ``--discovery-lb`` (its ops port) one task keeps the
node registered (DESIGN.md, "Registration")::

    POST http://<lb>/register     Registration JSON          200: registered
    POST http://<lb>/deregister   {"id": <node id>}          200: deregistered

* success: wait ``announce_interval``, register again (the same id updates
  the entry, so a load balancer that restarted with no state re-learns this
  node within one interval);
* failure (down, refused, 5xx, timeout): retry after 1 s, 2 s, 4 s, ...,
  capped at :data:`MAX_BACKOFF` and at ``announce_interval``; each load
  balancer has its own task and deadlines, so one that is down or hangs
  never delays the others;
* a 4xx answer (401 wrong secret, 400 invalid registration) is logged as an
  error with the load balancer's message and retried on the same schedule:
  the operator may fix the load balancer's side without restarting the node.

With a shared secret every request carries ``Authorization: Bearer
<secret>``.  The secret is never logged (nor are headers).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Final

import anyio

from inferno.config import HostPort
from inferno.http.client import HTTPClient, Timeouts
from inferno.http.client_errors import ClientError
from inferno.protocol import Registration, format_address

__all__ = [
    "DEFAULT_BACKOFF",
    "DEREGISTER_TIMEOUT",
    "MAX_BACKOFF",
    "REGISTER_TIMEOUTS",
    "Backoff",
    "Registrar",
]

logger = logging.getLogger("inferno_backend.registration")

#: Longest pause between two attempts on a load balancer that keeps failing.
MAX_BACKOFF: Final = 30.0
#: Deadlines of one register or deregister call: a load balancer slower than
#: this counts as down (its own task retries it; the others do not wait).
REGISTER_TIMEOUTS: Final = Timeouts(connect=2.0, read=5.0, write=5.0, pool=2.0, total=8.0)
#: Longest time deregistration may take on stop, all load balancers together.
DEREGISTER_TIMEOUT: Final = 5.0
#: Most bytes of a refusal read for the log line.
MAX_ANSWER_BYTES: Final = 4096


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff: ``initial``, ``initial * factor``, ... never above ``cap`` seconds."""

    initial: float = 1.0
    factor: float = 2.0
    cap: float = MAX_BACKOFF

    def delays(self) -> Iterator[float]:
        """The pauses before each retry, forever."""
        delay = min(self.initial, self.cap)
        while True:
            yield delay
            delay = min(delay * self.factor, self.cap)


#: 1 s, 2 s, 4 s, ... up to :data:`MAX_BACKOFF`.
DEFAULT_BACKOFF: Final = Backoff()


class _LBState:
    __slots__ = ("address", "ever_registered", "failures", "registered")

    def __init__(self, address: HostPort) -> None:
        self.address = address
        self.registered = False
        self.ever_registered = False
        self.failures = 0


class Registrar:
    """Keeps a node registered with every load balancer (see the module docstring).

    :param load_balancers: their ops-port addresses.
    :param client: the HTTP client to send with (the caller closes it).
    :param announce_interval: seconds between re-registrations.
    :param shared_secret: sent as ``Authorization: Bearer``; never logged.
    :param backoff: retry schedule after a failure (capped at ``announce_interval`` too).
    """

    def __init__(
        self,
        load_balancers: Sequence[HostPort],
        client: HTTPClient,
        *,
        announce_interval: float,
        shared_secret: str | None = None,
        backoff: Backoff = DEFAULT_BACKOFF,
        timeouts: Timeouts = REGISTER_TIMEOUTS,
    ) -> None:
        if not announce_interval > 0:
            raise ValueError(f"announce_interval must be > 0 seconds, got {announce_interval!r}")
        self._lbs = [_LBState(address) for address in dict.fromkeys(load_balancers)]
        self._client = client
        self.announce_interval = announce_interval
        self._backoff = Backoff(
            backoff.initial, backoff.factor, min(backoff.cap, announce_interval)
        )
        self._timeouts = timeouts
        self._headers: list[tuple[str, str]] = [("content-type", "application/json")]
        if shared_secret:
            self._headers.append(("authorization", f"Bearer {shared_secret}"))

    @property
    def connected(self) -> int:
        """Load balancers whose last registration succeeded."""
        return sum(1 for lb in self._lbs if lb.registered)

    async def run(self, registration: Callable[[], Registration]) -> None:
        """Keep registered with every load balancer until cancelled.

        ``registration()`` is called before each announcement, so a node whose
        models change (an engine that discovers them) announces the new list.
        """
        async with anyio.create_task_group() as tg:
            for lb in self._lbs:
                tg.start_soon(
                    self._keep_registered, lb, registration, name=f"register {lb.address}"
                )

    async def deregister_all(self, node_id: str) -> None:
        """Deregister from every load balancer ever registered with, in parallel.

        Bounded by :data:`DEREGISTER_TIMEOUT` in all: a stopping node does not
        wait on a load balancer that is down.
        """
        timeout = DEREGISTER_TIMEOUT
        body = json.dumps({"id": node_id}).encode("utf-8")
        targets = [lb for lb in self._lbs if lb.ever_registered]
        with anyio.move_on_after(timeout) as scope:
            async with anyio.create_task_group() as tg:
                for lb in targets:
                    tg.start_soon(self._deregister, lb, body)
        if scope.cancelled_caught:
            left = [str(lb.address) for lb in targets if lb.registered]
            logger.warning("deregistration timed out after %g s (%s)", timeout, ", ".join(left))

    # -- one load balancer --------------------------------------------------------------

    def _url(self, lb: _LBState, path: str) -> str:
        return f"http://{format_address(lb.address.host, lb.address.port)}{path}"

    async def _keep_registered(
        self, lb: _LBState, registration: Callable[[], Registration]
    ) -> None:
        delays = self._backoff.delays()
        while True:
            if await self._register(lb, registration()):
                delays = self._backoff.delays()
                await anyio.sleep(self.announce_interval)
            else:
                await anyio.sleep(next(delays))

    async def _register(self, lb: _LBState, registration: Registration) -> bool:
        body = json.dumps(registration.to_json(), separators=(",", ":")).encode("utf-8")
        problem, refused = await self._post(lb, "/register", body)
        if problem is None:
            if not lb.registered:
                logger.info(
                    "registered with %s as %s (%s)",
                    lb.address,
                    registration.id,
                    ", ".join(registration.models) or "no models",
                )
            else:
                logger.debug("re-announced to %s", lb.address)
            lb.registered = lb.ever_registered = True
            lb.failures = 0
            return True
        lb.registered = False
        lb.failures += 1
        # A refusal (4xx) needs the operator; a load balancer that is down will be back.
        # Either way say it on the first failure and every tenth, not on every retry.
        if lb.failures == 1 or lb.failures % 10 == 0:
            level = logging.ERROR if refused else logging.WARNING
        else:
            level = logging.DEBUG
        logger.log(
            level, "cannot register with %s (attempt %d): %s", lb.address, lb.failures, problem
        )
        return False

    async def _deregister(self, lb: _LBState, body: bytes) -> None:
        problem, _ = await self._post(lb, "/deregister", body)
        lb.registered = False
        if problem is None:
            logger.info("deregistered from %s", lb.address)
        else:
            logger.warning("cannot deregister from %s: %s", lb.address, problem)

    async def _post(self, lb: _LBState, path: str, body: bytes) -> tuple[str | None, bool]:
        """POST ``body``: ``(None, False)`` on a 2xx answer, else what went wrong (safe to
        log) and whether the load balancer refused (4xx) rather than failed."""
        try:
            response = await self._client.request(
                "POST",
                self._url(lb, path),
                headers=self._headers,
                body=body,
                timeouts=self._timeouts,
            )
        except ClientError as exc:
            return f"{type(exc).__name__}: {exc}", False
        if 200 <= response.status < 300:
            return None, False
        answer = (await response.read())[:MAX_ANSWER_BYTES]
        return f"HTTP {response.status}: {_message(answer)}", 400 <= response.status < 500


def _message(answer: bytes) -> str:
    """The error message of a JSON error answer, else the start of the text."""
    try:
        document = json.loads(answer)
    except ValueError:
        return answer.decode("utf-8", "replace").strip()[:200] or "(empty answer)"
    if isinstance(document, dict):
        error = document.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])
    return json.dumps(document)[:200]
