"""The CLIP category pre-filter: which of the queried classes are in the image at all.

Algorithm (OVDiff, stage 3.1): score the image against "a {name}" for every thing class,
softmax over the raw cosines (no temperature), keep classes with probability >= 1/C (if
none, the top 10), at most 10 of them; then score every non-empty subset of the kept
classes jointly with the prompt "a X and a Y and ..." and keep the best subset. Stuff
classes skip the filter (the caller keeps them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import combinations

import numpy as np

from ovdiff_core.protocols import ImageTextScorer

__all__ = ["PrefilterResult", "prefilter"]


@dataclass
class PrefilterResult:
    """Outcome of :func:`prefilter`.

    Attributes:
        kept: names kept, in the order given.
        dropped: names dropped, in the order given.
        probabilities: ``{name: softmax probability}`` of the single-class prompts.
        candidates: names that passed the probability test (before the subset search).
        subset_scores: ``{prompt: cosine}`` of every subset prompt scored (empty when the
            subset search was off or had one candidate).
    """

    kept: list[str]
    dropped: list[str]
    probabilities: dict[str, float]
    candidates: list[str]
    subset_scores: dict[str, float] = field(default_factory=dict)


def subset_prompt(names: Sequence[str], template: str = "a {}") -> str:
    """``["cat", "sofa"] -> "a cat and a sofa"``."""
    return " and ".join(template.format(n) for n in names)


def prefilter(
    image: np.ndarray,
    names: Sequence[str],
    scorer: ImageTextScorer,
    template: str = "a {}",
    max_classes: int = 10,
    subsets: bool = True,
) -> PrefilterResult:
    """Pick the classes present in ``image`` among ``names`` (thing classes only).

    Args:
        image: (H, W, 3) uint8 RGB.
        names: C >= 1 distinct class names.
        scorer: image-text cosine similarity.
        template: single-class prompt; ``{}`` is replaced by the name.
        max_classes: cap on candidates (1..10; the subset search scores 2**n - 1 prompts).
        subsets: run the joint subset search (else keep all candidates).

    Returns:
        :class:`PrefilterResult`; ``kept`` is never empty.
    """
    if not names:
        raise ValueError("prefilter: names is empty; pass at least one class name")
    if len(set(names)) != len(names):
        raise ValueError(f"prefilter: names must be distinct, got {list(names)}")
    if not 1 <= max_classes <= 10:
        raise ValueError(f"prefilter: max_classes must be in 1..10, got {max_classes}")
    cos = np.asarray(scorer.image_text_scores(image, [template.format(n) for n in names]))
    cos = cos.astype(np.float64).reshape(-1)
    if cos.shape[0] != len(names):
        raise ValueError(f"prefilter: scorer returned {cos.shape[0]} scores for {len(names)} texts")
    p = np.exp(cos - cos.max())
    p /= p.sum()
    probs = {n: float(q) for n, q in zip(names, p, strict=True)}
    order = np.argsort(-p, kind="stable")
    passing = [int(i) for i in order if p[i] >= 1.0 / len(names)]
    if not passing:
        passing = [int(i) for i in order[:10]]
    passing = sorted(passing[:max_classes])  # back to the given order
    candidates = [names[i] for i in passing]

    kept = candidates
    subset_scores: dict[str, float] = {}
    if subsets and len(candidates) > 1:
        groups = [
            list(c) for r in range(1, len(candidates) + 1) for c in combinations(candidates, r)
        ]
        prompts = [subset_prompt(g, template) for g in groups]
        scores = np.asarray(scorer.image_text_scores(image, prompts), dtype=np.float64)
        subset_scores = {t: float(s) for t, s in zip(prompts, scores.reshape(-1), strict=True)}
        kept = groups[int(np.argmax(scores))]
    kept_set = set(kept)
    return PrefilterResult(
        kept=[n for n in names if n in kept_set],
        dropped=[n for n in names if n not in kept_set],
        probabilities=probs,
        candidates=candidates,
        subset_scores=subset_scores,
    )
