"""The contract between the backend's HTTP layer and an inference engine.

The HTTP layer validates OpenAI requests, applies admission control and turns
:class:`TokenChunk` streams into OpenAI JSON or SSE; an engine only generates.
Cancellation is the caller's tool: closing the ``generate`` iterator (or
cancelling the task iterating it) must stop the generation and free whatever
it held (batch slot, KV-cache blocks, upstream connection).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

__all__ = ["Engine", "EngineError", "EngineStats", "GenerationRequest", "TokenChunk"]


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One validated generation request.

    ``kind`` says which OpenAI endpoint it came from: an engine that fronts a
    real server forwards ``messages`` or ``prompt`` as they are; the simulator
    renders ``messages`` into one prompt text.
    """

    request_id: str
    model: str
    kind: Literal["chat", "completion"]
    prompt: str = ""
    messages: tuple[Mapping[str, Any], ...] = ()
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    temperature: float | None = None
    seed: int | None = None
    #: Other OpenAI fields a fronting engine passes through untouched.
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class TokenChunk:
    """A piece of generated text.

    ``completion_tokens`` is cumulative; the last chunk of a generation has a
    ``finish_reason`` (``"stop"`` or ``"length"``) and may carry no text.
    """

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None = None


@dataclass(frozen=True, slots=True)
class EngineStats:
    """What an engine knows about its own load, reported in the node's vitals.

    ``None`` means the engine cannot tell (an engine server without metrics).
    """

    running: int | None = None
    waiting: int | None = None
    kv_cache_usage: float | None = None
    tokens_per_second: float | None = None


class EngineError(Exception):
    """Raised when an engine cannot serve a request (engine server down, bad answer).

    ``status`` is the HTTP status the backend answers with.
    """

    def __init__(self, message: str, *, status: int = 502, temporary: bool = True) -> None:
        super().__init__(message)
        self.status = status
        self.temporary = temporary


class Engine(Protocol):
    """An inference engine the backend serves through its OpenAI API."""

    name: str

    async def start(self) -> None:
        """Prepare to serve (load a profile, reach the engine server)."""

    async def aclose(self) -> None:
        """Stop every generation and release resources."""

    def models(self) -> list[str]:
        """Model names this engine serves."""

    def ready(self) -> bool:
        """Whether the engine can take requests now."""

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenChunk]:
        """Generate for ``request``, yielding chunks as tokens are produced."""

    def stats(self) -> EngineStats:
        """Current load, cheap to call (vitals poll it)."""
