"""Static backends: their ``;weight=``/``;model=`` syntax, and their models read from the node.

Three layers.  The pure parts (:class:`BackendSpec`, :func:`read_model_list`,
:class:`ModelDiscovery`, the pool's :meth:`~inferno_proxy.pool.Pool.lists`) are
tested on values.  The health loop is driven round by round with
:meth:`HealthLoop.check_all` and a clock the test moves, against real servers
on loopback.  The whole proxy (:func:`serve_proxy`) runs in process in front
of :class:`OpenAIServer`, a plain OpenAI-compatible server such as a static
backend is, and is observed only through its ports: ``/v1/models`` and
requests on the service port, ``/backends`` and ``/telemetry`` on the
operations port.  The command line is run through :func:`inferno.cli.main`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
from hypothesis import given
from hypothesis import strategies as st
from inferno_health.checkers import HTTPChecker, VitalsChecker
from inferno_proxy.healthloop import ChangeReporter, HealthLoop
from inferno_proxy.nodes import PoolSettings
from inferno_proxy.policies import LeastRequests
from inferno_proxy.pool import Pool
from inferno_proxy.role import ProxyParts, serve_proxy
from inferno_proxy.settings import ProxySettings
from inferno_proxy.staticnodes import (
    MAX_MODEL_LIST_BYTES,
    BackendSpec,
    ModelAnswer,
    ModelDiscovery,
    StaticBackend,
    add_static_backends,
    describe_models,
    read_model_list,
)

from inferno.cli import main
from inferno.config import HostPort
from inferno.errors import HTTPError
from inferno.http import Request, Response, ServerInfo, serve
from inferno.http.client import HTTPClient
from inferno.metrics import Registry
from inferno.protocol import MAX_MODELS, MAX_NAME_CHARS, Registration

pytestmark = pytest.mark.anyio

WAIT = 20.0  # seconds a test waits for what must happen before it fails instead of hanging
SPEC = BackendSpec()


# --- the syntax ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("10.0.0.5:8000", StaticBackend(HostPort("10.0.0.5", 8000))),
        (
            "10.0.0.5:8000;weight=2;model=llama3",
            StaticBackend(HostPort("10.0.0.5", 8000), 2.0, ("llama3",)),
        ),
        (
            " [::1]:9 ; model = meta-llama/Llama-3-8B:q4 ; weight = 0.25 ; model=b ",
            StaticBackend(HostPort("::1", 9), 0.25, ("meta-llama/Llama-3-8B:q4", "b")),
        ),
        (
            "gpu-1.example.com:80;model=a=b",
            StaticBackend(HostPort("gpu-1.example.com", 80), 1.0, ("a=b",)),
        ),
        ("h:1;weight=1e3", StaticBackend(HostPort("h", 1), 1000.0)),
    ],
)
def test_an_entry_parses_to_address_weight_and_models(raw: str, expected: StaticBackend) -> None:
    assert SPEC.parse(raw) == expected


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("10.0.0.5:8000;weight=0", "has a weight '0' out of range: expected a number > 0"),
        ("10.0.0.5:8000;weight=-1", "has a weight '-1' out of range: expected a number > 0"),
        ("10.0.0.5:8000;weight=nan", "has a weight 'nan' out of range"),
        ("10.0.0.5:8000;weight=inf", "has a weight 'inf' out of range"),
        ("10.0.0.5:8000;weight=heavy", "has a weight 'heavy' that is not a number"),
        ("10.0.0.5:8000;weight=", "has a weight '' that is not a number"),
        ("10.0.0.5:8000;weight=1;weight=2", "gives weight twice"),
        ("10.0.0.5:8000;model=", "has an empty model name"),
        ("10.0.0.5:8000;model=a;model=a", "gives model 'a' twice"),
        ("10.0.0.5:8000;models=a", "has an unknown option 'models'; the options are weight=W"),
        ("10.0.0.5:8000;weight", "has an option 'weight' without '='"),
        ("10.0.0.5:8000;", "has an empty option"),
        ("10.0.0.5:8000;;model=a", "has an empty option"),
        ("nohost", "'nohost' has no port"),
        ("0.0.0.0:80;weight=2", "'0.0.0.0:80' cannot be connected to: '0.0.0.0' is a wildcard"),
        ("10.0.0.5:0", "cannot be connected to: port '0' is not a number from 1 to 65535"),
        ("10.0.0.5:8000;model=" + "m" * 300, "is 300 characters long; at most 256"),
        ("10.0.0.5:8000;model=bad\x07name", "must be printable"),
    ],
)
def test_a_bad_entry_is_refused_naming_its_problem(raw: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        SPEC.parse(raw)


def test_only_strings_and_tables_are_entries() -> None:
    with pytest.raises(ValueError, match="expected a 'host:port;option=value' string, got int"):
        SPEC.parse(8000)
    with pytest.raises(ValueError, match="got an array"):
        SPEC.parse(["10.0.0.5:8000"])


@pytest.mark.usefixtures("clean_inferno_env")
def test_a_toml_table_is_an_entry_too(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    table = {"address": "10.0.0.5:8000", "weight": 2, "models": ["meta-llama/Llama-3-8B"]}
    expected = StaticBackend(HostPort("10.0.0.5", 8000), 2.0, ("meta-llama/Llama-3-8B",))
    assert SPEC.parse(table) == expected
    assert SPEC.parse({"address": "10.0.0.6:8000"}) == StaticBackend(HostPort("10.0.0.6", 8000))
    # From a file: an inline table beside a string entry, shown back as strings.
    saved = tmp_path / "proxy.toml"
    saved.write_text(
        "[proxy]\n"
        'backends = [{ address = "10.0.0.5:8000", weight = 2, models = ["meta-llama/Llama-3-8B"] },'
        ' "10.0.0.6:8000"]\n'
    )
    assert main(["config", "proxy", "--config", str(saved)]) == 0
    shown = capsys.readouterr().out
    assert (
        'backends = ["10.0.0.5:8000;weight=2;model=meta-llama/Llama-3-8B", "10.0.0.6:8000"]'
        in shown
    )


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"address": "10.0.0.5:8000", "wieght": 2}, "unknown key(s) 'wieght'"),
        ({"weight": 2}, 'needs address = "host:port"'),
        ({"address": "0.0.0.0:8000"}, "cannot be connected to"),
        ({"address": "10.0.0.5:8000", "weight": 0}, "out of range"),
        ({"address": "10.0.0.5:8000", "weight": True}, "weight must be a number"),
        ({"address": "10.0.0.5:8000", "models": "llama3"}, "models must be an array"),
        ({"address": "10.0.0.5:8000", "models": ["a", "a"]}, "lists a model twice"),
        ({"address": "10.0.0.5:8000", "models": [""]}, "empty model name"),
    ],
)
def test_a_bad_table_is_refused_naming_its_problem(table: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        SPEC.parse(table)


def test_a_backend_built_in_code_keeps_the_registration_rules() -> None:
    address = HostPort("127.0.0.1", 8000)
    with pytest.raises(ValueError, match=r"weight: 0\.0 is out of range"):
        StaticBackend(address, weight=0.0)
    with pytest.raises(ValueError, match=f"has {MAX_MODELS + 1} entries; at most {MAX_MODELS}"):
        StaticBackend(address, models=tuple(f"m{i}" for i in range(MAX_MODELS + 1)))
    with pytest.raises(ValueError, match="model 'a;b': ';' separates options"):
        StaticBackend(address, models=("a;b",))
    backend = StaticBackend(address, 3, ("m",))
    assert backend.weight == 3.0
    assert isinstance(backend.weight, float)
    assert str(backend) == "127.0.0.1:8000"  # the node's id
    assert backend.spec() == "127.0.0.1:8000;weight=3;model=m"


@pytest.mark.parametrize(
    ("backend", "text"),
    [
        (StaticBackend(HostPort("a", 1)), "a:1"),
        (StaticBackend(HostPort("::1", 8000), 2.5), "[::1]:8000;weight=2.5"),
        (StaticBackend(HostPort("a", 1), 0.1 + 0.2), "a:1;weight=0.30000000000000004"),
        (StaticBackend(HostPort("a", 1), 1.0, ("x/y:z", "w")), "a:1;model=x/y:z;model=w"),
    ],
)
def test_an_entry_renders_as_written_and_parses_back(backend: StaticBackend, text: str) -> None:
    assert SPEC.render(backend) == text
    assert SPEC.parse(text) == backend


_NAME_CHARS = st.characters(codec="utf-8", categories=("L", "N", "P", "S"), exclude_characters=";")


@given(
    weight=st.floats(min_value=1e-6, max_value=1e6),
    models=st.lists(
        st.text(_NAME_CHARS, min_size=1, max_size=40).filter(lambda n: n.strip() == n),
        max_size=4,
        unique=True,
    ),
)
def test_every_backend_renders_to_text_that_parses_back(weight: float, models: list[str]) -> None:
    backend = StaticBackend(HostPort("10.0.0.5", 8000), weight, tuple(models))
    assert SPEC.parse(SPEC.render(backend)) == backend


# --- the syntax through the configuration ------------------------------------------------------


@pytest.mark.usefixtures("clean_inferno_env")
def test_inferno_config_shows_the_backends_in_a_form_it_reads_back(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flag = "10.0.0.5:8000;model=llama3;weight=2,10.0.0.6:8000;model=meta-llama/Llama-3-8B:q4"
    assert main(["config", "proxy", "--backends", flag]) == 0
    shown = capsys.readouterr().out
    line = next(x for x in shown.splitlines() if x.startswith("backends = "))
    expected = (
        'backends = ["10.0.0.5:8000;weight=2;model=llama3", '
        '"10.0.0.6:8000;model=meta-llama/Llama-3-8B:q4"]'
    )
    assert line == f"{expected}  # from flag --backends"
    saved = tmp_path / "proxy.toml"
    saved.write_text(shown)
    assert main(["config", "proxy", "--config", str(saved)]) == 0
    again = capsys.readouterr().out
    assert f"{expected}  # from {saved}:" in again


@pytest.mark.usefixtures("clean_inferno_env")
@pytest.mark.parametrize("where", ["flag", "env", "file"])
def test_a_bad_entry_stops_the_proxy_with_exit_2_naming_key_source_and_problem(
    where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    entry = "127.0.0.1:8000;weight=0"
    args = ["proxy", "--port=0", "--ops-port=0"]
    if where == "flag":
        args += ["--backends", f"127.0.0.1:7999,{entry}"]
        source = "flag --backends"
    elif where == "env":
        monkeypatch.setenv("INFERNO_PROXY_BACKENDS", f"127.0.0.1:7999,{entry}")
        source = "env INFERNO_PROXY_BACKENDS"
    else:
        toml = tmp_path / "proxy.toml"
        toml.write_text(f'[proxy]\nbackends = ["127.0.0.1:7999", "{entry}"]\n')
        args += ["--config", str(toml)]
        source = f"{toml}:2"
    assert main(args) == 2
    err = capsys.readouterr().err
    assert (
        f"proxy.backends ({source}): item 2: '{entry}' has a weight '0' out of range: "
        "expected a number > 0; allowed: "
    ) in err
    assert "Traceback" not in err


# --- a model list answer -------------------------------------------------------------------------


def model_list(*names: Any, **extra: Any) -> bytes:
    entries = [{"id": n, "object": "model", "owned_by": "vllm"} for n in names]
    return json.dumps({"object": "list", "data": entries, **extra}).encode()


def test_an_openai_model_list_gives_its_ids_in_order() -> None:
    answer = read_model_list(200, model_list("b", "a", "b", "meta-llama/Llama-3-8B"))
    assert answer == ModelAnswer(("b", "a", "meta-llama/Llama-3-8B"))  # a repeat is dropped


def test_unusable_ids_and_those_past_the_registration_limit_are_left_out_and_told() -> None:
    answer = read_model_list(200, model_list("ok", "", " padded", 42, "x" * (MAX_NAME_CHARS + 1)))
    assert answer.models == ("ok",)
    assert answer.note == "4 entries of /v1/models left out (no usable id, or past 1024)"
    many = read_model_list(200, model_list(*(f"m{i}" for i in range(MAX_MODELS + 3))))
    assert many.models is not None
    assert len(many.models) == MAX_MODELS
    assert many.note.startswith("3 entries of /v1/models left out")


@pytest.mark.parametrize(
    ("status", "body", "why"),
    [
        (404, b'{"detail": "Not Found"}', "HTTP 404"),
        (401, b'{"error": "invalid api key"}', "HTTP 401"),
        (200, b"<html>", "an answer that is not JSON"),
        (200, b'{"models": ["a"]}', 'JSON without a "data" array'),
        (200, b"[]", 'JSON without a "data" array'),
        (200, model_list(), "an empty model list"),
        (200, model_list(None, 7), "no usable model id"),
        (200, None, "an answer over 1024 KiB"),
    ],
)
def test_an_answer_that_is_no_model_list_leaves_a_wildcard(
    status: int, body: bytes | None, why: str
) -> None:
    answer = read_model_list(status, body)
    assert answer.models == ()
    assert answer.note == f"no model list (/v1/models gave {why}): it takes any model"


@pytest.mark.parametrize("status", [408, 429, 500, 503])
def test_an_answer_meaning_not_now_keeps_what_is_known(status: int) -> None:
    answer = read_model_list(status, b"busy")
    assert answer.models is None
    assert f"HTTP {status}" in answer.note


def test_a_change_names_a_few_models() -> None:
    assert describe_models(("a", "b")) == "models a, b"
    assert describe_models(tuple("abcdefg")) == "models a, b, c, d, e and 2 more"
    assert describe_models(()) == "no model list: takes any model"


def test_discovery_asks_at_the_first_pass_after_a_failure_and_every_interval() -> None:
    discovery = ModelDiscovery(interval=60.0, retry=10.0)
    assert discovery.due("n", 0.0)  # never asked
    assert discovery.answered("n", ModelAnswer(("a",)), 0.0) == ""
    assert not discovery.due("n", 59.0)
    assert discovery.due("n", 60.0)
    discovery.lost("n")  # a failed check: it may restart with another model
    assert discovery.due("n", 1.0)
    note = "no model list (/v1/models gave HTTP 404): it takes any model"
    assert discovery.answered("n", ModelAnswer((), note), 1.0) == note
    assert discovery.answered("n", ModelAnswer((), note), 61.0) == ""  # told once
    kept = ModelAnswer(None, "/v1/models answered HTTP 503; its models stay as they were")
    assert discovery.answered("n", kept, 121.0) == kept.note
    assert not discovery.due("n", 130.0)
    assert discovery.due("n", 131.0)  # soon again
    discovery.forget(keep=set())
    assert discovery.due("n", 0.0)
    assert discovery.answered("n", ModelAnswer((), note), 0.0) == note  # forgotten: told again
    with pytest.raises(ValueError, match="interval must be > 0"):
        ModelDiscovery(interval=0.0)


# --- the pool ------------------------------------------------------------------------------------


def test_only_listed_models_are_listed_while_a_wildcard_serves_any() -> None:
    pool = Pool()
    listed = StaticBackend(HostPort("127.0.0.1", 8001), 2.0, ("llama3",))
    wildcard = StaticBackend(HostPort("127.0.0.1", 8002))
    changes = add_static_backends(pool, [listed, wildcard], 0.0)
    assert [(c.node_id, c.kind.value, c.reason) for c in changes] == [
        ("127.0.0.1:8001", "added", "static"),
        ("127.0.0.1:8002", "added", "static"),
    ]
    node = pool.get("127.0.0.1:8001")
    assert node is not None
    assert (node.weight, node.models) == (2.0, ("llama3",))
    assert pool.serves("llama3")
    assert pool.lists("llama3")
    assert pool.serves("made-up-by-a-client")  # the wildcard takes it
    assert not pool.lists("made-up-by-a-client")
    [change] = pool.set_models("127.0.0.1:8002", ("qwen",), 1.0, "models qwen")
    assert (change.kind.value, change.old, change.new, change.reason) == (
        "updated",
        "127.0.0.1:8002",
        "127.0.0.1:8002",
        "models qwen",
    )
    assert pool.set_models("127.0.0.1:8002", ("qwen",), 2.0) == ()  # the same list
    assert pool.set_models("nobody", ("qwen",), 2.0) == ()
    assert pool.lists("qwen")
    assert not pool.serves("made-up-by-a-client")  # no wildcard left


# --- servers ------------------------------------------------------------------------------------


@dataclass(eq=False)
class OpenAIServer:
    """A plain OpenAI-compatible server, as a static backend is (vLLM, llama.cpp...).

    ``/health`` answers 200; ``/v1/models`` lists :attr:`models`, or answers 404
    when it is ``None`` (a server without the route), or :attr:`models_status`
    when that is not 200; ``/v1/chat/completions`` names the server and the
    model asked for.  :meth:`down` closes its port (connections are refused),
    :meth:`up` opens the same port again.
    """

    name: str
    models: tuple[str, ...] | None
    models_status: int = 200
    port: int = 0
    paths: list[str] = field(default_factory=list)
    _tg: anyio.abc.TaskGroup | None = None
    _scope: anyio.CancelScope | None = None

    @property
    def address(self) -> HostPort:
        return HostPort("127.0.0.1", self.port)

    async def handle(self, request: Request) -> Response:
        self.paths.append(request.path)
        if request.path == "/health":
            return Response.json({"status": "ok"})
        if request.path == "/v1/models" and self.models is not None:
            if self.models_status != 200:
                raise HTTPError(self.models_status, "busy")
            return Response(200, body=model_list(*self.models))
        if request.path == "/v1/chat/completions":
            body = await request.json()
            return Response.json({"served_by": self.name, "model": body.get("model")})
        raise HTTPError(404, "no such route")

    def asked_for_models(self) -> int:
        return self.paths.count("/v1/models")

    async def up(self) -> None:
        assert self._tg is not None
        scope = self._scope = anyio.CancelScope()

        async def run(*, task_status: anyio.abc.TaskStatus[ServerInfo]) -> None:
            with scope:
                await serve(self.handle, host="127.0.0.1", port=self.port, task_status=task_status)

        info: ServerInfo = await self._tg.start(run)
        self.port = info.port

    def down(self) -> None:
        assert self._scope is not None
        self._scope.cancel()


@contextlib.asynccontextmanager
async def serving(*servers: OpenAIServer) -> AsyncIterator[None]:
    async with anyio.create_task_group() as tg:
        for server in servers:
            server._tg = tg
            await server.up()
        yield
        tg.cancel_scope.cancel()


async def eventually(condition: Callable[[], Any]) -> None:
    """Wait, bounded, for something the proxy's loops must bring about."""
    with anyio.fail_after(WAIT):
        while True:
            if await condition():
                return
            await anyio.sleep(0.02)


