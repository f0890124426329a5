"""Writing a streamed response body, and always closing it.

A streamed body (an async iterable of bytes: an async generator, or an object
wrapping an upstream response) often holds something until it is closed: an
admission slot, an upstream connection.  Left unclosed it keeps that until the
garbage collector finds it, so :func:`send_stream` closes the body however the
response ends: done, the client gone (a failed write or a cancelled
connection), the body failing, a shutdown.  The close is shielded from the
cancellation that may be ending the connection and bounded by
:data:`BODY_CLOSE_TIMEOUT`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterable, AsyncIterator

import anyio
import h11

from inferno.http._wire import Wire

__all__ = ["BODY_CLOSE_TIMEOUT", "close_body", "send_stream"]

logger = logging.getLogger("inferno.http")

# Seconds a streamed body's aclose() may take: its finally blocks release slots
# or upstream streams in milliseconds; one stuck longer is abandoned so that
# the connection (and a shutdown) can end.
BODY_CLOSE_TIMEOUT = 5.0


async def send_stream(
    conn: h11.Connection,
    wire: Wire,
    head: bytes,
    body: AsyncIterable[bytes],
    *,
    head_only: bool,
    what: object,
) -> bool:
    """Send ``head``, then each piece of ``body`` as it is produced, then close ``body``.

    ``head_only``: the response has no content (HEAD, 204, 304); the body is
    closed without being iterated.  ``what`` names the response in logs.
    Returns false when the connection must end without more I/O (the body
    failed mid-stream, or did not match its headers).

    :raises anyio.BrokenResourceError: (or ``ClosedResourceError``) when the
        client went away.
    """
    iterator: AsyncIterator[bytes] | None = None
    finished = False
    try:
        if head_only:
            await wire.send_all(head + conn.send(h11.EndOfMessage()))
            return True
        await wire.send_all(head)
        iterator = body.__aiter__()
        Data = h11.Data  # the per-chunk loop is the SSE hot path
        send = conn.send
        send_all = wire.send_all
        try:
            async for chunk in iterator:
                if chunk:
                    await send_all(send(Data(data=chunk)))
            finished = True
            tail = send(h11.EndOfMessage())
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            raise  # the client went away: the connection ends quietly
        except h11.LocalProtocolError as exc:
            logger.error("response body does not match its headers (%s): %s", what, exc)
            return False
        except Exception:
            logger.exception("response body of %s failed mid-stream", what)
            return False  # the client sees the body cut short
    finally:
        # An exhausted async generator has nothing left to release.
        if not (finished and getattr(iterator, "ag_frame", True) is None):
            await close_body(body if iterator is None else iterator)
    if tail:
        await wire.send_all(tail)
    return True


async def close_body(body: object) -> None:
    """``await body.aclose()`` if it has one: shielded, bounded, failures logged."""
    aclose = getattr(body, "aclose", None)
    if aclose is None:
        return
    with anyio.CancelScope(shield=True) as scope:
        scope.deadline = anyio.current_time() + BODY_CLOSE_TIMEOUT
        try:
            await aclose()
        except Exception:
            logger.exception("closing a response body failed")
    if scope.cancelled_caught:
        logger.warning(
            "a response body did not close within %g s; left to itself", BODY_CLOSE_TIMEOUT
        )
