"""evaluate(): a colour-world model on a synthetic VOC folder scores what is known in advance."""

import math

import pytest
from helpers import loop_miou

from ovdiff_core.colorworld import ColorExtractor, ColorGenerator, ColorScorer
from ovdiff_core.config import SegmentConfig
from ovdiff_core.evaluation.datasets import VOCSegmentation, class_names
from ovdiff_core.evaluation.run import evaluate
from ovdiff_core.evaluation.synthetic import color_world, write_synthetic_voc
from ovdiff_core.pipeline import OVDiff

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
        segment_config=SegmentConfig(short_side=160, windows=False),
    )
    m.build(NAMES)
    return m


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
    expected = loop_miou([(w.painted, w.label) for w in val], 21)
    assert expected < 0.95
    assert m.miou == pytest.approx(expected, abs=1e-12)
