"""HTTP/1.1 on anyio + h11 and WebSockets on wsproto: Inferno's only network layer.

The public names are re-exported here; import from ``inferno.http``.
"""

from __future__ import annotations

# -- client (inferno.http.client) ---------------------------------------------------
from inferno.http.client import URL, ClientResponse, HTTPClient, Timeouts, parse_url
from inferno.http.client_errors import (
    ClientError,
    ClientTimeout,
    ConnectError,
    ConnectTimeout,
    DecodeError,
    InvalidURL,
    LocalProtocolError,
    PoolTimeout,
    ReadError,
    ReadTimeout,
    RemoteProtocolError,
    ResponseTooLarge,
    TLSError,
    TotalTimeout,
    WriteError,
    WriteTimeout,
)

# -- server (inferno.http.server) ---------------------------------------------------
from inferno.http.headers import Headers
from inferno.http.pool import Origin, OriginStats, PoolStats
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
    start_server,
)

# -- WebSocket (inferno.http.websocket) ---------------------------------------------
from inferno.http.websocket import (
    WebSocket,
    WebSocketClosed,
    WebSocketError,
    WebSocketHandshakeError,
    WebSocketTimeout,
    connect_websocket,
)

__all__ = [
    "URL",
    "ClientError",
    "ClientResponse",
    "ClientTimeout",
    "ConnectError",
    "ConnectTimeout",
    "DecodeError",
    "HTTPClient",
    "Handler",
    "Headers",
    "InvalidURL",
    "LocalProtocolError",
    "Origin",
    "OriginStats",
    "PoolStats",
    "PoolTimeout",
    "ReadError",
    "ReadTimeout",
    "RemoteProtocolError",
    "Request",
    "Response",
    "ResponseTooLarge",
    "ServerInfo",
    "ServerLimits",
    "TLSConfigError",
    "TLSError",
    "Timeouts",
    "TotalTimeout",
    "WebSocket",
    "WebSocketAccept",
    "WebSocketClosed",
    "WebSocketError",
    "WebSocketHandshakeError",
    "WebSocketTimeout",
    "WriteError",
    "WriteTimeout",
    "connect_websocket",
    "parse_url",
    "serve",
    "server_ssl_context",
    "start_server",
]
