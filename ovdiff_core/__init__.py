"""OVDiff Explorer core: open-vocabulary segmentation with diffusion-made prototypes.

Five lines::

    from ovdiff_core.backends import build_ovdiff
    model = build_ovdiff("cpu")                      # real models (downloads once)
    model.build(["cat", "sofa", "lamp"])             # support sets + prototype banks, cached
    seg = model.segment(image)                       # (H, W, 3) uint8 -> Segmentation
    why = trace(seg, x=120, y=80)                    # PixelTrace of pixel column 120, row 80

Everything here is model-agnostic; models live in :mod:`ovdiff_core.backends`.
"""

from ovdiff_core.cache import Cache
from ovdiff_core.config import FAST_SEGMENT, PAPER_SEGMENT, PrototypeConfig, SegmentConfig
from ovdiff_core.pipeline import BuildProgress, OVDiff
from ovdiff_core.prefilter import PrefilterResult, prefilter
from ovdiff_core.protocols import FeatureExtractor, ImageTextScorer, SupportGenerator
from ovdiff_core.prototypes import build_bank
from ovdiff_core.segment import Segmentation, segment
from ovdiff_core.trace import PixelTrace, trace
from ovdiff_core.types import Category, PrototypeBank, PrototypeKind, SupportSet

__all__ = [
    "FAST_SEGMENT",
    "PAPER_SEGMENT",
    "BuildProgress",
    "Cache",
    "Category",
    "FeatureExtractor",
    "ImageTextScorer",
    "OVDiff",
    "PixelTrace",
    "PrefilterResult",
    "PrototypeBank",
    "PrototypeConfig",
    "PrototypeKind",
    "SegmentConfig",
    "Segmentation",
    "SupportGenerator",
    "SupportSet",
    "build_bank",
    "prefilter",
    "segment",
    "trace",
]
