"""Configuration of the algorithm's stages 2 and 3, as dataclasses with named presets."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

__all__ = ["MASK_RULES", "PrototypeConfig", "SegmentConfig"]

# Bump when a change to the algorithm changes the bytes of cached banks.
ALGORITHM_VERSION = 1

# How a support mask becomes feature-grid cells (see ovdiff_core.prototypes.region_to_grid):
# "any" = a cell is inside if any of its pixels is (the paper's rule); "majority" = more than
# half of its pixels are; "eroded" = all of its pixels are.
MASK_RULES = ("any", "majority", "eroded")


@dataclass(frozen=True)
class PrototypeConfig:
    """How prototypes are built from a support set (stage 2)."""

    n_parts: int = 32  # K of the part-level K-means (paper: 32)
    seed: int = 0  # K-means seed; banks are deterministic given it
    kmeans_max_iter: int = 100  # Lloyd iterations at most
    kmeans_tol: float = 1e-4  # stop when inertia improves by less than this fraction
    class_level: bool = True  # keep the class-mean prototype (fg and bg)
    instance_level: bool = True  # keep one prototype per support image
    part_level: bool = True  # keep K part prototypes
    mask_rule: str = "majority"  # mask -> grid cells: "any" (paper), "majority", "eroded";
    #   "majority" keeps cells that are mostly another region out of part prototypes

    def __post_init__(self) -> None:
        if self.mask_rule not in MASK_RULES:
            raise ValueError(
                f"PrototypeConfig.mask_rule must be one of {MASK_RULES}, got {self.mask_rule!r}"
            )
        if self.n_parts < 0:
            raise ValueError(f"PrototypeConfig.n_parts must be >= 0, got {self.n_parts}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SegmentConfig:
    """How a target image is segmented (stage 3)."""

    short_side: int = 448  # target resized so its short side is this many pixels
    windows: bool = True  # add sliding windows to the whole-image view
    window_sizes: tuple[int, ...] = (448, 336)  # square window sides, pixels
    window_stride: int = 224  # window step, pixels
    score_floor: float = 0.0  # cosine scores <= this become 0
    background: bool = True  # use background prototypes (ablation: False)
    stuff_threshold: float = 0.85  # drop bg prototypes this close to a stuff fg prototype
    prefilter: bool = True  # CLIP category pre-filter (needs a scorer)
    prefilter_max: int = 10  # at most this many thing classes survive the pre-filter
    prefilter_subsets: bool = True  # score every subset of kept classes jointly
    prompt: str = "a {}"  # pre-filter prompt per class

    def __post_init__(self) -> None:
        if self.short_side < 16:
            raise ValueError(f"SegmentConfig.short_side must be >= 16, got {self.short_side}")
        if self.window_stride < 1 or any(s < 16 for s in self.window_sizes):
            raise ValueError("SegmentConfig windows must be >= 16 px with stride >= 1")
        if not 1 <= self.prefilter_max <= 10:
            raise ValueError("SegmentConfig.prefilter_max must be in 1..10 (2**10 subsets)")

    def replace(self, **changes: Any) -> SegmentConfig:
        return replace(self, **changes)


PAPER_SEGMENT = SegmentConfig()
# One whole-image view at a smaller size: about 10x less extractor work than PAPER.
FAST_SEGMENT = SegmentConfig(short_side=320, windows=False)
