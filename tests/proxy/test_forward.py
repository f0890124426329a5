"""The proxy's request path over real sockets: routing, models, streaming, headers.

Every test runs real backends (``tests/proxy/upstreams.py``) and a real
``ServiceApp`` under ``inferno.http.serve``, and drives it with our HTTP
client, raw sockets or the ``openai`` client.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator

import anyio
import openai
import pytest
from inferno_proxy.forward import DEFAULT_SECURITY_HEADERS, ForwardSettings
from inferno_proxy.policies import Affinity
from inferno_proxy.settings import HeaderField, ProxySettings, response_fields

from inferno.http.client_errors import RemoteProtocolError
from tests.proxy.upstreams import (
    IO_TIMEOUT,
    Backend,
    break_after_first,
    chat_stream,
    collect,
    echo,
    gated_sse,
    proxied,
    sse_event,
)

pytestmark = pytest.mark.anyio


def chat(model: str, **extra: object) -> bytes:
    document = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    return json.dumps(document | extra).encode()


JSON = {"content-type": "application/json"}


async def test_requests_go_only_to_nodes_serving_their_model() -> None:
    a = Backend("a", echo, models=("alpha",))
    b = Backend("b", echo, models=("beta",))
    async with proxied(a, b) as h:
        for model, node in [("alpha", "a"), ("beta", "b"), ("alpha", "a"), ("beta", "b")]:
            response = await h.client.request(
                "POST", f"{h.url}/v1/chat/completions", headers=JSON, body=chat(model)
            )
            assert response.status == 200
            assert (await response.json())["node"] == node
        assert len(a.seen) == 2
        assert len(b.seen) == 2
        assert a.seen[0].json()["model"] == "alpha"  # the body arrives unchanged
        assert h.metric("inferno_proxy_requests_total", status="200", model="alpha") == 2


async def test_an_unknown_model_is_404_in_the_openai_shape() -> None:
    a = Backend("a", echo, models=("alpha",))
    async with proxied(a) as h:
        response = await h.client.request(
            "POST", f"{h.url}/v1/chat/completions", headers=JSON, body=chat("gamma")
        )
        assert response.status == 404
        error = (await response.json())["error"]
        assert error["code"] == "model_not_found"
        assert "gamma" in error["message"]
        assert a.seen == []
        openai_client = openai.AsyncOpenAI(base_url=f"{h.url}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.NotFoundError):
            await openai_client.chat.completions.create(
                model="gamma", messages=[{"role": "user", "content": "hi"}]
            )
        await openai_client.close()


async def test_a_request_naming_no_model_goes_to_any_node() -> None:
    a = Backend("a", echo, models=("alpha",))
    async with proxied(a) as h:
        response = await h.client.request("GET", f"{h.url}/health?x=1")
        assert response.status == 200
        assert (await response.json())["path"] == "/health?x=1"


async def test_models_are_listed_by_the_proxy_from_the_pool() -> None:
    a = Backend("a", echo, models=("alpha", "shared"))
    b = Backend("b", echo, models=("beta", "shared"))
    async with proxied(a, b) as h:
        openai_client = openai.AsyncOpenAI(base_url=f"{h.url}/v1", api_key="x", max_retries=0)
        listed = [m.id async for m in openai_client.models.list()]
        assert listed == ["alpha", "beta", "shared"]
        one = await openai_client.models.retrieve("beta")
        assert one.id == "beta"
        with pytest.raises(openai.NotFoundError):
            await openai_client.models.retrieve("gamma")
        await openai_client.close()
        assert a.seen == []  # answered by the proxy itself
        assert b.seen == []


async def test_invalid_json_is_400_and_a_non_string_model_too() -> None:
    a = Backend("a", echo, models=("alpha",))
    async with proxied(a) as h:
        response = await h.client.request(
            "POST", f"{h.url}/v1/chat/completions", headers=JSON, body=b"{not json"
        )
        assert response.status == 400
        assert (await response.json())["error"]["code"] == "invalid_json"
        response = await h.client.request(
            "POST", f"{h.url}/v1/chat/completions", headers=JSON, body=b'{"model": 5}'
        )
        assert response.status == 400
        assert a.seen == []


async def test_a_non_json_body_is_forwarded_without_being_parsed() -> None:
    a = Backend("a", echo, models=("alpha",))
    async with proxied(a) as h:
        response = await h.client.request(
            "POST",
            f"{h.url}/v1/audio/transcriptions",
            headers={"content-type": "application/octet-stream"},
            body=b"{not json at all",
        )
        assert response.status == 200
        assert a.seen[0].body == b"{not json at all"


async def test_a_body_over_the_limit_is_413() -> None:
    a = Backend("a", echo)
    async with proxied(a, settings=ForwardSettings(max_body_bytes=100)) as h:
        response = await h.client.request(
            "POST", f"{h.url}/v1/completions", headers=JSON, body=b"x" * 101
        )
        assert response.status == 413

        async def chunked() -> AsyncIterator[bytes]:
            for _ in range(3):
                yield b"y" * 50

        response = await h.client.request(
            "POST", f"{h.url}/v1/completions", headers=JSON, body=chunked()
        )
        assert response.status == 413
        response = await h.client.request(
            "POST", f"{h.url}/v1/completions", body=b'{"model": null}'
        )
        assert response.status == 200
        assert a.seen[0].body == b'{"model": null}'


async def test_a_stream_arrives_chunk_by_chunk() -> None:
    """Each chunk is released only after the client got the previous one: a proxy
    that buffered would never deliver the first, and the test would time out."""
    a = Backend("a", gated_sse(3), models=("alpha",))
    async with proxied(a) as h:
        a.gate(1).set()
        with anyio.fail_after(IO_TIMEOUT):
            async with h.client.stream(
                "POST", f"{h.url}/v1/chat/completions", headers=JSON, body=chat("alpha")
            ) as response:
                assert response.status == 200
                assert response.headers.get("content-type") == "text/event-stream"
                received = b""
                chunks = response.iter_bytes()
                for index in (1, 2, 3):
                    while sse_event(index) not in received:
                        received += await chunks.__anext__()
                    if index < 3:
                        a.gate(index + 1).set()
                async for rest in chunks:
                    received += rest
        assert received.endswith(b"data: [DONE]\n\n")
        assert h.in_flight("a") == 0


async def test_the_openai_client_streams_through_the_proxy() -> None:
    a = Backend("a", chat_stream(["Hello", " from", " the", " node"]), models=("alpha",))
    async with proxied(a) as h:
        openai_client = openai.AsyncOpenAI(base_url=f"{h.url}/v1", api_key="x", max_retries=0)
        stream = await openai_client.chat.completions.create(
            model="alpha", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        words = [c.choices[0].delta.content async for c in stream if c.choices[0].delta.content]
        await openai_client.close()
        assert "".join(words) == "Hello from the node"


async def test_hop_by_hop_headers_are_dropped_and_forwarding_headers_added() -> None:
    a = Backend("a", echo)
    async with proxied(a) as h:
        response = await h.client.request(
            "GET",
            f"{h.url}/v1/thing",
            headers=[
                ("connection", "keep-alive, x-client-hop"),
                ("x-client-hop", "1"),
                ("keep-alive", "timeout=5"),
                ("proxy-authorization", "Basic eA=="),
                ("te", "trailers"),
                ("x-forwarded-for", "6.6.6.6"),
                ("x-forwarded-proto", "gopher"),
                ("x-keep", "yes"),
                ("x-request-id", "req-123"),
            ],
        )
        assert response.status == 200
        seen = a.seen[0].headers
        for name in ("x-client-hop", "keep-alive", "proxy-authorization", "te"):
            assert name not in seen, name
        assert seen.get("connection") != "keep-alive, x-client-hop"
        assert seen.get("x-keep") == "yes"
        assert seen.get_all("x-forwarded-for") == ["127.0.0.1"]  # the client's claim is dropped
        assert seen.get_all("x-forwarded-proto") == ["http"]
        assert seen.get("x-request-id") == "req-123"
        assert seen.get("host") == a.address
        # And on the way back.
        assert "x-backend-hop" not in response.headers
        assert "keep-alive" not in response.headers
        assert response.headers.get("x-backend-other") == "kept"
        assert response.headers.get("x-request-id") == "req-123"
        for name, value in DEFAULT_SECURITY_HEADERS:
            assert response.headers.get_all(name) == [value]  # replacing the node's own


async def test_a_request_id_is_made_when_missing_or_unusable() -> None:
    a = Backend("a", echo)
    async with proxied(a) as h:
        first = await h.client.request("GET", f"{h.url}/v1/x")
        second = await h.client.request("GET", f"{h.url}/v1/x", headers={"x-request-id": "a b"})
        ids = [r.headers.get("x-request-id") for r in (first, second)]
        for given, seen in zip(ids, a.seen, strict=True):
            assert given is not None
            assert re.fullmatch(r"[0-9a-f]{32}", given)
            assert seen.headers.get("x-request-id") == given
        assert ids[0] != ids[1]


async def test_trusted_forwarded_headers_are_extended() -> None:
    a = Backend("a", echo)
    settings = ForwardSettings(trust_forwarded_headers=True, security_headers=())
    async with proxied(a, settings=settings) as h:
        response = await h.client.request(
            "GET",
            f"{h.url}/v1/x",
            headers={"x-forwarded-for": "10.0.0.1, 10.0.0.2", "x-forwarded-proto": "https"},
        )
        seen = a.seen[0].headers
        assert seen.get("x-forwarded-for") == "10.0.0.1, 10.0.0.2, 127.0.0.1"
        assert seen.get("x-forwarded-proto") == "https"
        assert "x-frame-options" not in response.headers  # none configured
        assert response.headers.get("x-content-type-options") == "backend-value"


async def test_errors_made_by_the_proxy_carry_security_headers_and_the_request_id() -> None:
    async with proxied(Backend("a", echo, models=("alpha",))) as h:
        response = await h.client.request(
            "POST",
            f"{h.url}/v1/completions",
            headers={**JSON, "x-request-id": "mine"},
            body=chat("nope"),
        )
        assert response.status == 404
        assert response.headers.get("x-request-id") == "mine"
        assert response.headers.get("x-content-type-options") == "nosniff"


async def test_configured_response_headers_replace_the_nodes_and_the_security_ones() -> None:
    fields = (
        ("Strict-Transport-Security", "max-age=63072000"),
        ("X-Content-Type-Options", "nosniff"),  # a node's own is replaced
        ("x-frame-options", "SAMEORIGIN"),  # a security header, changed
    )
    settings = ProxySettings(response_headers=fields).forward_settings()
    async with proxied(Backend("a", echo, models=("alpha",)), settings=settings) as h:
        served = await h.client.request("POST", f"{h.url}/v1/x", headers=JSON, body=chat("alpha"))
        refused = await h.client.request("POST", f"{h.url}/v1/x", headers=JSON, body=chat("nope"))
        for response, status in ((served, 200), (refused, 404)):
            assert response.status == status
            headers = response.headers
            assert headers.get_all("strict-transport-security") == ["max-age=63072000"]
            assert headers.get_all("x-content-type-options") == ["nosniff"]
            assert headers.get_all("x-frame-options") == ["SAMEORIGIN"]
            assert headers.get("referrer-policy") == "no-referrer"  # the rest stay


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        ("no colon", "is not 'Name: value'"),
        (": value", "is not 'Name: value'"),
        ("bad name: x", "'bad name' is not a valid field name"),
        ("Content-Length: 5", "'Content-Length' is set by the proxy itself"),
        ("X-Request-Id: mine", "is set by the proxy itself"),
        ("X-A: line\r\nInjected: 1", "holds a control character"),
    ],
)
def test_a_bad_response_header_is_refused(raw: str, problem: str) -> None:
    with pytest.raises(ValueError, match=re.escape(problem)):
        HeaderField().parse(raw)


def test_response_header_fields_render_as_they_parse() -> None:
    field = HeaderField()
    assert field.parse(" Cache-Control :  no-store ") == ("Cache-Control", "no-store")
    assert field.parse(field.render(("X-A", "b: c"))) == ("X-A", "b: c")
    assert response_fields((("x-a", "1"), ("x-b", "2")), (("X-B", "3"), ("x-b", "4"))) == (
        ("x-a", "1"),
        ("x-b", "4"),
    )


async def test_a_stream_broken_after_its_first_chunk_is_cut_short_for_the_client() -> None:
    breaker = Backend("breaker", break_after_first, models=("alpha",))
    spare = Backend("spare", echo, models=("alpha",))
    async with proxied(breaker, spare) as h:
        got = await collect(
            h.client, "POST", f"{h.url}/v1/chat/completions", headers=JSON, body=chat("alpha")
        )
        assert got.status == 200
        assert isinstance(got.error, RemoteProtocolError)  # no final chunk: visibly truncated
        assert got.body == sse_event(1)
        assert spare.seen == []  # a byte had gone out: never retried
        assert h.in_flight("breaker") == 0
        breaker_node = h.pool.get("breaker")
        assert breaker_node is not None
        assert breaker_node.health.consecutive_failures == 1  # a transport failure
        assert h.metric("inferno_proxy_upstream_failures_total", reason="mid_stream") == 1


async def test_a_session_sticks_to_one_node_under_the_affinity_policy() -> None:
    nodes = [Backend(f"n{i}", echo, models=("m",)) for i in range(4)]
    async with proxied(*nodes, policy=Affinity()) as h:
        for session in ("alice", "bob", "carol"):
            served = set()
            for _ in range(5):
                response = await h.client.request(
                    "POST",
                    f"{h.url}/v1/chat/completions",
                    headers={**JSON, "x-session-id": session},
                    body=chat("m"),
                )
                served.add((await response.json())["node"])
            assert len(served) == 1, session
        # A shared prompt prefix is a key too (no session, no user).
        served = set()
        for _ in range(5):
            response = await h.client.request(
                "POST", f"{h.url}/v1/chat/completions", headers=JSON, body=chat("m")
            )
            served.add((await response.json())["node"])
        assert len(served) == 1


async def test_head_requests_and_empty_bodies_pass() -> None:
    a = Backend("a", echo)
    async with proxied(a) as h:
        response = await h.client.request("HEAD", f"{h.url}/v1/x")
        assert response.status == 200
        assert await response.read() == b""
        assert int(response.headers.get("content-length", "0")) > 0  # the node's, kept
        response = await h.client.request("POST", f"{h.url}/v1/x", body=b"")
        assert response.status == 200
        assert a.seen[1].headers.get("content-length") == "0"


async def test_metrics_follow_requests_nodes_and_streams() -> None:
    a = Backend("a", gated_sse(2), models=("m",))
    async with proxied(a) as h:
        a.gate(1).set()
        with anyio.fail_after(IO_TIMEOUT):
            async with h.client.stream(
                "POST", f"{h.url}/v1/chat/completions", headers=JSON, body=chat("m")
            ) as response:
                chunks = response.iter_bytes()
                await chunks.__anext__()
                # Mid-stream: the request is in flight at the node, and for the app.
                assert h.metric("inferno_proxy_node_in_flight_requests", node="a") == 1
                assert h.app.in_flight() == 1
                a.gate(2).set()
                async for _ in chunks:
                    pass
        assert h.metric("inferno_proxy_node_in_flight_requests", node="a") == 0
        assert h.app.in_flight() == 0
        labels = {"route": "/v1/chat/completions"}
        assert h.metric("inferno_proxy_requests_total", status="200", model="m", **labels) == 1
        assert h.metric("inferno_proxy_request_duration_seconds", **labels) == 1
        assert h.metric("inferno_proxy_time_to_first_byte_seconds", **labels) == 1
        assert h.metric("inferno_proxy_upstream_selection_seconds") == 1
        await h.client.request("GET", f"{h.url}/some/unknown/path")
        assert h.metric("inferno_proxy_requests_total", route="other") == 1
        text = h.registry.render_prometheus()
        for name in (
            "inferno_proxy_queued_requests",
            "inferno_proxy_retries_total",
            "inferno_proxy_retry_budget_exhausted_total",
            "inferno_proxy_upstream_failures_total",
            "inferno_proxy_queue_wait_seconds",
        ):
            assert f"# TYPE {name} " in text
        h.pool.remove("a", 0.0)
        h.app.pool_changed()  # the node's series leaves with it
        assert 'node="a"' not in h.registry.render_prometheus()


@pytest.mark.parametrize(
    "options",
    [
        {"connect_timeout": 0.0},
        {"idle_timeout": -1.0},
        {"max_attempts": 0},
        {"queue_timeout": -1.0},
        {"max_queue": -1},
        {"max_body_bytes": 0},
    ],
)
def test_settings_out_of_range_are_refused(options: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(options))):
        ForwardSettings(**options)  # type: ignore[arg-type]
