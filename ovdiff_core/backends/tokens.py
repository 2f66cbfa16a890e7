"""Where a category name sits inside a tokenized prompt.

The attribution map of a category is read from the cross-attention columns of the
name's own tokens (OVDiff / DAAM). Prompts are built from a template such as
``"A good picture of a {}"``; the name's character span in the prompt is therefore known
exactly, and its tokens are the ones whose character offsets overlap that span.

Offsets come from the tokenizer itself when it is a "fast" (Rust ``tokenizers``)
tokenizer, which ``transformers.CLIPTokenizer`` is in transformers 5. For other
tokenizers we fall back to tokenizing the text before the name and the name separately:
CLIP's BPE never merges across words, so the name's tokens are the same inside the prompt
as alone. Both paths are tested to agree on CLIP.

Positions index the *encoded* sequence, start token included: for CLIP, position 0 is
``<|startoftext|>``, so ``"A good picture of a cat"`` puts ``cat`` at position 6.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["PromptTokens", "format_prompt", "locate_name_tokens", "token_positions"]


@dataclass(frozen=True)
class PromptTokens:
    """A prompt made from a template and the positions of the name's tokens in it.

    Attributes:
        prompt: the full prompt text, e.g. ``"A good picture of a potted plant"``.
        name: the name inserted into the template.
        span: (start, end) character offsets of ``name`` in ``prompt`` (end exclusive).
        positions: increasing token positions of the name in the encoded prompt (start
            token at position 0); never empty.
    """

    prompt: str
    name: str
    span: tuple[int, int]
    positions: tuple[int, ...]


def format_prompt(template: str, name: str) -> tuple[str, tuple[int, int]]:
    """Insert ``name`` into ``template`` at its single ``{}`` placeholder.

    Returns:
        (prompt, (start, end)): the prompt and the name's character span in it.

    Raises:
        ValueError: the template does not contain exactly one ``{}`` or the name is blank.
    """
    if template.count("{}") != 1:
        raise ValueError(
            f"prompt template must contain exactly one '{{}}' where the name goes, got {template!r}"
        )
    if not name.strip():
        raise ValueError("category name must be a non-empty string")
    name = name.strip()
    start = template.index("{}")
    prompt = template[:start] + name + template[start + 2 :]
    return prompt, (start, start + len(name))


def _max_length(tokenizer: Any) -> int:
    n = getattr(tokenizer, "model_max_length", None)
    return int(n) if isinstance(n, int) and 0 < n < 100_000 else 77


def token_positions(tokenizer: Any, prompt: str, span: tuple[int, int]) -> tuple[int, ...]:
    """Positions of the tokens covering characters ``span`` of ``prompt``.

    Args:
        tokenizer: a ``transformers`` tokenizer that adds a start token (CLIP's).
        prompt: the full prompt.
        span: (start, end) character offsets, end exclusive, ``0 <= start < end <= len``.

    Returns:
        Increasing positions in the encoded prompt (start token = position 0).

    Raises:
        ValueError: empty span, or the span falls beyond the tokenizer's
            ``model_max_length`` (77 for CLIP): shorten the prompt template or the name.
    """
    start, end = span
    if not 0 <= start < end <= len(prompt):
        raise ValueError(f"span must satisfy 0 <= start < end <= {len(prompt)}, got {span}")
    limit = _max_length(tokenizer)
    positions: list[int] = []
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(prompt, return_offsets_mapping=True, add_special_tokens=True)
        for i, (lo, hi) in enumerate(enc["offset_mapping"]):
            if hi > lo and lo < end and hi > start:  # special tokens have empty offsets
                positions.append(i)
    else:
        before = tokenizer(prompt[:start].strip(), add_special_tokens=False)["input_ids"]
        inside = tokenizer(prompt[start:end], add_special_tokens=False)["input_ids"]
        first = 1 + len(before)  # 1 for the start token
        positions = list(range(first, first + len(inside)))
    if not positions:
        raise ValueError(f"no token of the prompt {prompt!r} covers characters {span}")
    if positions[-1] >= limit - 1:  # the last slot holds the end token
        raise ValueError(
            f"the name in {prompt!r} ends at token {positions[-1]}, beyond the text "
            f"encoder's {limit}-token window; use a shorter prompt template or name"
        )
    return tuple(positions)


def locate_name_tokens(tokenizer: Any, template: str, name: str) -> PromptTokens:
    """Build the prompt for ``name`` and find the name's token positions in it.

    Example (CLIP tokenizer): ``locate_name_tokens(tok, "A good picture of a {}",
    "potted plant").positions == (6, 7)``.
    """
    prompt, span = format_prompt(template, name)
    positions = token_positions(tokenizer, prompt, span)
    return PromptTokens(
        prompt=prompt, name=prompt[span[0] : span[1]], span=span, positions=positions
    )
