"""Request, Response, Headers and the server's pure protocol decisions, without a socket."""

from __future__ import annotations

import json

import h11
import pytest

from inferno.errors import HTTPError
from inferno.http import Headers, Request, Response, ServerInfo, ServerLimits
from inferno.http._responses import (
    has_obs_fold,
    inspect_head,
    protocol_error,
    render_error,
    valid_websocket_key,
)


@pytest.mark.anyio
async def test_request_built_directly_reads_its_body() -> None:
    request = Request(
        "POST",
        "/v1/chat?stream=true",
        [("Content-Type", "application/json")],
        body=b'{"model": "m"}',
    )
    assert (request.path, request.query) == ("/v1/chat", "stream=true")
    assert request.headers.get("content-type") == "application/json"
    assert await request.json() == {"model": "m"}
    assert await request.read() == b'{"model": "m"}'  # cached
    streamed = Request("POST", "/", body=b"abc")
    assert [piece async for piece in streamed.stream()] == [b"abc"]
    with pytest.raises(RuntimeError):
        await streamed.read()


def test_request_target_forms() -> None:
    assert Request("GET", "http://h:1/p/q?x=1").path == "/p/q"
    assert Request("GET", "http://h:1").path == "/"
    assert Request("OPTIONS", "*").path == "*"
    assert Request("GET", "/a%20b?c").path == "/a%20b"  # not decoded


def test_websocket_upgrade_detection() -> None:
    upgrade = [
        ("Host", "x"),
        ("Connection", "keep-alive, Upgrade"),
        ("Upgrade", "WebSocket"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("Sec-WebSocket-Version", "13"),
    ]
    assert Request("GET", "/ws", upgrade).is_websocket_upgrade()
    assert not Request("POST", "/ws", upgrade).is_websocket_upgrade()
    assert not Request("GET", "/ws", upgrade[:2]).is_websocket_upgrade()


def test_headers_are_case_insensitive_and_keep_repeats() -> None:
    headers = Headers(
        [(b"content-type", b"text/plain"), (b"set-cookie", b"a=1"), (b"set-cookie", b"b=2")]
    )
    assert headers.get("Content-Type") == "text/plain"
    assert headers.get(b"CONTENT-TYPE") == "text/plain"
    assert headers.get("missing") is None
    assert headers.get("missing", "x") == "x"
    assert headers.get("set-cookie") == "a=1, b=2"
    assert headers.get_all("Set-Cookie") == ["a=1", "b=2"]
    assert "SET-COOKIE" in headers
    assert "nope" not in headers
    assert 3 not in headers
    assert list(headers) == headers.items()
    assert len(headers) == 3
    assert headers.raw[0] == (b"content-type", b"text/plain")
    assert Headers.from_pairs([("X-A", "é")]).raw == [(b"x-a", b"\xe9")]
    assert Headers([(b"x", b"\xff")]).get("x") == "\xff"  # latin-1 never fails
    assert Headers([(b"connection", b"keep-alive, Upgrade")]).has_token("Connection", "upgrade")
    assert Headers([(b"a", b"1")]) == Headers([(b"a", b"1")])


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError, match="max_body_bytes"):
        ServerLimits(max_body_bytes=0)
    with pytest.raises(ValueError, match="header_timeout"):
        ServerLimits(header_timeout=0)


def test_server_info_url() -> None:
    assert ServerInfo("127.0.0.1", 80).url == "http://127.0.0.1:80"
    assert ServerInfo("::1", 443, scheme="https").url == "https://[::1]:443"


def test_response_helpers() -> None:
    response = Response.json({"a": "é"}, 201, [("x-b", "c")])
    assert response.status == 201
    assert response.body == '{"a":"é"}'.encode()
    assert response.headers == [("content-type", "application/json"), ("x-b", "c")]
    text = Response.text("hi")
    assert text.body == b"hi"
    assert text.headers[0][1].startswith("text/plain")
    error = Response.error(HTTPError(404, "no such model"))
    assert json.loads(error.body)["error"]["type"] == "not_found_error"  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Out of range"):
        Response.json({"x": float("nan")})


# -- the server's decisions on a parsed head ---------------------------------------------


def _parse(raw: bytes) -> h11.Request:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(raw)
    event = conn.next_event()
    assert isinstance(event, h11.Request)
    return event


def test_inspect_head_reports_framing() -> None:
    limits = ServerLimits()
    raw, length, chunked = inspect_head(
        _parse(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 12\r\n\r\n"), limits
    )
    assert (length, chunked) == (12, False)
    assert (b"host", b"x") in raw
    _, length, chunked = inspect_head(
        _parse(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"), limits
    )
    assert (length, chunked) == (None, True)


@pytest.mark.parametrize(
    ("raw", "limits", "status"),
    [
        (
            b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 200 + b"\r\n\r\n",
            {"max_header_bytes": 100},
            431,
        ),
        (b"GET / HTTP/1.2\r\nHost: x\r\n\r\n", {}, 505),
        (
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n",
            {},
            400,
        ),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\n", {"max_body_bytes": 10}, 413),
    ],
)
def test_inspect_head_refuses(raw: bytes, limits: dict[str, int], status: int) -> None:
    with pytest.raises(HTTPError) as refused:
        inspect_head(_parse(raw), ServerLimits(**limits))
    assert refused.value.status == status


def test_obs_fold_is_found_only_in_the_head() -> None:
    assert has_obs_fold(b"GET / HTTP/1.1\r\nA: b\r\n c\r\n\r\n")
    assert has_obs_fold(b"GET / HTTP/1.1\nA: b\n\tc\n\n")
    assert has_obs_fold(b"GET / HTTP/1.1\r\nA: b\r\n c")  # an incomplete head too
    assert not has_obs_fold(b'POST / HTTP/1.1\r\nA: b\r\n\r\n{\n  "pretty": 1\n}')


def test_h11_verdicts_map_to_statuses() -> None:
    assert protocol_error(h11.RemoteProtocolError("x", error_status_hint=431)).status == 431
    assert protocol_error(h11.RemoteProtocolError("x", error_status_hint=501)).status == 501
    assert protocol_error(h11.RemoteProtocolError("bad")).status == 400


def test_error_is_rendered_only_while_h11_allows_a_response() -> None:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    conn.next_event()
    data = render_error(conn, HTTPError(429, "slow down", headers=[("Retry-After", "2")]))
    assert data is not None
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 429 Too Many Requests\r\n")
    assert b"connection: close" in head.lower()
    assert b"Retry-After: 2" in head
    assert json.loads(body)["error"]["message"] == "slow down"
    assert render_error(conn, HTTPError(500, "again")) is None  # a response was already sent


def test_websocket_key_must_be_16_bytes_of_base64() -> None:
    assert valid_websocket_key("dGhlIHNhbXBsZSBub25jZQ==")
    assert not valid_websocket_key("dGhlIHNhbXBsZQ==")
    assert not valid_websocket_key("not base64!")
