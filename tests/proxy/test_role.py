"""The ``proxy`` role: in process, as a real process under SIGTERM, and its command line.

Nodes are real servers on loopback (:func:`inferno.http.serve`) answering
``/metrics`` vitals and ``/health``; the proxy is :func:`serve_proxy` in
process, or ``python -m inferno proxy`` in a child process whose JSON log
lines say where it listens.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import signal
import socket
import ssl
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
import trustme
from inferno_health.checkers import HTTPChecker, VitalsChecker
from inferno_proxy.auth import ApiKeys
from inferno_proxy.policies import LeastRequests
from inferno_proxy.role import ProxyInfo, ProxyParts, check_settings, is_loopback, serve_proxy
from inferno_proxy.settings import ProxySettings
from inferno_proxy.staticnodes import StaticBackend

from inferno.cli import main
from inferno.config import HostPort
from inferno.errors import ConfigError, HTTPError
from inferno.http import Request, Response, ServerInfo, serve
from inferno.http.client import HTTPClient
from inferno.metrics import Registry
from inferno.plugins import get_plugin_manager

pytestmark = pytest.mark.anyio

WAIT = 45.0  # seconds a test waits for what must happen before failing instead of hanging
ROOT = Path(__file__).resolve().parents[2]
LISTENING = re.compile(r"proxy listening on ([\d.]+):(\d+) \(ops ([\d.]+):(\d+)\)")
SECRET = "role-test-secret"

VITALS: dict[str, Any] = {
    "ready": True,
    "requests_in_progress": 0,
    "requests_queued": 0,
    "cpu_usage": 0.1,
    "memory_usage": 0.2,
    "uptime_seconds": 1.0,
    "version": "0.1.0",
    "models": ["tiny"],
}


# --- a node to route to -----------------------------------------------------------------------


class Node:
    """A backend stand-in: vitals on ``/metrics``, ``/health``, and a chat answer that
    names it, on one port (its service and operations port at once)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.requests: list[str] = []

    async def handle(self, request: Request) -> Response:
        self.requests.append(request.path)
        if request.path == "/metrics":
            return Response.json(VITALS)
        if request.path == "/health":
            return Response.json({"status": "ready"})
        if request.path == "/v1/chat/completions":
            body = await request.json()
            return Response.json({"served_by": self.name, "model": body.get("model")})
        raise HTTPError(404, "no such route")


@contextlib.asynccontextmanager
async def running(node: Node) -> AsyncIterator[ServerInfo]:
    async with anyio.create_task_group() as tg:
        info: ServerInfo = await tg.start(functools.partial(serve, node.handle))
        yield info
        tg.cancel_scope.cancel()


def registration(node_id: str, port: int) -> bytes:
    document = {
        "id": node_id,
        "address": f"127.0.0.1:{port}",
        "metrics_port": port,
        "node_type": "backend",
        "models": ["tiny"],
    }
    return json.dumps(document).encode()


async def eventually(condition: Callable[[], Any]) -> None:
    """Wait, bounded, for something the proxy's loops must bring about."""
    with anyio.fail_after(WAIT):
        while True:
            if await condition():
                return
            await anyio.sleep(0.02)


def parts() -> ProxyParts:
    return ProxyParts(LeastRequests(), VitalsChecker(), HTTPChecker())


# --- in process ----------------------------------------------------------------------------------


async def test_the_proxy_checks_static_backends_takes_registrations_and_stops_by_itself() -> None:
    static_node, registered_node = Node("static"), Node("registered")
    stopping = anyio.Event()
    async with (
        running(static_node) as static,
        running(registered_node) as registered,
        HTTPClient() as http,
        anyio.create_task_group() as tg,
    ):
        settings = ProxySettings(
            backends=(StaticBackend(HostPort("127.0.0.1", static.port)),), health_interval=0.05
        )
        info: ProxyInfo = await tg.start(
            functools.partial(
                serve_proxy,
                settings,
                parts(),
                registry=Registry(),
                stopping=stopping,
                shutdown_timeout=WAIT,
            )
        )
        ops = f"http://127.0.0.1:{info.ops.port}"
        answer = await http.request(
            "POST", f"{ops}/register", body=registration("node-r", registered.port)
        )
        assert answer.status == 200
        assert [p["id"] for p in (await answer.json())["peers"]] == [f"127.0.0.1:{static.port}"]

        async def all_healthy() -> bool:
            backends = (await (await http.request("GET", f"{ops}/backends")).json())["backends"]
            checked = "/metrics" in registered_node.requests
            return checked and len(backends) == 2 and all(b["healthy"] for b in backends)

        await eventually(all_healthy)
        assert "/health" in static_node.requests  # the static checker: http
        assert "/metrics" in registered_node.requests  # the registered one: vitals
        stopping.set()
    assert not tg.cancel_scope.cancel_called  # serve_proxy returned by itself


