"""WebSockets: our server against our client and against a hand-made handshake
driving wsproto's low-level connection (a foreign client)."""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable

import anyio
import pytest
from wsproto.connection import Connection, ConnectionType
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    Pong,
    TextMessage,
)

from inferno.errors import HTTPError
from inferno.http import (
    Request,
    Response,
    ServerInfo,
    WebSocket,
    WebSocketAccept,
    WebSocketClosed,
    WebSocketError,
    WebSocketHandshakeError,
    WebSocketTimeout,
    connect_websocket,
    serve,
)
from tests.http.conftest import (
    IO_TIMEOUT,
    assert_json_error,
    exchange,
    good_request,
    parse_response,
    read_until,
    running_server,
)

pytestmark = pytest.mark.anyio

Session = Callable[[WebSocket], Awaitable[None]]


async def echo(ws: WebSocket) -> None:
    async for message in ws:
        await ws.send(message)


def upgrade_handler(
    session: Session = echo, **options: object
) -> Callable[..., Awaitable[Response]]:
    async def handler(request: Request) -> Response:
        if request.path == "/":
            return Response(200, body=b"plain")
        if request.path == "/refuse":
            raise HTTPError(403, "not for you", code="forbidden")
        return WebSocketAccept(session, **options)  # type: ignore[arg-type]

    return handler


async def test_echo_with_our_client(wire_mode: str) -> None:
    big = os.urandom(200_000)
    async with running_server(upgrade_handler()) as info:
        with anyio.fail_after(IO_TIMEOUT):
            ws = await connect_websocket(f"ws://127.0.0.1:{info.port}/ws")
            await ws.send("héllo")
            assert await ws.receive() == "héllo"
            await ws.send(b"\x00binary")
            assert await ws.receive() == b"\x00binary"
            await ws.send(big)
            assert await ws.receive() == big
            await ws.ping(b"are you there")
            await ws.send("after ping")
            assert await ws.receive() == "after ping"  # the pong was consumed on the way
            await ws.close()
        assert ws.closed
        assert ws.close_code == 1000
        await good_request(info.port)


def _handshake(key: bytes, path: bytes = b"/ws", extra: bytes = b"") -> bytes:
    return (
        b"GET " + path + b" HTTP/1.1\r\nHost: example\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: " + key + b"\r\n"
        b"Sec-WebSocket-Version: 13\r\n" + extra + b"\r\n"
    )


async def _events(stream: anyio.abc.ByteStream, conn: Connection, count: int) -> list[Event]:
    events: list[Event] = []
    with anyio.fail_after(IO_TIMEOUT):
        while len(events) < count:
            conn.receive_data(await stream.receive())
            events.extend(conn.events())
    return events


async def test_hand_made_handshake_and_wsproto_frames(wire_mode: str) -> None:
    key = base64.b64encode(os.urandom(16))
    expected_accept = base64.b64encode(
        hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()
    )
    client = Connection(ConnectionType.CLIENT)
    async with (
        running_server(upgrade_handler()) as info,
        await anyio.connect_tcp("127.0.0.1", info.port) as stream,
    ):
        # The first frame rides in the same write as the handshake: the server
        # must hand the bytes after the request to wsproto.
        await stream.send(_handshake(key) + client.send(TextMessage(data="early")))
        head = await read_until(stream, b"\r\n\r\n")
        head, _, rest = head.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        assert lines[0] == b"HTTP/1.1 101 Switching Protocols"
        fields = {k.lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines[1:])}
        assert fields[b"sec-websocket-accept"] == expected_accept
        assert fields[b"upgrade"].lower() == b"websocket"

        client.receive_data(rest)
        events = list(client.events())
        if not events:
            events = await _events(stream, client, 1)
        assert isinstance(events[0], TextMessage)
        assert events[0].data == "early"

        await stream.send(client.send(Ping(payload=b"p")))
        (pong,) = await _events(stream, client, 1)
        assert isinstance(pong, Pong)
        assert pong.payload == b"p"

        # A fragmented message comes back whole.
        await stream.send(client.send(BytesMessage(data=b"frag-", message_finished=False)))
        await stream.send(client.send(BytesMessage(data=b"ment", message_finished=True)))
        (message,) = await _events(stream, client, 1)
        assert isinstance(message, BytesMessage)
        assert message.data == b"frag-ment"

        await stream.send(client.send(CloseConnection(code=1000, reason="bye")))
        (close,) = await _events(stream, client, 1)
        assert isinstance(close, CloseConnection)
        assert close.code == 1000


