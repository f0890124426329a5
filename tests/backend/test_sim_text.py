"""The simulator's tokenizer and pseudo-text: lossless, honest counts, deterministic."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from inferno_backend.engines.simtext import (
    NATURAL_MAX_TOKENS,
    NATURAL_MIN_TOKENS,
    PseudoText,
    count_tokens,
    natural_length,
    render_chat,
    text_seed,
    tokenize,
)


def generate(
    prompt: str, seed: int | None, tokens: int, *, leading_space: bool = False
) -> list[str]:
    """The first ``tokens`` pieces of the text seeded by ``prompt`` and ``seed``."""
    key = text_seed(prompt, seed)
    text = PseudoText(key, natural_length(key), prompt=prompt, leading_space=leading_space)
    return [text.next_piece() for _ in range(tokens)]


def test_tokenizer_splits_words_digits_punctuation_and_space() -> None:
    assert tokenize("Hello, world!\n\n 12345 foo_bar everything") == [
        "Hello", ",", " world", "!", "\n\n ", "123", "45", " foo", "_", "bar",
        " everythi", "ng",
    ]  # fmt: skip
    assert count_tokens("") == 0
    assert count_tokens("The quiet river.") == 4


@given(st.text())
def test_tokenizer_is_lossless(text: str) -> None:
    pieces = tokenize(text)
    assert "".join(pieces) == text
    assert all(pieces)
    assert count_tokens(text) == len(pieces)


@pytest.mark.parametrize("leading_space", [False, True])
def test_each_generated_piece_is_one_token_and_counts_survive_retokenizing(
    leading_space: bool,
) -> None:
    for seed in range(300):
        prompt = f"Prompt {seed}: grüße über naïve café ÄÖÜ straße Œuvre ǅemal"
        pieces = generate(prompt, seed, NATURAL_MAX_TOKENS + 50, leading_space=leading_space)
        assert tokenize("".join(pieces)) == pieces, seed


def test_same_prompt_and_seed_give_the_same_text_on_every_run() -> None:
    # Golden values: a change here changes every simulated answer (and breaks
    # determinism across versions), so it must be deliberate.
    assert text_seed("Tell me a story.", None) == 4384562732363940838
    assert generate("Tell me a story.", None, 12) == [
        "Every", " modest", " lantern", " still", " answers", ".", " Each", " rapid", " server",
        " carries", " that", " cache",
    ]  # fmt: skip
    assert generate("abc", 7, 200) == generate("abc", 7, 200)


def test_prompt_and_seed_both_change_the_text() -> None:
    base = generate("Tell me a story.", None, 60)
    assert generate("Tell me a poem.", None, 60) != base
    assert generate("Tell me a story.", 1, 60) != base
    assert generate("Tell me a story.", 1, 60) != generate("Tell me a story.", 2, 60)
    assert text_seed("x", None) != text_seed("x", 0)


def test_text_reads_as_sentences_and_echoes_prompt_words() -> None:
    text = "".join(generate("Describe the volcano near Naples please", 3, 400))
    assert text[0].isupper()
    assert text.count(".") >= 10
    assert "volcano" in text.lower() or "naples" in text.lower()


def test_natural_length_is_bounded_and_varies() -> None:
    lengths = {natural_length(text_seed(str(i), None)) for i in range(500)}
    assert min(lengths) >= NATURAL_MIN_TOKENS
    assert max(lengths) <= NATURAL_MAX_TOKENS
    assert len(lengths) > 100


def test_a_naturally_ended_text_ends_on_a_full_stop() -> None:
    for seed in range(300):
        key = text_seed("p", seed)
        length = natural_length(key)
        text = PseudoText(key, length)
        pieces = [text.next_piece() for _ in range(length)]
        assert pieces[-1] == ".", seed
        assert pieces[-2] not in (".", ",", "\n\n"), seed


def test_render_chat_renders_roles_and_text_parts() -> None:
    messages = (
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "image_url"}]},
        {"role": "assistant", "content": None},
    )
    assert render_chat(messages) == "system: Be brief.\nuser: Hi \nassistant: \nassistant:"
