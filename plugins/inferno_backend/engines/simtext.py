"""Deterministic pseudo-text and the tokenizer the simulator counts with.

The ``sim`` engine computes nothing, but the text it returns must look like
text and its token counts must be honest, because clients, the proxy and the
governator all count tokens.  So this module defines one small tokenizer and
makes the generator emit exactly one of that tokenizer's tokens per simulated
token: re-tokenizing a generated text gives back the generated count.

**The tokenizer** splits text into pieces, left to right, each piece the first
of these that matches:

* an optional space and 1–8 letters (``" river"``, ``"The"``; a longer word
  becomes several pieces, as sub-words do in real BPE vocabularies);
* an optional space and 1–3 digits (``" 2024"`` is ``" 202"`` + ``"4"``);
* an optional space and one other non-space character (``","``, ``" ("``);
* a run of white space (``"\\n\\n"``).

Every character belongs to exactly one piece, so the pieces concatenate back to
the text.  It is in the spirit of the pre-tokenizers of BPE models (words carry
their leading space), so counts land in the same range as a real tokenizer's
for English text; it is not the tokenizer of any real model.

**The text** is a stream of short sentences built from small word lists
(determiner, adjective, noun, verb, ...) and, now and then, words taken from
the prompt, with commas, full stops and paragraph breaks.  Every word is at
most 8 letters, so each word (with its leading space) is one token.  The random
stream is seeded by a hash of the prompt and the request's ``seed``: the same
prompt and seed give the same text on every run, machine and Python version
(only :meth:`random.Random.random` is used, whose sequence Python guarantees).
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "NATURAL_MAX_TOKENS",
    "NATURAL_MIN_TOKENS",
    "PseudoText",
    "count_tokens",
    "natural_length",
    "render_chat",
    "text_seed",
    "tokenize",
]

_TOKEN = re.compile(r" ?[^\W\d_]{1,8}| ?\d{1,3}| ?[^\s\d]|\s+")
_PROMPT_WORD = re.compile(r"\b[^\W\d_]{3,8}\b")
_ONE_WORD = re.compile(r"[^\W\d_]{1,8}")

#: Bounds of the length at which a generation ends by itself (an end-of-sequence
#: token), drawn log-uniformly: mostly short answers, some long ones.
NATURAL_MIN_TOKENS = 24
NATURAL_MAX_TOKENS = 400
#: Only the end of a long prompt is scanned for words to echo (bounded work per request).
_PROMPT_SCAN_CHARS = 4000
_PROMPT_WORDS_MAX = 32
_PROMPT_WORD_P = 0.2  # chance a noun slot echoes a prompt word
_PARAGRAPH_P = 0.15  # chance a sentence is followed by a paragraph break
_ROLE_WORDS = frozenset({"system", "user", "assistant", "tool", "developer"})

# Our own small word lists; every word at most 8 letters (one token).
_WORDS: dict[str, tuple[str, ...]] = {
    "D": ("the", "this", "every", "each", "our", "that", "one", "some", "no", "their"),
    "A": (
        "quiet", "bright", "small", "early", "steady", "distant", "gentle", "narrow", "hidden",
        "patient", "silver", "careful", "simple", "rapid", "warm", "cold", "broken", "green",
        "honest", "final", "modest", "quick", "curious", "heavy", "local", "golden", "plain",
        "sudden", "vivid", "tired",
    ),
    "N": (
        "river", "engine", "garden", "signal", "window", "market", "harbor", "lantern", "compass",
        "letter", "machine", "village", "pattern", "voice", "bridge", "forest", "question",
        "answer", "journey", "station", "kernel", "packet", "number", "mirror", "winter",
        "morning", "shadow", "planet", "story", "circuit", "balance", "promise", "teacher",
        "captain", "request", "server", "cluster", "token", "model", "cache",
    ),
    "V": (
        "carries", "builds", "finds", "follows", "answers", "measures", "keeps", "opens",
        "shapes", "watches", "explains", "gathers", "crosses", "reaches", "returns", "holds",
        "changes", "covers", "prepares", "records", "welcomes", "repairs", "lifts", "guides",
        "counts", "studies", "outlasts", "sends",
    ),
    "P": (
        "over", "under", "near", "beyond", "through", "across", "into", "around", "behind",
        "beside", "toward", "within",
    ),
    "R": (
        "slowly", "often", "rarely", "again", "quietly", "always", "never", "still", "gently",
        "surely", "soon", "already",
    ),
    "C": ("and", "but", "while", "because", "so", "until", "although"),
}  # fmt: skip
# Sentence shapes; a full stop follows each.  "," is a comma after a word.
_SHAPES = (
    "DANVDN",
    "DNVPDAN",
    "DNRVDN,CDNV",
    "DANVDNPDN",
    "PDAN,DNRV",
    "DNVDN,CDANVDN",
    "DANRV",
)


def tokenize(text: str) -> list[str]:
    """Split ``text`` into the simulator's tokens (they concatenate back to ``text``)."""
    return _TOKEN.findall(text)


