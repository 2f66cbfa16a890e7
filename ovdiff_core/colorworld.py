"""The colour world: the ``color`` backend, a deterministic world without networks.

For tests, demos without models, and teaching.

In this world a category is a set of *part colours* and every image is a painting of
coloured regions. :class:`ColorExtractor` turns colours into features with random Fourier
features of a Gaussian kernel, so features of equal colours match (cosine ~1) and those of
distant colours are nearly orthogonal: exactly the structure OVDiff relies on, with known
ground truth. :class:`ColorGenerator` paints support images of a category's parts with
exact masks; :class:`ColorScorer` plays CLIP for the pre-filter. Nothing here downloads or
learns anything.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ovdiff_core.types import SupportSet

__all__ = [
    "ColorExtractor",
    "ColorGenerator",
    "ColorScorer",
    "ColorWorld",
    "paint_scene",
]

Color = tuple[int, int, int]


@dataclass
class ColorWorld:
    """Categories as part colours, plus background colours.

    Attributes:
        parts: ``{category: [part colour, ...]}`` RGB uint8 triples.
        backgrounds: colours that belong to no category.
    """

    parts: dict[str, list[Color]]
    backgrounds: list[Color] = field(default_factory=lambda: [(40, 40, 40), (200, 200, 200)])

    @staticmethod
    def default() -> ColorWorld:
        return ColorWorld(
            parts={
                "cat": [(230, 120, 20), (120, 60, 10)],
                "sofa": [(20, 60, 220), (90, 20, 160)],
                "lamp": [(240, 240, 40)],
                "grass": [(30, 170, 40)],
            },
            backgrounds=[(40, 40, 40), (200, 200, 200), (150, 110, 140)],
        )


def paint_scene(
    size: tuple[int, int],
    background: Color,
    objects: Sequence[tuple[Sequence[Color], tuple[int, int, int, int]]],
    noise: float = 4.0,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Paint rectangles made of vertical part stripes on a flat background.

    Args:
        size: (H, W).
        objects: ``(part colours, (top, left, height, width))``; an object's box is split
            into equal vertical stripes, one per part colour, left to right.
        noise: standard deviation of Gaussian pixel noise (0..255 units).

    Returns:
        image (H, W, 3) uint8, and the object-index map (H, W) int64 (0 = background,
        i = objects[i - 1]).
    """
    h, w = size
    rng = np.random.default_rng(seed)
    img = np.empty((h, w, 3), dtype=np.float64)
    img[:] = background
    index = np.zeros((h, w), dtype=np.int64)
    for k, (colors, (top, left, bh, bw)) in enumerate(objects, start=1):
        edges = np.linspace(left, left + bw, len(colors) + 1).round().astype(int)
        for c, (a, b) in zip(colors, pairwise(edges), strict=True):
            img[top : top + bh, a:b] = c
        index[top : top + bh, left : left + bw] = k
    img += rng.normal(0.0, noise, img.shape)
    return img.clip(0, 255).astype(np.uint8), index


