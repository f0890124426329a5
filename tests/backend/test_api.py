"""The inference API below the client: request validation, chunk JSON, raw HTTP, SSE, WebSocket.

Pure parts (:mod:`inferno_backend.oaischema`) are checked on values; the
wire is checked with our HTTP client and WebSocket against a backend started
in process on the sim engine, looking at the bytes a non-``openai`` client
would see.
"""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from inferno_backend.engines.sim import SimEngine
from inferno_backend.gpu import GPUSampler
from inferno_backend.oaischema import (
    MAX_STOP_SEQUENCES,
    ChunkEncoder,
    OpenAIError,
    parse_request,
    whole_response,
)
from inferno_backend.profiles import load_profile
from inferno_backend.role import BackendInfo, serve_backend
from inferno_backend.settings import BackendSettings

from inferno.http import WebSocket, connect_websocket
from inferno.http.client import HTTPClient
from inferno.metrics import Registry

WAIT = 10.0
MODEL = "sim-tiny"
USER = {"role": "user", "content": "Hello there."}


# -- validation (pure) ---------------------------------------------------------------------------


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [USER], **fields}


def test_a_chat_request_becomes_a_generation_request() -> None:
    parsed = parse_request(
        "chat",
        chat(
            max_tokens=50,
            max_completion_tokens=20,
            stop="\n",
            temperature=0.5,
            seed=11,
            stream=True,
            stream_options={"include_usage": True},
            top_p=0.9,
            ignore_eos=True,
        ),
        "req-1",
    )
    generation = parsed.generation
    assert (parsed.kind, parsed.stream, parsed.include_usage) == ("chat", True, True)
    assert (generation.request_id, generation.model, generation.kind) == ("req-1", MODEL, "chat")
    assert generation.messages == (USER,)
    assert generation.max_tokens == 20  # max_completion_tokens wins over max_tokens
    assert generation.stop == ("\n",)
    assert (generation.temperature, generation.seed) == (0.5, 11)
    assert generation.extra == {"top_p": 0.9, "ignore_eos": True}  # passed through untouched


def test_a_completion_request_takes_one_prompt() -> None:
    parsed = parse_request("completion", {"model": MODEL, "prompt": ["only one"]}, "r")
    assert parsed.generation.prompt == "only one"
    assert parsed.generation.max_tokens is None
    assert (parsed.stream, parsed.include_usage) == (False, False)
    assert parse_request("completion", {"model": MODEL, "prompt": ""}, "r").generation.prompt == ""


@pytest.mark.parametrize(
    ("kind", "body", "param"),
    [
        ("chat", {"messages": [USER]}, "model"),
        ("chat", {"model": 3, "messages": [USER]}, "model"),
        ("chat", {"model": ""}, "model"),
        ("chat", {"model": MODEL}, "messages"),
        ("chat", {"model": MODEL, "messages": "hi"}, "messages"),
        ("chat", chat(messages=["hi"]), "messages[0]"),
        ("chat", chat(messages=[{"content": "x"}]), "messages[0].role"),
        ("chat", chat(messages=[USER, {"role": "user", "content": 5}]), "messages[1].content"),
        ("chat", chat(messages=[{"role": "user", "content": [{"type": "text"}]}]), None),
        ("chat", chat(max_tokens=True), "max_tokens"),
        ("chat", chat(max_completion_tokens=0), "max_completion_tokens"),
        ("chat", chat(n=3), "n"),
        ("chat", chat(stream="yes"), "stream"),
        ("chat", chat(stream=True, stream_options=[]), "stream_options"),
        (
            "chat",
            chat(stream=True, stream_options={"include_usage": 1}),
            "stream_options.include_usage",
        ),
        ("chat", chat(stop=["a"] * (MAX_STOP_SEQUENCES + 1)), "stop"),
        ("chat", chat(stop=7), "stop"),
        ("chat", chat(temperature=-1), "temperature"),
        ("chat", chat(temperature=float("nan")), "temperature"),
        ("chat", chat(seed=2**70), "seed"),
        ("chat", chat(top_p="high"), "top_p"),
        ("chat", chat(tools={}), "tools"),
        ("completion", {"model": MODEL}, "prompt"),
        ("completion", {"model": MODEL, "prompt": ["a", "b"]}, "prompt"),
        ("completion", {"model": MODEL, "prompt": [1, 2, 3]}, "prompt"),
        ("completion", {"model": MODEL, "prompt": "x", "best_of": 2}, "best_of"),
        ("completion", {"model": MODEL, "prompt": "x", "echo": "no"}, "echo"),
    ],
)
def test_bad_requests_name_the_field(kind: Any, body: dict[str, Any], param: str | None) -> None:
    with pytest.raises(OpenAIError) as caught:
        parse_request(kind, body, "r")
    error = caught.value
    assert error.status == 400
    document = error.body()["error"]
    assert document["type"] == "invalid_request_error"
    if param is not None:
        assert document["param"] == param
        assert param in document["message"]
    else:
        assert document["param"].startswith("messages[0].content[0]")


