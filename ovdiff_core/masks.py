"""Foreground / background masks of support images from attribution maps and segments.

OVDiff's rule (spec, stage 1): an unsupervised instance segmenter proposes segments; a
"no instance" segment (the pixels no proposal covers) is added; every candidate is scored
by its mean attribution. Foreground = the best-scored candidate. Background = the
worst-scored candidate AND attribution < 0.2, then eroded. Without any proposal:
foreground = attribution > 0.5, background = attribution < 0.2.

This module is that rule and nothing else: pure numpy/torch over *given* candidate
segments. Where segments come from is :mod:`ovdiff_core.backends.proposer` (the paper's
CutLER needs detectron2, which is not installable from PyPI).

Arrays are (H, W) in image pixels: row = y, column = x.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["MaskConfig", "MaskSelection", "erode", "select_masks", "select_masks_batch"]


@dataclass(frozen=True)
class MaskConfig:
    """How support images are split into foreground and background."""

    fg_threshold: float = 0.5  # no segments: foreground = attribution > this (spec 0.5)
    bg_threshold: float = 0.2  # background needs attribution < this (spec 0.2)
    bg_erosion: float = 1 / 64  # erosion radius of the background, fraction of the short side
    proposer: str = "features"  # segment proposer: "features" (cluster extractor features) or
    #   "threshold" (no segments: the spec's fallback thresholds for every image)
    n_clusters: int = 4  # "features": K-means clusters per image before splitting components
    min_segment_area: float = 0.01  # "features": drop components smaller than this image fraction

    def __post_init__(self) -> None:
        if not 0.0 <= self.bg_threshold <= self.fg_threshold <= 1.0:
            raise ValueError(
                "MaskConfig needs 0 <= bg_threshold <= fg_threshold <= 1, got "
                f"bg_threshold={self.bg_threshold}, fg_threshold={self.fg_threshold}"
            )
        if not 0.0 <= self.bg_erosion < 0.5:
            raise ValueError(f"MaskConfig.bg_erosion must be in [0, 0.5), got {self.bg_erosion}")
        if self.proposer not in ("features", "threshold"):
            raise ValueError(
                f"MaskConfig.proposer must be 'features' or 'threshold', got {self.proposer!r}"
            )
        if self.n_clusters < 2:
            raise ValueError(f"MaskConfig.n_clusters must be >= 2, got {self.n_clusters}")
        if not 0.0 <= self.min_segment_area < 1.0:
            raise ValueError(
                f"MaskConfig.min_segment_area must be in [0, 1), got {self.min_segment_area}"
            )

    def erosion_radius(self, image_size: tuple[int, int]) -> int:
        """Background erosion radius in pixels for an (H, W) image (8 px at 512)."""
        return round(self.bg_erosion * min(image_size))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class MaskSelection:
    """Foreground and background of one support image, and why.

    Attributes:
        foreground: (H, W) bool.
        background: (H, W) bool; never overlaps ``foreground``.
        scores: (S + 1,) float32 mean attribution of each candidate: the S given segments
            in order, then the "no instance" complement (the whole image when S = 0); NaN
            for an empty candidate.
        fg_index: candidate chosen as foreground (S = the complement), or -1 when the
            threshold fallback was used (no segments given).
        bg_index: candidate chosen as background, or -1 for the fallback.
    """

    foreground: np.ndarray
    background: np.ndarray
    scores: np.ndarray
    fg_index: int
    bg_index: int


def erode(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary erosion of an (H, W) bool mask by a (2r+1) x (2r+1) square.

    Pixels outside the image count as inside the mask, so regions touching the border
    are not eaten from the border (they usually are background that continues there).
    """
    if mask.ndim != 2 or mask.dtype != np.bool_:
        raise ValueError(f"mask must be an (H, W) bool array, got {mask.shape} {mask.dtype}")
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    if radius == 0 or not mask.any():
        return mask.copy()
    outside = torch.from_numpy(~mask).float()[None, None]
    # max_pool pads with -inf: the border never counts as "outside the mask".
    grown = F.max_pool2d(outside, kernel_size=2 * radius + 1, stride=1, padding=radius)
    return (grown[0, 0] < 0.5).numpy()


