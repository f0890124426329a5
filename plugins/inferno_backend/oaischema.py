"""The OpenAI wire format, without I/O: request validation, responses and stream chunks.

:func:`parse_request` checks a decoded ``/v1/chat/completions`` or
``/v1/completions`` body and turns it into a
:class:`~inferno_backend.engines.base.GenerationRequest`; a missing or wrongly
typed field raises :class:`OpenAIError` (400) naming it in ``param``, as
OpenAI does, so the official client shows which field was wrong.  Fields we
do not interpret (``top_p``, ``tools``, vLLM's ``ignore_eos``, ...) are
passed to the engine untouched in ``GenerationRequest.extra``; the ones with a
well-known type are type-checked first.

:class:`ChunkEncoder` writes the JSON of one stream's chunks
(``chat.completion.chunk`` / ``text_completion``) from bytes prepared once
per stream, so a token costs one JSON string encoding; SSE and WebSocket
framing are the caller's.  :func:`whole_response` is the non-streaming answer.
"""

from __future__ import annotations

import json
import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from inferno.errors import HTTPError
from inferno_backend.engines.base import GenerationRequest

__all__ = [
    "MAX_STOP_SEQUENCES",
    "ChunkEncoder",
    "Kind",
    "OpenAIError",
    "ParsedRequest",
    "completion_id",
    "model_object",
    "models_list",
    "parse_request",
    "usage",
    "whole_response",
]

Kind = Literal["chat", "completion"]

#: Stop sequences per request.  OpenAI allows 4; vLLM more.  Each one is
#: checked against every new piece of text, so the number is bounded.
MAX_STOP_SEQUENCES: Final = 16
#: Roles a chat message may have (OpenAI's, including the newer ``developer``).
CHAT_ROLES: Final = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
_SEED_LIMIT: Final = 2**63  # seeds must fit a signed 64-bit integer (what engines take)
_OWNER: Final = "inferno"

# Fields this module interprets; every other field goes to ``extra``.
_COMMON: Final = frozenset(
    {"model", "max_tokens", "stop", "n", "stream", "stream_options", "temperature", "seed"}
)
_CHAT_FIELDS: Final = _COMMON | {"messages", "max_completion_tokens"}
_COMPLETION_FIELDS: Final = _COMMON | {"prompt"}


