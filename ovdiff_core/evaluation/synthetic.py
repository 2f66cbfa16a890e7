"""Synthetic benchmarks in the real on-disk formats, painted in the colour world.

:func:`write_synthetic_voc` writes a Pascal VOC 2012 folder (JPEG photos, palette PNG
annotations with VOC's colours and 255 object borders, ``ImageSets/Segmentation`` lists)
whose scenes are painted with :func:`ovdiff_core.testing.paint_scene`: each object is a
box of its class's colour-world colour, aligned to a grid, on a background colour of the
world. A model whose categories come from the same world (:func:`color_world`) can
segment these scenes exactly, so the expected scores are known in advance. Used by the
tests and by ``benchmarks/bench_eval.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ovdiff_core.evaluation.datasets import class_names, voc_palette
from ovdiff_core.testing import ColorGenerator, ColorWorld, paint_scene

Color = tuple[int, int, int]

__all__ = ["SyntheticImage", "color_world", "write_synthetic_voc"]


def _candidates(taken: Sequence[tuple[int, int, int]], spacing: float) -> list[Color]:
    """Colours of the lattice {0, 85, 170, 255}^3 at least ``spacing`` from ``taken``."""
    levels = (0, 85, 170, 255)
    out: list[Color] = []
    for r in levels:
        for g in levels:
            for b in levels:
                c = (r, g, b)
                if all(np.linalg.norm(np.subtract(c, t)) >= spacing for t in taken):
                    out.append(c)
    return out


def color_world(names: Sequence[str], spacing: float = 60.0) -> ColorWorld:
    """The default colour world plus one colour for every name of ``names`` it lacks.

    New names take, in their order in ``names``, the colours of a lattice (0, 85, 170, 255
    per channel) that lie at least ``spacing`` (RGB units) from the world's backgrounds
    and colours: so every name of a vocabulary is told apart from the others and from
    the backgrounds, and scenes painted in this world have known segmentations. Names
    beyond the 40-odd such colours get :class:`~ovdiff_core.testing.ColorGenerator`'s
    colour for unknown names (a hash of the name; possibly close to another).
    A name's colour therefore depends on its vocabulary (cache keys include it).
    """
    world = ColorWorld.default()
    parts: dict[str, list[Color]] = {k: list(v) for k, v in world.parts.items()}
    used = [*world.backgrounds, *(c for cs in parts.values() for c in cs)]
    free = _candidates(used, spacing)
    gen = ColorGenerator(world)
    for n in names:
        if n in parts:
            continue
        if free:
            parts[n] = [free.pop(0)]
        else:
            r, g, b = gen.spec(n)["parts"][0]
            parts[n] = [(int(r), int(g), int(b))]
    return ColorWorld(parts=parts, backgrounds=list(world.backgrounds))


@dataclass
class SyntheticImage:
    """What was written for one image.

    Attributes:
        image_id: file stem.
        label: (H, W) uint8 annotation as written (VOC21 indices, 255 borders).
        painted: (H, W) uint8 VOC21 index of the class actually painted at each pixel
            (no borders): what a perfect model predicts.
        split: "val" or "train".
    """

    image_id: str
    label: np.ndarray
    painted: np.ndarray
    split: str


def _place(
    rng: np.random.Generator, cells: tuple[int, int], n: int, sides: tuple[int, int]
) -> list[tuple[int, ...]]:
    """Up to ``n`` boxes (top, left, h, w) in grid cells, sides in ``sides`` (inclusive),
    at least one free cell apart."""
    ch, cw = cells
    lo, hi = min(sides[0], ch, cw), min(sides[1], ch, cw)
    taken = np.zeros((ch, cw), bool)
    boxes: list[tuple[int, ...]] = []
    for _ in range(500):
        if len(boxes) == n:
            break
        h = int(rng.integers(lo, hi + 1))
        w = int(rng.integers(lo, hi + 1))
        t = int(rng.integers(0, ch - h + 1))
        left = int(rng.integers(0, cw - w + 1))
        if taken[max(0, t - 1) : t + h + 1, max(0, left - 1) : left + w + 1].any():
            continue
        taken[t : t + h, left : left + w] = True
        boxes.append((t, left, h, w))
    return boxes


def write_synthetic_voc(
    root: str | Path,
    world: ColorWorld,
    classes: Sequence[str],
    n_images: int = 6,
    size: tuple[int, int] = (160, 224),
    grid: int = 16,
    border: int = 3,
    max_objects: int = 3,
    box_cells: tuple[int, int] = (3, 4),
    mislabelled: int = 0,
    seed: int = 0,
) -> list[SyntheticImage]:
    """Write a VOC 2012 folder ``root/VOCdevkit/VOC2012`` of colour-world scenes.

    Args:
        root: folder to write into (created).
        world: colour world; every name in ``classes`` must have parts in it (the first
            part colour paints the object).
        classes: VOC class names (as in the ``voc`` name file) that objects are drawn from.
        n_images: images listed in ``val.txt``; one more image goes to ``train.txt`` only.
        size: (H, W) of every image.
        grid: object boxes are multiples of this many pixels and aligned to it.
        border: width in pixels of the 255 band on each side of an object's outline.
        max_objects: objects per image (1..max_objects, distinct classes).
        box_cells: smallest and largest box side in grid cells. Similar sizes keep every
            object through OVDiff's subset pre-filter, which drops an object covering
            less than about 0.4 times the area of the largest one.
        mislabelled: the first ``mislabelled`` val images annotate their first object as
            another class of ``classes`` (the painting is unchanged): known errors.
        seed: seed of the layout.

    Returns:
        One :class:`SyntheticImage` per written image, val images first.
    """
    voc = class_names("voc")
    unknown = [c for c in classes if c not in voc or c not in world.parts]
    if unknown:
        raise ValueError(f"write_synthetic_voc: {unknown} are not VOC names with world colours")
    if len(classes) < 2 and mislabelled:
        raise ValueError("write_synthetic_voc: mislabelled images need two classes at least")
    base = Path(root) / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    h, w = size
    rng = np.random.default_rng(seed)
    palette = voc_palette().ravel().tolist()
    out: list[SyntheticImage] = []
    for k in range(n_images + 1):
        split = "val" if k < n_images else "train"
        image_id = f"2012_{k:06d}"
        n_obj = int(rng.integers(1, min(max_objects, len(classes)) + 1))
        boxes = _place(rng, (h // grid, w // grid), n_obj, box_cells)
        picked = [classes[int(i)] for i in rng.permutation(len(classes))[: len(boxes)]]
        bg = world.backgrounds[int(rng.integers(len(world.backgrounds)))]
        objects = [
            ([world.parts[c][0]], (t * grid, le * grid, bh * grid, bw * grid))
            for c, (t, le, bh, bw) in zip(picked, boxes, strict=True)
        ]
        image, index = paint_scene((h, w), bg, objects, seed=int(rng.integers(2**31)))
        painted = np.zeros((h, w), np.uint8)
        for i, c in enumerate(picked, start=1):
            painted[index == i] = voc.index(c) + 1
        annotated = list(picked)
        if k < mislabelled:
            annotated[0] = classes[(list(classes).index(picked[0]) + 1) % len(classes)]
        label = np.zeros((h, w), np.uint8)
        for (_, (t, le, bh, bw)), c in zip(objects, annotated, strict=True):
            b = border
            label[max(0, t - b) : t + bh + b, max(0, le - b) : le + bw + b] = 255
            label[t + b : t + bh - b, le + b : le + bw - b] = voc.index(c) + 1
        Image.fromarray(image).save(base / "JPEGImages" / f"{image_id}.jpg", quality=95)
        png = Image.fromarray(label)
        png.putpalette(palette)
        png.save(base / "SegmentationClass" / f"{image_id}.png")
        out.append(SyntheticImage(image_id, label, painted, split))
    for split in ("val", "train"):
        ids = [s.image_id for s in out if s.split == split]
        (base / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return out