def test_a_body_that_is_not_an_object_is_refused() -> None:
    with pytest.raises(OpenAIError, match="JSON object"):
        parse_request("chat", [USER], "r")


# -- answers (pure) ------------------------------------------------------------------------------


def test_chat_chunks_are_openai_chunk_json() -> None:
    encoder = ChunkEncoder("chat", "chatcmpl-1", 1700000000, 'odd "model"', include_usage=True)
    first = json.loads(encoder.chunk("Hel"))
    middle = json.loads(encoder.chunk('lo "\n'))
    last = json.loads(encoder.chunk("", "stop"))
    usage = json.loads(encoder.usage_chunk(5, 3))
    assert first == {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": 'odd "model"',
        "choices": [
            {
                "index": 0,
                "delta": {"role": "assistant", "content": "Hel"},
                "logprobs": None,
                "finish_reason": None,
            }
        ],
        "usage": None,
    }
    assert middle["choices"][0]["delta"] == {"content": 'lo "\n'}
    assert last["choices"][0]["delta"] == {}
    assert last["choices"][0]["finish_reason"] == "stop"
    assert usage["choices"] == []
    assert usage["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}


def test_completion_chunks_and_whole_answers() -> None:
    encoder = ChunkEncoder("completion", "cmpl-1", 1, MODEL, include_usage=False)
    chunk = json.loads(encoder.chunk(" the end", "length"))
    assert chunk["object"] == "text_completion"
    assert "usage" not in chunk
    assert chunk["choices"] == [
        {"index": 0, "text": " the end", "logprobs": None, "finish_reason": "length"}
    ]
    whole = whole_response("chat", "chatcmpl-2", 2, MODEL, "Hi!", "stop", 4, 2)
    assert whole["object"] == "chat.completion"
    assert whole["choices"][0]["message"] == {"role": "assistant", "content": "Hi!"}
    assert whole["usage"]["total_tokens"] == 6


# -- on the wire ---------------------------------------------------------------------------------


def no_nvml() -> Any:
    raise ImportError("no nvidia-ml-py in this test")


@asynccontextmanager
async def backend(**options: Any) -> AsyncIterator[BackendInfo]:
    engine = SimEngine(load_profile("cpu-tiny"), speed=50.0)
    async with anyio.create_task_group() as tg:
        start = functools.partial(
            serve_backend,
            BackendSettings(port=0, ops_port=0, **options),
            engine,
            registry=Registry(),
            stopping=anyio.Event(),
            gpu=GPUSampler(load_nvml=no_nvml),
        )
        info = await tg.start(start)
        try:
            yield info
        finally:
            tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_raw_http_errors() -> None:
    async with backend() as info, HTTPClient() as http:
        url = info.service.url
        bad_json = await http.request("POST", f"{url}/v1/completions", body=b"{nope")
        assert bad_json.status == 400
        assert (await bad_json.json())["error"]["code"] == "invalid_json"
        not_object = await http.request("POST", f"{url}/v1/completions", body=b"[1]")
        assert not_object.status == 400
        wrong_method = await http.request("GET", f"{url}/v1/chat/completions")
        assert wrong_method.status == 405
        assert wrong_method.headers.get("allow") == "POST"
        unknown = await http.request("GET", f"{url}/v2/whatever")
        assert unknown.status == 404
        assert (await unknown.json())["error"]["code"] == "not_found"
        health = await http.request("GET", f"{url}/health")
        assert (health.status, (await health.json())["status"]) == (200, "ready")
        not_upgraded = await http.request("GET", f"{url}/v1/ws")
        assert not_upgraded.status == 426
        encoded = await http.request("GET", f"{url}/v1/models/sim%2Dtiny")
        assert (await encoded.json())["id"] == MODEL


@pytest.mark.anyio
async def test_sse_framing_on_the_wire() -> None:
    body = json.dumps(
        {
            "model": MODEL,
            "prompt": "frames",
            "max_tokens": 5,
            "stream": True,
            "ignore_eos": True,
        }
    ).encode()
    async with (
        backend() as info,
        HTTPClient() as http,
        http.stream("POST", f"{info.service.url}/v1/completions", body=body) as response,
    ):
        assert response.status == 200
        assert response.headers.get("content-type") == "text/event-stream; charset=utf-8"
        assert response.headers.get("cache-control") == "no-cache"
        raw = b"".join([piece async for piece in response.iter_bytes()])
    events = raw.split(b"\n\n")
    assert events[-1] == b""
    assert events[-2] == b"data: [DONE]"
    chunks = [json.loads(event.removeprefix(b"data: ")) for event in events[:-2]]
    assert all(event.startswith(b"data: {") for event in events[:-2])
    assert sum(len(c["choices"][0]["text"].split()) for c in chunks) >= 1
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


# -- WebSocket -----------------------------------------------------------------------------------


async def exchange(ws: WebSocket, request: dict[str, Any] | str) -> list[dict[str, Any]]:
    """Send one request, collect messages up to the terminal one."""
    await ws.send(request if isinstance(request, str) else json.dumps(request))
    messages = []
    with anyio.fail_after(WAIT):
        while True:
            message = json.loads(await ws.receive())
            messages.append(message)
            if "done" in message or "error" in message:
                return messages


@pytest.mark.anyio
async def test_websocket_streams_chunks_then_a_terminal_message() -> None:
    async with backend() as info, HTTPClient() as http:
        whole_answer = await http.request(
            "POST",
            f"{info.service.url}/v1/chat/completions",
            body=json.dumps({"model": MODEL, "messages": [USER], "max_tokens": 10}).encode(),
        )
        whole = await whole_answer.json()
        ws = await connect_websocket(f"ws://127.0.0.1:{info.service.port}/v1/ws")
        try:
            request = {
                "endpoint": "chat/completions",
                "model": MODEL,
                "messages": [USER],
                "max_tokens": 10,
                "stream_options": {"include_usage": True},
            }
            chat_messages = await exchange(ws, request)
            missing = await exchange(ws, {"model": "nope", "prompt": "x"})
            completion = await exchange(
                ws, {"endpoint": "/v1/completions", "model": MODEL, "prompt": "Hi"}
            )
            bad_endpoint = await exchange(ws, {"endpoint": "images", "model": MODEL})
            not_json = await exchange(ws, "{")
            inferred = await exchange(ws, {"model": MODEL, "messages": [USER], "max_tokens": 2})
        finally:
            await ws.close()
    *chunks, usage_chunk, done = chat_messages
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == whole["choices"][0]["message"]["content"]
    assert usage_chunk["choices"] == []
    assert done == {
        "done": True,
        "id": chunks[0]["id"],
        "finish_reason": whole["choices"][0]["finish_reason"],
        "usage": whole["usage"],
    }
    assert len(missing) == 1
    assert (missing[0]["status"], missing[0]["error"]["code"]) == (404, "model_not_found")
    assert completion[0]["object"] == "text_completion"
    assert completion[-1]["done"] is True
    assert (bad_endpoint[0]["status"], bad_endpoint[0]["error"]["param"]) == (400, "endpoint")
    assert (not_json[0]["status"], not_json[0]["error"]["code"]) == (400, "invalid_json")
    assert inferred[0]["object"] == "chat.completion.chunk"
    assert inferred[-1]["usage"]["completion_tokens"] <= 2


@pytest.mark.anyio
@pytest.mark.parametrize("include_usage", [False, True])
async def test_websocket_chunks_are_the_sse_chunks(include_usage: bool) -> None:
    request: dict[str, Any] = {"model": MODEL, "messages": [USER], "max_tokens": 6, "seed": 3}
    if include_usage:
        request["stream_options"] = {"include_usage": True}
    body = json.dumps({**request, "stream": True}).encode()
    async with backend() as info, HTTPClient() as http:
        async with http.stream(
            "POST", f"{info.service.url}/v1/chat/completions", body=body
        ) as response:
            raw = b"".join([piece async for piece in response.iter_bytes()])
        ws = await connect_websocket(f"ws://127.0.0.1:{info.service.port}/v1/ws")
        try:
            *over_ws, done = await exchange(ws, request)
        finally:
            await ws.close()
    over_sse = [json.loads(e.removeprefix(b"data: ")) for e in raw.split(b"\n\n")[:-2]]
    assert done["done"] is True

    def same_stream(chunk: dict[str, Any]) -> dict[str, Any]:
        return {key: value for key, value in chunk.items() if key not in ("id", "created")}

    assert [same_stream(c) for c in over_ws] == [same_stream(c) for c in over_sse]
    assert all(("usage" in c) is include_usage for c in over_ws)
