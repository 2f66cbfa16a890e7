"""Segment proposers: candidate instance segments of support images.

The paper proposes segments with CutLER (a detectron2 model, confidence 0.35); without it
VOC loses about 3 mIoU. detectron2 is not on PyPI, so we need another proposer. Ours:

**Feature clustering** (:class:`FeatureClusterProposer`, the default). A generated support
image ("A good picture of a cat") is one salient object on a background. Self-supervised
ViT features (DINO) separate such an object from its background cleanly: the same
property CutLER itself is bootstrapped from (its MaskCut stage cuts DINO feature
affinity graphs). We K-means the image's own L2-normalised features into a few clusters
with the core's :func:`ovdiff_core.kmeans.kmeans`, assign every *pixel* to the cluster
whose centroid is most similar after bilinear upsampling of the (K, h, w) similarity maps
(smooth boundaries instead of stride-sized blocks), then split every cluster into
8-connected components (one cluster can hold several instances) and drop components
smaller than ``min_segment_area``. The masks module then ranks these segments and the
uncovered remainder by attribution. It is training-free, needs no extra model (the
pipeline already has a DINO extractor), is deterministic, and costs one extractor pass per
support image.

**Threshold** (:class:`ThresholdProposer`): no segments at all, so every image uses the
spec's fallback (foreground = attribution > 0.5, background = attribution < 0.2). Free;
useful on slow machines and as an ablation.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

from ovdiff_core.masks import MaskConfig
from ovdiff_core.protocols import FeatureExtractor

__all__ = [
    "FeatureClusterProposer",
    "SegmentProposer",
    "ThresholdProposer",
    "connected_components",
    "make_proposer",
]


@runtime_checkable
class SegmentProposer(Protocol):
    """Proposes candidate instance segments for images."""

    def __call__(self, images: np.ndarray) -> list[np.ndarray]:
        """Segments of each image.

        Args:
            images: (N, H, W, 3) uint8 RGB.

        Returns:
            N arrays, each (S_i, H, W) bool (S_i may be 0): candidate segments of image i.
        """
        ...

    def spec(self) -> dict[str, Any]:
        """JSON-serialisable identity (everything that changes the segments)."""
        ...


class ThresholdProposer:
    """Proposes nothing: masks fall back to the attribution thresholds."""

    def __call__(self, images: np.ndarray) -> list[np.ndarray]:
        _check_images(images)
        n, h, w = images.shape[:3]
        return [np.zeros((0, h, w), dtype=bool) for _ in range(n)]

    def spec(self) -> dict[str, Any]:
        return {"type": "threshold"}


def _check_images(images: np.ndarray) -> None:
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be (N, H, W, 3) uint8, got {images.shape} {images.dtype}")


def connected_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of an (H, W) bool mask.

    Returns:
        (labels, n): (H, W) int32 labels, 0 outside the mask and 1..n for components.
    """
    from scipy import ndimage

    labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    return labels.astype(np.int32, copy=False), int(n)


class FeatureClusterProposer:
    """Segments from K-means of an image's own dense features, split into components.

    Args:
        extractor: any :class:`~ovdiff_core.protocols.FeatureExtractor` (DINO in practice).
        n_clusters: K-means clusters per image.
        min_segment_area: components smaller than this fraction of the image are dropped.
        input_size: images are resized to this square side before the extractor
            (None = as they are). Caps the extractor cost on CPUs.
        seed: K-means seed.
    """

    def __init__(
        self,
        extractor: FeatureExtractor,
        n_clusters: int = 4,
        min_segment_area: float = 0.01,
        input_size: int | None = None,
        seed: int = 0,
    ) -> None:
        if n_clusters < 2:
            raise ValueError(f"n_clusters must be >= 2, got {n_clusters}")
        if not 0.0 <= min_segment_area < 1.0:
            raise ValueError(f"min_segment_area must be in [0, 1), got {min_segment_area}")
        if input_size is not None and input_size < extractor.stride:
            raise ValueError(
                f"input_size must be >= the extractor stride {extractor.stride}, got {input_size}"
            )
        self.extractor = extractor
        self.n_clusters = int(n_clusters)
        self.min_segment_area = float(min_segment_area)
        self.input_size = input_size
        self.seed = int(seed)

    @classmethod
    def from_config(
        cls, extractor: FeatureExtractor, config: MaskConfig, input_size: int | None = None
    ) -> FeatureClusterProposer:
        return cls(extractor, config.n_clusters, config.min_segment_area, input_size)

    def spec(self) -> dict[str, Any]:
        return {
            "type": "feature_clusters",
            "extractor": self.extractor.spec(),
            "n_clusters": self.n_clusters,
            "min_segment_area": self.min_segment_area,
            "input_size": self.input_size,
            "seed": self.seed,
        }

    def features(self, images: np.ndarray) -> torch.Tensor:
        """(N, D, h, w) float32 features of (N, H, W, 3) uint8 images, on the extractor's
        device."""
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
        if self.input_size is not None:
            x = F.interpolate(
                x, size=(self.input_size, self.input_size), mode="bilinear", antialias=True
            )
        with torch.no_grad():
            return self.extractor(x).float()

    def cluster_map(self, features: torch.Tensor, image_size: tuple[int, int]) -> np.ndarray:
        """Pixel cluster labels of one image.

        Args:
            features: (D, h, w) features of the image.
            image_size: (H, W) of the image.

        Returns:
            (H, W) int64 labels in [0, K') (K' <= n_clusters).
        """
        from ovdiff_core.kmeans import kmeans

        d, gh, gw = features.shape
        cells = F.normalize(features.reshape(d, -1).T, dim=1)  # (h*w, D)
        result = kmeans(cells, self.n_clusters, seed=self.seed)
        centroids = F.normalize(result.centroids, dim=1)  # (K', D)
        sims = (centroids @ cells.T).reshape(1, -1, gh, gw)  # (1, K', h, w)
        sims = F.interpolate(sims, size=tuple(image_size), mode="bilinear", align_corners=False)
        return sims[0].argmax(dim=0).cpu().numpy()  # clustered on the features' device

    def __call__(self, images: np.ndarray) -> list[np.ndarray]:
        """Candidate segments, see :meth:`SegmentProposer.__call__`."""
        _check_images(images)
        n, h, w = images.shape[:3]
        if n == 0:
            return []
        feats = self.features(images)
        min_pixels = self.min_segment_area * h * w
        out = []
        for i in range(n):
            labels = self.cluster_map(feats[i], (h, w))
            segments = []
            for k in np.unique(labels):
                comp, count = connected_components(labels == k)
                if count == 0:
                    continue
                sizes = np.bincount(comp.ravel(), minlength=count + 1)
                for c in range(1, count + 1):
                    if sizes[c] >= max(min_pixels, 1):
                        segments.append(comp == c)
            out.append(np.stack(segments) if segments else np.zeros((0, h, w), dtype=bool))
        return out


def make_proposer(
    config: MaskConfig, extractor: FeatureExtractor | None, input_size: int | None = None
) -> SegmentProposer:
    """The proposer ``config.proposer`` names.

    Raises:
        ValueError: ``"features"`` without an extractor (pass one, e.g. the DINO
            extractor, or set ``MaskConfig(proposer="threshold")``).
    """
    if config.proposer == "threshold":
        return ThresholdProposer()
    if extractor is None:
        raise ValueError(
            "MaskConfig.proposer='features' needs a feature extractor (e.g. the DINO "
            "extractor) to cluster; pass extractor=..., or use MaskConfig(proposer='threshold')"
        )
    return FeatureClusterProposer.from_config(extractor, config, input_size)
