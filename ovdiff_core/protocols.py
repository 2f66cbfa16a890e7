"""Interfaces of the components the algorithm is given (never loads itself).

Real implementations live in :mod:`ovdiff_core.backends`; tests use tiny random models
of the same classes or the deterministic stand-ins of :mod:`ovdiff_core.colorworld`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from ovdiff_core.types import SupportSet

__all__ = ["FeatureExtractor", "ImageTextScorer", "SupportGenerator"]


@runtime_checkable
class FeatureExtractor(Protocol):
    """Dense features of images.

    Attributes:
        name: unique, filesystem-independent identifier (e.g. ``"dino"``); banks and
            segmentations refer to extractors by this name.
        stride: nominal pixels per feature cell (8 for DINO ViT-B/8, 16 for CLIP B/16).
    """

    name: str
    stride: int

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Extract features.

        Args:
            images: (B, 3, H, W) float32 RGB in [0, 1], on any device (the CPU from the
                pipeline). Any H, W >= ``stride``; the extractor resizes or pads
                internally as its model needs.

        Returns:
            (B, D, h, w) float tensor (float32 unless the extractor is configured
            otherwise) on the extractor's device: a GPU model's features stay on the GPU
            (callers move to the CPU only what they store). The grid covers the whole input: cell
            (r, c) covers input rows ``[r * H / h, (r + 1) * H / h)`` and likewise for
            columns (so h is about H / stride). Not necessarily normalised.
        """
        ...

    def spec(self) -> dict[str, Any]:
        """JSON-serialisable identity: model id, revision, layers, facet, input size.

        Everything that changes the features must appear here: it is part of every
        cache key of banks built with this extractor.
        """
        ...


@runtime_checkable
class ImageTextScorer(Protocol):
    """Image-text similarity (CLIP) for the category pre-filter."""

    def image_text_scores(self, image: np.ndarray, texts: Sequence[str]) -> np.ndarray:
        """Cosine similarity between one image and each text.

        Args:
            image: (H, W, 3) uint8 RGB.
            texts: T prompts.

        Returns:
            (T,) float32 raw cosine similarities in [-1, 1] (no temperature, no softmax).
        """
        ...


@runtime_checkable
class SupportGenerator(Protocol):
    """Makes support sets for category names (text-to-image plus attribution and masks)."""

    def spec(self, category: str) -> dict[str, Any]:
        """JSON-serialisable identity of the support set :meth:`generate` would produce
        for ``category`` (prompt, negative prompt, model id and revision, steps,
        guidance, seed, number of images, resolution, mask settings...). Used as the
        cache key *before* generating, so equal specs must mean equal outputs.
        """
        ...

    def generate(self, category: str) -> Iterator[SupportSet]:
        """Generate the support set of ``category`` batch by batch.

        Yields:
            One :class:`SupportSet` per generated batch (images, attributions, masks of
            that batch only), as soon as the batch is ready. The concatenation of all
            batches is the category's support set; its ``settings`` equal
            :meth:`spec`.
        """
        ...
