"""What a failed attempt at a node means for its request: the answer, a retry, a wait.

The forwarding loop (:mod:`~inferno_proxy.forward`) sends a request to a
node; when that fails before any byte reached the client, :func:`judge_failure`
says what the client would get if no other node is tried, whether another
node may be (``retryable``), and whether the node looked *unreachable*
(connect refused or timed out, reset), which lets the request wait for a
node to come back rather than fail.  A timeout after the request went out
(the node is slow, not away) is neither retried nor waited for: the request
may be running there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from inferno.errors import HTTPError
from inferno.http import (
    ClientError,
    ClientTimeout,
    ConnectError,
    PoolTimeout,
    ReadError,
    RemoteProtocolError,
    WriteError,
)
from inferno_proxy.budget import retry_after_header
from inferno_proxy.nodes import Node, Outcome
from inferno_proxy.relay import Opened

__all__ = [
    "FAILED_RETRY_AFTER",
    "Failed",
    "error_outcome",
    "first_byte_timeout",
    "judge_failure",
]

FAILED_RETRY_AFTER: Final = 1.0  # seconds, Retry-After of a 503 when every node tried failed


@dataclass(slots=True)
class Failed:
    """An attempt that failed before any byte went to the client."""

    status: int  # what the client gets if no other node is tried
    message: str
    code: str
    retryable: bool
    reason: str  # metrics label
    opened: Opened | None = None  # an upstream answer (429/502/503) to pass on instead
    unreachable: bool = False  # connect refused or timed out, reset: the node, not the request

    def error(self) -> HTTPError:
        headers = [("retry-after", retry_after_header(FAILED_RETRY_AFTER))]
        return HTTPError(
            self.status, self.message, code=self.code, headers=headers if self.status == 503 else []
        )


def error_outcome(exc: ClientError) -> Outcome:
    """How a transport error counts against the node (a passive health signal)."""
    # A full pool is our own limit, not the node's fault.
    return Outcome.NEUTRAL if isinstance(exc, PoolTimeout) else Outcome.TRANSPORT_FAILURE


def judge_failure(exc: ClientError, node: Node) -> Failed:
    """What a client error before the first byte means for the request."""
    if isinstance(exc, (ConnectError, PoolTimeout)):  # nothing was sent: try elsewhere
        # A full connection pool is our own limit, not the node being away.
        unreachable = not isinstance(exc, PoolTimeout)
        return Failed(
            503,
            f"cannot reach {node.id}: {exc}",
            "no_healthy_upstream",
            True,
            "connect",
            unreachable=unreachable,
        )
    if isinstance(exc, ClientTimeout):
        return Failed(504, f"{node.id} timed out: {exc}", "upstream_timeout", False, "timeout")
    if isinstance(exc, (ReadError, WriteError, RemoteProtocolError)):
        temporary = exc.temporary  # a reset or a close without an answer
        return Failed(
            502,
            f"{node.id} failed: {exc}",
            "bad_gateway",
            temporary,
            "reset",
            unreachable=temporary,
        )
    return Failed(502, f"cannot forward to {node.id}: {exc}", "bad_gateway", False, "error")


def first_byte_timeout(node: Node, limit: float) -> Failed:
    """A node that did not start its response within *limit* seconds."""
    return Failed(
        504,
        f"{node.id} did not start its response (head and first chunk) within {limit:g} s",
        "upstream_timeout",
        False,
        "timeout",
    )
