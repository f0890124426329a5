"""The pure halves of the openai engine: the SSE parser and the OpenAI chunk translator."""

from __future__ import annotations

import json
from typing import Any

import pytest
from inferno_backend.engines.base import EngineError, TokenChunk
from inferno_backend.engines.openaistream import (
    MAX_MESSAGE_CHARS,
    ChunkTranslator,
    SSEError,
    SSEEvent,
    SSEParser,
    error_message,
    failure_from_answer,
)

# Every line ending, a BOM, comments, multi-line data, UTF-8 of 2, 3 and 4 bytes,
# fields without a space or without a colon, an event without data.
STREAM = (
    "\ufeff: a comment first\r\n"
    "data: héllo\r\n"
    "\r\n"
    "event: update\r"
    "id: 7\r"
    "data:first line\r"
    "data:  second — line\r"
    "\r"
    "id: 8\n"
    "retry: 3000\n"
    "\n"
    "data\n"
    "\n"
    "data: 🔥 done\n"
    ": keep-alive\n"
    "\n"
    "data: never finished"
).encode()

EXPECTED = [
    SSEEvent("héllo"),
    SSEEvent("first line\n second — line", "update", "7"),
    SSEEvent("", "message", "8"),  # ``id: 8`` alone dispatched nothing, but persists
    SSEEvent("🔥 done", "message", "8"),
]


def feed_all(parser: SSEParser, pieces: list[bytes]) -> list[SSEEvent]:
    return [event for piece in pieces for event in parser.feed(piece)]


def test_sse_parses_a_whole_stream() -> None:
    assert SSEParser().feed(STREAM) == EXPECTED


@pytest.mark.parametrize("cut", range(len(STREAM) + 1))
def test_sse_split_at_any_byte_gives_the_same_events(cut: int) -> None:
    # splits land inside UTF-8 characters, between CR and LF, inside field names
    assert feed_all(SSEParser(), [STREAM[:cut], STREAM[cut:]]) == EXPECTED


def test_sse_fed_one_byte_at_a_time() -> None:
    pieces = [STREAM[i : i + 1] for i in range(len(STREAM))]
    assert feed_all(SSEParser(), pieces) == EXPECTED


def test_sse_events_come_out_as_soon_as_they_are_complete() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: one\n") == []
    assert parser.feed(b"\n") == [SSEEvent("one")]
    assert parser.feed(b"data: two\r") == []
    # the CR ended the line: an LF right after it is its pair, not a blank line
    assert parser.feed(b"\n") == []
    assert parser.feed(b"\r\n") == [SSEEvent("two")]


def test_sse_bom_only_at_the_very_start() -> None:
    assert SSEParser().feed("data: x\n\n\ufeffdata: y\n\n".encode()) == [SSEEvent("x")]


def test_sse_a_line_longer_than_the_limit_is_refused() -> None:
    parser = SSEParser(max_event_bytes=64)
    parser.feed(b"data: " + b"a" * 40)
    with pytest.raises(SSEError, match="longer than 64 bytes"):
        parser.feed(b"a" * 40)


def test_sse_an_event_longer_than_the_limit_is_refused() -> None:
    parser = SSEParser(max_event_bytes=64)
    with pytest.raises(SSEError):
        parser.feed(b"data: 0123456789\n" * 5)


def test_sse_the_limit_is_per_event() -> None:
    parser = SSEParser(max_event_bytes=64)
    events = feed_all(parser, [b"data: 0123456789012345678901234567890123456789\n\n"] * 10)
    assert len(events) == 10


# -- the OpenAI chunk translator ------------------------------------------------------------


def chat_chunk(content: str | None = None, finish: str | None = None, **extra: Any) -> SSEEvent:
    delta = {} if content is None else {"content": content}
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    document = {"id": "c1", "object": "chat.completion.chunk", "choices": [choice], **extra}
    return SSEEvent(json.dumps(document))


def usage_chunk(prompt: int, completion: int) -> SSEEvent:
    usage = {"prompt_tokens": prompt, "completion_tokens": completion}
    return SSEEvent(json.dumps({"id": "c1", "choices": [], "usage": usage}))


DONE = SSEEvent("[DONE]")


def translate(kind: Any, events: list[SSEEvent]) -> tuple[list[TokenChunk], ChunkTranslator]:
    translator = ChunkTranslator(kind)
    chunks = [c for c in (translator.on_event(e) for e in events) if c is not None]
    return chunks, translator


def test_chat_stream_with_usage() -> None:
    events = [
        SSEEvent(json.dumps({"choices": [{"index": 0, "delta": {"role": "assistant"}}]})),
        chat_chunk("Hel", usage=None),
        chat_chunk("lo"),
        chat_chunk("!", finish="stop"),
        usage_chunk(9, 3),
        DONE,
    ]
    chunks, translator = translate("chat", events)
    assert chunks == [
        TokenChunk("Hel", 0, 1),
        TokenChunk("lo", 0, 2),
        TokenChunk("!", 0, 3),  # the finish waits for the usage that follows
        TokenChunk("", 9, 3, "stop"),
    ]
    assert translator.done