async def test_a_request_to_the_service_port_reaches_a_registered_node(tmp_path: Path) -> None:
    node = Node("registered")
    keys = tmp_path / "keys.txt"
    keys.write_text("team-a:sk-test-key-0123456789\n")
    stopping = anyio.Event()
    async with (
        running(node) as node_info,
        HTTPClient() as http,
        anyio.create_task_group() as tg,
    ):
        info: ProxyInfo = await tg.start(
            functools.partial(
                serve_proxy,
                ProxySettings(health_interval=0.05, queue_timeout=0.0),
                parts(),
                registry=Registry(),
                stopping=stopping,
                shutdown_timeout=WAIT,
                api_keys=ApiKeys.from_file(keys),
            )
        )
        service = f"http://127.0.0.1:{info.service.port}"
        ops = f"http://127.0.0.1:{info.ops.port}"
        chat = json.dumps({"model": "tiny", "messages": []}).encode()
        refused = await http.request("POST", f"{service}/v1/chat/completions", body=chat)
        assert refused.status == 401  # API keys are required
        authorized = [("authorization", "Bearer sk-test-key-0123456789")]
        nobody = await http.request(
            "POST", f"{service}/v1/completions", headers=authorized, body=b"{}"
        )
        assert nobody.status == 503  # no node yet, and no waiting (queue_timeout 0)
        assert nobody.headers.get("retry-after") is not None
        answer = await http.request(
            "POST", f"{ops}/register", body=registration("node-r", node_info.port)
        )
        assert answer.status == 200
        response = await http.request(
            "POST", f"{service}/v1/chat/completions", headers=authorized, body=chat
        )
        assert response.status == 200, await response.read()
        assert await response.json() == {"served_by": "registered", "model": "tiny"}
        assert node.requests.count("/v1/chat/completions") == 1
        models = await http.request("GET", f"{service}/v1/models", headers=authorized)
        assert [m["id"] for m in (await models.json())["data"]] == ["tiny"]
        vitals = await (await http.request("GET", f"{ops}/metrics")).json()
        assert vitals["requests_in_progress"] == 0
        assert vitals["backoff_requests"] == 1  # the 503 above
        assert vitals["failed_responses"] == 0
        telemetry = await http.request("GET", f"{ops}/telemetry")
        text = (await telemetry.read()).decode()
        assert 'inferno_proxy_requests_total{route="/v1/chat/completions",status="200"' in text
        stopping.set()


# --- settings ------------------------------------------------------------------------------------


def source(dotted: str) -> str:
    return "test"


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"ops_host": "0.0.0.0"}, "proxy.ops_host"),
        ({"ops_host": "::"}, "proxy.ops_host"),
        ({"ops_host": "10.1.2.3"}, "proxy.ops_host"),
        ({"ops_host": "proxy.example.com"}, "proxy.ops_host"),
        ({"shared_secret": "  "}, "proxy.shared_secret"),
        ({"shared_secret": "x", "open_enrollment": True}, "proxy.open_enrollment"),
        ({"tls_key": Path("key.pem")}, "proxy.tls_key"),
        ({"circuit_cooldown": 10.0, "circuit_max_cooldown": 5.0}, "proxy.circuit_max_cooldown"),
        ({"backends": (StaticBackend(HostPort("0.0.0.0", 80)),)}, "proxy.backends"),
        ({"backends": (StaticBackend(HostPort("127.0.0.1", 0)),)}, "proxy.backends"),
    ],
)
def test_settings_the_proxy_must_not_run_with_are_refused(
    options: dict[str, Any], key: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        check_settings(ProxySettings(**options), source)
    assert [p.key for p in refused.value.problems] == [key]


@pytest.mark.parametrize(
    "options",
    [
        {"ops_host": "127.0.0.1"},
        {"ops_host": "localhost"},
        {"ops_host": "::1"},
        {"ops_host": "0.0.0.0", "shared_secret": "x"},
        {"ops_host": "0.0.0.0", "open_enrollment": True},
    ],
)
def test_loopback_or_a_secret_or_explicit_open_enrolment_may_start(
    options: dict[str, Any],
) -> None:
    check_settings(ProxySettings(**options), source)


def test_plugin_names_are_checked_against_the_plugins() -> None:
    pm = get_plugin_manager(refresh=True)
    from inferno.plugins import collect_named

    policies = collect_named(pm, "inferno_routing_policies")
    checkers = collect_named(pm, "inferno_health_checkers")
    assert {"least_requests", "round_robin", "weighted", "affinity"} <= set(policies)
    settings = ProxySettings(policy="fastest", health_checker="psychic")
    with pytest.raises(ConfigError) as refused:
        check_settings(settings, source, policies=policies, checkers=checkers)
    assert [p.key for p in refused.value.problems] == ["proxy.policy", "proxy.health_checker"]
    assert "least_requests" in refused.value.problems[0].allowed


def test_the_plugin_offers_every_built_in_policy_lazily() -> None:
    from inferno_proxy.plugin import POLICY_NAMES, inferno_routing_policies
    from inferno_proxy.policies import routing_policy_factories

    assert sorted(POLICY_NAMES) == sorted(routing_policy_factories())
    for name, factory in inferno_routing_policies().items():
        assert factory(None).name == name


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("", False),
        ("::", False),
        ("192.168.1.1", False),
        ("example.com", False),
    ],
)
def test_what_counts_as_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