class OpenAIError(HTTPError):
    """Raised for a request OpenAI would refuse; rendered with ``param`` naming the field."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type_: str | None = None,
        headers: list[tuple[str, str]] | None = None,
    ) -> None:
        super().__init__(status, message, type_=type_, code=code, headers=headers)
        self.param = param

    def body(self) -> dict[str, Any]:
        document = super().body()
        document["error"]["param"] = self.param
        return document


def _invalid(param: str, problem: str, code: str = "invalid_value") -> OpenAIError:
    return OpenAIError(400, f"{param}: {problem}", param=param, code=code)


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _wrong_type(param: str, expected: str, value: object) -> OpenAIError:
    return _invalid(param, f"expected {expected}, got {_type_name(value)}", code="invalid_type")


# -- field checks: (body, name) -> value or None when absent/null ------------------------------


def _integer(body: Mapping[str, Any], name: str, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    expected = f"an integer >= {low}" if high is None else f"an integer from {low} to {high}"
    if not isinstance(value, int) or isinstance(value, bool):
        raise _wrong_type(name, expected, value)
    if value < low or (high is not None and value > high):
        raise _invalid(name, f"{value} is out of range: expected {expected}")
    return value


def _number(body: Mapping[str, Any], name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    expected = f"a number from {low:g} to {high:g}"
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise _wrong_type(name, expected, value)
    number = float(value)
    if not (math.isfinite(number) and low <= number <= high):
        raise _invalid(name, f"{value} is out of range: expected {expected}")
    return number


def _boolean(body: Mapping[str, Any], name: str) -> bool | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise _wrong_type(name, "true or false", value)
    return value


def _of_type(body: Mapping[str, Any], name: str, kind: type, expected: str) -> None:
    value = body.get(name)
    if value is not None and not isinstance(value, kind):
        raise _wrong_type(name, expected, value)


def _model(body: Mapping[str, Any]) -> str:
    if "model" not in body or body["model"] is None:
        raise _invalid("model", "is required", code="missing_required_parameter")
    model = body["model"]
    if not isinstance(model, str):
        raise _wrong_type("model", "a string", model)
    if not model:
        raise _invalid("model", "must not be empty")
    return model


def _stop(body: Mapping[str, Any]) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list):
        raise _wrong_type("stop", "a string or an array of strings", value)
    if len(value) > MAX_STOP_SEQUENCES:
        raise _invalid("stop", f"has {len(value)} sequences; at most {MAX_STOP_SEQUENCES}")
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise _wrong_type(f"stop[{index}]", "a string", item)
    return tuple(value)


def _messages(body: Mapping[str, Any]) -> tuple[Mapping[str, Any], ...]:
    if "messages" not in body or body["messages"] is None:
        raise _invalid("messages", "is required", code="missing_required_parameter")
    messages = body["messages"]
    if not isinstance(messages, list):
        raise _wrong_type("messages", "an array of messages", messages)
    if not messages:
        raise _invalid("messages", "must contain at least one message")
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise _wrong_type(where, "a message object", message)
        role = message.get("role")
        if role is None:
            raise _invalid(f"{where}.role", "is required", code="missing_required_parameter")
        if not isinstance(role, str):
            raise _wrong_type(f"{where}.role", "a string", role)
        if role not in CHAT_ROLES:
            allowed = ", ".join(sorted(CHAT_ROLES))
            raise _invalid(f"{where}.role", f"{role!r} is not one of {allowed}")
        content = message.get("content")
        if content is None:
            if role != "assistant":  # an assistant turn with tool calls may have no content
                raise _invalid(f"{where}.content", "is required", code="missing_required_parameter")
        elif isinstance(content, list):
            _content_parts(content, f"{where}.content")
        elif not isinstance(content, str):
            raise _wrong_type(f"{where}.content", "a string or an array of parts", content)
    return tuple(messages)


def _content_parts(parts: list[Any], where: str) -> None:
    for index, part in enumerate(parts):
        at = f"{where}[{index}]"
        if not isinstance(part, dict):
            raise _wrong_type(at, "a content part object", part)
        kind = part.get("type")
        if not isinstance(kind, str):
            raise _wrong_type(f"{at}.type", "a string", kind)
        if kind == "text" and not isinstance(part.get("text"), str):
            raise _wrong_type(f"{at}.text", "a string", part.get("text"))


def _prompt(body: Mapping[str, Any]) -> str:
    if "prompt" not in body or body["prompt"] is None:
        raise _invalid("prompt", "is required", code="missing_required_parameter")
    prompt = body["prompt"]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        if len(prompt) == 1 and isinstance(prompt[0], str):
            return prompt[0]
        if prompt and all(isinstance(p, str) for p in prompt):
            raise _invalid(
                "prompt", "only one prompt per request is supported", "unsupported_value"
            )
    raise _wrong_type("prompt", "a string", prompt)


def _check_extras(kind: Kind, body: Mapping[str, Any]) -> None:
    """Type-check the well-known fields passed through to the engine."""
    _number(body, "top_p", 0.0, 1.0)
    _number(body, "presence_penalty", -2.0, 2.0)
    _number(body, "frequency_penalty", -2.0, 2.0)
    _of_type(body, "user", str, "a string")
    _of_type(body, "logit_bias", dict, "an object")
    if kind == "chat":
        _boolean(body, "logprobs")
        _integer(body, "top_logprobs", 0, 20)
        _of_type(body, "response_format", dict, "an object")
        _of_type(body, "tools", list, "an array")
        _boolean(body, "parallel_tool_calls")
    else:
        _integer(body, "logprobs", 0, 5)
        _boolean(body, "echo")
        _of_type(body, "suffix", str, "a string")
        best_of = _integer(body, "best_of", 1)
        if best_of is not None and best_of > 1:
            raise _invalid("best_of", "only best_of=1 is supported", "unsupported_value")


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    """A validated request: what to generate and how to answer."""

    kind: Kind
    generation: GenerationRequest
    stream: bool
    include_usage: bool

    @property
    def model(self) -> str:
        return self.generation.model


def parse_request(kind: Kind, body: object, request_id: str) -> ParsedRequest:
    """Validate a decoded request body of ``kind``.

    :raises OpenAIError: 400 naming the first missing, mistyped or unsupported
        field in ``param``.
    """
    if not isinstance(body, dict):
        raise OpenAIError(400, f"the request body must be a JSON object, got {_type_name(body)}")
    model = _model(body)
    if kind == "chat":
        messages = _messages(body)
        prompt = ""
        max_tokens = _integer(body, "max_completion_tokens", 1)
        legacy = _integer(body, "max_tokens", 1)
        if max_tokens is None:
            max_tokens = legacy
        known = _CHAT_FIELDS
    else:
        messages = ()
        prompt = _prompt(body)
        max_tokens = _integer(body, "max_tokens", 1)
        known = _COMPLETION_FIELDS
    n = _integer(body, "n", 1)
    if n is not None and n > 1:
        raise _invalid("n", "only n=1 is supported", "unsupported_value")
    stream = bool(_boolean(body, "stream"))
    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise _wrong_type("stream_options", "an object", options)
        if not stream:
            raise _invalid("stream_options", "is only allowed when stream is true")
        flag = options.get("include_usage")
        if flag is not None and not isinstance(flag, bool):
            raise _wrong_type("stream_options.include_usage", "true or false", flag)
        include_usage = bool(flag)
    _check_extras(kind, body)
    generation = GenerationRequest(
        request_id=request_id,
        model=model,
        kind=kind,
        prompt=prompt,
        messages=messages,
        max_tokens=max_tokens,
        stop=_stop(body),
        temperature=_number(body, "temperature", 0.0, 2.0),
        seed=_integer(body, "seed", -_SEED_LIMIT, _SEED_LIMIT - 1),
        extra={key: value for key, value in body.items() if key not in known},
    )
    return ParsedRequest(kind, generation, stream, include_usage)


# -- answers ------------------------------------------------------------------------------------


def completion_id(kind: Kind) -> str:
    """A new id in OpenAI's style: ``chatcmpl-…`` or ``cmpl-…``."""
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(12)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """The ``usage`` object."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def whole_response(
    kind: Kind,
    id_: str,
    created: int,
    model: str,
    text: str,
    finish_reason: str | None,
    prompt_tokens: int,
    completion_tokens: int,
) -> dict[str, Any]:
    """The non-streaming answer: ``chat.completion`` or ``text_completion``."""
    if kind == "chat":
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": finish_reason,
        }
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        obj = "text_completion"
    return {
        "id": id_,
        "object": obj,
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def model_object(model: str, created: int) -> dict[str, Any]:
    """One entry of ``GET /v1/models``."""
    return {"id": model, "object": "model", "created": created, "owned_by": _OWNER}


def models_list(models: list[str], created: int) -> dict[str, Any]:
    """The ``GET /v1/models`` answer."""
    return {"object": "list", "data": [model_object(m, created) for m in models]}


def _json_bytes(value: object) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


class ChunkEncoder:
    """The JSON of one stream's chunks, in OpenAI's format (no SSE or WebSocket framing).

    The first chat chunk carries ``"role": "assistant"``; a chunk with a
    ``finish_reason`` ends the choice; with ``include_usage`` every chunk has
    ``"usage": null`` and :meth:`usage_chunk` is the last one, with empty
    ``choices`` (as OpenAI sends them).
    """

    __slots__ = ("_chat", "_first", "_head", "_tail_open", "include_usage")

    def __init__(self, kind: Kind, id_: str, created: int, model: str, include_usage: bool) -> None:
        self._chat = kind == "chat"
        self.include_usage = include_usage
        obj = "chat.completion.chunk" if self._chat else "text_completion"
        self._head = b'{"id":%s,"object":"%s","created":%d,"model":%s,"choices":' % (
            _json_bytes(id_),
            obj.encode(),
            created,
            _json_bytes(model),
        )
        self._tail_open = b',"usage":null}' if include_usage else b"}"
        self._first = True

    def chunk(self, text: str, finish_reason: str | None = None) -> bytes:
        """One chunk with ``text`` (may be empty) and, on the last, its ``finish_reason``."""
        reason = b"null" if finish_reason is None else _json_bytes(finish_reason)
        if self._chat:
            if self._first:
                delta = b'{"role":"assistant","content":%s}' % _json_bytes(text)
            elif text or finish_reason is None:
                delta = b'{"content":%s}' % _json_bytes(text)
            else:
                delta = b"{}"
            choice = b'[{"index":0,"delta":%s,"logprobs":null,"finish_reason":%s}]' % (
                delta,
                reason,
            )
        else:
            choice = b'[{"index":0,"text":%s,"logprobs":null,"finish_reason":%s}]' % (
                _json_bytes(text),
                reason,
            )
        self._first = False
        return self._head + choice + self._tail_open

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        """The last chunk of a stream that asked for usage: empty choices, the counts."""
        return self._head + b'[],"usage":%s}' % _json_bytes(usage(prompt_tokens, completion_tokens))