class ColorExtractor:
    """Feature extractor of the colour world (satisfies ``FeatureExtractor``).

    A cell's feature is the random-Fourier-feature embedding of its mean colour; the
    inner product of two embeddings approximates ``exp(-|a - b|^2 * bandwidth^2 / 2)`` for
    colours a, b scaled to [0, 1].

    Args:
        name: extractor name.
        stride: cell size in pixels.
        dim: feature dimension.
        bandwidth: kernel bandwidth; 8 makes colours 0.4 apart nearly orthogonal.
        seed: seed of the random projection.
    """

    def __init__(
        self,
        name: str = "color",
        stride: int = 8,
        dim: int = 64,
        bandwidth: float = 8.0,
        seed: int = 0,
    ) -> None:
        self.name = name
        self.stride = stride
        self.dim = dim
        self.bandwidth = bandwidth
        self.seed = seed
        gen = torch.Generator().manual_seed(seed)
        self._w = torch.randn(dim // 2, 3, generator=gen) * bandwidth
        self.calls = 0  # number of forward calls (tests count model runs)

    def spec(self) -> dict[str, Any]:
        return {
            "type": "color",
            "name": self.name,
            "stride": self.stride,
            "dim": self.dim,
            "bandwidth": self.bandwidth,
            "seed": self.seed,
        }

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float in [0, 1] -> (B, dim, ceil(H / stride), ceil(W / stride))."""
        self.calls += 1
        h, w = images.shape[2:]
        gh, gw = max(1, -(-h // self.stride)), max(1, -(-w // self.stride))
        mean = F.adaptive_avg_pool2d(images.float(), (gh, gw))  # (B, 3, gh, gw)
        proj = torch.einsum("kc,bchw->bkhw", self._w, mean)
        return torch.cat([proj.cos(), proj.sin()], 1) / (self.dim // 2) ** 0.5


class ColorGenerator:
    """Support-set generator of the colour world (satisfies ``SupportGenerator``).

    Each support image shows the category's parts as one striped rectangle at a random
    place on a random background colour; its attribution is the object (softened at the
    border), foreground the object, background everything at least ``margin`` px away.

    Args:
        world: the colour world.
        n_images: support images per category.
        batch_size: images per yielded batch.
        size: (H, W) of support images.
        seed: base seed (combined with a hash of the category name).
        margin: background starts this many pixels away from the object.
        align: object boxes snap to multiples of this many pixels (use the extractors'
            stride so that no feature cell mixes object and background colours).
    """

    def __init__(
        self,
        world: ColorWorld,
        n_images: int = 6,
        batch_size: int = 2,
        size: tuple[int, int] = (64, 64),
        seed: int = 0,
        margin: int = 4,
        align: int = 8,
    ) -> None:
        self.world = world
        self.n_images = n_images
        self.batch_size = batch_size
        self.size = size
        self.seed = seed
        self.margin = margin
        self.align = align
        self.generated = 0  # images generated so far (tests check cache hits)

    def spec(self, category: str) -> dict[str, Any]:
        return {
            "type": "color",
            "category": category,
            "parts": [list(c) for c in self._parts(category)],
            "n_images": self.n_images,
            "size": list(self.size),
            "seed": self.seed,
            "margin": self.margin,
            "align": self.align,
        }

    def _parts(self, category: str) -> list[Color]:
        if category in self.world.parts:
            return self.world.parts[category]
        rng = np.random.default_rng(zlib.crc32(category.encode("utf-8")))
        r, g, b = (int(v) for v in rng.integers(0, 256, 3))
        return [(r, g, b)]

    def _one(self, category: str, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        h, w = self.size
        rng = np.random.default_rng([self.seed, zlib.crc32(category.encode("utf-8")), i])
        a = self.align
        bh = a * int(rng.integers(max(1, h // (3 * a)), h // (2 * a) + 1))
        bw = a * int(rng.integers(max(1, w // (3 * a)), w // (2 * a) + 1))
        top = a * int(rng.integers(0, (h - bh) // a + 1))
        left = a * int(rng.integers(0, (w - bw) // a + 1))
        bgs = self.world.backgrounds
        bg = bgs[int(rng.integers(len(bgs)))]
        img, index = paint_scene(
            (h, w),
            bg,
            [(self._parts(category), (top, left, bh, bw))],
            seed=int(rng.integers(2**31)),
        )
        fg = index == 1
        yy, xx = np.mgrid[:h, :w]
        dy = np.maximum(np.maximum(top - yy, yy - (top + bh - 1)), 0)
        dx = np.maximum(np.maximum(left - xx, xx - (left + bw - 1)), 0)
        dist = np.maximum(dy, dx)
        attribution = np.clip(1.0 - dist / (2.0 * self.margin), 0.0, 1.0).astype(np.float32)
        bgmask = dist >= self.margin
        return img, attribution, fg, bgmask

    def generate(self, category: str) -> Iterator[SupportSet]:
        spec = self.spec(category)
        for start in range(0, self.n_images, self.batch_size):
            items = [
                self._one(category, i)
                for i in range(start, min(start + self.batch_size, self.n_images))
            ]
            self.generated += len(items)
            yield SupportSet(
                category=category,
                images=np.stack([t[0] for t in items]),
                attributions=np.stack([t[1] for t in items]),
                foreground=np.stack([t[2] for t in items]),
                background=np.stack([t[3] for t in items]),
                settings=spec,
            )


class ColorScorer:
    """CLIP stand-in for the pre-filter (satisfies ``ImageTextScorer``).

    The image is the vector of per-category pixel fractions (pixels within ``tolerance``
    of one of its part colours); a prompt "a X and a Y" is the indicator vector of the
    named categories; the score is their cosine.
    """

    def __init__(self, world: ColorWorld, tolerance: float = 40.0) -> None:
        self.world = world
        self.tolerance = tolerance

    def presence(self, image: np.ndarray) -> dict[str, float]:
        px = image.reshape(-1, 3).astype(np.float64)
        out = {}
        for name, colors in self.world.parts.items():
            d = np.min([np.linalg.norm(px - np.array(c), axis=1) for c in colors], axis=0)
            out[name] = float((d < self.tolerance).mean())
        return out

    def image_text_scores(self, image: np.ndarray, texts: Sequence[str]) -> np.ndarray:
        p = self.presence(image)
        norm = float(np.sqrt(sum(v * v for v in p.values()))) or 1.0
        out = []
        for t in texts:
            named = [n.strip() for n in re.split(r"\band\b", t)]
            named = [re.sub(r"^an? ", "", n) for n in named]
            vals = [p.get(n, 0.0) for n in named]
            out.append(sum(vals) / (np.sqrt(len(vals)) * norm))
        return np.asarray(out, dtype=np.float32)