def count_tokens(text: str) -> int:
    """Number of tokens in ``text``: what ``usage.prompt_tokens`` reports for a prompt."""
    return len(_TOKEN.findall(text))


def render_chat(messages: Iterable[Mapping[str, Any]]) -> str:
    """Render chat messages into the one prompt text the simulator counts.

    A plain template, ``"{role}: {content}\\n"`` per message and a final
    ``"assistant:"``; real chat templates add special tokens of their own, this
    one adds about three tokens per message.  Content given as a list of parts
    contributes its text parts; other parts (images, audio) add nothing.
    """
    lines: list[str] = []
    for message in messages:
        lines.append(f"{message.get('role', 'user')}: {_content_text(message.get('content'))}\n")
    lines.append("assistant:")
    return "".join(lines)


def _content_text(content: object) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):
        texts = [
            str(part.get("text", ""))
            for part in content
            if isinstance(part, Mapping) and part.get("type", "text") == "text"
        ]
        return "".join(texts)
    return str(content)


def text_seed(prompt: str, seed: int | None) -> int:
    """A 64-bit seed from the prompt and the request's seed (stable across runs)."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update(b"-" if seed is None else str(seed).encode("ascii"))
    digest.update(b"\x00")
    digest.update(prompt.encode("utf-8", "surrogatepass"))
    return int.from_bytes(digest.digest(), "big")


def natural_length(seed: int) -> int:
    """Tokens after which a generation seeded with ``seed`` ends by itself."""
    fraction = random.Random(seed ^ 0x5EED).random()
    span = NATURAL_MAX_TOKENS / NATURAL_MIN_TOKENS
    return int(NATURAL_MIN_TOKENS * span**fraction)


def _variants(word: str) -> tuple[str, str, str, str]:
    """``(word, " word", Word, " Word")``: indexed by ``capital * 2 + space``."""
    capital = word.capitalize()
    return (word, " " + word, capital, " " + capital)


_VARIANTS = {slot: tuple(_variants(w) for w in words) for slot, words in _WORDS.items()}


def _prompt_words(prompt: str) -> tuple[tuple[str, str, str, str], ...]:
    """Distinct short words of the prompt, each still one token when capitalised."""
    seen: dict[str, None] = {}
    for match in _PROMPT_WORD.finditer(prompt[-_PROMPT_SCAN_CHARS:].lower()):
        word = match.group()
        if word in _ROLE_WORDS or not _ONE_WORD.fullmatch(word.capitalize()):
            continue
        seen[word] = None
        if len(seen) >= _PROMPT_WORDS_MAX:
            break
    return tuple(_variants(w) for w in seen)


class PseudoText:
    """An endless stream of readable-ish tokens, deterministic for its seed.

    ``length`` is where the text ends by itself: the pieces are arranged so the
    token at that position is a full stop (unless ``length`` is 1), and a
    naturally ended text reads as finished.  Past ``length`` it simply goes on
    (the caller stops).
    """

    __slots__ = (
        "_after_word",
        "_capital",
        "_emitted",
        "_length",
        "_pending_break",
        "_pos",
        "_prompt_words",
        "_rng",
        "_shape",
        "_space",
    )

    def __init__(
        self, seed: int, length: int, *, prompt: str = "", leading_space: bool = False
    ) -> None:
        self._rng = random.Random(seed)
        self._length = length
        self._emitted = 0
        self._prompt_words = _prompt_words(prompt)
        self._shape = _SHAPES[int(self._rng.random() * len(_SHAPES))]
        self._pos = 0
        self._capital = True
        self._space = leading_space
        self._after_word = False
        self._pending_break = False

    def next_piece(self) -> str:
        """The next token's text."""
        self._emitted += 1
        remaining = self._length - self._emitted  # tokens after this one
        if self._pending_break:
            self._pending_break = False
            if remaining > 1:
                self._space = False
                self._after_word = False
                return "\n\n"
        shape = self._shape
        if (remaining == 0 and self._after_word) or (self._pos >= len(shape) and remaining != 1):
            return self._end_sentence()
        if self._pos >= len(shape):
            slot = "R"  # one word more, so that the text can end on a full stop
        else:
            slot = shape[self._pos]
            self._pos += 1
            if slot == ",":
                if remaining != 1:
                    self._after_word = False
                    return ","
                slot = shape[self._pos]  # a comma is always followed by a word
                self._pos += 1
        choices = _VARIANTS[slot]
        if slot == "N" and self._prompt_words and self._rng.random() < _PROMPT_WORD_P:
            choices = self._prompt_words
        variants = choices[int(self._rng.random() * len(choices))]
        piece = variants[self._capital * 2 + self._space]
        self._capital = False
        self._space = True
        self._after_word = True
        return piece

    def _end_sentence(self) -> str:
        rng = self._rng
        self._shape = _SHAPES[int(rng.random() * len(_SHAPES))]
        self._pos = 0
        self._capital = True
        self._space = True
        self._after_word = False
        self._pending_break = rng.random() < _PARAGRAPH_P
        return "."