async def test_message_over_the_limit_closes_with_1009(wire_mode: str) -> None:
    async with running_server(upgrade_handler(max_message_bytes=1024)) as info:
        ws = await connect_websocket(f"ws://127.0.0.1:{info.port}/ws")
        await ws.send(b"x" * 1000)
        assert await ws.receive() == b"x" * 1000
        await ws.send(b"y" * 2000)
        with anyio.fail_after(IO_TIMEOUT), pytest.raises(WebSocketClosed) as closed:
            await ws.receive()
        assert closed.value.code == 1009
        assert ws.close_code == 1009


async def test_our_client_limits_incoming_messages_too() -> None:
    async def shout(ws: WebSocket) -> None:
        await ws.send("z" * 5000)
        await ws.receive()

    async with running_server(upgrade_handler(shout)) as info:
        ws = await connect_websocket(f"ws://127.0.0.1:{info.port}/ws", max_message_bytes=100)
        with anyio.fail_after(IO_TIMEOUT), pytest.raises(WebSocketClosed) as closed:
            await ws.receive()
        assert closed.value.code == 1009
        await ws.close()


async def test_failing_session_closes_with_1011(caplog: pytest.LogCaptureFixture) -> None:
    async def broken(ws: WebSocket) -> None:
        await ws.receive()
        raise RuntimeError("session bug")

    async with running_server(upgrade_handler(broken)) as info:
        ws = await connect_websocket(f"ws://127.0.0.1:{info.port}/ws")
        await ws.send("trigger")
        with anyio.fail_after(IO_TIMEOUT), pytest.raises(WebSocketClosed) as closed:
            await ws.receive()
        assert closed.value.code == 1011
        await ws.close()
    assert any(
        r.levelno == logging.ERROR and "WebSocket session failed" in r.getMessage()
        for r in caplog.records
    )


async def test_session_returning_closes_normally_and_sees_the_client_close() -> None:
    seen: list[tuple[int | None, str | None]] = []

    async def one_message(ws: WebSocket) -> None:
        await ws.send("only one")
        async for _ in ws:
            pass
        seen.append((ws.close_code, ws.close_reason))

    async with running_server(upgrade_handler(one_message)) as info:
        ws = await connect_websocket(f"ws://127.0.0.1:{info.port}/ws")
        assert await ws.receive() == "only one"
        await ws.close(4000, "client done")
    assert seen == [(4000, "client done")]

    async def say_and_go(ws: WebSocket) -> None:
        await ws.send("goodbye")

    async with running_server(upgrade_handler(say_and_go)) as info:
        ws = await connect_websocket(f"ws://127.0.0.1:{info.port}/ws")
        assert [message async for message in ws] == ["goodbye"]
        assert ws.close_code == 1000


async def test_one_task_receives_while_another_sends() -> None:
    async def relay_like(ws: WebSocket) -> None:
        async with anyio.create_task_group() as tg:

            async def ticker() -> None:
                for i in range(5):
                    await ws.send(f"tick {i}")

            tg.start_soon(ticker)
            async for message in ws:
                await ws.send(f"echo {message}")

    async with running_server(upgrade_handler(relay_like)) as info:
        ws = await connect_websocket(f"ws://127.0.0.1:{info.port}/ws")
        await ws.send("a")
        received = set()
        with anyio.fail_after(IO_TIMEOUT):
            while len(received) < 6:
                received.add(await ws.receive())
        assert received == {f"tick {i}" for i in range(5)} | {"echo a"}
        await ws.close()