def _check_attribution(attribution: np.ndarray) -> None:
    if attribution.ndim != 2:
        raise ValueError(f"attribution must be (H, W), got shape {attribution.shape}")
    if not np.issubdtype(attribution.dtype, np.floating):
        raise ValueError(f"attribution must be a float array in [0, 1], got {attribution.dtype}")


def select_masks(
    attribution: np.ndarray,
    segments: np.ndarray | Sequence[np.ndarray],
    config: MaskConfig | None = None,
) -> MaskSelection:
    """Foreground and background of one image (the OVDiff rule, see module docstring).

    Args:
        attribution: (H, W) float in [0, 1], the category's attribution map.
        segments: (S, H, W) bool array or a sequence of S (H, W) bool masks; candidate
            instance segments (may overlap; S may be 0).
        config: thresholds and erosion; default :class:`MaskConfig()`.

    Returns:
        The selection. Ties between candidates go to the lower index.
    """
    cfg = config or MaskConfig()
    _check_attribution(attribution)
    h, w = attribution.shape
    seg = np.asarray(segments, dtype=bool) if len(segments) else np.zeros((0, h, w), bool)
    if seg.ndim != 3 or seg.shape[1:] != (h, w):
        raise ValueError(
            f"segments must be (S, H, W) bool masks matching attribution {(h, w)}, got {seg.shape}"
        )
    att = attribution.astype(np.float32, copy=False)
    low = att < cfg.bg_threshold
    radius = cfg.erosion_radius((h, w))
    if seg.shape[0] == 0:
        fg = att > cfg.fg_threshold
        bg = erode(low, radius) & ~fg
        return MaskSelection(fg, bg, np.array([att.mean()], np.float32), -1, -1)

    uncovered: np.ndarray = np.logical_not(seg.any(axis=0))
    candidates = np.concatenate([seg, uncovered[None]], axis=0)  # (S + 1, H, W)
    areas = candidates.reshape(len(candidates), -1).sum(axis=1)
    sums = (candidates * att[None]).reshape(len(candidates), -1).sum(axis=1)
    scores = np.full(len(candidates), np.nan, dtype=np.float32)
    nonempty = areas > 0
    scores[nonempty] = (sums[nonempty] / areas[nonempty]).astype(np.float32)
    valid = np.flatnonzero(nonempty)
    fg_index = int(valid[np.argmax(scores[valid])])
    bg_index = int(valid[np.argmin(scores[valid])])
    fg = candidates[fg_index].copy()
    bg = erode(candidates[bg_index] & low, radius) & ~fg
    return MaskSelection(fg, bg, scores, fg_index, bg_index)


def select_masks_batch(
    attributions: np.ndarray,
    segments: Sequence[np.ndarray | Sequence[np.ndarray]],
    config: MaskConfig | None = None,
) -> tuple[np.ndarray, np.ndarray, list[MaskSelection]]:
    """:func:`select_masks` for N images.

    Args:
        attributions: (N, H, W) float in [0, 1].
        segments: N candidate sets, each (S_i, H, W) bool.

    Returns:
        foreground (N, H, W) bool, background (N, H, W) bool, the N selections.
    """
    if attributions.ndim != 3:
        raise ValueError(f"attributions must be (N, H, W), got {attributions.shape}")
    if len(segments) != len(attributions):
        raise ValueError(
            f"segments must hold one candidate set per image: {len(segments)} sets for "
            f"{len(attributions)} images"
        )
    picks = [select_masks(a, s, config) for a, s in zip(attributions, segments, strict=True)]
    h, w = attributions.shape[1:]
    fg = np.stack([p.foreground for p in picks]) if picks else np.zeros((0, h, w), bool)
    bg = np.stack([p.background for p in picks]) if picks else np.zeros((0, h, w), bool)
    return fg, bg, picks
