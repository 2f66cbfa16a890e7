"""Pascal Context (PC60, PC59) and COCO-Object: readers on converted synthetic downloads,
and `ovdiff eval` end to end with the colour backend, whose mIoU is known in advance."""

import io
import json

import numpy as np
import pytest
from helpers import loop_miou

from ovdiff_core.cli import main
from ovdiff_core.evaluation.convert import convert_coco_object, convert_context
from ovdiff_core.evaluation.datasets import COCOObject, PascalContext, class_names, open_dataset
from ovdiff_core.evaluation.synthetic import (
    color_world,
    write_synthetic_coco,
    write_synthetic_context,
)

CONTEXT = class_names("context59")
COCO = class_names("coco-object")
# scenes filled by one object (no edges), so a perfect colour-world model is exact
FULL_FRAME = {"size": (96, 96), "grid": 16, "max_objects": 1, "box_cells": (6, 6)}


def _distinct(names, k=6):
    """The first k names whose world colour is 60+ RGB units from every other colour."""
    world = color_world(names)
    cols = {n: np.array(world.parts[n][0], float) for n in names}
    others = [np.array(b, float) for b in world.backgrounds]
    out = []
    for n in names:
        rest = [c for m, c in cols.items() if m != n] + others
        if min(np.linalg.norm(cols[n] - c) for c in rest) >= 60:
            out.append(n)
    return out[:k]


def _to_pc59(label):
    out = label.astype(int) - 1
    out[label == 0] = 255
    return out


@pytest.fixture(scope="module")
def context(tmp_path_factory):
    root = tmp_path_factory.mktemp("ctx")
    written = write_synthetic_context(root, color_world(CONTEXT), CONTEXT, n_images=4, seed=6)
    convert_context(root / "context", root / "VOCdevkit")
    return root, written


def test_context60_and_59_readers(context):
    root, written = context
    val = [w for w in written if w.split == "val"]
    pc60 = open_dataset("context60", root)
    assert isinstance(pc60, PascalContext) and pc60.name == "context60" and len(pc60) == 4
    assert pc60.class_names == ["background", *CONTEXT] and pc60.names_set == "context59"
    pc59 = PascalContext(root / "VOCdevkit" / "VOC2010", background=False)
    assert pc59.name == "context59" and pc59.class_names == CONTEXT
    for s60, s59, w in zip(pc60, pc59, val, strict=True):
        assert s60.image_id == w.image_id and s60.image.shape == (160, 224, 3)
        np.testing.assert_array_equal(s60.label, w.label)
        np.testing.assert_array_equal(s59.label, _to_pc59(w.label))
    assert len(PascalContext(root, split="train")) == 1 and len(PascalContext(root, limit=2)) == 2


def test_context_reader_explains_an_unconverted_folder(tmp_path):
    write_synthetic_context(tmp_path, color_world(CONTEXT), CONTEXT[:2], n_images=1)
    with pytest.raises(ValueError, match="ovdiff convert context"):
        PascalContext(tmp_path)


def test_coco_object_reader(tmp_path):
    written = write_synthetic_coco(tmp_path, color_world(COCO), COCO, n_images=3, seed=2, empty=1)
    with pytest.raises(ValueError, match="ovdiff convert coco-object"):
        COCOObject(tmp_path)
    convert_coco_object(tmp_path)
    ds = open_dataset("coco-object", tmp_path)  # "val" means val2017
    assert ds.name == "coco-object" and ds.class_names == ["background", *COCO]
    assert [s.image_id for s in ds] == [w.image_id for w in written]
    for s, w in zip(ds, written, strict=True):
        np.testing.assert_array_equal(s.label, w.label)
    assert len(COCOObject(tmp_path, limit=1)) == 1


def test_metric_on_the_reader_labels_matches_an_independent_count(context):
    root, _ = context
    ds = PascalContext(root)
    rng = np.random.default_rng(0)
    from ovdiff_core.evaluation.metrics import ConfusionMatrix

    m = ConfusionMatrix(ds.class_names)
    pairs = []
    for s in ds:
        pred = s.label.astype(np.int64).copy()
        pred[rng.random(pred.shape) < 0.2] = rng.integers(0, 60)  # some wrong pixels
        m.update(pred, s.label)
        pairs.append((pred, s.label))
    assert m.compute().miou == pytest.approx(loop_miou(pairs, 60), abs=1e-12)


def run(*argv):
    return main([*argv, "--quiet"], stdout=io.StringIO())


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def context_full(tmp_path_factory):
    root = tmp_path_factory.mktemp("ctxfull")
    written = write_synthetic_context(
        root, color_world(CONTEXT), _distinct(CONTEXT), n_images=6, seed=1, mislabelled=2,
        **FULL_FRAME,
    )  # fmt: skip
    assert run("convert", "context", "--src", str(root / "context"),
               "--dst", str(root / "VOCdevkit")) == 0  # fmt: skip
    return root, [w for w in written if w.split == "val"]


@pytest.mark.parametrize("dataset", ["context59", "context60"])
def test_eval_context_end_to_end_gives_the_known_miou(context_full, cache, tmp_path, dataset):
    root, val = context_full
    rc = run("eval", dataset, "--root", str(root / "VOCdevkit"), "--backend", "color",
             "--cache", cache, "--support-size", "2", "--out", str(tmp_path))  # fmt: skip
    assert rc == 0
    data = json.loads((tmp_path / f"{dataset}.json").read_text())
    assert data["dataset"] == dataset and data["names"] == "context59" and data["n_images"] == 6
    # a perfect model predicts the painting; two annotations name another class
    if dataset == "context60":
        expected = loop_miou([(w.painted, w.label) for w in val], 60)
    else:
        expected = loop_miou([(_to_pc59(w.painted), _to_pc59(w.label)) for w in val], 59)
    assert expected < 0.9
    assert data["exact"]["mIoU"] == pytest.approx(expected, abs=1e-12)


def test_eval_coco_object_end_to_end_gives_the_known_miou(cache, tmp_path):
    root = tmp_path / "coco"
    written = write_synthetic_coco(
        root, color_world(COCO), _distinct(COCO), n_images=6, seed=1, mislabelled=1, empty=2,
        **FULL_FRAME,
    )  # fmt: skip
    assert run("convert", "coco-object", "--src", str(root)) == 0
    rc = run("eval", "coco-object", "--root", str(root), "--backend", "color",
             "--cache", cache, "--support-size", "2", "--out", str(tmp_path))  # fmt: skip
    assert rc == 0
    data = json.loads((tmp_path / "coco-object.json").read_text())
    assert data["dataset"] == "coco-object" and data["n_images"] == 8
    assert data["per_class"]["background"]["IoU"] == 100.0  # the two empty images
    expected = loop_miou([(w.painted, w.label) for w in written], 81)
    assert expected < 0.9
    assert data["exact"]["mIoU"] == pytest.approx(expected, abs=1e-12)


def test_eval_and_convert_usage_errors(tmp_path):
    assert run("eval", "context60", "--root", str(tmp_path), "--backend", "color") == 2
    assert run("convert", "context", "--src", str(tmp_path)) == 2  # no --dst
    assert run("convert", "coco-object", "--src", str(tmp_path)) == 2