async def test_subprotocol_and_headers_reach_the_other_side() -> None:
    seen: list[str | None] = []

    async def handler(request: Request) -> Response:
        seen.append(request.headers.get("sec-websocket-protocol"))
        seen.append(request.headers.get("x-token"))
        return WebSocketAccept(echo, subprotocol="chat.v2", extra_headers=[("x-server", "inferno")])

    async with running_server(handler) as info:
        ws = await connect_websocket(
            f"ws://127.0.0.1:{info.port}/ws?room=1",
            subprotocols=["chat.v2", "chat.v1"],
            headers=[("X-Token", "secret")],
        )
        assert ws.subprotocol == "chat.v2"
        await ws.close()
    assert seen == ["chat.v2, chat.v1", "secret"]


async def test_upgrade_refused_by_the_handler_raises_with_status_and_body() -> None:
    async with running_server(upgrade_handler()) as info:
        with pytest.raises(WebSocketHandshakeError) as refused:
            await connect_websocket(f"ws://127.0.0.1:{info.port}/refuse")
    assert refused.value.status == 403
    assert refused.value.temporary is False
    assert b"not for you" in refused.value.body
    assert refused.value.headers.get("content-type") == "application/json"


async def test_accept_for_a_request_that_is_no_upgrade_is_a_426(wire_mode: str) -> None:
    async with running_server(upgrade_handler()) as info:
        data = await exchange(info.port, b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n")
        wrong_version = await exchange(
            info.port,
            _handshake(base64.b64encode(os.urandom(16))).replace(b"Version: 13", b"Version: 8"),
        )
        bad_key = await exchange(info.port, _handshake(b"not-base64-16-bytes"))
        await good_request(info.port)
    assert assert_json_error(parse_response(data), 426)["code"] == "upgrade_required"
    response = parse_response(wrong_version)
    assert_json_error(response, 426)
    assert response.header("sec-websocket-version") == "13"
    assert_json_error(parse_response(bad_key), 400)


async def test_server_shutdown_closes_open_websockets_with_1001() -> None:
    shutdown = anyio.Event()
    entered = anyio.Event()

    async def waiting(ws: WebSocket) -> None:
        entered.set()
        await anyio.sleep_forever()

    async with anyio.create_task_group() as tg:
        info: ServerInfo = await tg.start(
            lambda task_status: serve(
                upgrade_handler(waiting),
                shutdown=shutdown,
                shutdown_timeout=0.1,
                task_status=task_status,
            )
        )
        ws = await connect_websocket(f"ws://127.0.0.1:{info.port}/ws")
        with anyio.fail_after(IO_TIMEOUT):
            await entered.wait()
        shutdown.set()
        with anyio.fail_after(IO_TIMEOUT), pytest.raises(WebSocketClosed) as closed:
            await ws.receive()
        await ws.close()
    assert closed.value.code == 1001


async def test_connect_errors_are_ours() -> None:
    with pytest.raises(ValueError, match="not a WebSocket URL"):
        await connect_websocket("ftp://127.0.0.1/")
    async with running_server(upgrade_handler()) as info:
        port = info.port
    with pytest.raises(WebSocketError) as failed:
        await connect_websocket(f"ws://127.0.0.1:{port}/ws", timeout=IO_TIMEOUT)
    assert failed.value.temporary is True
    async with running_server(upgrade_handler()) as info:
        # a plain HTTP server that answers 200 to the upgrade request
        with pytest.raises(WebSocketHandshakeError) as refused:
            await connect_websocket(f"ws://127.0.0.1:{info.port}/")
        assert refused.value.status == 200


async def test_a_connect_timeout_is_told_from_a_handshake_timeout() -> None:
    with socket.socket() as full, socket.socket() as filler:
        # listen(0) with one connection waiting: the kernel drops further SYNs.
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        filler.connect(full.getsockname())
        url = f"ws://127.0.0.1:{full.getsockname()[1]}/ws"
        with pytest.raises(WebSocketError, match="timed out connecting") as away:
            await connect_websocket(url, timeout=IO_TIMEOUT, connect_timeout=0.05)
        assert away.value.temporary is True
        assert not isinstance(away.value, WebSocketTimeout)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)  # the kernel completes connections; nobody answers
        url = f"ws://127.0.0.1:{silent.getsockname()[1]}/ws"
        with pytest.raises(WebSocketTimeout, match="timed out opening") as stalled:
            await connect_websocket(url, timeout=0.1, connect_timeout=0.05)
        assert stalled.value.temporary is True
