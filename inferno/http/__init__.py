"""HTTP/1.1 on anyio + h11 and WebSockets on wsproto: Inferno's only network layer.

The public names are re-exported here; import from ``inferno.http``.
"""

from __future__ import annotations

# -- server (inferno.http.server) ---------------------------------------------------
from inferno.http.headers import Headers
from inferno.http.server import (
    Handler,
    Request,
    Response,
    ServerInfo,
    ServerLimits,
    TLSConfigError,
    WebSocketAccept,
    serve,
    server_ssl_context,
)

# -- WebSocket (inferno.http.websocket) ---------------------------------------------
from inferno.http.websocket import (
    WebSocket,
    WebSocketClosed,
    WebSocketError,
    WebSocketHandshakeError,
    connect_websocket,
)

# -- client (inferno.http.client): names added by the client's owner go here ---------

__all__ = [
    "Handler",
    "Headers",
    "Request",
    "Response",
    "ServerInfo",
    "ServerLimits",
    "TLSConfigError",
    "WebSocket",
    "WebSocketAccept",
    "WebSocketClosed",
    "WebSocketError",
    "WebSocketHandshakeError",
    "connect_websocket",
    "serve",
    "server_ssl_context",
]
