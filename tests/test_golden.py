"""Golden numbers: one small colour-world segmentation end to end, frozen.

``build_ovdiff("cpu", backend="color")`` -> build four categories -> segment a painted
scene. Every step is deterministic: support images come from numpy generators seeded by
(seed, crc32(name), index), the colour extractors' projections from a seeded torch
generator, K-means from ``PrototypeConfig.seed`` with its draws on a CPU generator, the
scene from ``paint_scene(seed=7)``; there is no threading-dependent reduction larger
than float32 rounding (about 1e-7 here, checked with 1 and 2 OpenMP threads). The
numbers were computed once with this code and written down; a change to any stage
(support sets, masks, prototypes, scoring, blending, the pre-filter) moves them.
The nearest label decision in the scene is 1.1e-4 apart, far above that rounding, so
the label counts are exact.
"""

from __future__ import annotations

import numpy as np
import pytest

from ovdiff_core.backends import build_ovdiff
from ovdiff_core.colorworld import ColorWorld, paint_scene

WORLD = ColorWorld.default()

CLASS_NAMES = ["background", "cat", "lamp", "grass"]
LABEL_COUNTS = [2521, 1217, 1253, 2497]
SCORES_AT = {  # (x, y): scores of CLASS_NAMES
    (20, 20): [0.0242113, 0.9385733, 0.0433462, 0.0392528],  # cat
    (76, 24): [0.0571057, 0.0652121, 0.9996117, 0.1106326],  # lamp
    (50, 60): [0.1083350, 0.1914805, 0.1051215, 0.9995664],  # grass
    (90, 30): [0.0694477, 0.0593077, 0.9042907, 0.1243245],  # lamp, near its edge
    (41, 47): [0.2337468, 0.0495998, 0.0250217, 0.2336345],  # cat/grass/backdrop corner
}


@pytest.fixture(scope="module")
def result():
    model = build_ovdiff("cpu", backend="color", use_cache=False, support_size=4)
    model.build(["cat", "sofa", "lamp", "grass"])
    image, index = paint_scene(
        (72, 104),
        (200, 200, 200),
        [
            (WORLD.parts["cat"], (8, 8, 40, 32)),
            (WORLD.parts["grass"], (48, 0, 24, 104)),
            (WORLD.parts["lamp"], (8, 56, 32, 40)),
        ],
        seed=7,
    )
    return model.segment(image), index


def test_golden_labels(result) -> None:
    seg, index = result
    assert seg.queried == ["cat", "sofa", "lamp", "grass"]
    assert seg.prefilter is not None and seg.prefilter.kept == ["cat", "lamp"]  # no sofa
    assert seg.class_names == CLASS_NAMES
    counts = np.bincount(seg.labels.ravel(), minlength=len(CLASS_NAMES)).tolist()
    assert counts == LABEL_COUNTS
    # and they are right: painted object k (cat, grass, lamp) -> label
    truth = np.array([0, 1, 3, 2])[index]
    assert (seg.labels == truth).mean() > 0.9


def test_golden_scores(result) -> None:
    seg, _ = result
    for (x, y), want in SCORES_AT.items():
        np.testing.assert_allclose(seg.scores_at(x, y), want, atol=1e-6, err_msg=f"({x}, {y})")