# --- the health loop, round by round -------------------------------------------------------------


class Clock:
    """Monotonic seconds the test moves: model lists fall due when it says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@contextlib.asynccontextmanager
async def health_loop(pool: Pool, clock: Clock, **options: Any) -> AsyncIterator[HealthLoop]:
    checker = HTTPChecker()
    loop = HealthLoop(pool, checker=checker, interval=60.0, timeout=5.0, clock=clock, **options)
    try:
        yield loop
    finally:
        await loop.aclose()
        await checker.aclose()


async def test_a_static_node_joins_with_its_models_and_a_refresh_follows_a_change(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="inferno_proxy.health")
    server = OpenAIServer("vllm", ("llama3",))
    pool, clock, told = Pool(PoolSettings(slow_start=0.0)), Clock(), []
    registry = Registry()
    reporter = ChangeReporter(pool, registry, on_change=lambda: told.append(1))
    async with serving(server), health_loop(pool, clock, reporter=reporter) as loop:
        address = str(server.address)
        reporter.report(add_static_backends(pool, [StaticBackend(server.address)], clock()))
        await loop.check_all()
        assert pool.models() == ["llama3"]  # in rotation, with its list from the first pass
        assert server.paths == ["/health", "/v1/models"]
        first = caplog.messages.index(f"node {address} updated: models llama3")
        assert caplog.messages.index(f"node {address} in rotation") > first  # never a wildcard
        clock.now = 59.0
        server.models = ("llama3", "qwen")
        await loop.check_all()
        assert server.asked_for_models() == 1  # not due yet
        told.clear()
        clock.now = 60.0
        await loop.check_all()
        assert pool.models() == ["llama3", "qwen"]
        assert server.asked_for_models() == 2
        assert told == [1]  # the data path (and the workers) hear of it
        assert f"node {address} updated: models llama3, qwen" in caplog.messages
        text = registry.render_prometheus()
        assert 'inferno_proxy_node_changes_total{kind="updated",state="changed"} 2' in text


async def test_a_node_back_from_a_failure_is_asked_again_at_once() -> None:
    server = OpenAIServer("vllm", ("llama3",))
    pool, clock = Pool(PoolSettings(slow_start=0.0)), Clock()
    async with serving(server), health_loop(pool, clock) as loop:
        add_static_backends(pool, [StaticBackend(server.address)], clock())
        await loop.check_all()
        assert pool.models() == ["llama3"]
        server.down()
        await loop.check_all()
        server.models = ("mistral",)  # restarted with another model, a second later
        await server.up()
        await loop.check_all()
        assert server.asked_for_models() == 2
        assert pool.models() == ["mistral"]


async def test_a_server_without_a_list_stays_a_wildcard_and_is_told_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="inferno_proxy.health")
    server = OpenAIServer("llama.cpp", None)
    pool, clock = Pool(PoolSettings(slow_start=0.0)), Clock()
    async with serving(server), health_loop(pool, clock) as loop:
        add_static_backends(pool, [StaticBackend(server.address)], clock())
        for _ in range(3):
            await loop.check_all()
            clock.now += 60.0
        assert server.asked_for_models() == 3
        node = pool.get(str(server.address))
        assert node is not None
        assert node.in_rotation()
        assert node.models == ()
        assert pool.serves("any-model")
    notes = [m for m in caplog.messages if "no model list" in m]
    assert notes == [
        f"node {server.address}: no model list (/v1/models gave HTTP 404): it takes any model"
    ]


async def test_a_failed_answer_keeps_the_list_and_asks_again_sooner(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="inferno_proxy.health")
    server = OpenAIServer("sglang", ("qwen",))
    pool, clock = Pool(PoolSettings(slow_start=0.0)), Clock()
    async with serving(server), health_loop(pool, clock) as loop:
        add_static_backends(pool, [StaticBackend(server.address)], clock())
        await loop.check_all()
        server.models_status = 503
        clock.now = 60.0
        await loop.check_all()
        assert pool.models() == ["qwen"]  # kept
        server.models_status = 200
        server.models = ("qwen", "llama3")
        clock.now = 70.0  # the retry, before the next minute
        await loop.check_all()
        assert server.asked_for_models() == 3
        assert pool.models() == ["llama3", "qwen"]
    kept = [m for m in caplog.messages if "stay as they were" in m]
    assert kept == [
        f"node {server.address}: /v1/models answered HTTP 503; its models stay as they were"
    ]


async def test_configured_models_and_registered_nodes_are_never_asked() -> None:
    pinned, registered = OpenAIServer("pinned", ("other",)), OpenAIServer("registered", ("x",))
    pool, clock = Pool(PoolSettings(slow_start=0.0)), Clock()
    async with serving(pinned, registered), health_loop(pool, clock) as loop:
        add_static_backends(pool, [StaticBackend(pinned.address, models=("llama3",))], 0.0)
        pool.register(
            Registration(
                id="reg",
                address=str(registered.address),
                metrics_port=registered.port,
                node_type="backend",
            ),
            0.0,
        )
        for _ in range(3):
            await loop.check_all()
            clock.now += 60.0
        assert pinned.paths == registered.paths == ["/health"] * 3
        assert pool.models() == ["llama3"]


async def test_the_free_running_loop_refreshes_on_its_own() -> None:
    server = OpenAIServer("vllm", ("a",))
    pool = Pool(PoolSettings(slow_start=0.0))
    checker = HTTPChecker()
    loop = HealthLoop(pool, checker=checker, interval=0.02, timeout=5.0, model_refresh=0.05)
    try:
        async with serving(server), anyio.create_task_group() as tg:
            add_static_backends(pool, [StaticBackend(server.address)], loop.clock())
            await tg.start(loop.run)

            async def listed(models: list[str]) -> bool:
                return pool.models() == models

            await eventually(functools.partial(listed, ["a"]))
            server.models = ("b",)
            await eventually(functools.partial(listed, ["b"]))
            tg.cancel_scope.cancel()
    finally:
        await checker.aclose()


async def test_an_answer_over_the_size_limit_is_no_list(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="inferno_proxy.health")
    # Valid but huge: were it read whole, its first 1024 models would be taken.
    names = tuple(f"{i:05d}-" + "m" * 240 for i in range(5000))
    server = OpenAIServer("huge", names)
    assert len(model_list(*names)) > MAX_MODEL_LIST_BYTES
    pool, clock = Pool(PoolSettings(slow_start=0.0)), Clock()
    async with serving(server), health_loop(pool, clock) as loop:
        add_static_backends(pool, [StaticBackend(server.address)], clock())
        await loop.check_all()
        node = pool.get(str(server.address))
        assert node is not None
        assert node.in_rotation()
        assert node.models == ()
    assert (
        f"node {server.address}: no model list (/v1/models gave an answer over 1024 KiB): "
        "it takes any model"
    ) in caplog.messages


# --- the whole proxy -----------------------------------------------------------------------------


@dataclass
class Proxy:
    service: str
    ops: str
    http: HTTPClient

    async def models(self) -> list[str]:
        answer = await self.http.request("GET", f"{self.service}/v1/models")
        return [m["id"] for m in (await answer.json())["data"]]

    async def backends(self) -> list[dict[str, Any]]:
        answer = await self.http.request("GET", f"{self.ops}/backends")
        entries: list[dict[str, Any]] = (await answer.json())["backends"]
        return entries

    async def chat(self, model: str) -> tuple[int, Any]:
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]})
        answer = await self.http.request(
            "POST", f"{self.service}/v1/chat/completions", body=body.encode()
        )
        return answer.status, await answer.json()

    async def requests_total(self) -> list[str]:
        """The ``inferno_proxy_requests_total`` series of ``/telemetry``."""
        text = (await (await self.http.request("GET", f"{self.ops}/telemetry")).read()).decode()
        return [
            line for line in text.splitlines() if line.startswith("inferno_proxy_requests_total")
        ]


@contextlib.asynccontextmanager
async def proxy(*backends: StaticBackend) -> AsyncIterator[Proxy]:
    settings = ProxySettings(
        backends=backends, health_interval=0.05, slow_start=0.0, queue_timeout=0.0
    )
    parts = ProxyParts(LeastRequests(), VitalsChecker(), HTTPChecker())
    stopping = anyio.Event()
    async with HTTPClient() as http, anyio.create_task_group() as tg:
        info = await tg.start(
            functools.partial(
                serve_proxy,
                settings,
                parts,
                registry=Registry(),
                stopping=stopping,
                shutdown_timeout=WAIT,
            )
        )
        yield Proxy(
            f"http://127.0.0.1:{info.service.port}", f"http://127.0.0.1:{info.ops.port}", http
        )
        stopping.set()


async def test_the_proxy_lists_and_routes_the_models_it_discovered() -> None:
    server = OpenAIServer("vllm", ("llama3", "meta-llama/Llama-3-8B"))
    async with serving(server), proxy(StaticBackend(server.address)) as px:

        async def discovered() -> bool:
            return await px.models() == ["llama3", "meta-llama/Llama-3-8B"]

        await eventually(discovered)
        [entry] = await px.backends()
        assert entry["models"] == ["llama3", "meta-llama/Llama-3-8B"]
        assert await px.chat("meta-llama/Llama-3-8B") == (
            200,
            {"served_by": "vllm", "model": "meta-llama/Llama-3-8B"},
        )
        status, error = await px.chat("not-served")
        assert (status, error["error"]["code"]) == (404, "model_not_found")  # no wildcard now
        [served] = [s for s in await px.requests_total() if "chat" in s and 'status="200"' in s]
        assert 'model="meta-llama/Llama-3-8B"' in served


async def test_a_model_only_a_wildcard_takes_is_routed_and_labelled_unknown() -> None:
    server = OpenAIServer("llama.cpp", None)  # no /v1/models
    async with serving(server), proxy(StaticBackend(server.address)) as px:

        async def in_rotation() -> bool:
            return [b["healthy"] for b in await px.backends()] == [True]

        await eventually(in_rotation)
        assert server.asked_for_models() == 1
        assert await px.models() == []
        for _ in range(2):
            answer = await px.chat("any-name-a-client-makes-up")
            assert answer == (
                200,
                {"served_by": "llama.cpp", "model": "any-name-a-client-makes-up"},
            )
        series = await px.requests_total()
        assert [s for s in series if "/v1/chat/completions" in s] == [
            'inferno_proxy_requests_total{route="/v1/chat/completions",status="200",'
            'model="unknown"} 2'
        ]
        assert not [s for s in series if "makes-up" in s]


async def test_configured_weight_and_models_reach_the_node_and_turn_discovery_off() -> None:
    server = OpenAIServer("vllm", ("what-the-server-says",))
    async with serving(server):
        backend = StaticBackend(server.address, weight=2.5, models=("pinned",))
        async with proxy(backend) as px:

            async def checked_thrice() -> bool:
                return server.paths.count("/health") >= 3

            await eventually(checked_thrice)
            [entry] = await px.backends()
            assert (entry["weight"], entry["models"], entry["healthy"]) == (2.5, ["pinned"], True)
            assert await px.models() == ["pinned"]
            assert await px.chat("pinned") == (200, {"served_by": "vllm", "model": "pinned"})
            assert server.asked_for_models() == 0


async def test_the_proxy_follows_a_backend_restarted_with_another_model() -> None:
    server = OpenAIServer("vllm", ("llama3",))
    async with serving(server), proxy(StaticBackend(server.address)) as px:

        async def listing(models: list[str]) -> bool:
            return await px.models() == models

        await eventually(functools.partial(listing, ["llama3"]))
        server.down()

        async def failing() -> bool:
            return [b["consecutive_failures"] > 0 for b in await px.backends()] == [True]

        await eventually(failing)
        server.models = ("mistral",)
        await server.up()
        await eventually(functools.partial(listing, ["mistral"]))
        assert await px.chat("mistral") == (200, {"served_by": "vllm", "model": "mistral"})