def test_completion_stream_with_usage_on_the_finishing_chunk() -> None:
    # TGI and llama.cpp put usage on the chunk that finishes
    def text_chunk(text: str, finish: str | None = None, usage: Any = None) -> SSEEvent:
        choice = {"index": 0, "text": text, "finish_reason": finish}
        return SSEEvent(json.dumps({"choices": [choice], "usage": usage}))

    events = [
        text_chunk(" a"),
        text_chunk(" b", "length", {"prompt_tokens": 4, "completion_tokens": 2}),
        DONE,
    ]
    chunks, _ = translate("completion", events)
    assert chunks == [TokenChunk(" a", 0, 1), TokenChunk(" b", 4, 2, "length")]


def test_stream_without_usage_ends_with_the_estimate() -> None:
    chunks, _ = translate("chat", [chat_chunk("x"), chat_chunk("y", "eos_token"), DONE])
    # TGI's own spelling of a natural end is OpenAI's "stop"
    assert chunks == [TokenChunk("x", 0, 1), TokenChunk("y", 0, 2), TokenChunk("", 0, 2, "stop")]


def test_stream_cut_before_finishing_is_an_error() -> None:
    _, translator = translate("chat", [chat_chunk("x")])
    with pytest.raises(EngineError, match="ended before") as caught:
        translator.on_end()
    assert (caught.value.status, caught.value.temporary) == (502, True)


def test_stream_ended_after_finish_without_done_still_finishes() -> None:
    _, translator = translate("chat", [chat_chunk("x", "length")])
    assert translator.on_end() == TokenChunk("", 0, 1, "length")
    assert translator.on_end() is None


def test_nothing_after_the_final_chunk_counts() -> None:
    events = [chat_chunk("a", "stop"), usage_chunk(1, 1), usage_chunk(5, 5), chat_chunk("b"), DONE]
    chunks, _ = translate("chat", events)
    assert chunks == [TokenChunk("a", 0, 1), TokenChunk("", 1, 1, "stop")]


@pytest.mark.parametrize(
    ("document", "status", "temporary"),
    [
        ({"error": {"message": "boom", "type": "server_error", "code": 500}}, 500, True),
        ({"error": {"message": "boom"}}, 502, True),
        ({"object": "error", "message": "boom", "code": 400}, 400, False),
        ({"error": "boom", "error_type": "generation"}, 502, True),
    ],
)
def test_error_events_raise_engine_errors(document: Any, status: int, temporary: bool) -> None:
    translator = ChunkTranslator("chat")
    translator.on_event(chat_chunk("a"))
    with pytest.raises(EngineError, match="boom") as caught:
        translator.on_event(SSEEvent(json.dumps(document)))
    assert (caught.value.status, caught.value.temporary) == (status, temporary)


@pytest.mark.parametrize("data", ["not json", "[1, 2]", '"text"'])
def test_unreadable_events_raise(data: str) -> None:
    with pytest.raises(EngineError) as caught:
        ChunkTranslator("chat").on_event(SSEEvent(data))
    assert caught.value.status == 502


def test_a_whole_answer_from_a_server_that_ignored_stream() -> None:
    chat = {
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1},
    }
    chat["choices"][0]["finish_reason"] = "stop"
    assert ChunkTranslator("chat").on_whole(chat) == TokenChunk("hi", 3, 1, "stop")
    completion = {"choices": [{"index": 0, "text": "ok"}]}
    assert ChunkTranslator("completion").on_whole(completion) == TokenChunk("ok", 0, 1, "stop")


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"error": {"message": "context too long", "type": "BadRequestError"}}, "context too long"),
        ({"object": "error", "message": "bad model", "code": 404}, "bad model"),
        ({"error": "Input validation error", "error_type": "validation"}, "Input validation error"),
        ({"detail": "Not Found"}, "Not Found"),
        ({"detail": [{"loc": ["body"], "msg": "x"}]}, '[{"loc": ["body"], "msg": "x"}]'),
        ({"choices": []}, None),
        ([], None),
    ],
)
def test_error_message_shapes(document: Any, message: str | None) -> None:
    assert error_message(document) == message


@pytest.mark.parametrize(
    ("status", "answered", "temporary"),
    [(400, 400, False), (404, 404, False), (429, 429, True), (500, 500, True), (503, 503, True)],
)
def test_failure_from_answer(status: int, answered: int, temporary: bool) -> None:
    error = failure_from_answer(status, "why")
    assert (error.status, error.temporary, str(error)) == (answered, temporary, "why")


def test_failure_messages_are_capped() -> None:
    assert len(str(failure_from_answer(500, "x" * 100_000))) == MAX_MESSAGE_CHARS


def test_failure_from_a_non_error_status_is_a_bad_gateway() -> None:
    error = failure_from_answer(302, "Found")
    assert (error.status, error.temporary) == (502, True)
    assert "302" in str(error)