# --- the command line ----------------------------------------------------------------------------


@pytest.mark.usefixtures("clean_inferno_env")
@pytest.mark.parametrize(
    ("args", "key"),
    [
        (["--ops-host", "0.0.0.0"], "proxy.ops_host"),
        (["--policy", "nope"], "proxy.policy"),
        (["--static-health-checker", "nope"], "proxy.static_health_checker"),
        (["--health-path", "no-slash"], "proxy.health_path"),
        (["--tls-cert", "/nonexistent/cert.pem"], "proxy.tls_cert"),
        (["--backends", "nohost"], "proxy.backends"),
        (["--health-interval", "0s"], "proxy.health_interval"),
        (["--api-keys", "/nonexistent/keys.txt"], "proxy.api_keys"),
        (["--response-headers", "X-A: 1, Transfer-Encoding: gzip"], "proxy.response_headers"),
        (["--backends", "127.0.0.1:9001,127.0.0.1:9001;weight=2"], "proxy.backends"),
    ],
)
def test_bad_settings_exit_2_naming_the_key(
    args: list[str], key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["proxy", "--port=0", "--ops-port=0", *args]) == 2
    err = capsys.readouterr().err
    assert f"{key} (" in err
    assert "Traceback" not in err


@pytest.mark.usefixtures("clean_inferno_env")
def test_a_backend_listed_twice_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--backends", "localhost:9001,127.0.0.1:9002, localhost:9001;model=m"]
    assert main(["proxy", "--port=0", "--ops-port=0", *args]) == 2
    assert "item 3: localhost:9001 is item 1 again" in capsys.readouterr().err


