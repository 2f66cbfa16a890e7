"""Typed containers shared by every stage: support sets, prototype banks, categories.

Conventions used throughout the project:

* Images are ``numpy.ndarray`` of shape (H, W, 3), dtype uint8, RGB.
* Array indices are (row, col) = (y, x). Public functions that take a *point* take
  ``x`` (column) and ``y`` (row) as separate, named integers, in pixels of the image
  they refer to, origin at the top-left corner.
* Feature maps are ``torch.Tensor`` of shape (B, D, h, w) (channels first).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import numpy as np
import torch

from ovdiff_core.geometry import cells_to_pixels

__all__ = [
    "Category",
    "PrototypeBank",
    "PrototypeKind",
    "SupportSet",
]


class PrototypeKind(IntEnum):
    """Granularity of a prototype (the paper's three levels)."""

    CLASS = 0  # mean of all region features of all support images
    INSTANCE = 1  # mean of one support image's region features
    PART = 2  # one K-means centroid of the pooled region features


@dataclass
class SupportSet:
    """The support images of one category and their foreground/background regions.

    Attributes:
        category: the category name as the user typed it (e.g. ``"potted plant"``).
        images: (N, H, W, 3) uint8 RGB support images.
        attributions: (N, H, W) float32 in [0, 1]; the category's cross-attention
            attribution map per image (1 = strongly attributed to the name).
        foreground: (N, H, W) bool; pixels of the category's object.
        background: (N, H, W) bool; pixels confidently *not* the category.
        settings: JSON-serialisable description of how the set was made (prompt,
            model id, steps, seed, ...). Part of every cache key derived from it.
    """

    category: str
    images: np.ndarray
    attributions: np.ndarray
    foreground: np.ndarray
    background: np.ndarray
    settings: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.shape[-1] != 3 or self.images.dtype != np.uint8:
            raise ValueError(
                f"SupportSet.images must be (N, H, W, 3) uint8, got {self.images.shape} "
                f"{self.images.dtype}"
            )
        expected = self.images.shape[:3]
        for name in ("attributions", "foreground", "background"):
            arr = getattr(self, name)
            if arr.shape != expected:
                raise ValueError(
                    f"SupportSet.{name} must have shape {expected} (N, H, W) like images, "
                    f"got {arr.shape}"
                )
        if self.foreground.dtype != np.bool_ or self.background.dtype != np.bool_:
            raise ValueError("SupportSet.foreground and .background must be bool arrays")
        self.attributions = self.attributions.astype(np.float32, copy=False)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of the support images."""
        return int(self.images.shape[1]), int(self.images.shape[2])

    def tensors(self) -> dict[str, torch.Tensor]:
        """Plain tensors for safetensors serialisation (see :meth:`from_tensors`)."""
        return {
            "images": torch.from_numpy(np.ascontiguousarray(self.images)),
            "attributions": torch.from_numpy(np.ascontiguousarray(self.attributions)),
            "foreground": torch.from_numpy(np.ascontiguousarray(self.foreground)),
            "background": torch.from_numpy(np.ascontiguousarray(self.background)),
        }

    @classmethod
    def from_tensors(
        cls, category: str, tensors: dict[str, torch.Tensor], settings: dict[str, Any]
    ) -> SupportSet:
        return cls(
            category=category,
            images=tensors["images"].numpy(),
            attributions=tensors["attributions"].numpy(),
            foreground=tensors["foreground"].numpy().astype(bool),
            background=tensors["background"].numpy().astype(bool),
            settings=settings,
        )


@dataclass
class PrototypeBank:
    """Prototypes of one category for one feature extractor, with provenance.

    P prototypes, foreground and background together. Every prototype is the mean of a
    set of *member cells* of the support images' feature grids: all region cells (class
    level), one image's region cells (instance level) or one K-means cluster (part level).
    The members are stored in CSR form so that any prototype can be traced back to the
    exact support pixels that formed it.

    Attributes:
        category: category name.
        extractor: name of the feature extractor (``FeatureExtractor.name``).
        vectors: (P, D) float32, L2-normalised prototypes.
        foreground: (P,) bool; True for foreground prototypes, False for background.
        kinds: (P,) int8 of :class:`PrototypeKind` values.
        image_index: (P,) int32; the support image of an instance prototype, -1 otherwise.
        member_offsets: (P + 1,) int64; members of prototype p are
            ``member_cells[member_offsets[p]:member_offsets[p + 1]]``.
        member_cells: (M,) int64 flat indices ``n * gh * gw + row * gw + col`` into the
            (N, gh, gw) feature grid of the support set.
        grid_size: (gh, gw) feature grid of one support image.
        image_size: (H, W) of the support images; grid cell (row, col) covers image rows
            ``[row * H // gh, (row + 1) * H // gh)`` and likewise for columns.
        settings: JSON-serialisable build settings (K, seed, extractor spec, ...).
    """

    category: str
    extractor: str
    vectors: torch.Tensor
    foreground: torch.Tensor
    kinds: torch.Tensor
    image_index: torch.Tensor
    member_offsets: torch.Tensor
    member_cells: torch.Tensor
    grid_size: tuple[int, int]
    image_size: tuple[int, int]
    settings: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        p = self.vectors.shape[0]
        if self.vectors.ndim != 2:
            raise ValueError(
                f"PrototypeBank.vectors must be (P, D), got {tuple(self.vectors.shape)}"
            )
        for name in ("foreground", "kinds", "image_index"):
            if tuple(getattr(self, name).shape) != (p,):
                raise ValueError(f"PrototypeBank.{name} must have shape ({p},)")
        if tuple(self.member_offsets.shape) != (p + 1,):
            raise ValueError(f"PrototypeBank.member_offsets must have shape ({p + 1},)")
        self.grid_size = (int(self.grid_size[0]), int(self.grid_size[1]))
        self.image_size = (int(self.image_size[0]), int(self.image_size[1]))

    def __len__(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def members(self, p: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Member cells of prototype ``p`` as (image index, grid row, grid col) int arrays."""
        lo, hi = int(self.member_offsets[p]), int(self.member_offsets[p + 1])
        flat = self.member_cells[lo:hi].numpy()
        gh, gw = self.grid_size
        n, rest = np.divmod(flat, gh * gw)
        row, col = np.divmod(rest, gw)
        return n, row, col

    def member_masks(self, p: int) -> dict[int, np.ndarray]:
        """Image-resolution masks of prototype ``p``'s member cells
        (:func:`~ovdiff_core.geometry.cells_to_pixels`).

        Returns:
            ``{support image index: (H, W) bool mask}`` for every support image that has
            at least one member cell, in increasing image order.
        """
        n, row, col = self.members(p)
        if len(n) == 0:
            return {}
        images, slot = np.unique(n, return_inverse=True)
        grids = np.zeros((len(images), *self.grid_size), dtype=bool)
        grids[slot, row, col] = True
        masks = cells_to_pixels(grids, self.image_size)
        return {int(i): masks[k] for k, i in enumerate(images)}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "vectors": self.vectors.contiguous(),
            "foreground": self.foreground.contiguous(),
            "kinds": self.kinds.contiguous(),
            "image_index": self.image_index.contiguous(),
            "member_offsets": self.member_offsets.contiguous(),
            "member_cells": self.member_cells.contiguous(),
        }

    def meta(self) -> dict[str, Any]:
        return {
            "category": self.category,
            "extractor": self.extractor,
            "grid_size": list(self.grid_size),
            "image_size": list(self.image_size),
            "settings": self.settings,
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> PrototypeBank:
        return cls(
            category=meta["category"],
            extractor=meta["extractor"],
            vectors=tensors["vectors"],
            foreground=tensors["foreground"].bool(),
            kinds=tensors["kinds"],
            image_index=tensors["image_index"],
            member_offsets=tensors["member_offsets"],
            member_cells=tensors["member_cells"],
            grid_size=(int(meta["grid_size"][0]), int(meta["grid_size"][1])),
            image_size=(int(meta["image_size"][0]), int(meta["image_size"][1])),
            settings=meta.get("settings", {}),
        )


@dataclass
class Category:
    """Everything segmentation needs about one category.

    Attributes:
        name: category name.
        banks: ``{extractor name: PrototypeBank}``; one bank per feature extractor.
        support: the support set the banks were built from (optional, used by
            :func:`ovdiff_core.trace` to show support images).
        stuff: True for amorphous "stuff" categories (sky, grass, ...): they contribute
            no background prototypes and bypass the CLIP pre-filter.
    """

    name: str
    banks: dict[str, PrototypeBank]
    support: SupportSet | None = None
    stuff: bool = False


def stable_hash(obj: Any) -> str:
    """SHA-256 hex digest of a JSON-serialisable object (keys sorted, compact)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()
