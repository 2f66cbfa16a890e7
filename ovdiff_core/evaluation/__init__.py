"""Evaluation on the standard benchmarks: dataset readers and the mmseg metric.

* :mod:`ovdiff_core.evaluation.metrics`: one confusion matrix per dataset at ground-truth
  resolution, per-class IoU, mIoU, aAcc (as mmseg computes them), JSON and Markdown out.
* :mod:`ovdiff_core.evaluation.datasets`: Pascal VOC 2012 (VOC21 and VOC20) from its
  standard on-disk layout, with the class-name files of the literature.
* :func:`evaluate`: run a model over a dataset and score it.
"""

from ovdiff_core.evaluation.datasets import (
    NAME_SETS,
    Sample,
    VOCSegmentation,
    class_names,
    names_version,
    voc_palette,
)
from ovdiff_core.evaluation.metrics import (
    IGNORE_INDEX,
    ConfusionMatrix,
    SegMetrics,
    confusion_matrix,
    resize_nearest,
)
from ovdiff_core.evaluation.run import EvalResult, evaluate, labels_for

__all__ = [
    "IGNORE_INDEX",
    "NAME_SETS",
    "ConfusionMatrix",
    "EvalResult",
    "Sample",
    "SegMetrics",
    "VOCSegmentation",
    "class_names",
    "confusion_matrix",
    "evaluate",
    "labels_for",
    "names_version",
    "resize_nearest",
    "voc_palette",
]
