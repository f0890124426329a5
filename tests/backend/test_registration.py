"""Registration with load balancers: a small real LB stand-in on inferno.http.server.

The stand-in checks bodies with :class:`inferno.protocol.Registration`, as a
proxy does, and records what it received.  "Down" load balancers are real
too: a port nobody listens on (refused) and a socket that listens but never
answers (a hung load balancer).
"""

from __future__ import annotations

import functools
import json
import logging
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from inferno_backend.engines.sim import SimEngine
from inferno_backend.gpu import GPUSampler
from inferno_backend.profiles import load_profile
from inferno_backend.registration import Backoff, Registrar
from inferno_backend.role import serve_backend
from inferno_backend.settings import BackendSettings

from inferno.config import HostPort
from inferno.errors import HTTPError
from inferno.http import Request, Response, serve
from inferno.http.client import HTTPClient
from inferno.metrics import Registry
from inferno.protocol import Registration

pytestmark = pytest.mark.anyio

WAIT = 10.0
FAST = Backoff(initial=0.01, factor=2.0, cap=0.05)
SECRET = "s3cret-for-tests"


class LoadBalancer:
    """Answers /register and /deregister like a proxy's ops port, and records them."""

    def __init__(self, secret: str | None = None) -> None:
        self.secret = secret
        self.registrations: list[Registration] = []
        self.deregistrations: list[dict[str, Any]] = []
        self.authorization: list[str | None] = []
        self.attempts = 0
        self._changed = anyio.Event()

    async def handle(self, request: Request) -> Response:
        self.attempts += 1
        self.authorization.append(request.headers.get("authorization"))
        self._notify()
        if self.secret is not None and request.headers.get("authorization") != (
            f"Bearer {self.secret}"
        ):
            raise HTTPError(401, "missing or wrong shared secret", code="unauthorized")
        body = await request.json()
        if request.path == "/register":
            try:
                registration = Registration.from_json(body)
            except ValueError as exc:
                raise HTTPError(400, str(exc)) from None
            self.registrations.append(registration)
            self._notify()
            return Response.json({"status": "registered", "peers": []})
        if request.path == "/deregister":
            self.deregistrations.append(body)
            self._notify()
            return Response.json({"status": "deregistered"})
        raise HTTPError(404, "no such route")

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def until(self, condition: Callable[[], bool]) -> None:
        with anyio.fail_after(WAIT):
            while not condition():
                await self._changed.wait()


@asynccontextmanager
async def running(lb: LoadBalancer, port: int = 0) -> AsyncIterator[HostPort]:
    async with anyio.create_task_group() as tg:
        stop = anyio.Event()
        info = await tg.start(
            functools.partial(serve, lb.handle, port=port, shutdown=stop, shutdown_timeout=0.1)
        )
        try:
            yield HostPort("127.0.0.1", info.port)
        finally:
            stop.set()


async def eventually(condition: Callable[[], bool]) -> None:
    """Wait (bounded) for a condition of the registrar, which has no events of its own."""
    with anyio.fail_after(WAIT):
        while True:
            if condition():
                return
            await anyio.sleep(0.005)


