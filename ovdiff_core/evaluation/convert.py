"""One-time converters from the downloaded annotation formats to label PNGs our readers load.

No mmcv, Detail API or pycocotools: the formats are read here from their descriptions.

**Pascal Context** (:func:`convert_context`), the ``.mat`` route. Inputs, as downloaded:

* the Context ``trainval.tar.gz``: ``trainval/<id>.mat`` (one per VOC 2010 train/val image,
  variable ``LabelMap``: (H, W) ids of the full 459-class annotation, 0 = unlabelled) and
  ``labels.txt`` (459 lines ``<id>: <name>``);
* VOC 2010 (``VOCtrainval_03-May-2010.tar``): ``JPEGImages/`` and
  ``ImageSets/Main/{train,val}.txt`` (4,998 and 5,105 ids: the Context splits).

Output, mmseg's layout, in the VOC 2010 folder::

    SegmentationClassContext/<id>.png      palette PNG: 0 = background, 1..59 = the 59
                                           classes in the order of names/context59.txt
    ImageSets/SegmentationContext/{train,val}.txt

The 59 classes are found in ``labels.txt`` by name (the dataset's spellings, e.g.
``pottedplant``, ``tvmonitor``; case, spaces and ``/`` ignored); every other id, and 0,
becomes background (0). Since ``labels.txt`` is alphabetical, this equals mmseg's mapping
of the 59 sorted 459-ids to 1..59. The Detail API's ``trainval_merged.json`` is not read.

**COCO-Object** (:func:`convert_coco_object`). Inputs: ``annotations/instances_val2017.json``
and ``val2017/*.jpg``. Output::

    annotations/object_val2017/<file stem>.png   palette PNG: 0 = background, 1..80 = the
                                                 80 thing categories sorted by category id
                                                 (ids 1..90 have gaps), = names/coco-object.txt
    annotations/object_val2017.txt               the image stems in the json's order

Every image of the json gets a PNG (images without annotations are all background).
Instances are painted one after another, the largest (in rasterised pixels) first, so
where instances overlap the **smaller instance wins** (equal areas: the later annotation
in the file wins). Crowd (``iscrowd=1``) regions take their class (as COCO-Stuff's label
maps do) or, with ``crowd="ignore"``, 255 (ignored by the metric). Polygons are filled
with the pixel-centre rule: pixel (row i, column j) is inside when its centre
(x = j + 0.5, y = i + 0.5) is inside the polygon (even-odd rule; COCO coordinates put
pixel j between x = j and x = j + 1), so a box polygon from x0 to x1 covers columns
x0..x1 - 1. RLE masks (``counts`` as a list, or as COCO's compressed string) are decoded
by :func:`decode_rle`.

Every PNG is written to a temporary name and renamed, so an interrupted run leaves no
half-written files; running again rewrites everything.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ovdiff_core.evaluation.datasets import voc_palette
from ovdiff_core.evaluation.metrics import IGNORE_INDEX
from ovdiff_core.stuff import COCO_OBJECT, PASCAL_CONTEXT

__all__ = [
    "ConvertResult",
    "context59_lookup",
    "convert_coco_object",
    "convert_context",
    "decode_rle",
    "fill_polygon",
    "read_context_labels",
]

Progress = Callable[[int, int], None]


@dataclass
class ConvertResult:
    """What a converter wrote.

    Attributes:
        label_dir: folder of the label PNGs.
        lists: the image lists written (split name -> file).
        n_images: label PNGs written.
        skipped: ids listed in a split whose source annotation is missing.
    """

    label_dir: Path
    lists: dict[str, Path]
    n_images: int
    skipped: list[str]


def _save_png(label: np.ndarray, path: Path) -> None:
    """Write a uint8 label map as a VOC-palette PNG, atomically (temp file + rename)."""
    png = Image.fromarray(label.astype(np.uint8), mode="L").convert("P")
    png.putpalette(voc_palette().ravel().tolist())
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png")
    os.close(fd)
    try:
        png.save(tmp, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- Pascal Context


def _norm(name: str) -> str:
    return re.sub(r"[\s/_-]+", "", name.lower())


def read_context_labels(path: str | Path) -> dict[int, str]:
    """Parse Pascal Context's ``labels.txt`` (lines ``<id>: <name>``) into {id: name}.

    Raises:
        ValueError: a missing file or a line that is not ``<id>: <name>``.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(
            f"{path} is missing: it comes with the Context trainval.tar.gz "
            "(459 lines '<id>: <name>')"
        )
    out: dict[int, str] = {}
    for n, line in enumerate(path.read_text("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        found = re.fullmatch(r"\s*(\d+)\s*:\s*(.+?)\s*", line)
        if not found:
            raise ValueError(f"{path}:{n}: expected '<id>: <name>', got {line!r}")
        out[int(found.group(1))] = found.group(2)
    return out


def context59_lookup(labels: dict[int, str]) -> np.ndarray:
    """Lookup table from full-annotation ids to PC60 labels.

    Args:
        labels: ``labels.txt`` as parsed by :func:`read_context_labels`.

    Returns:
        (max id + 1,) uint8: entry i is 1 + the position of id i's name among the 59
        classes (:data:`ovdiff_core.stuff.PASCAL_CONTEXT` order), 0 for every other id.

    Raises:
        ValueError: one of the 59 names is not in ``labels``.
    """
    by_name = {_norm(n): i for i, n in labels.items()}
    missing = [n for n in PASCAL_CONTEXT if _norm(n) not in by_name]
    if missing:
        raise ValueError(
            f"labels.txt lacks the Context-59 classes {missing[:5]}; is it the 459-class "
            "labels.txt of the Context download?"
        )
    lut = np.zeros(max(labels) + 1, dtype=np.uint8)
    for k, name in enumerate(PASCAL_CONTEXT, start=1):
        lut[by_name[_norm(name)]] = k
    return lut


def _find_voc2010(root: Path) -> Path:
    for cand in (root, root / "VOC2010", root / "VOCdevkit" / "VOC2010"):
        if (cand / "JPEGImages").is_dir():
            return cand
    raise ValueError(
        f"{root} is not a VOC 2010 folder: expected JPEGImages/ in it (or in VOC2010/ or "
        "VOCdevkit/VOC2010/ below it). Download VOCtrainval_03-May-2010.tar and extract it"
    )


def convert_context(
    src: str | Path,
    dst: str | Path,
    splits: Sequence[str] = ("train", "val"),
    progress: Progress | None = None,
) -> ConvertResult:
    """Convert Pascal Context's 459-class ``.mat`` files to PC60 label PNGs (see module doc).

    Args:
        src: the extracted Context download: ``trainval/*.mat`` and ``labels.txt``.
        dst: the VOC 2010 folder (``JPEGImages/``, ``ImageSets/Main/``), or a folder with
            ``VOC2010/`` or ``VOCdevkit/VOC2010/`` inside; outputs go there.
        splits: VOC 2010 ``ImageSets/Main`` lists to convert.
        progress: called with (done, total) after each image.

    Raises:
        ValueError: missing inputs, or a ``.mat`` without ``LabelMap``, with what to fix.
    """
    from scipy.io import loadmat

    src = Path(src).expanduser()
    mats = src / "trainval"
    if not mats.is_dir():
        raise ValueError(
            f"{mats} is missing: --src must be the extracted Context trainval.tar.gz "
            "(trainval/*.mat and labels.txt)"
        )
    lut = context59_lookup(read_context_labels(src / "labels.txt"))
    voc = _find_voc2010(Path(dst).expanduser())
    ids: dict[str, list[str]] = {}
    for split in splits:
        listing = voc / "ImageSets" / "Main" / f"{split}.txt"
        if not listing.is_file():
            raise ValueError(
                f"{listing} is missing: the Context splits are VOC 2010's ImageSets/Main "
                "train.txt and val.txt; extract VOCtrainval_03-May-2010.tar"
            )
        ids[split] = [s.split()[0] for s in listing.read_text().splitlines() if s.strip()]
    out_dir = voc / "SegmentationClassContext"
    list_dir = voc / "ImageSets" / "SegmentationContext"
    out_dir.mkdir(parents=True, exist_ok=True)
    list_dir.mkdir(parents=True, exist_ok=True)
    todo = list(dict.fromkeys(i for split in splits for i in ids[split]))
    done: set[str] = set()
    skipped: list[str] = []
    for n, image_id in enumerate(todo, start=1):
        mat = mats / f"{image_id}.mat"
        if not mat.is_file():
            skipped.append(image_id)
            continue
        data = loadmat(mat)
        if "LabelMap" not in data:
            raise ValueError(f"{mat} has no LabelMap variable; is it a Context annotation?")
        full = np.asarray(data["LabelMap"]).astype(np.int64)
        if full.ndim != 2 or (full.size and (full.min() < 0 or full.max() >= lut.size)):
            raise ValueError(f"{mat}: LabelMap must be (H, W) ids of labels.txt")
        _save_png(lut[full], out_dir / f"{image_id}.png")
        done.add(image_id)
        if progress is not None:
            progress(n, len(todo))
    lists = {}
    for split in splits:
        lists[split] = list_dir / f"{split}.txt"
        _write_text(lists[split], "".join(f"{i}\n" for i in ids[split] if i in done))
    return ConvertResult(out_dir, lists, len(done), skipped)


# --------------------------------------------------------------------------- COCO


def decode_rle(rle: dict[str, Any]) -> np.ndarray:
    """Decode a COCO run-length encoding to an (H, W) bool mask.

    ``rle = {"size": [H, W], "counts": ...}``. The counts are run lengths of the mask in
    column-major order (down the first column, then the next), alternating 0s and 1s and
    starting with 0s. ``counts`` is a list of ints (uncompressed RLE, used for crowds) or
    COCO's compressed string: each count is split into 5-bit groups, least significant
    first, each written as the character ``48 + group``, with bit 0x20 set when more
    groups follow; bit 0x10 of the last group is the sign; from the fourth count on, the
    value stored is the difference to the count two places earlier.

    Raises:
        ValueError: malformed size or counts, or runs that do not add up to H * W.
    """
    try:
        h, w = (int(v) for v in rle["size"])
        counts = rle["counts"]
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"RLE must be {{'size': [H, W], 'counts': ...}}, got {rle!r}") from None
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    if isinstance(counts, str):
        runs: list[int] = []
        p = 0
        while p < len(counts):
            x, k, more = 0, 0, True
            while more:
                if p >= len(counts):
                    raise ValueError("RLE counts string ends inside a number")
                c = ord(counts[p]) - 48
                if not 0 <= c < 64:
                    raise ValueError(f"RLE counts string has a bad character {counts[p]!r}")
                x |= (c & 0x1F) << (5 * k)
                more = bool(c & 0x20)
                p += 1
                k += 1
                if not more and c & 0x10:
                    x -= 1 << (5 * k)  # sign-extend
            if len(runs) > 2:
                x += runs[-2]
            runs.append(x)
    else:
        runs = [int(v) for v in counts]
    if any(r < 0 for r in runs) or sum(runs) != h * w:
        raise ValueError(f"RLE runs add up to {sum(runs)} pixels, not {h} x {w}")
    values = np.zeros(len(runs), dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, runs)
    return flat.reshape((w, h)).T.copy()


def fill_polygon(xy: Sequence[float], size: tuple[int, int]) -> np.ndarray:
    """Rasterise one polygon with the pixel-centre rule.

    Args:
        xy: ``[x1, y1, x2, y2, ...]`` vertices in COCO image coordinates (x right, y down;
            pixel column j spans j <= x < j + 1).
        size: (H, W) of the mask.

    Returns:
        (H, W) bool: True where the pixel centre (j + 0.5, i + 0.5) is inside the polygon
        (even-odd rule).
    """
    h, w = size
    pts = np.asarray(xy, dtype=np.float64)
    if pts.size < 6 or pts.size % 2:
        raise ValueError(f"a polygon needs 3+ (x, y) pairs, got {pts.size} numbers")
    pts = pts.reshape(-1, 2)
    x0, y0 = pts[:, 0], pts[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    mask = np.zeros((h, w), dtype=bool)
    top = max(0, int(np.floor(pts[:, 1].min() - 0.5)))
    bottom = min(h - 1, int(np.ceil(pts[:, 1].max())))
    centres = np.arange(w) + 0.5
    for i in range(top, bottom + 1):
        yc = i + 0.5
        crossing = (y0 <= yc) != (y1 <= yc)  # the edge straddles the row's centre line
        if not crossing.any():
            continue
        t = (yc - y0[crossing]) / (y1[crossing] - y0[crossing])
        xs = np.sort(x0[crossing] + t * (x1[crossing] - x0[crossing]))
        inside = (np.searchsorted(xs, centres, side="right") % 2).astype(bool)
        mask[i] = inside
    return mask


def _instance_mask(seg: Any, size: tuple[int, int], where: str) -> np.ndarray:
    if isinstance(seg, list):
        mask = np.zeros(size, dtype=bool)
        for poly in seg:
            mask |= fill_polygon(poly, size)  # an instance is the union of its parts
        return mask
    if isinstance(seg, dict):
        mask = decode_rle(seg)
        if mask.shape != size:
            raise ValueError(f"{where}: RLE size {mask.shape} is not the image's {size}")
        return mask
    raise ValueError(f"{where}: segmentation must be polygons or an RLE dict")


def convert_coco_object(
    src: str | Path,
    dst: str | Path | None = None,
    split: str = "val2017",
    crowd: str = "class",
    progress: Progress | None = None,
) -> ConvertResult:
    """Merge COCO instance masks into COCO-Object label PNGs (see the module doc for rules).

    Args:
        src: the COCO folder: ``annotations/instances_<split>.json`` and ``<split>/``.
        dst: output folder (default ``src``); when another folder, ``dst/<split>`` becomes a
            link to the images so that ``dst`` is a complete dataset root.
        split: ``val2017`` (the benchmark) or ``train2017``.
        crowd: ``"class"`` = crowd regions take their class; ``"ignore"`` = 255.
        progress: called with (done, total) after each image.

    Raises:
        ValueError: missing files, categories that are not COCO's 80, bad segmentations.
    """
    if crowd not in ("class", "ignore"):
        raise ValueError(f"crowd must be 'class' or 'ignore', got {crowd!r}")
    if not re.fullmatch(r"[a-z]+\d{4}", split):
        raise ValueError(f"split must look like 'val2017', got {split!r}")
    src = Path(src).expanduser()
    dst = Path(dst).expanduser() if dst is not None else src
    ann_file = src / "annotations" / f"instances_{split}.json"
    if not ann_file.is_file():
        raise ValueError(
            f"{ann_file} is missing: extract annotations_trainval2017.zip into --src "
            "(it holds annotations/instances_val2017.json)"
        )
    data = json.loads(ann_file.read_text("utf-8"))
    cats = sorted(data["categories"], key=lambda c: int(c["id"]))
    names = [c["name"] for c in cats]
    if names != list(COCO_OBJECT):
        raise ValueError(
            f"{ann_file}: the categories sorted by id are not COCO's 80 things "
            f"(first differences: {[n for n in names if n not in COCO_OBJECT][:5]})"
        )
    label_of = {int(c["id"]): k for k, c in enumerate(cats, start=1)}
    by_image: dict[int, list[dict[str, Any]]] = {}
    for ann in data["annotations"]:
        by_image.setdefault(int(ann["image_id"]), []).append(ann)
    out_dir = dst / "annotations" / f"object_{split}"
    out_dir.mkdir(parents=True, exist_ok=True)
    if dst.resolve() != src.resolve():
        link = dst / split
        if not link.exists():
            link.symlink_to((src / split).resolve(), target_is_directory=True)
    images = data["images"]
    stems: list[str] = []
    for n, info in enumerate(images, start=1):
        stem = Path(str(info["file_name"])).stem
        if not re.fullmatch(r"[\w.-]+", stem):
            raise ValueError(f"{ann_file}: unexpected file name {info['file_name']!r}")
        size = (int(info["height"]), int(info["width"]))
        painted = []
        for order, ann in enumerate(by_image.get(int(info["id"]), [])):
            where = f"annotation {ann.get('id')} of {info['file_name']}"
            if int(ann["category_id"]) not in label_of:
                raise ValueError(f"{where}: unknown category id {ann['category_id']}")
            mask = _instance_mask(ann["segmentation"], size, where)
            value = label_of[int(ann["category_id"])]
            if ann.get("iscrowd") and crowd == "ignore":
                value = IGNORE_INDEX
            painted.append((-int(mask.sum()), order, mask, value))
        label = np.zeros(size, dtype=np.uint8)
        for _, _, mask, value in sorted(painted, key=lambda p: (p[0], p[1])):
            label[mask] = value
        _save_png(label, out_dir / f"{stem}.png")
        stems.append(stem)
        if progress is not None:
            progress(n, len(images))
    listing = dst / "annotations" / f"object_{split}.txt"
    _write_text(listing, "".join(f"{s}\n" for s in stems))
    return ConvertResult(out_dir, {split: listing}, len(stems), [])
