"""evaluate(): a colour-world model on a synthetic VOC folder scores what is known in advance."""

import math

import numpy as np
import pytest

from ovdiff_core.config import SegmentConfig
from ovdiff_core.evaluation.datasets import VOCSegmentation, class_names
from ovdiff_core.evaluation.run import evaluate
from ovdiff_core.evaluation.synthetic import color_world, write_synthetic_voc
from ovdiff_core.pipeline import OVDiff
from ovdiff_core.testing import ColorExtractor, ColorGenerator, ColorScorer

NAMES = class_names("voc")


@pytest.fixture(scope="module")
def model():
    world = color_world(NAMES)
    gen = ColorGenerator(world, n_images=16, batch_size=4, size=(96, 96), align=16)
    extractors = [ColorExtractor("color", stride=8), ColorExtractor("color2", stride=16, seed=1)]
    m = OVDiff(
        gen,
        extractors,
        ColorScorer(world),
        segmentation=SegmentConfig(short_side=160, windows=False),
    )
    m.build(NAMES)
    return m


def _independent_miou(pairs, num_classes):
    """TP/FP/FN per class with explicit loops over pixels; mIoU over classes present."""
    tp, fp, fn = np.zeros(num_classes), np.zeros(num_classes), np.zeros(num_classes)
    for pred, gt in pairs:
        for p, g in zip(pred.ravel().tolist(), gt.ravel().tolist(), strict=True):
            if g == 255:
                continue
            if p == g:
                tp[g] += 1
            else:
                fn[g] += 1
                if 0 <= p < num_classes:
                    fp[p] += 1
    ious = [tp[c] / (tp[c] + fp[c] + fn[c]) for c in range(num_classes) if tp[c] + fp[c] + fn[c]]
    return sum(ious) / len(ious)


@pytest.mark.parametrize("background", [True, False])
def test_grid_aligned_scenes_score_100(tmp_path, model, background):
    write_synthetic_voc(tmp_path, color_world(NAMES), NAMES, n_images=5, seed=2)
    ds = VOCSegmentation(tmp_path, background=background)
    result = evaluate(model, ds, NAMES, ds.class_names, background)
    m = result.metrics
    assert m.n_images == 5 and result.images_per_s > 0
    assert m.miou == 1.0 and m.aacc == 1.0
    present = {i for i, v in enumerate(m.iou) if not math.isnan(v)}
    assert len(present) >= 3  # several classes (and background on VOC21) were scored


def test_mislabelled_annotations_give_the_independently_computed_miou(tmp_path, model):
    written = write_synthetic_voc(
        tmp_path, color_world(NAMES), NAMES, n_images=5, seed=4, mislabelled=2
    )
    ds = VOCSegmentation(tmp_path)
    m = evaluate(model, ds, NAMES, ds.class_names, True).metrics
    # a perfect model predicts what was painted; the annotations disagree on two objects
    val = [w for w in written if w.split == "val"]
    expected = _independent_miou([(w.painted, w.label) for w in val], 21)
    assert expected < 0.95
    assert m.miou == pytest.approx(expected, abs=1e-12)