def free_port() -> int:
    """A port nobody listens on (connecting to it is refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def registration(models: tuple[str, ...] = ("m",)) -> Registration:
    return Registration(
        id="node-1", address="127.0.0.1:3000", metrics_port=6101, node_type="backend", models=models
    )


def test_backoff_doubles_up_to_its_cap() -> None:
    delays = Backoff().delays()
    assert [next(delays) for _ in range(8)] == [1, 2, 4, 8, 16, 30, 30, 30]
    capped = Backoff(initial=1.0, cap=5.0).delays()
    assert [next(capped) for _ in range(4)] == [1, 2, 4, 5]


async def test_registers_and_reannounces_with_the_secret(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    lb = LoadBalancer(secret=SECRET)
    async with running(lb) as address, HTTPClient() as client:
        registrar = Registrar(
            [address], client, announce_interval=0.02, shared_secret=SECRET, backoff=FAST
        )
        async with anyio.create_task_group() as tg:
            tg.start_soon(registrar.run, registration)
            await lb.until(lambda: len(lb.registrations) >= 3)
            assert registrar.connected == 1
            tg.cancel_scope.cancel()
        await registrar.deregister_all("node-1")
    assert lb.registrations[0] == registration()
    assert set(lb.authorization) == {f"Bearer {SECRET}"}
    assert lb.deregistrations == [{"id": "node-1"}]
    assert registrar.connected == 0
    assert all(SECRET not in record.getMessage() for record in caplog.records)


async def test_backs_off_while_down_then_registers() -> None:
    port = free_port()
    async with HTTPClient() as client:
        registrar = Registrar(
            [HostPort("127.0.0.1", port)], client, announce_interval=30.0, backoff=FAST
        )
        async with anyio.create_task_group() as tg:
            tg.start_soon(registrar.run, registration)
            lb = LoadBalancer()
            async with running(lb, port=port):
                await lb.until(lambda: len(lb.registrations) == 1)
                await eventually(lambda: registrar.connected == 1)
            tg.cancel_scope.cancel()


async def test_a_restarted_load_balancer_relearns_the_node() -> None:
    first, restarted = LoadBalancer(), LoadBalancer()  # the second starts with no state
    async with HTTPClient() as client, anyio.create_task_group() as tg:
        async with running(first) as address:
            registrar = Registrar([address], client, announce_interval=0.05, backoff=FAST)
            tg.start_soon(registrar.run, registration)
            await first.until(lambda: len(first.registrations) == 1)
        async with running(restarted, port=address.port):
            await restarted.until(lambda: len(restarted.registrations) >= 1)
        tg.cancel_scope.cancel()


async def test_a_hung_load_balancer_does_not_delay_the_others() -> None:
    hung = socket.socket()  # listens, never accepts: connects succeed, nothing answers
    hung.bind(("127.0.0.1", 0))
    hung.listen(8)
    try:
        good = LoadBalancer()
        async with running(good) as address, HTTPClient() as client:
            hung_address = HostPort("127.0.0.1", hung.getsockname()[1])
            registrar = Registrar(
                [hung_address, address], client, announce_interval=30.0, backoff=FAST
            )
            async with anyio.create_task_group() as tg:
                tg.start_soon(registrar.run, registration)
                await good.until(lambda: len(good.registrations) == 1)
                await eventually(lambda: registrar.connected == 1)
                assert registrar.connected == 1  # the hung one has not answered (and never will)
                tg.cancel_scope.cancel()
            await registrar.deregister_all("node-1")  # only the one it registered with
            assert good.deregistrations == [{"id": "node-1"}]
    finally:
        hung.close()


async def test_a_refusal_is_logged_without_the_secret_and_retried(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="inferno_backend.registration")
    lb = LoadBalancer(secret="the-right-one")
    async with running(lb) as address, HTTPClient() as client:
        registrar = Registrar(
            [address], client, announce_interval=30.0, shared_secret="a-wrong-one", backoff=FAST
        )
        async with anyio.create_task_group() as tg:
            tg.start_soon(registrar.run, registration)
            await lb.until(lambda: lb.attempts >= 3)
            tg.cancel_scope.cancel()
    assert lb.registrations == []
    assert registrar.connected == 0
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert errors
    assert "401" in errors[0].getMessage()
    assert "wrong shared secret" in errors[0].getMessage()
    assert all("a-wrong-one" not in r.getMessage() for r in caplog.records)


def test_announce_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="announce_interval"):
        Registrar([], HTTPClient(), announce_interval=0)


# -- the backend registers itself ---------------------------------------------------------------


async def test_backend_registers_announces_its_ports_and_deregisters_on_stop() -> None:
    lb = LoadBalancer(secret=SECRET)
    async with running(lb) as address, HTTPClient() as http:
        settings = BackendSettings(
            port=0,
            ops_port=0,
            discovery_lb=(address,),
            shared_secret=SECRET,
            announce_interval=30.0,
            max_concurrency=8,
            weight=2.0,
            drain_timeout=1.0,
        )
        stopping = anyio.Event()
        async with anyio.create_task_group() as tg:
            info = await tg.start(
                functools.partial(
                    serve_backend,
                    settings,
                    SimEngine(load_profile("cpu-tiny"), speed=50.0),
                    registry=Registry(),
                    stopping=stopping,
                    gpu=GPUSampler(load_nvml=_no_nvml),
                )
            )
            await lb.until(lambda: len(lb.registrations) == 1)
            vitals = json.loads(await (await http.request("GET", f"{info.ops.url}/metrics")).read())
            assert vitals["connected_peers"] == 1
            stopping.set()
            await lb.until(lambda: len(lb.deregistrations) == 1)
    announced = lb.registrations[0]
    assert announced.address == f"127.0.0.1:{info.service.port}"
    assert announced.metrics_port == info.ops.port
    assert announced.id == info.node_id == f"backend-127.0.0.1:{info.service.port}"
    assert announced.models == ("sim-tiny",)
    assert (announced.max_concurrency, announced.weight) == (8, 2.0)
    assert "streaming" in announced.capabilities
    assert lb.deregistrations == [{"id": info.node_id}]


def _no_nvml() -> Any:
    raise ImportError("no nvidia-ml-py in this test")
