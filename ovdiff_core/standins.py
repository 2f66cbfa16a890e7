"""Model-free stand-ins for stage 3 at real sizes: banks and extractors with random
weights, for benchmarks and tests that need many classes or real feature dimensions.

* :class:`FixedExtractor`: fixed random features of the right grid size, whatever the
  image (the worst case for pruning: every channel's scores are alike everywhere).
* :class:`CodedExtractor`: features of a *coded* image, where each pixel's colour names a
  class (:func:`coded_scene`): a cell gets one of that class's foreground prototypes (or,
  for code 0, some class's background prototype) plus noise, so scores look like a real
  image's: one class high in each region, the others near zero.
* :func:`random_categories`: categories whose banks are shaped like real ones (1 class,
  N instance and K part prototypes, foreground then background) with real member cells.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ovdiff_core.types import Category, PrototypeBank, PrototypeKind, SupportSet

__all__ = ["CodedExtractor", "FixedExtractor", "coded_scene", "random_bank", "random_categories"]


class FixedExtractor:
    """Returns fixed random features of the right grid size (no model cost).

    Grid: ``ceil(H / stride) x ceil(W / stride)``; features (1, ``dim``, h, w) float32,
    the same for every image of that size (made on first use, then kept).
    """

    def __init__(self, name: str, dim: int, stride: int, seed: int) -> None:
        self.name, self.dim, self.stride, self.seed = name, dim, stride, seed
        self._feats: dict[tuple[int, int], torch.Tensor] = {}

    def spec(self) -> dict[str, object]:
        return {"name": self.name, "dim": self.dim, "stride": self.stride}

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[2:]
        grid = (-(-h // self.stride), -(-w // self.stride))
        if grid not in self._feats:
            g = torch.Generator().manual_seed(self.seed * 1000 + grid[0] * 7 + grid[1])
            self._feats[grid] = torch.randn(1, self.dim, *grid, generator=g)
        return self._feats[grid].expand(images.shape[0], -1, -1, -1)


def random_bank(
    category: str,
    name: str,
    dim: int,
    stride: int,
    n_images: int,
    image_px: int,
    n_parts: int,
    seed: int,
    fg_fraction: float = 0.3,
    bg_fraction: float = 0.5,
) -> PrototypeBank:
    """A bank shaped like a real one: fg then bg, each 1 class + N instance + K parts.

    Vectors are random unit vectors (``dim``). Members are real: random disjoint fg / bg
    cell sets over the (``image_px // stride``)^2 support grid; instance prototypes own
    their image's cells, parts a random partition of all region cells.
    """
    g = torch.Generator().manual_seed(seed)
    gh = gw = image_px // stride
    per_image = gh * gw
    perm = torch.randperm(n_images * per_image, generator=g)
    n_fg = int(fg_fraction * len(perm))
    n_bg = int(bg_fraction * len(perm))
    regions = (perm[:n_fg].sort().values, perm[n_fg : n_fg + n_bg].sort().values)
    members: list[torch.Tensor] = []
    kinds: list[int] = []
    images: list[int] = []
    fg: list[bool] = []
    for is_fg, cells in zip((True, False), regions, strict=True):
        image_of = cells // per_image
        members.append(cells)
        kinds.append(PrototypeKind.CLASS)
        images.append(-1)
        for i in range(n_images):
            members.append(cells[image_of == i])
            kinds.append(PrototypeKind.INSTANCE)
            images.append(i)
        part = torch.randint(n_parts, (len(cells),), generator=g)
        for j in range(n_parts):
            members.append(cells[part == j])
            kinds.append(PrototypeKind.PART)
            images.append(-1)
        fg += [is_fg] * (1 + n_images + n_parts)
    offsets = torch.zeros(len(members) + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(torch.tensor([len(m) for m in members]), 0)
    vectors = F.normalize(torch.randn(len(members), dim, generator=g), dim=1)
    return PrototypeBank(
        category=category,
        extractor=name,
        vectors=vectors,
        foreground=torch.tensor(fg),
        kinds=torch.tensor(kinds, dtype=torch.int8),
        image_index=torch.tensor(images, dtype=torch.int32),
        member_offsets=offsets,
        member_cells=torch.cat(members).long(),
        grid_size=(gh, gw),
        image_size=(image_px, image_px),
    )


def random_categories(
    extractors: Sequence[FixedExtractor | CodedExtractor],
    n_classes: int,
    n_images: int = 32,
    image_px: int = 64,
    n_parts: int = 32,
) -> list[Category]:
    """``n_classes`` categories ``class0..`` with a :func:`random_bank` per extractor
    (deterministic) and a blank support set of ``n_images`` images."""
    empty = np.zeros((n_images, image_px, image_px), dtype=bool)
    support = SupportSet(
        "support",
        np.zeros((n_images, image_px, image_px, 3), dtype=np.uint8),
        np.zeros((n_images, image_px, image_px), dtype=np.float32),
        empty,
        empty,
    )
    cats = []
    for c in range(n_classes):
        banks = {
            ex.name: random_bank(
                f"class{c}", ex.name, ex.dim, ex.stride, n_images, image_px, n_parts, 1000 * c + k
            )
            for k, ex in enumerate(extractors)
        }
        cats.append(Category(f"class{c}", banks, support))
    return cats


def coded_scene(size: tuple[int, int], n_classes: int, n_regions: int, seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8 image of ``n_regions`` rectangles coded with class numbers.

    A pixel's red value is 0 for background or ``1 + class index`` (classes drawn at
    random from ``n_classes``, at most 255); rectangles are random, later ones on top.
    """
    if not 1 <= n_classes <= 255:
        raise ValueError("coded_scene: 1..255 classes")
    rng = np.random.default_rng(seed)
    h, w = size
    img = np.zeros((h, w, 3), dtype=np.uint8)
    for _ in range(n_regions):
        rh, rw = int(rng.integers(h // 8, h // 2)), int(rng.integers(w // 8, w // 2))
        top, left = int(rng.integers(0, h - rh)), int(rng.integers(0, w - rw))
        img[top : top + rh, left : left + rw, 0] = 1 + int(rng.integers(n_classes))
    return img


class CodedExtractor:
    """Features of a :func:`coded_scene`: prototypes of the coded class plus noise.

    Set ``categories`` (what the image's codes index) before use. The cell at grid
    position (i, j) reads the code of the pixel at its centre; code ``c >= 1`` gives a
    foreground prototype of ``categories[c - 1]``, code 0 a background prototype of some
    category (both chosen by a fixed hash of the cell and code), plus Gaussian noise of
    norm about ``noise``. Cost: one gather and one random tensor per call. The result is
    a channels-last view of (B, h, w, dim) cells, the layout the DINO, CLIP and SD
    extractors return (:class:`FixedExtractor` gives the other one, channels-first).
    """

    def __init__(self, name: str, dim: int, stride: int, seed: int, noise: float = 0.5) -> None:
        self.name, self.dim, self.stride, self.seed, self.noise = name, dim, stride, seed, noise
        self.categories: list[Category] = []
        self._table: torch.Tensor | None = None

    def spec(self) -> dict[str, object]:
        return {"name": self.name, "dim": self.dim, "stride": self.stride, "coded": True}

    def _lookup(self) -> torch.Tensor:
        """(n codes, 8, dim): eight candidate vectors per code."""
        if self._table is None:
            rows = []
            g = torch.Generator().manual_seed(self.seed)
            bgs = torch.cat(
                [
                    c.banks[self.name].vectors[~c.banks[self.name].foreground]
                    for c in self.categories
                ]
            )
            rows.append(bgs[torch.randint(len(bgs), (8,), generator=g)])
            for c in self.categories:
                bank = c.banks[self.name]
                fg = bank.vectors[bank.foreground]
                rows.append(fg[torch.randint(len(fg), (8,), generator=g)])
            self._table = torch.stack(rows)
        return self._table

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[2:]
        gh, gw = -(-h // self.stride), -(-w // self.stride)
        ys = ((torch.arange(gh) + 0.5) * h / gh).long().clamp(max=h - 1)
        xs = ((torch.arange(gw) + 0.5) * w / gw).long().clamp(max=w - 1)
        table = self._lookup()
        codes = (images[:, 0][:, ys][:, :, xs] * 255).round().long().clamp(0, len(table) - 1)
        pick = (torch.arange(gh)[:, None] * 31 + torch.arange(gw)[None, :] * 17 + codes) % 8
        feats = table[codes, pick]  # (B, gh, gw, dim)
        g = torch.Generator().manual_seed(self.seed + h * 7 + w)
        noise = torch.randn(feats.shape, generator=g) * (self.noise / self.dim**0.5)
        return (feats + noise).permute(0, 3, 1, 2)  # channels-last, like the real extractors