@pytest.mark.usefixtures("clean_inferno_env")
def test_the_open_enrolment_refusal_explains_itself(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["proxy", "--port=0", "--ops-port=0", "--ops-host=0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "not a loopback address" in err
    assert "--open-enrollment" in err


@pytest.mark.usefixtures("clean_inferno_env")
@pytest.mark.parametrize("flag", ["--port", "--ops-port"])
def test_a_port_in_use_is_one_clear_line(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["proxy", "--port=0", "--ops-port=0", f"{flag}={port}"]) == 1
    err = capsys.readouterr().err
    key = "proxy.port" if flag == "--port" else "proxy.ops_port"
    assert f"inferno: error: cannot listen on 127.0.0.1:{port} ({key}): " in err
    assert "Traceback" not in err


@pytest.mark.usefixtures("clean_inferno_env")
def test_config_shows_settings_and_hides_the_secret(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "proxy", "--shared-secret", "hush-hush", "--policy", "affinity"]) == 0
    out = capsys.readouterr().out
    assert 'policy = "affinity"  # from flag --policy' in out
    assert "hush-hush" not in out
    assert "[proxy]" in out


# --- a real process ------------------------------------------------------------------------------


def proxy_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERNO_")}
    env["INFERNO_LOG_FORMAT"] = "json"
    return env


async def read_lines(
    stream: anyio.abc.ByteReceiveStream, lines: list[dict[str, Any]], listening: anyio.Event
) -> None:
    buffer = b""
    async for data in stream:
        buffer += data
        *complete, buffer = buffer.split(b"\n")
        for raw in complete:
            try:
                record = json.loads(raw)
            except ValueError:
                record = {"message": raw.decode(errors="replace")}
            lines.append(record)
            if LISTENING.search(str(record.get("message", ""))):
                listening.set()


async def test_the_proxy_process_takes_registrations_and_exits_0_on_sigterm() -> None:
    lines: list[dict[str, Any]] = []
    listening = anyio.Event()
    node = Node("registered")
    command = [
        sys.executable,
        "-m",
        "inferno",
        "proxy",
        "--port=0",
        "--ops-port=0",
        f"--shared-secret={SECRET}",
        "--health-interval=50ms",
    ]
    async with (
        running(node) as node_info,
        HTTPClient() as http,
        await anyio.open_process(command, env=proxy_env(), cwd=ROOT) as process,
    ):
        assert process.stderr is not None
        async with anyio.create_task_group() as tg:
            tg.start_soon(read_lines, process.stderr, lines, listening)
            try:
                with anyio.fail_after(WAIT):
                    await listening.wait()
                    (found,) = [m for r in lines if (m := LISTENING.search(str(r.get("message"))))]
                    ops = f"http://127.0.0.1:{found.group(4)}"
                    body = registration("node-r", node_info.port)
                    refused = await http.request("POST", f"{ops}/register", body=body)
                    assert refused.status == 401
                    answer = await http.request(
                        "POST",
                        f"{ops}/register",
                        headers=[("authorization", f"Bearer {SECRET}")],
                        body=body,
                    )
                    assert answer.status == 200
                    peers = (await (await http.request("GET", f"{ops}/peers")).json())["peers"]
                    assert [p["id"] for p in peers] == ["node-r"]
                    await eventually(lambda: _checked(node))
                    service = f"http://127.0.0.1:{found.group(2)}"
                    chat = json.dumps({"model": "tiny", "messages": []}).encode()
                    routed = await http.request("POST", f"{service}/v1/chat/completions", body=chat)
                    assert (await routed.json())["served_by"] == "registered"
                    process.send_signal(signal.SIGTERM)
                    status = await process.wait()
            finally:
                if process.returncode is None:
                    process.kill()
            tg.cancel_scope.cancel()
    log = "\n".join(str(r.get("message")) for r in lines)
    assert status == 0, log
    assert "node node-r added (registered)" in log
    assert "proxy stopped" in log
    assert SECRET not in json.dumps(lines)


async def _checked(node: Node) -> bool:
    return "/metrics" in node.requests


async def test_tls_on_the_service_port_and_api_keys_reloaded_on_sighup(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_file, key_file, keys = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "keys"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    keys.write_text("old:sk-old-key-0123456789\n")
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    lines: list[dict[str, Any]] = []
    listening = anyio.Event()
    command = [
        sys.executable,
        "-m",
        "inferno",
        "proxy",
        "--port=0",
        "--ops-port=0",
        f"--tls-cert={cert_file}",
        f"--tls-key={key_file}",
        f"--api-keys={keys}",
    ]

    async def models(http: HTTPClient, url: str, key: str) -> int:
        headers = [("authorization", f"Bearer {key}")]
        return (await http.request("GET", f"{url}/v1/models", headers=headers)).status

    async with (
        HTTPClient(ssl_context=client_context) as http,
        await anyio.open_process(command, env=proxy_env(), cwd=ROOT) as process,
    ):
        assert process.stderr is not None
        async with anyio.create_task_group() as tg:
            tg.start_soon(read_lines, process.stderr, lines, listening)
            try:
                with anyio.fail_after(WAIT):
                    await listening.wait()
                    (found,) = [m for r in lines if (m := LISTENING.search(str(r.get("message"))))]
                    service = f"https://127.0.0.1:{found.group(2)}"
                    assert await models(http, service, "sk-old-key-0123456789") == 200
                    assert await models(http, service, "sk-new-key-0123456789") == 401
                    keys.write_text("new:sk-new-key-0123456789\n")
                    process.send_signal(signal.SIGHUP)

                    async def reloaded() -> bool:
                        return await models(http, service, "sk-new-key-0123456789") == 200

                    await eventually(reloaded)
                    assert await models(http, service, "sk-old-key-0123456789") == 401
                    process.send_signal(signal.SIGTERM)
                    status = await process.wait()
            finally:
                if process.returncode is None:
                    process.kill()
            tg.cancel_scope.cancel()
    log = "\n".join(str(r.get("message")) for r in lines)
    assert status == 0, log
    assert "API keys reloaded: 1 key(s)" in log
    assert "sk-old-key" not in log
