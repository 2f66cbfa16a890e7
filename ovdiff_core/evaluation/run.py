"""Run a model over a dataset and score it with the mmseg metric."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ovdiff_core.evaluation.datasets import Sample
from ovdiff_core.evaluation.metrics import ConfusionMatrix, SegMetrics
from ovdiff_core.pamr import PamrConfig, pamr
from ovdiff_core.segment import Segmentation

__all__ = ["EvalResult", "Segmenter", "evaluate", "labels_for"]


class Segmenter(Protocol):
    """Anything with :meth:`ovdiff_core.OVDiff.segment`'s signature."""

    def segment(
        self, image: np.ndarray, categories: Sequence[str] | None = None
    ) -> Segmentation: ...


def labels_for(
    seg: Segmentation,
    class_names: Sequence[str],
    background: bool,
    refine: PamrConfig | None = None,
    image: np.ndarray | None = None,
) -> np.ndarray:
    """A segmentation's labels as indices of a dataset's ``class_names``.

    Args:
        seg: the model's output; its labels index ``seg.class_names``
            (``["background", kept...]``).
        class_names: the dataset's classes in label order.
        background: whether the dataset has a background class (named "background").
            Without one (VOC20, PC59) each pixel takes the best-scoring kept *object*
            class, the protocol of the literature for these variants.
        refine: PAMR settings: refine ``seg.scores`` (all C + 1 channels) with
            :func:`~ovdiff_core.pamr.pamr` on ``image`` before the argmax; None = the
            model's own labels.
        image: (H, W, 3) uint8, the segmented image (needed with ``refine``).

    Returns:
        (H, W) int64 dataset labels; -1 where the predicted class is not one of the
        dataset's (the metric counts it as a miss).
    """
    index = {n: i for i, n in enumerate(class_names)}
    objects = [index.get(n, -1) for n in seg.class_names[1:]]
    scores = None  # all channels' maps: materialised only for PAMR
    if refine is not None:
        if image is None:
            raise ValueError("labels_for: PAMR needs the image (pass image=)")
        scores = pamr(image, seg.scores, refine.iterations, refine.dilations)
    if background:
        lut = np.array([index["background"], *objects], dtype=np.int64)
        return lut[seg.labels if scores is None else scores.argmax(axis=0)]
    if not objects:
        return np.full(seg.labels.shape, -1, dtype=np.int64)
    if scores is None:
        return np.array([-1, *objects], dtype=np.int64)[seg.object_labels()]
    return np.array(objects, dtype=np.int64)[scores[1:].argmax(axis=0)]


@dataclass
class EvalResult:
    """Scores of one evaluation run, with its throughput.

    Attributes:
        metrics: the dataset-level scores.
        seconds: wall-clock seconds spent segmenting and scoring (not building).
        images_per_s: ``metrics.n_images / seconds``.
    """

    metrics: SegMetrics
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.metrics.n_images / self.seconds if self.seconds > 0 else float("nan")


def evaluate(
    model: Segmenter,
    samples: Iterable[Sample],
    names: Sequence[str],
    class_names: Sequence[str],
    background: bool,
    on_image: Callable[[Sample, np.ndarray], None] | None = None,
    refine: PamrConfig | None = None,
) -> EvalResult:
    """Segment every sample with the categories ``names`` (built already) and score it.

    Args:
        model: e.g. an :class:`~ovdiff_core.OVDiff` whose categories ``names`` are built.
        samples: the dataset's images and annotations.
        names: category names to segment with (the dataset's object classes).
        class_names: the dataset's evaluated classes in label order.
        background: whether ``class_names`` has background (see :func:`labels_for`).
        on_image: called after each image with the sample and its (H, W) predicted labels.
        refine: PAMR settings to refine every image's scores with (see :func:`labels_for`);
            None = no refinement.
    """
    matrix = ConfusionMatrix(class_names)
    start = time.perf_counter()
    for sample in samples:
        seg = model.segment(sample.image, list(names))
        pred = labels_for(seg, class_names, background, refine, sample.image)
        matrix.update(pred, sample.label)
        if on_image is not None:
            on_image(sample, pred)
    return EvalResult(matrix.compute(), time.perf_counter() - start)
