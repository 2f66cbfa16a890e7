"""PAMR in the evaluation: labels_for refines the scores before the argmax; evaluate and
the CLI pass the setting through."""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from ovdiff_core.evaluation.datasets import Sample
from ovdiff_core.evaluation.run import evaluate, labels_for
from ovdiff_core.pamr import PAPER_PAMR

CLASSES = ["background", "cat", "dog"]
EDGE = 30  # the colour edge (column)


def scene(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A cat (orange, left of EDGE) and a dog (blue) filling a 40 x 64 image."""
    rng = np.random.default_rng(seed)
    img = np.zeros((40, 64, 3), np.float64)
    img[:, :EDGE] = (220, 120, 30)
    img[:, EDGE:] = (30, 60, 210)
    img += rng.normal(0, 3, img.shape)
    label = np.where(np.arange(64) < EDGE, 1, 2).astype(np.uint8)[None].repeat(40, 0)
    return img.clip(0, 255).astype(np.uint8), label


def coarse_segmentation(image: np.ndarray, shift: int = -5) -> Any:
    """What a coarse model gives: the cat/dog score edge ``shift`` px off the colour edge,
    weak background everywhere. Channels: background, cat, dog."""
    h, w, _ = image.shape
    cols = np.arange(w)
    cat = (cols < EDGE + shift).astype(np.float32)
    scores = np.stack([np.full(w, 0.1, np.float32), 0.2 + 0.6 * cat, 0.8 - 0.6 * cat])
    scores = np.ascontiguousarray(scores[:, None, :].repeat(h, 1))
    return SimpleNamespace(
        image=image,
        labels=scores.argmax(0),
        scores=scores,
        class_names=CLASSES,
        object_labels=lambda: scores[1:].argmax(0) + 1,
    )


@pytest.mark.parametrize("background", [True, False])
def test_labels_for_refines_the_scores(background: bool) -> None:
    image, truth = scene(0)
    seg = coarse_segmentation(image)
    names = CLASSES if background else CLASSES[1:]
    offset = 0 if background else 1  # dataset labels without background start at cat = 0
    plain = labels_for(seg, names, background)
    assert (plain != truth - offset).mean() > 0.05, "the coarse edge is off"
    refined = labels_for(seg, names, background, PAPER_PAMR, image)
    np.testing.assert_array_equal(refined, truth - offset)
    with pytest.raises(ValueError, match="needs the image"):
        labels_for(seg, names, background, PAPER_PAMR)


class CoarseModel:
    def segment(self, image: np.ndarray, names: Sequence[str] | None = None) -> Any:
        return coarse_segmentation(image)


def test_evaluate_with_pamr() -> None:
    samples = [Sample(str(i), *scene(i)) for i in range(3)]
    plain = evaluate(CoarseModel(), samples, CLASSES[1:], CLASSES, True).metrics  # type: ignore[arg-type]
    refined = evaluate(
        CoarseModel(),  # type: ignore[arg-type]
        samples,
        CLASSES[1:],
        CLASSES,
        True,
        refine=PAPER_PAMR,
    ).metrics
    assert plain.aacc < 0.95
    assert refined.aacc == 1.0
