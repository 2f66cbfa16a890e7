"""Synthetic benchmarks in the real on-disk formats, painted in the colour world.

:func:`write_synthetic_voc` writes a Pascal VOC 2012 folder (JPEG photos, palette PNG
annotations with VOC's colours and 255 object borders, ``ImageSets/Segmentation`` lists)
whose scenes are painted with :func:`ovdiff_core.colorworld.paint_scene`: each object is a
box of its class's colour-world colour, aligned to a grid, on a background colour of the
world. A model whose categories come from the same world (:func:`color_world`) can
segment these scenes exactly, so the expected scores are known in advance.
:func:`write_synthetic_context` and :func:`write_synthetic_coco` write the *raw downloads*
of Pascal Context (``.mat`` + ``labels.txt``) and COCO (instances json with polygons and
RLE) for such scenes, with the label maps a correct conversion gives. Used by the
tests and by ``benchmarks/bench_eval.py``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ovdiff_core.colorworld import ColorGenerator, ColorWorld, paint_scene
from ovdiff_core.evaluation.datasets import class_names, voc_palette
from ovdiff_core.stuff import COCO_OBJECT, PASCAL_CONTEXT

Color = tuple[int, int, int]

__all__ = [
    "SyntheticImage",
    "color_world",
    "encode_rle",
    "write_synthetic_coco",
    "write_synthetic_context",
    "write_synthetic_voc",
]


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
    beyond the 40-odd such colours get :class:`~ovdiff_core.colorworld.ColorGenerator`'s
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


# --------------------------------------------------------------------------- Context, COCO

# The real files' facts the synthetic sources reproduce (the converters never read these).
# Pascal Context labels.txt: ids of the 59 common classes among the 459 (alphabetical).
CONTEXT_459_IDS: dict[str, int] = dict(
    zip(
        PASCAL_CONTEXT,
        (2, 9, 18, 19, 22, 23, 25, 31, 33, 34, 44, 45, 46, 59, 65, 68, 72, 80, 85, 98, 104,
         105, 113, 115, 144, 158, 159, 162, 187, 189, 207, 220, 232, 258, 259, 260, 284, 295,
         296, 308, 324, 326, 347, 349, 354, 355, 360, 366, 368, 397, 415, 416, 420, 424, 427,
         440, 445, 454, 458),
        strict=True,
    )
)  # fmt: skip
# COCO instances json: category ids of the 80 things (1..90 without these ten)
COCO_MISSING_IDS = (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)
COCO_CATEGORY_IDS: dict[str, int] = dict(
    zip(COCO_OBJECT, [i for i in range(1, 91) if i not in COCO_MISSING_IDS], strict=True)
)


def _scene(
    rng: np.random.Generator,
    world: ColorWorld,
    classes: Sequence[str],
    size: tuple[int, int],
    grid: int,
    max_objects: int,
    box_cells: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray, list[str], list[tuple[int, int, int, int]]]:
    """One colour-world scene: image (H, W, 3), object index (H, W), classes, pixel boxes."""
    h, w = size
    n_obj = int(rng.integers(1, min(max_objects, len(classes)) + 1))
    cells = _place(rng, (h // grid, w // grid), n_obj, box_cells)
    picked = [classes[int(i)] for i in rng.permutation(len(classes))[: len(cells)]]
    bg = world.backgrounds[int(rng.integers(len(world.backgrounds)))]
    boxes = [(t * grid, le * grid, bh * grid, bw * grid) for t, le, bh, bw in cells]
    objects = [([world.parts[c][0]], box) for c, box in zip(picked, boxes, strict=True)]
    image, index = paint_scene(size, bg, objects, seed=int(rng.integers(2**31)))
    return image, index, picked, boxes


def _lut(index: np.ndarray, values: Sequence[int]) -> np.ndarray:
    return np.array([0, *values], dtype=np.uint8)[index]


def write_synthetic_context(
    root: str | Path,
    world: ColorWorld,
    classes: Sequence[str],
    n_images: int = 6,
    size: tuple[int, int] = (160, 224),
    grid: int = 16,
    max_objects: int = 3,
    box_cells: tuple[int, int] = (3, 4),
    mislabelled: int = 0,
    seed: int = 0,
) -> list[SyntheticImage]:
    """Write Pascal Context's downloads for colour-world scenes, in their real formats.

    Writes ``root/VOCdevkit/VOC2010`` (``JPEGImages/<id>.jpg``,
    ``ImageSets/Main/{train,val}.txt``) and ``root/context`` (``labels.txt``: 459 lines
    ``<id>: <name>`` with the 59 classes at their real ids and other names elsewhere;
    ``trainval/<id>.mat`` with ``LabelMap``: (H, W) uint16 ids). Objects are labelled with
    their class's id; the background with ids of classes outside the 59 (one per image
    half) and a top row of 0 (unlabelled): all become background in PC60.

    Args:
        classes: Context-59 names (``names/context59.txt`` spelling) objects are drawn from.
        Others as :func:`write_synthetic_voc` (no borders: Context has none).

    Returns:
        One :class:`SyntheticImage` per image, val first: ``label`` is the PC60 label map a
        correct conversion gives (0 = background, 1..59), ``painted`` what was painted.
    """
    from scipy.io import savemat

    names = class_names("context59")
    dataset_name = dict(zip(names, PASCAL_CONTEXT, strict=True))
    unknown = [c for c in classes if c not in names or c not in world.parts]
    if unknown:
        raise ValueError(f"write_synthetic_context: {unknown} are not Context-59 world names")
    voc = Path(root) / "VOCdevkit" / "VOC2010"
    ctx = Path(root) / "context"
    for sub in (voc / "JPEGImages", voc / "ImageSets" / "Main", ctx / "trainval"):
        sub.mkdir(parents=True, exist_ok=True)
    ids_59 = {CONTEXT_459_IDS[dataset_name[c]]: dataset_name[c] for c in names}
    lines = [f"{i}: {ids_59.get(i, f'other thing {i}')}" for i in range(1, 460)]
    (ctx / "labels.txt").write_text("\n".join(lines) + "\n")
    others = [i for i in range(1, 460) if i not in ids_59]
    rng = np.random.default_rng(seed)
    out: list[SyntheticImage] = []
    for k in range(n_images + 1):
        split = "val" if k < n_images else "train"
        image_id = f"2010_{k:06d}"
        image, index, picked, _ = _scene(rng, world, classes, size, grid, max_objects, box_cells)
        annotated = list(picked)
        if k < mislabelled:
            annotated[0] = classes[(list(classes).index(picked[0]) + 1) % len(classes)]
        full = np.zeros(size, dtype=np.uint16)
        full[:, : size[1] // 2] = others[int(rng.integers(len(others)))]
        full[:, size[1] // 2 :] = others[int(rng.integers(len(others)))]
        full[0] = 0
        for i, c in enumerate(annotated, start=1):
            full[index == i] = CONTEXT_459_IDS[dataset_name[c]]
        savemat(ctx / "trainval" / f"{image_id}.mat", {"LabelMap": full})
        Image.fromarray(image).save(voc / "JPEGImages" / f"{image_id}.jpg", quality=95)
        label = _lut(index, [names.index(c) + 1 for c in annotated])
        painted = _lut(index, [names.index(c) + 1 for c in picked])
        out.append(SyntheticImage(image_id, label, painted, split))
    for split in ("val", "train"):
        ids = [s.image_id for s in out if s.split == split]
        (voc / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return out


def encode_rle(mask: np.ndarray, compressed: bool = True) -> dict[str, Any]:
    """COCO RLE of an (H, W) bool mask: ``{"size": [H, W], "counts": ...}``.

    Runs of 0s and 1s in column-major order, starting with 0s; ``compressed`` writes
    COCO's string form (see :func:`ovdiff_core.evaluation.convert.decode_rle`), else a list.
    """
    flat = np.asarray(mask, dtype=bool).T.ravel()
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        runs = [0, *runs]
    size = [int(mask.shape[0]), int(mask.shape[1])]
    if not compressed:
        return {"size": size, "counts": runs}
    chars: list[str] = []
    for i, run in enumerate(runs):
        x = run - runs[i - 2] if i > 2 else run
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            chars.append(chr(48 + (c | 0x20 if more else c)))
    return {"size": size, "counts": "".join(chars)}


def write_synthetic_coco(
    root: str | Path,
    world: ColorWorld,
    classes: Sequence[str],
    n_images: int = 6,
    size: tuple[int, int] = (160, 224),
    grid: int = 16,
    max_objects: int = 3,
    box_cells: tuple[int, int] = (3, 4),
    mislabelled: int = 0,
    overlap: bool = False,
    empty: int = 0,
    seed: int = 0,
) -> list[SyntheticImage]:
    """Write COCO's ``val2017/*.jpg`` and ``annotations/instances_val2017.json`` for
    colour-world scenes, in the real formats.

    The json lists COCO's 80 categories with their real (gapped) ids in shuffled order.
    Object j's mask is stored, in turn, as a box polygon, as two polygons (left and right
    halves), as a compressed-string RLE and as a list RLE with ``iscrowd=1``.

    Args:
        classes: COCO-Object names objects are drawn from.
        overlap: image 0 gets one more object inside its first object's box (painted on
            top, listed first in the json): the smaller instance must win.
        empty: this many more val images have no objects and no annotations.
        Others as :func:`write_synthetic_voc`.

    Returns:
        One :class:`SyntheticImage` per image (stem of the jpg), all ``split="val"``:
        ``label`` is the COCO-Object label map a correct conversion gives (0 background,
        1..80; crowds take their class), ``painted`` what was painted.
    """
    names = class_names("coco-object")
    unknown = [c for c in classes if c not in names or c not in world.parts]
    if unknown:
        raise ValueError(f"write_synthetic_coco: {unknown} are not COCO-Object world names")
    base = Path(root)
    (base / "val2017").mkdir(parents=True, exist_ok=True)
    (base / "annotations").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images: list[dict[str, Any]] = []
    anns: list[dict[str, Any]] = []
    out: list[SyntheticImage] = []
    style = 0
    h, w = size
    for k in range(n_images + empty):
        image_id = 1000 + 7 * k
        stem = f"{image_id:012d}"
        if k < n_images:
            image, index, picked, boxes = _scene(
                rng, world, classes, size, grid, max_objects, box_cells
            )
        else:
            bg = world.backgrounds[int(rng.integers(len(world.backgrounds)))]
            image, index = paint_scene(size, bg, [], seed=int(rng.integers(2**31)))
            picked, boxes = [], []
        if k == 0 and overlap:
            t, le, bh, bw = boxes[0]
            inner = (t + bh // 4, le + bw // 4, bh // 2, bw // 2)
            extra = classes[(list(classes).index(picked[0]) + 1) % len(classes)]
            image[inner[0] : inner[0] + inner[2], inner[1] : inner[1] + inner[3]] = world.parts[
                extra
            ][0]
            index[inner[0] : inner[0] + inner[2], inner[1] : inner[1] + inner[3]] = len(boxes) + 1
            picked, boxes = [*picked, extra], [*boxes, inner]
        annotated = list(picked)
        if k < mislabelled:
            annotated[0] = classes[(list(classes).index(picked[0]) + 1) % len(classes)]
        order = list(range(len(boxes)))
        if k == 0 and overlap:
            order = [order[-1], *order[:-1]]  # the inner object comes first in the file
        for j in order:
            t, le, bh, bw = boxes[j]
            x0, y0, x1, y1 = le, t, le + bw, t + bh
            crowd = 0
            seg: Any
            if style % 4 == 0:
                seg = [[x0, y0, x1, y0, x1, y1, x0, y1]]
            elif style % 4 == 1:
                xm = le + bw // 2
                seg = [[x0, y0, xm, y0, xm, y1, x0, y1], [xm, y0, x1, y0, x1, y1, xm, y1]]
            else:
                mask = np.zeros(size, dtype=bool)
                mask[t : t + bh, le : le + bw] = True
                seg = encode_rle(mask, compressed=style % 4 == 2)
                crowd = int(style % 4 == 3)
            style += 1
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": image_id,
                    "category_id": COCO_CATEGORY_IDS[annotated[j]],
                    "segmentation": seg,
                    "area": float(bh * bw),
                    "bbox": [x0, y0, bw, bh],
                    "iscrowd": crowd,
                }
            )
        Image.fromarray(image).save(base / "val2017" / f"{stem}.jpg", quality=95)
        images.append({"id": image_id, "file_name": f"{stem}.jpg", "height": h, "width": w})
        label = _lut(index, [names.index(c) + 1 for c in annotated])
        painted = _lut(index, [names.index(c) + 1 for c in picked])
        out.append(SyntheticImage(stem, label, painted, "val"))
    cats = [{"id": COCO_CATEGORY_IDS[n], "name": n, "supercategory": "thing"} for n in COCO_OBJECT]
    cats = [cats[int(i)] for i in rng.permutation(len(cats))]
    data = {"images": images, "annotations": anns, "categories": cats}
    (base / "annotations" / "instances_val2017.json").write_text(json.dumps(data))
    return out
