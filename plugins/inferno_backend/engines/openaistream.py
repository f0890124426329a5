"""Reading an OpenAI-compatible server's streamed answer, without I/O.

Two pure pieces the ``openai`` engine drives with the bytes it receives:

- :class:`SSEParser`, an incremental parser of ``text/event-stream`` (the
  WHATWG HTML "server-sent events" rules): fed bytes split anywhere, even
  inside a UTF-8 character or between ``\\r`` and ``\\n``, it returns every
  complete event and keeps the rest.
- :class:`ChunkTranslator`, which turns the events of one OpenAI completion
  or chat completion stream into :class:`~.base.TokenChunk` values, and
  error events or answers into :class:`~.base.EngineError`.

Token counts: OpenAI streams carry usage only at the end (we always ask for it
with ``stream_options.include_usage``), in a chunk with no choices that
follows the one carrying ``finish_reason``.  Until then a chunk's
``completion_tokens`` counts the deltas received (these servers send one
token per delta, so the estimate is close) and ``prompt_tokens`` is 0; the
final chunk, which waits for the usage chunk, carries the server's figures.
A server that sends no usage leaves the estimate in the final chunk.

Only text deltas become chunks: tool-call deltas and reasoning text have no
place in :class:`~.base.TokenChunk` and are skipped.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Final, Literal

from inferno_backend.engines.base import EngineError, TokenChunk

__all__ = [
    "MAX_EVENT_BYTES",
    "MAX_MESSAGE_CHARS",
    "ChunkTranslator",
    "SSEError",
    "SSEEvent",
    "SSEParser",
    "error_message",
    "failure_from_answer",
]

#: Largest event (or unfinished line) kept; a chunk with logprobs of a long
#: delta is a few KiB, so more means a broken or hostile server.
MAX_EVENT_BYTES: Final = 4 * 1024 * 1024

#: Longest error message passed on from the engine server (a traceback is not for users).
MAX_MESSAGE_CHARS: Final = 2000

_LINE_END: Final = re.compile(rb"\r\n|\r|\n")
_BOM: Final = b"\xef\xbb\xbf"  # U+FEFF in UTF-8
#: Finish reasons some servers spell their own way, mapped to OpenAI's.
_FINISH_REASONS: Final = {"eos_token": "stop", "stop_sequence": "stop", "max_tokens": "length"}


class SSEError(ValueError):
    """Raised when an event stream breaks a limit (an event over :data:`MAX_EVENT_BYTES`)."""


@dataclass(frozen=True, slots=True)
class SSEEvent:
    """One dispatched event: its ``data`` lines joined by ``\\n``."""

    data: str
    event: str = "message"
    id: str = ""


class SSEParser:
    """Incremental ``text/event-stream`` parser: :meth:`feed` bytes, get events.

    Follows the WHATWG rules: lines end with CRLF, LF or CR; a blank line
    dispatches the event; ``:`` starts a comment; one space after a field's
    colon is dropped; an event without ``data`` is not dispatched; ``id``
    persists across events.  ``retry`` is ignored (a generation is never
    reconnected).  An unfinished event at the end of the stream is discarded
    by simply never being returned.
    """

    __slots__ = ("_buffer", "_data", "_event", "_id", "_max", "_size", "_skip_lf", "_started")

    def __init__(self, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self._max = max_event_bytes
        self._buffer = bytearray()  # bytes of an unfinished line
        self._skip_lf = False  # the last byte seen was a CR: a LF right after it is its pair
        self._started = False  # the BOM check is done
        self._data: list[str] = []
        self._size = 0
        self._event = ""
        self._id = ""

    def feed(self, data: bytes) -> list[SSEEvent]:
        """Every event completed by ``data``, in order.

        :raises SSEError: when an event or line grows beyond the limit.
        """
        if self._skip_lf and data:
            self._skip_lf = False
            if data[0] == 0x0A:
                data = data[1:]
        events: list[SSEEvent] = []
        lines: list[bytes] | list[bytearray] | None
        # The kept bytes never hold a line end, so only ``data`` is scanned for one.
        if b"\r" in data:
            buffer = self._buffer + data
            lines = _LINE_END.split(buffer)
            # a CR that ends the data ends a line; the LF of its CRLF may come next
            self._skip_lf = buffer.endswith(b"\r")
        elif b"\n" in data:  # the usual case
            lines = (self._buffer + data).split(b"\n") if self._buffer else data.split(b"\n")
        else:  # no line end: keep the bytes (appending, so a long line costs linear time)
            self._buffer += data
            lines = None
        if lines is not None:
            self._buffer = bytearray(lines.pop())
            for raw in lines:
                self._line(raw, events)
        if len(self._buffer) + self._size > self._max:
            raise SSEError(f"an event stream event is longer than {self._max} bytes")
        return events

    def _line(self, raw: bytes | bytearray, events: list[SSEEvent]) -> None:
        if not self._started:
            self._started = True
            if raw.startswith(_BOM):
                raw = raw[len(_BOM) :]
        if not raw:
            self._dispatch(events)
            return
        if raw[0] == 0x3A:  # ":" starts a comment (servers send them as keep-alives)
            return
        name, colon, value = raw.partition(b":")
        if colon and value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            self._data.append(value.decode("utf-8", "replace"))
            self._size += len(raw) + 1
            if self._size > self._max:
                raise SSEError(f"an event stream event is longer than {self._max} bytes")
        elif name == b"event":
            self._event = value.decode("utf-8", "replace")
        elif name == b"id" and b"\0" not in value:
            self._id = value.decode("utf-8", "replace")

    def _dispatch(self, events: list[SSEEvent]) -> None:
        if self._data:
            events.append(SSEEvent("\n".join(self._data), self._event or "message", self._id))
        self._data = []
        self._size = 0
        self._event = ""


def error_message(document: Any) -> str | None:
    """The message of an error document, in any of the servers' shapes, else ``None``.

    OpenAI, vLLM, llama.cpp and SGLang: ``{"error": {"message": ...}}``; older
    vLLM: ``{"object": "error", "message": ...}``; TGI: ``{"error": "...",
    "error_type": ...}``; FastAPI: ``{"detail": ...}``.
    """
    if not isinstance(document, dict):
        return None
    error = document.get("error")
    if isinstance(error, dict):
        message = error.get("message")
        return message if isinstance(message, str) and message else json.dumps(error)
    if isinstance(error, str) and error:
        return error
    if document.get("object") == "error":
        message = document.get("message")
        return message if isinstance(message, str) and message else "error"
    detail = document.get("detail")
    if isinstance(detail, str) and detail:
        return detail
    if detail is not None:
        return json.dumps(detail)
    return None


def _error_status(document: dict[str, Any]) -> int | None:
    """An HTTP status an error document names as its ``code``, if any."""
    error = document.get("error")
    holder = error if isinstance(error, dict) else document
    for key in ("code", "status"):
        code = holder.get(key)
        if isinstance(code, int) and not isinstance(code, bool) and 400 <= code <= 599:
            return code
    return None


def failure_from_answer(status: int, message: str) -> EngineError:
    """The error for a server's non-200 answer: its status, its message.

    4xx is the request's fault (permanent) except 408 and 429; 5xx is
    temporary; anything else (a 3xx, a 204) is a broken server: 502.  The
    message goes to the end client, so it is capped at :data:`MAX_MESSAGE_CHARS`.
    """
    message = message[:MAX_MESSAGE_CHARS]
    if not 400 <= status <= 599:
        return EngineError(f"the engine server answered {status}: {message}", status=502)
    temporary = status >= 500 or status in (408, 429)
    return EngineError(message, status=status, temporary=temporary)


class ChunkTranslator:
    """Turns the events of one OpenAI stream into :class:`~.base.TokenChunk` values.

    Feed every event to :meth:`on_event`; after ``[DONE]`` :attr:`done` is
    true.  If the stream ends without ``[DONE]``, call :meth:`on_end`.
    """

    __slots__ = ("_deltas", "_emitted_final", "_finish", "_kind", "_prompt", "_usage", "done")

    def __init__(self, kind: Literal["chat", "completion"]) -> None:
        self._kind = kind
        self._deltas = 0  # text deltas received: the estimate of completion tokens
        self._prompt = 0
        self._usage: int | None = None  # completion tokens per the server's usage
        self._finish: str | None = None
        self._emitted_final = False
        #: ``[DONE]`` has arrived: nothing more will.
        self.done = False

    def on_event(self, event: SSEEvent) -> TokenChunk | None:
        """The chunk ``event`` makes, if any.

        :raises EngineError: for an error event (the server's status when it
            names one, else 502) or an event that is not an OpenAI chunk.
        """
        data = event.data
        if data.strip() == "[DONE]":
            self.done = True
            return None if self._emitted_final else self._final("")
        try:
            document = json.loads(data)
        except ValueError:
            raise EngineError(
                f"the engine server streamed an unreadable event: {data[:200]!r}"
            ) from None
        if not isinstance(document, dict):
            raise EngineError(f"the engine server streamed a non-object event: {data[:200]!r}")
        return self._on_chunk(document)

    def on_end(self) -> TokenChunk | None:
        """The stream ended without ``[DONE]``: the final chunk, if the generation finished.

        :raises EngineError: 502 when the stream stopped before a ``finish_reason``.
        """
        if self._emitted_final:
            return None
        if self._finish is None:
            raise EngineError("the engine server's stream ended before the generation finished")
        return self._final("")

    def on_whole(self, document: Any) -> TokenChunk:
        """The one chunk of a non-streaming answer (from a server that ignored ``stream``)."""
        if not isinstance(document, dict):
            raise EngineError("the engine server answered a non-object document")
        chunk = self._on_chunk(document)
        if chunk is not None and chunk.finish_reason is not None:
            return chunk
        return self._final(chunk.text if chunk is not None else "")

    def _on_chunk(self, document: dict[str, Any]) -> TokenChunk | None:
        message = error_message(document)
        if message is not None:
            status = _error_status(document) or 502
            raise failure_from_answer(status, message)
        if self._emitted_final:
            return None
        usage = document.get("usage")
        if isinstance(usage, dict):
            self._take_usage(usage)
        text = ""
        choices = document.get("choices")
        if isinstance(choices, list) and choices:
            choice = choices[0]
            if isinstance(choice, dict):
                text = self._choice_text(choice)
                reason = choice.get("finish_reason")
                if isinstance(reason, str) and reason:
                    self._finish = _FINISH_REASONS.get(reason, reason)
        if text:
            self._deltas += 1
        if self._finish is not None and self._usage is not None:
            return self._final(text)
        if text:
            return TokenChunk(text, self._prompt, self._completion_tokens())
        return None

    def _choice_text(self, choice: dict[str, Any]) -> str:
        if self._kind == "completion":
            text = choice.get("text")
        else:
            holder = choice.get("delta")
            if not isinstance(holder, dict):
                holder = choice.get("message")  # a whole (non-streamed) answer
            text = holder.get("content") if isinstance(holder, dict) else None
        return text if isinstance(text, str) else ""

    def _take_usage(self, usage: dict[str, Any]) -> None:
        prompt = usage.get("prompt_tokens")
        completion = usage.get("completion_tokens")
        if isinstance(prompt, int) and prompt >= 0:
            self._prompt = prompt
        if isinstance(completion, int) and completion >= 0:
            self._usage = completion

    def _completion_tokens(self) -> int:
        return self._usage if self._usage is not None else self._deltas

    def _final(self, text: str) -> TokenChunk:
        self._emitted_final = True
        reason = self._finish or "stop"
        return TokenChunk(text, self._prompt, self._completion_tokens(), reason)
