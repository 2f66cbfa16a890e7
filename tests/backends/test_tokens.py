"""Locating a category's tokens in a prompt, with the real CLIP tokenizer rebuilt offline."""

from __future__ import annotations

import pytest

from ovdiff_core.backends.tiny_sd import clip_tokenizer_offline
from ovdiff_core.backends.tokens import format_prompt, locate_name_tokens, token_positions

TEMPLATE = "A good picture of a {}"


@pytest.fixture(scope="module")
def tok():
    return clip_tokenizer_offline()


@pytest.mark.parametrize(
    ("name", "positions", "pieces"),
    [
        ("cat", (6,), ["cat</w>"]),
        ("potted plant", (6, 7), ["potted</w>", "plant</w>"]),
        ("tv monitor", (6, 7), ["tv</w>", "monitor</w>"]),
        ("hippopotamus", (6, 7, 8), ["hippo", "potam", "us</w>"]),  # one word, 3 BPE pieces
    ],
)
def test_locate_name_tokens(tok, name, positions, pieces) -> None:
    found = locate_name_tokens(tok, TEMPLATE, name)
    assert found.prompt == f"A good picture of a {name}"
    assert found.positions == positions
    ids = tok(found.prompt).input_ids
    assert ids[0] == 49406  # positions count the start token
    assert tok.convert_ids_to_tokens([ids[i] for i in positions]) == pieces
    assert found.prompt[found.span[0] : found.span[1]] == name


def test_name_in_the_middle_of_the_template(tok) -> None:
    found = locate_name_tokens(tok, "a {} on a table", "tv monitor")
    assert found.positions == (2, 3)
    assert tok.convert_ids_to_tokens(tok(found.prompt).input_ids)[2:4] == ["tv</w>", "monitor</w>"]


def test_fast_and_fallback_paths_agree(tok) -> None:
    class Slow:
        """The tokenizer without offsets: forces the subsequence fallback."""

        is_fast = False
        model_max_length = 77

        def __call__(self, text, add_special_tokens=True):
            return tok(text, add_special_tokens=add_special_tokens)

    for name in ("cat", "potted plant", "tv monitor", "Dining-Table", "hippopotamus"):
        prompt, span = format_prompt(TEMPLATE, name)
        assert token_positions(Slow(), prompt, span) == token_positions(tok, prompt, span), name


def test_case_and_whitespace(tok) -> None:
    found = locate_name_tokens(tok, TEMPLATE, "  Potted Plant ")
    assert found.name == "Potted Plant"
    assert found.positions == (6, 7)


def test_bad_inputs(tok) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        format_prompt("a picture", "cat")
    with pytest.raises(ValueError, match="exactly one"):
        format_prompt("{} and {}", "cat")
    with pytest.raises(ValueError, match="non-empty"):
        format_prompt(TEMPLATE, "   ")
    long_template = "word " * 80 + "{}"
    with pytest.raises(ValueError, match="77-token window"):
        locate_name_tokens(tok, long_template, "cat")
    with pytest.raises(ValueError, match="span"):
        token_positions(tok, "a cat", (3, 3))
