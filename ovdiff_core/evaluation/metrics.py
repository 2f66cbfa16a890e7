"""Semantic-segmentation metrics computed the way mmseg's ``IoUMetric`` computes them.

* One confusion matrix over the whole dataset, at ground-truth resolution: a prediction of
  another size is first resized to the annotation's size with nearest-neighbour sampling
  (source index ``floor(i * in / out)``, OpenCV's ``INTER_NEAREST``, which mmcv uses).
* Pixels whose ground truth is ``ignore_index`` (255) are skipped; so are predicted labels
  outside ``0..num_classes - 1`` in the prediction's histogram (mmseg's ``histc``), while
  the ground-truth pixel still counts: such a prediction is a miss.
* Per class: IoU = TP / (TP + FP + FN), Acc = TP / (TP + FN); NaN when the denominator is 0.
* mIoU and mAcc: mean over the classes that are not NaN. aAcc = trace / labelled pixels.
  It is not the mean of per-image IoUs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "IGNORE_INDEX",
    "ConfusionMatrix",
    "SegMetrics",
    "confusion_matrix",
    "resize_nearest",
]

IGNORE_INDEX = 255


def resize_nearest(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a label map (OpenCV ``INTER_NEAREST`` convention).

    Args:
        labels: (H, W) integer label map.
        size: (H', W') wanted.

    Returns:
        (H', W') array of the same dtype; pixel (i, j) takes source pixel
        ``(floor(i * H / H'), floor(j * W / W'))``.
    """
    if labels.ndim != 2:
        raise ValueError(f"resize_nearest: labels must be (H, W), got shape {labels.shape}")
    h, w = labels.shape
    oh, ow = size
    if oh < 1 or ow < 1:
        raise ValueError(f"resize_nearest: size must be positive, got {size}")
    if (oh, ow) == (h, w):
        return labels
    rows = np.minimum((np.arange(oh) * h) // oh, h - 1)
    cols = np.minimum((np.arange(ow) * w) // ow, w - 1)
    return labels[rows[:, None], cols[None, :]]


def confusion_matrix(
    pred: np.ndarray, gt: np.ndarray, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> np.ndarray:
    """Confusion matrix of one image.

    Args:
        pred: (h, w) integer predicted labels; resized to ``gt``'s size (nearest) if needed.
        gt: (H, W) integer ground truth in ``0..num_classes - 1`` or ``ignore_index``.
        num_classes: number of classes C.

    Returns:
        (C, C + 1) int64: entry ``[g, p]`` counts the labelled pixels of class g predicted
        as class p; the last column counts those predicted as anything outside
        ``0..C-1`` (for example background on VOC20, which has no background class).

    Raises:
        ValueError: shapes that are not 2-D, or ground truth outside the classes.
    """
    if gt.ndim != 2 or pred.ndim != 2:
        raise ValueError(
            f"confusion_matrix: pred and gt must be (H, W) maps, got {pred.shape} and {gt.shape}"
        )
    if num_classes < 1:
        raise ValueError(f"confusion_matrix: num_classes must be >= 1, got {num_classes}")
    pred = resize_nearest(pred, (int(gt.shape[0]), int(gt.shape[1])))
    g = gt.astype(np.int64).ravel()
    p = pred.astype(np.int64).ravel()
    keep = g != ignore_index
    g, p = g[keep], p[keep]
    if g.size and (g.min() < 0 or g.max() >= num_classes):
        bad = sorted(set(np.unique(g[(g < 0) | (g >= num_classes)]).tolist()))[:5]
        raise ValueError(
            f"confusion_matrix: ground-truth labels {bad} are outside 0..{num_classes - 1} and "
            f"are not the ignore index {ignore_index}; check the dataset's class count"
        )
    p = np.where((p < 0) | (p >= num_classes), num_classes, p)
    flat = np.bincount(g * (num_classes + 1) + p, minlength=num_classes * (num_classes + 1))
    return flat.reshape(num_classes, num_classes + 1).astype(np.int64)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.full(num.shape, np.nan, dtype=np.float64)
    ok = den > 0
    out[ok] = num[ok] / den[ok]
    return out


def _nanmean(values: np.ndarray) -> float:
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else math.nan


@dataclass
class SegMetrics:
    """Dataset-level scores (fractions in [0, 1]; NaN where a class has no pixels at all).

    Attributes:
        class_names: the C class names, in label order.
        iou: (C,) float64 per-class IoU.
        acc: (C,) float64 per-class accuracy (recall).
        miou: mean of the non-NaN ``iou``.
        macc: mean of the non-NaN ``acc``.
        aacc: correctly labelled pixels / labelled pixels.
        n_images: images accumulated.
        n_pixels: labelled (not ignored) pixels.
        matrix: (C, C + 1) int64 confusion matrix (see :func:`confusion_matrix`).
    """

    class_names: list[str]
    iou: np.ndarray
    acc: np.ndarray
    miou: float
    macc: float
    aacc: float
    n_images: int
    n_pixels: int
    matrix: np.ndarray

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: percentages rounded to 2 decimals as mmseg prints them, plus the
        exact fractions and the confusion matrix. NaN becomes None."""

        def pct(v: float) -> float | None:
            return None if math.isnan(v) else round(100.0 * v, 2)

        def raw(v: float) -> float | None:
            return None if math.isnan(v) else float(v)

        return {
            "mIoU": pct(self.miou),
            "mAcc": pct(self.macc),
            "aAcc": pct(self.aacc),
            "n_images": self.n_images,
            "n_pixels": self.n_pixels,
            "per_class": {
                n: {"IoU": pct(i), "Acc": pct(a)}
                for n, i, a in zip(self.class_names, self.iou, self.acc, strict=True)
            },
            "exact": {
                "mIoU": raw(self.miou),
                "mAcc": raw(self.macc),
                "aAcc": raw(self.aacc),
                "IoU": [raw(v) for v in self.iou],
                "Acc": [raw(v) for v in self.acc],
            },
            "confusion_matrix": self.matrix.tolist(),
        }

    def to_json(self, **extra: Any) -> str:
        """:meth:`to_dict` (plus ``extra`` keys) as indented JSON."""
        return json.dumps({**extra, **self.to_dict()}, indent=2)

    def to_markdown(self) -> str:
        """A per-class table (IoU, Acc in %) followed by a summary row."""

        def cell(v: float) -> str:
            return "-" if math.isnan(v) else f"{100.0 * v:.2f}"

        lines = ["| class | IoU | Acc |", "|---|---:|---:|"]
        for n, i, a in zip(self.class_names, self.iou, self.acc, strict=True):
            lines.append(f"| {n} | {cell(i)} | {cell(a)} |")
        lines += [
            "",
            "| mIoU | mAcc | aAcc | images |",
            "|---:|---:|---:|---:|",
            f"| {cell(self.miou)} | {cell(self.macc)} | {cell(self.aacc)} | {self.n_images} |",
        ]
        return "\n".join(lines)


class ConfusionMatrix:
    """Accumulates one confusion matrix over a dataset.

    Args:
        class_names: the C class names; label i is ``class_names[i]``.
        ignore_index: ground-truth value that is skipped (255 in VOC, Context, COCO).
    """

    def __init__(self, class_names: Sequence[str], ignore_index: int = IGNORE_INDEX) -> None:
        if not class_names:
            raise ValueError("ConfusionMatrix: class_names is empty")
        self.class_names = list(class_names)
        self.ignore_index = ignore_index
        c = len(self.class_names)
        self.matrix = np.zeros((c, c + 1), dtype=np.int64)
        self.n_images = 0

    def update(self, pred: np.ndarray, gt: np.ndarray) -> None:
        """Add one image: ``pred`` (h, w) labels (any size), ``gt`` (H, W) labels."""
        self.matrix += confusion_matrix(pred, gt, len(self.class_names), self.ignore_index)
        self.n_images += 1

    def merge(self, other: ConfusionMatrix) -> None:
        """Add another accumulator's counts (same classes), e.g. from another process."""
        if other.class_names != self.class_names:
            raise ValueError("ConfusionMatrix.merge: the class lists differ")
        self.matrix += other.matrix
        self.n_images += other.n_images

    def compute(self) -> SegMetrics:
        """Per-class IoU and accuracy, mIoU, mAcc and aAcc of everything added so far."""
        m = self.matrix.astype(np.float64)
        c = len(self.class_names)
        tp = np.diag(m[:, :c])
        gt_area = m.sum(axis=1)
        pred_area = m[:, :c].sum(axis=0)
        iou = _ratio(tp, gt_area + pred_area - tp)
        acc = _ratio(tp, gt_area)
        total = float(gt_area.sum())
        return SegMetrics(
            class_names=list(self.class_names),
            iou=iou,
            acc=acc,
            miou=_nanmean(iou),
            macc=_nanmean(acc),
            aacc=float(tp.sum() / total) if total else math.nan,
            n_images=self.n_images,
            n_pixels=int(total),
            matrix=self.matrix.copy(),
        )
