"""The operations port over real loopback sockets: discovery, the pool explained, vitals.

An :class:`OpsApp` over a real :class:`Pool` is served by :func:`inferno.http.serve`
and spoken to with our HTTP client, as a backend's registrar and an operator's
tools speak to it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio
import pytest
from inferno_proxy.healthloop import CHANGE_STATES, ChangeReporter
from inferno_proxy.nodes import Outcome, PoolSettings
from inferno_proxy.ops import OpsApp, ServiceLoad
from inferno_proxy.pool import Pool

from inferno.http import ServerInfo, serve
from inferno.http.client import ClientResponse, HTTPClient
from inferno.metrics import Registry
from inferno.protocol import NodeInfo, NodeVitals

pytestmark = pytest.mark.anyio

SECRET = "s3cret-for-tests"


def registration(node_id: str = "node-a", **fields: Any) -> dict[str, Any]:
    document: dict[str, Any] = {
        "id": node_id,
        "address": "127.0.0.1:9001",
        "metrics_port": 9101,
        "node_type": "backend",
        "models": ["tiny"],
        "capabilities": ["chat"],
        "weight": 1.0,
        "max_concurrency": 8,
    }
    document.update(fields)
    return {k: v for k, v in document.items() if v is not None}


@dataclass
class Ops:
    """A running operations port, its pool and a client to speak to it."""

    app: OpsApp
    pool: Pool
    registry: Registry
    info: ServerInfo
    http: HTTPClient
    told: list[int]

    async def post(
        self, path: str, body: Any, *, secret: str | None = None, raw: bytes | None = None
    ) -> tuple[int, Any]:
        headers = [("content-type", "application/json")]
        if secret is not None:
            headers.append(("authorization", f"Bearer {secret}"))
        data = raw if raw is not None else json.dumps(body).encode()
        response = await self.http.request(
            "POST", f"{self.info.url}{path}", headers=headers, body=data
        )
        return response.status, await response.json()

    async def get(self, path: str, accept: str | None = None) -> ClientResponse:
        headers = [("accept", accept)] if accept else []
        return await self.http.request("GET", f"{self.info.url}{path}", headers=headers)

    async def get_json(self, path: str) -> Any:
        response = await self.get(path)
        assert response.status == 200, await response.read()
        return await response.json()


@contextlib.asynccontextmanager
async def ops_port(
    *, secret: str | None = None, load: ServiceLoad | None = None, **pool_settings: Any
) -> AsyncIterator[Ops]:
    pool = Pool(PoolSettings(**pool_settings))
    registry = Registry()
    told: list[int] = []
    reporter = ChangeReporter(pool, registry, on_change=lambda: told.append(1))
    app = OpsApp(
        pool,
        reporter=reporter,
        registry=registry,
        shared_secret=secret,
        load=(lambda: load) if load is not None else None,
    )
    async with anyio.create_task_group() as tg, HTTPClient() as http:
        info: ServerInfo = await tg.start(functools.partial(serve, app.handle))
        yield Ops(app, pool, registry, info, http, told)
        tg.cancel_scope.cancel()


# --- registration ------------------------------------------------------------------------------


async def test_a_valid_registration_is_stored_and_answered_with_the_other_peers() -> None:
    async with ops_port() as ops:
        status, answer = await ops.post("/register", registration())
        assert (status, answer) == (200, {"status": "registered", "peers": []})
        node = ops.pool.get("node-a")
        assert node is not None
        assert node.address == "127.0.0.1:9001"
        assert node.models == ("tiny",)
        assert ops.told == [1]  # the data path heard of it
        peers = (await ops.get_json("/peers"))["peers"]
        assert [NodeInfo.from_json(p).id for p in peers] == ["node-a"]


async def test_the_answer_lists_every_other_proxy_and_backend() -> None:
    async with ops_port() as ops:
        await ops.post("/register", registration("node-a"))
        await ops.post(
            "/register",
            registration("proxy-2", address="10.0.0.2:8080", node_type="proxy", models=[]),
        )
        status, answer = await ops.post("/register", registration("node-b", address="h:1"))
        assert status == 200
        peers = [NodeInfo.from_json(p) for p in answer["peers"]]
        assert [(p.id, p.node_type) for p in peers] == [
            ("node-a", "backend"),
            ("proxy-2", "proxy"),
        ]
        assert peers[0] == NodeInfo.from_json(registration("node-a"))
        # Proxies are peers, not backends: nothing is routed to them.
        backends = (await ops.get_json("/backends"))["backends"]
        assert [b["id"] for b in backends] == ["node-a", "node-b"]


async def test_registering_again_updates_the_node() -> None:
    async with ops_port() as ops:
        await ops.post("/register", registration(models=["tiny"], weight=1.0))
        status, _ = await ops.post("/register", registration(models=["big"], weight=3.0))
        assert status == 200
        assert len(ops.pool) == 1
        node = ops.pool.get("node-a")
        assert node is not None
        assert (node.models, node.weight) == (("big",), 3.0)
        await ops.post("/register", registration(address="127.0.0.1:9002"))
        assert node.address == "127.0.0.1:9002"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({k: v for k, v in registration().items() if k != "address"}, "address"),
        (registration(address="0.0.0.0:80"), "address"),
        (registration(metrics_port=70000), "metrics_port"),
        (registration(node_type="toaster"), "node_type"),
        ({"id": "gpu-b", "address": "127.0.0.1:3002", "node_type": "toaster"}, "metrics_port"),
        (registration(models=["a", "a"]), "models[1]"),
        (registration(weight=True), "weight"),
        (registration(id="has space"), "id"),
        (["not", "an", "object"], "body"),
    ],
)
async def test_an_invalid_registration_is_refused_naming_the_field(body: Any, field: str) -> None:
    async with ops_port() as ops:
        status, answer = await ops.post("/register", body)
        assert status == 400
        assert answer["error"]["message"].startswith(f"invalid registration: field {field!r}: ")
        assert answer["error"]["code"] == "invalid_field"
        assert len(ops.pool) == 0  # nothing stored
        assert ops.told == []


async def test_a_body_that_is_not_json_is_a_400() -> None:
    async with ops_port() as ops:
        status, answer = await ops.post("/register", None, raw=b"{not json")
        assert status == 400
        assert answer["error"]["type"] == "invalid_request_error"
        assert len(ops.pool) == 0


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer wrong", f"Basic {SECRET}", f"Bearer {SECRET}x", "Bearer", f"bearer{SECRET}"],
)
async def test_without_the_shared_secret_nothing_is_registered(authorization: str | None) -> None:
    async with ops_port(secret=SECRET) as ops:
        headers = [("authorization", authorization)] if authorization else []
        response = await ops.http.request(
            "POST", f"{ops.info.url}/register", headers=headers, body=b"not even json"
        )
        assert response.status == 401  # before the body is even looked at
        assert response.headers.get("www-authenticate") == 'Bearer realm="inferno"'
        error = (await response.json())["error"]
        assert error["type"] == "authentication_error"
        assert SECRET not in error["message"]
        assert len(ops.pool) == 0


async def test_with_the_shared_secret_registration_and_deregistration_work() -> None:
    async with ops_port(secret=SECRET) as ops:
        status, _ = await ops.post("/register", registration(), secret=SECRET)
        assert status == 200
        assert "node-a" in ops.pool
        status, _ = await ops.post("/deregister", {"id": "node-a"})
        assert status == 401
        assert "node-a" in ops.pool
        status, answer = await ops.post("/deregister", {"id": "node-a"}, secret=SECRET)
        assert (status, answer) == (200, {"status": "deregistered"})
        assert "node-a" not in ops.pool


async def test_a_full_pool_says_so_with_retry_after() -> None:
    async with ops_port(max_nodes=1) as ops:
        await ops.post("/register", registration("a"))
        response = await ops.http.request(
            "POST", f"{ops.info.url}/register", body=json.dumps(registration("b")).encode()
        )
        assert response.status == 503
        assert response.headers.get("retry-after") == "30"
        assert (await response.json())["error"]["code"] == "pool_full"
        assert "b" not in ops.pool


# --- deregistration -------------------------------------------------------------------------------


async def test_deregistering_removes_an_idle_node_and_drains_a_busy_one() -> None:
    async with ops_port() as ops:
        await ops.post("/register", registration("idle"))
        await ops.post("/register", registration("busy", address="127.0.0.1:9002"))
        busy = ops.pool.get("busy")
        assert busy is not None
        lease = ops.pool.start(busy, 1.0)
        assert (await ops.post("/deregister", {"id": "idle"}))[0] == 200
        assert (await ops.post("/deregister", {"id": "busy"}))[0] == 200
        assert "idle" not in ops.pool
        [entry] = (await ops.get_json("/backends"))["backends"]
        assert entry["draining"] is True
        assert entry["out"][0]["reason"] == "draining"
        ops.pool.finish(lease, Outcome.SUCCESS, 2.0)
        assert "busy" not in ops.pool


async def test_deregistering_an_unknown_id_is_fine_and_a_missing_id_is_a_400() -> None:
    async with ops_port() as ops:
        assert await ops.post("/deregister", {"id": "nobody"}) == (
            200,
            {"status": "deregistered"},
        )
        status, answer = await ops.post("/deregister", {})
        assert status == 400
        assert answer["error"]["message"] == "invalid deregistration: field 'id': is required"
        status, answer = await ops.post("/deregister", {"id": 7})
        assert status == 400
        assert answer["error"]["message"].startswith("invalid deregistration: field 'id': ")


# --- explaining the pool ----------------------------------------------------------------------


async def test_backends_says_why_each_node_is_out_and_since_when() -> None:
    async with ops_port() as ops:
        ops.pool.add_static("127.0.0.1:9500", ops.app._clock())
        await ops.post("/register", registration("failing"))
        now = ops.app._clock()
        for _ in range(3):
            ops.pool.check_failed("failing", now, "connect refused")
        backends = {b["id"]: b for b in (await ops.get_json("/backends"))["backends"]}
        static = backends["127.0.0.1:9500"]
        assert static["source"] == "static"
        assert static["healthy"] is False
        [unchecked] = static["out"]
        assert unchecked["reason"] == "unchecked"
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", unchecked["since"])
        failing = backends["failing"]
        assert failing["health"] == "unhealthy"
        assert failing["consecutive_failures"] == 3
        [why] = failing["out"]
        assert why["reason"] == "failed_checks"
        assert why["detail"] == "3 consecutive failures, last: connect refused"
        assert why["for_seconds"] >= 0
        for key in ("address", "models", "circuit", "in_flight", "vitals", "draining"):
            assert key in failing


# --- vitals, telemetry, health ------------------------------------------------------------------


async def test_metrics_are_the_proxys_own_vitals_as_json() -> None:
    load = ServiceLoad(in_flight=3, queued=2, failed_responses=1, backoff_requests=4)
    async with ops_port(load=load) as ops:
        await ops.post("/register", registration())
        vitals = NodeVitals.from_json(await ops.get_json("/metrics"))
        assert vitals.ready is True
        assert (vitals.requests_in_progress, vitals.requests_queued) == (3, 2)
        assert (vitals.failed_responses, vitals.backoff_requests) == (1, 4)
        assert vitals.connected_peers == 1
        assert vitals.models == ("tiny",)
        assert 0.0 <= vitals.cpu_usage <= 1.0
        assert 0.0 <= vitals.memory_usage <= 1.0


@pytest.mark.parametrize("path", ["/metrics", "/telemetry"])
async def test_prometheus_text_has_per_node_gauges(path: str) -> None:
    async with ops_port() as ops:
        await ops.post("/register", registration())
        response = await ops.get(path, accept="text/plain")
        assert response.status == 200
        assert response.headers.get("content-type", "").startswith("text/plain")
        text = (await response.read()).decode()
        assert 'inferno_proxy_node_in_rotation{node="node-a"} 1' in text
        assert 'inferno_proxy_node_health_state{node="node-a",state="healthy"} 1' in text
        assert 'inferno_proxy_node_circuit_state{node="node-a",state="closed"} 1' in text
        assert 'inferno_proxy_registrations_total{result="registered"} 1' in text
        await ops.post("/deregister", {"id": "node-a"})
        text = (await (await ops.get(path, accept="text/plain")).read()).decode()
        assert 'node="node-a"' not in text  # a node that left leaves no stale series


async def test_node_changes_are_counted_under_a_fixed_set_of_labels() -> None:
    """Registering, moving and removing nodes at distinct addresses adds no series:
    no label carries an address or an id."""

    def series() -> set[tuple[str, str]]:
        family = registry.snapshot()["inferno_proxy_node_changes_total"]
        return {(s["labels"]["kind"], s["labels"]["state"]) for s in family["series"]}

    async with ops_port() as ops:
        registry = ops.registry

        async def cycle(first: int, count: int) -> None:
            for i in range(first, first + count):
                body = registration(f"n{i}", address=f"127.0.0.{i % 250 + 1}:{1000 + i}")
                assert (await ops.post("/register", body))[0] == 200
                body["address"] = f"127.0.0.{i % 250 + 1}:{2000 + i}"  # moved
                assert (await ops.post("/register", body))[0] == 200
                assert (await ops.post("/deregister", {"id": f"n{i}"}))[0] == 200

        await cycle(0, 2)
        few = series()
        await cycle(2, 40)
        assert series() == few
        assert few <= {(kind, state) for kind in ("added", "updated", "removed", "draining",
                                                  "rotation", "health", "circuit", "stall")
                       for state in CHANGE_STATES}  # fmt: skip
        assert ("updated", "moved") in few
        assert ("added", "registered") in few
        lines = ops.app.render_prometheus().splitlines()
        counted = [line for line in lines if line.startswith("inferno_proxy_node_changes_total")]
        assert counted
        assert not any("127.0.0." in line for line in counted)


async def test_health_turns_503_and_vitals_not_ready_while_draining() -> None:
    async with ops_port() as ops:
        response = await ops.get("/health")
        assert (response.status, await response.json()) == (200, {"status": "ready"})
        ops.app.start_draining()
        response = await ops.get("/health")
        assert (response.status, await response.json()) == (503, {"status": "draining"})
        assert (await ops.get_json("/metrics"))["ready"] is False


async def test_unknown_routes_and_wrong_methods() -> None:
    async with ops_port() as ops:
        assert (await ops.get("/nope")).status == 404
        response = await ops.get("/register")
        assert response.status == 405
        assert response.headers.get("allow") == "POST"
        status, _ = await ops.post("/backends", {})
        assert status == 405


def test_an_empty_secret_is_refused() -> None:
    pool = Pool()
    with pytest.raises(ValueError, match="empty shared secret"):
        OpsApp(
            pool, reporter=ChangeReporter(pool, Registry()), registry=Registry(), shared_secret=""
        )
