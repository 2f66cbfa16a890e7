"""The mmseg metric, checked against independent computations (pixel loops, scikit-learn)."""

import json
import math

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix as sk_confusion_matrix

from ovdiff_core.evaluation import ConfusionMatrix, confusion_matrix, resize_nearest


def _loop_scores(pairs, num_classes, ignore=255):
    """Per-pixel Python loops: TP, FP, FN per class over all images, then the ratios."""
    tp = [0] * num_classes
    fp = [0] * num_classes
    fn = [0] * num_classes
    correct = labelled = 0
    for pred, gt in pairs:
        for g, p in zip(gt.ravel().tolist(), pred.ravel().tolist(), strict=True):
            if g == ignore:
                continue
            labelled += 1
            if g == p:
                tp[g] += 1
                correct += 1
            else:
                fn[g] += 1
                if 0 <= p < num_classes:
                    fp[p] += 1
    iou = []
    for c in range(num_classes):
        den = tp[c] + fp[c] + fn[c]
        iou.append(tp[c] / den if den else math.nan)
    present = [v for v in iou if not math.isnan(v)]
    return iou, sum(present) / len(present), correct / labelled


def _random_pairs(rng, n, num_classes, out_of_range=False):
    pairs = []
    for _ in range(n):
        h, w = rng.integers(5, 30, 2)
        gt = rng.integers(0, num_classes, (h, w))
        gt[rng.random((h, w)) < 0.15] = 255
        pred = np.where(rng.random((h, w)) < 0.6, gt, rng.integers(0, num_classes, (h, w)))
        pred[gt == 255] = rng.integers(0, num_classes)
        if out_of_range:
            pred[rng.random((h, w)) < 0.1] = num_classes  # e.g. background on VOC20
        pairs.append((pred, gt))
    return pairs


@pytest.mark.parametrize("out_of_range", [False, True])
def test_dataset_level_metric_matches_pixel_loops(out_of_range):
    rng = np.random.default_rng(3)
    num_classes = 6
    pairs = _random_pairs(rng, 7, num_classes, out_of_range)
    # class 5 never appears in ground truth or prediction -> NaN and skipped
    for pred, gt in pairs:
        pred[pred == 5] = 0
        gt[gt == 5] = 1
    acc = ConfusionMatrix([f"c{i}" for i in range(num_classes)])
    for pred, gt in pairs:
        acc.update(pred, gt)
    m = acc.compute()
    iou, miou, aacc = _loop_scores(pairs, num_classes)
    assert math.isnan(m.iou[5]) and math.isnan(iou[5])
    np.testing.assert_allclose(m.iou[:5], iou[:5], rtol=1e-12)
    assert m.miou == pytest.approx(miou, rel=1e-12)
    assert m.aacc == pytest.approx(aacc, rel=1e-12)
    assert m.n_images == 7
    # not the mean of per-image mIoUs
    per_image = []
    for pred, gt in pairs:
        one = ConfusionMatrix([f"c{i}" for i in range(num_classes)])
        one.update(pred, gt)
        per_image.append(one.compute().miou)
    assert abs(np.mean(per_image) - m.miou) > 1e-6


def test_confusion_matrix_matches_sklearn():
    rng = np.random.default_rng(0)
    pred, gt = _random_pairs(rng, 1, 4)[0]
    keep = gt != 255
    expected = sk_confusion_matrix(gt[keep], pred[keep], labels=range(4))
    got = confusion_matrix(pred, gt, 4)
    np.testing.assert_array_equal(got[:, :4], expected)
    assert got[:, 4].sum() == 0


def test_prediction_resized_to_ground_truth_with_nearest():
    # a 2x2 prediction scored against a 4x6 annotation: each prediction pixel covers a block
    pred = np.array([[0, 1], [2, 3]])
    big = resize_nearest(pred, (4, 6))
    np.testing.assert_array_equal(
        big,
        [[0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 1], [2, 2, 2, 3, 3, 3], [2, 2, 2, 3, 3, 3]],
    )
    # OpenCV INTER_NEAREST convention when shrinking: source index floor(i * in / out)
    row = np.arange(10)[None, :]
    np.testing.assert_array_equal(resize_nearest(row, (1, 4)), [[0, 2, 5, 7]])
    gt = np.array([[0, 0, 0, 1, 1, 255], [0, 0, 0, 1, 1, 1], [2, 2, 2, 3, 3, 3], [2] * 6])
    m = confusion_matrix(pred, gt, 4)
    assert m[0, 0] == 6 and m[1, 1] == 5 and m[2, 2] == 6 and m[3, 3] == 3
    assert m[1, 0] == 0 and m[0, 1] == 0 and m[2, 3] == 3
    assert m.sum() == 23  # 24 pixels, one ignored


def test_unknown_ground_truth_label_is_an_error():
    with pytest.raises(ValueError, match=r"outside 0\.\.2"):
        confusion_matrix(np.zeros((2, 2), int), np.full((2, 2), 7), 3)


def test_json_and_markdown_outputs():
    acc = ConfusionMatrix(["background", "cat", "dog"])
    gt = np.array([[0, 0, 1, 1], [0, 0, 1, 255]])
    pred = np.array([[0, 1, 1, 1], [0, 0, 0, 0]])
    acc.update(pred, gt)
    m = acc.compute()
    # background: TP 3, FN 1 (as cat), FP 1 (cat pixel predicted bg) -> 3/5
    # cat: TP 2, FN 1, FP 1 -> 2/4; dog: never present -> NaN, skipped
    assert m.iou[0] == pytest.approx(0.6) and m.iou[1] == pytest.approx(0.5)
    assert math.isnan(m.iou[2])
    assert m.miou == pytest.approx(0.55)
    assert m.aacc == pytest.approx(5 / 7)
    data = json.loads(m.to_json(dataset="toy"))
    assert data["dataset"] == "toy"
    assert data["mIoU"] == 55.0 and data["aAcc"] == pytest.approx(71.43)
    assert data["per_class"]["dog"]["IoU"] is None
    assert data["per_class"]["cat"]["IoU"] == 50.0
    assert data["confusion_matrix"][0][:3] == [3, 1, 0]
    md = m.to_markdown()
    assert "| cat | 50.00 | 66.67 |" in md
    assert "| dog | - | - |" in md
    assert "| 55.00 |" in md
