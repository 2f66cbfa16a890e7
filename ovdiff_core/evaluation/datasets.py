"""Dataset readers for the standard public layouts (no mmcv), and the class-name files.

Pascal VOC 2012 (``VOCdevkit/VOC2012``)::

    JPEGImages/<id>.jpg                 RGB photos
    SegmentationClass/<id>.png          palette ("P" mode) PNGs: 0 = background,
                                        1..20 = classes, 255 = object borders (ignored)
    ImageSets/Segmentation/val.txt      one image id per line (1,449 ids for val)

Two variants, as the literature reports them:

* ``voc21``: 20 classes + background (OVDiff's headline numbers).
* ``voc20``: the 20 classes only; background pixels become 255 (ignored), and a model's
  prediction is the best *object* class at each pixel (see :func:`labels_for`).

Pascal Context (:class:`PascalContext`; mmseg's layout, written by
``ovdiff convert context``) in the VOC 2010 folder::

    JPEGImages/<id>.jpg
    SegmentationClassContext/<id>.png    0 = background, 1..59 = names/context59.txt
    ImageSets/SegmentationContext/val.txt (5,105 ids)

* ``context60``: 59 classes + background; ``context59``: background pixels ignored.

COCO-Object (:class:`COCOObject`, written by ``ovdiff convert coco-object``)::

    val2017/<stem>.jpg
    annotations/object_val2017/<stem>.png  0 = background, 1..80 = names/coco-object.txt,
                                           255 = ignored (crowds, if converted so)
    annotations/object_val2017.txt         the image stems (5,000)

Class names come from versioned text files in ``ovdiff_core/evaluation/names/`` (one name
per line in label order, ``#`` comments), with the literature's remaps of the datasets'
spellings (``diningtable -> table``, ``pottedplant -> potted plant``,
``tvmonitor -> monitor``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from ovdiff_core.evaluation.metrics import IGNORE_INDEX

__all__ = [
    "DATASETS",
    "NAME_SETS",
    "COCOObject",
    "Dataset",
    "PascalContext",
    "Sample",
    "VOCSegmentation",
    "class_names",
    "names_version",
    "open_dataset",
    "voc_palette",
]

# named class lists shipped with the package: name -> file in names/
NAME_SETS = {"voc": "voc.txt", "context59": "context59.txt", "coco-object": "coco-object.txt"}


def _names_text(name: str) -> str:
    if name not in NAME_SETS:
        raise ValueError(f"unknown class-name set {name!r}; use one of {sorted(NAME_SETS)}")
    return (
        resources.files("ovdiff_core.evaluation")
        .joinpath("names", NAME_SETS[name])
        .read_text("utf-8")
    )


def class_names(name: str) -> list[str]:
    """The class names of a named set (``voc``, ``context59``, ``coco-object``), without
    background, in label order (label i + 1 on datasets with background)."""
    lines = (line.split("#", 1)[0].strip() for line in _names_text(name).splitlines())
    return [line for line in lines if line]


def names_version(name: str) -> int:
    """The ``# version N`` of a named class list (results record it)."""
    found = re.search(r"#\s*version\s+(\d+)", _names_text(name))
    return int(found.group(1)) if found else 0


def voc_palette(n: int = 256) -> np.ndarray:
    """The Pascal VOC colour map: (n, 3) uint8, label i -> RGB (0 black, 255 cream).

    Colour i spreads the bits of i over the channels, most significant first: bit 3k of i
    goes to bit 7 - k of red, bit 3k + 1 to green, bit 3k + 2 to blue.
    """
    out = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        rgb = [0, 0, 0]
        for k in range(8):
            for ch in range(3):
                if (i >> (3 * k + ch)) & 1:
                    rgb[ch] |= 1 << (7 - k)
        out[i] = rgb
    return out


@dataclass
class Sample:
    """One evaluation image.

    Attributes:
        image_id: the dataset's id (file stem).
        image: (H, W, 3) uint8 RGB.
        label: (H, W) uint8 ground truth; ``0..C-1`` index the dataset's ``class_names``,
            255 = ignored.
    """

    image_id: str
    image: np.ndarray
    label: np.ndarray


def _find_voc_root(root: Path) -> Path:
    for cand in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (cand / "JPEGImages").is_dir() and (cand / "SegmentationClass").is_dir():
            return cand
    raise ValueError(
        f"{root} is not a Pascal VOC 2012 folder: expected JPEGImages/ and SegmentationClass/ "
        "in it (or in VOC2012/ or VOCdevkit/VOC2012/ below it). Download and extract "
        "VOCtrainval_11-May-2012.tar and pass the folder that contains VOCdevkit/"
    )


class VOCSegmentation:
    """Pascal VOC 2012 semantic segmentation from its standard layout.

    Args:
        root: the ``VOC2012`` folder, or a folder with ``VOC2012/`` or
            ``VOCdevkit/VOC2012/`` inside.
        split: image list in ``ImageSets/Segmentation/`` ("val", "train", ...).
        background: True = VOC21 (background is class 0); False = VOC20 (background
            pixels ignored, the 20 classes are labels 0..19).
        limit: keep only the first ``limit`` ids of the list (None = all).

    Attributes:
        names: the 20 class names to build (prompts), in label order.
        class_names: the evaluated classes, in label order (``["background", *names]``
            for VOC21, ``names`` for VOC20).

    Raises:
        ValueError: a missing folder or list, with what to download or fix.
    """

    names_set = "voc"

    def __init__(
        self,
        root: str | Path,
        split: str = "val",
        background: bool = True,
        limit: int | None = None,
    ) -> None:
        self.root = _find_voc_root(Path(root).expanduser())
        self.split = split
        self.background = background
        listing = self.root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not listing.is_file():
            raise ValueError(
                f"no image list {listing}: VOC 2012 ships ImageSets/Segmentation/{{train,val,"
                "trainval}.txt; pass --split with one of those"
            )
        ids = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
        if limit is not None:
            if limit < 1:
                raise ValueError(f"limit must be >= 1, got {limit}")
            ids = ids[:limit]
        self.ids = ids
        self.names = class_names("voc")
        self.class_names = (["background"] if background else []) + self.names

    @property
    def name(self) -> str:
        return "voc21" if self.background else "voc20"

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self)):
            yield self[i]

    def __getitem__(self, index: int) -> Sample:
        image_id = self.ids[index]
        img_path = self.root / "JPEGImages" / f"{image_id}.jpg"
        lab_path = self.root / "SegmentationClass" / f"{image_id}.png"
        for p in (img_path, lab_path):
            if not p.is_file():
                raise ValueError(f"{p} is missing (listed in {self.split}.txt); re-extract VOC")
        with Image.open(img_path) as im:
            image = np.asarray(im.convert("RGB"), dtype=np.uint8)
        label = read_palette_label(lab_path)
        if label.shape != image.shape[:2]:
            raise ValueError(
                f"{image_id}: annotation {label.shape} and image {image.shape[:2]} differ in size"
            )
        bad = (label > 20) & (label != IGNORE_INDEX)
        if bad.any():
            raise ValueError(
                f"{lab_path}: labels {sorted(set(label[bad].tolist()))[:5]} are not VOC classes "
                "(0..20, 255); is this a SegmentationObject (instance) file?"
            )
        if not self.background:
            shifted = label.astype(np.int16) - 1
            shifted[(label == 0) | (label == IGNORE_INDEX)] = IGNORE_INDEX
            label = shifted.astype(np.uint8)
        return Sample(image_id, image, label)


def read_palette_label(path: str | Path) -> np.ndarray:
    """(H, W) uint8 class indices of a palette ("P" mode) PNG annotation.

    Raises:
        ValueError: the PNG is not a palette image (RGB colours would need the palette
            mapped back; VOC's own files are palette PNGs).
    """
    with Image.open(path) as im:
        if im.mode not in ("P", "L"):
            raise ValueError(
                f"{path}: annotation is a {im.mode!r} image; VOC annotations are palette ('P') "
                "PNGs whose pixel values are class indices. Use the original files"
            )
        return np.asarray(im, dtype=np.uint8).copy()


class Dataset(Protocol):
    """What ``ovdiff eval`` needs of a benchmark reader.

    Attributes:
        name: the benchmark's name in results (``voc21``, ``context59``, ...).
        names_set: the class-name file (a key of :data:`NAME_SETS`).
        names: the object classes to build (prompts), in label order.
        class_names: the evaluated classes, in label order.
        background: whether ``class_names[0]`` is ``"background"``.
    """

    names_set: str
    names: list[str]
    class_names: list[str]
    background: bool

    @property
    def name(self) -> str: ...

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Sample: ...

    def __iter__(self) -> Iterator[Sample]: ...


def _read_list(listing: Path, limit: int | None, hint: str) -> list[str]:
    if not listing.is_file():
        raise ValueError(f"no image list {listing}: {hint}")
    ids = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        ids = ids[:limit]
    return ids


def _load_pair(
    img_path: Path, lab_path: Path, n_classes: int, listing: str
) -> tuple[np.ndarray, np.ndarray]:
    """Image (H, W, 3) uint8 and label (H, W) uint8 in 0..n_classes or 255, checked."""
    for p in (img_path, lab_path):
        if not p.is_file():
            raise ValueError(f"{p} is missing (listed in {listing}); re-extract or re-convert")
    with Image.open(img_path) as im:
        image = np.asarray(im.convert("RGB"), dtype=np.uint8)
    label = read_palette_label(lab_path)
    if label.shape != image.shape[:2]:
        raise ValueError(
            f"{img_path.stem}: annotation {label.shape} and image {image.shape[:2]} differ in size"
        )
    bad = (label > n_classes) & (label != IGNORE_INDEX)
    if bad.any():
        raise ValueError(
            f"{lab_path}: labels {sorted(set(label[bad].tolist()))[:5]} are outside "
            f"0..{n_classes} and 255; convert the annotations with `ovdiff convert`"
        )
    return image, label


def _drop_background(label: np.ndarray) -> np.ndarray:
    """Labels 1..C become 0..C-1; background (0) and 255 become 255."""
    shifted = label.astype(np.int16) - 1
    shifted[(label == 0) | (label == IGNORE_INDEX)] = IGNORE_INDEX
    return shifted.astype(np.uint8)


class _LabelFolder:
    """Shared reader: ``ids`` index images and label PNGs of one dataset."""

    names_set = ""
    name = ""
    split = ""
    ids: list[str]
    names: list[str]
    class_names: list[str]
    background: bool

    def _paths(self, image_id: str) -> tuple[Path, Path]:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self)):
            yield self[i]

    def __getitem__(self, index: int) -> Sample:
        image_id = self.ids[index]
        img_path, lab_path = self._paths(image_id)
        image, label = _load_pair(img_path, lab_path, len(self.names), f"{self.split} list")
        if not self.background:
            label = _drop_background(label)
        return Sample(image_id, image, label)


def _find_voc2010(root: Path) -> Path:
    for cand in (root, root / "VOC2010", root / "VOCdevkit" / "VOC2010"):
        if (cand / "JPEGImages").is_dir() and (cand / "SegmentationClassContext").is_dir():
            return cand
    raise ValueError(
        f"{root} is not a converted Pascal Context folder: expected JPEGImages/ and "
        "SegmentationClassContext/ in it (or in VOC2010/ or VOCdevkit/VOC2010/ below it). "
        "Extract VOC 2010 and run `ovdiff convert context --src <context> --dst <VOC2010>`"
    )


class PascalContext(_LabelFolder):
    """Pascal Context (VOC 2010 images, the 59 common classes) in mmseg's layout.

    Args:
        root: the ``VOC2010`` folder, or a folder with ``VOC2010/`` or
            ``VOCdevkit/VOC2010/`` inside, converted by
            :func:`ovdiff_core.evaluation.convert.convert_context`.
        split: list in ``ImageSets/SegmentationContext/`` ("val": 5,105 images).
        background: True = PC60 (background is class 0, as written); False = PC59
            (background pixels ignored, the 59 classes are labels 0..58).
        limit: keep only the first ``limit`` ids (None = all).

    Attributes:
        names: the 59 class names to build (``names/context59.txt``).
        class_names: ``["background", *names]`` (PC60) or ``names`` (PC59).
    """

    names_set = "context59"

    def __init__(
        self,
        root: str | Path,
        split: str = "val",
        background: bool = True,
        limit: int | None = None,
    ) -> None:
        self.root = _find_voc2010(Path(root).expanduser())
        self.split = split
        self.background = background
        self.ids = _read_list(
            self.root / "ImageSets" / "SegmentationContext" / f"{split}.txt",
            limit,
            "`ovdiff convert context` writes train.txt and val.txt; pass --split val",
        )
        self.names = class_names("context59")
        self.class_names = (["background"] if background else []) + self.names
        self.name = "context60" if background else "context59"

    def _paths(self, image_id: str) -> tuple[Path, Path]:
        return (
            self.root / "JPEGImages" / f"{image_id}.jpg",
            self.root / "SegmentationClassContext" / f"{image_id}.png",
        )


class COCOObject(_LabelFolder):
    """COCO-Object: COCO images with the 80 thing classes + background.

    Args:
        root: the COCO folder with ``<split>/`` images and ``annotations/object_<split>/``
            label PNGs, converted by
            :func:`ovdiff_core.evaluation.convert.convert_coco_object`.
        split: ``val2017`` (``val`` is accepted for it) or ``train2017``.
        limit: keep only the first ``limit`` ids (None = all).

    Attributes:
        names: the 80 class names to build (``names/coco-object.txt``).
        class_names: ``["background", *names]``.
    """

    names_set = "coco-object"
    name = "coco-object"
    background = True

    def __init__(self, root: str | Path, split: str = "val2017", limit: int | None = None):
        split = {"val": "val2017", "train": "train2017"}.get(split, split)
        if not re.fullmatch(r"[a-z]+\d{4}", split):
            raise ValueError(f"COCO split must look like 'val2017', got {split!r}")
        self.root = Path(root).expanduser()
        self.split = split
        ann = self.root / "annotations"
        if not (ann / f"object_{split}").is_dir():
            raise ValueError(
                f"{ann / f'object_{split}'} is missing: run `ovdiff convert coco-object "
                f"--src {self.root}` once (it needs annotations/instances_{split}.json)"
            )
        self.ids = _read_list(
            ann / f"object_{split}.txt", limit, "re-run `ovdiff convert coco-object`"
        )
        self.names = class_names("coco-object")
        self.class_names = ["background", *self.names]

    def _paths(self, image_id: str) -> tuple[Path, Path]:
        return (
            self.root / self.split / f"{image_id}.jpg",
            self.root / "annotations" / f"object_{self.split}" / f"{image_id}.png",
        )


# benchmark name -> whether it has a background class
DATASETS: dict[str, bool] = {
    "voc": True,
    "voc21": True,
    "voc20": False,
    "context60": True,
    "context59": False,
    "coco-object": True,
}


def open_dataset(
    name: str, root: str | Path, split: str = "val", limit: int | None = None
) -> Dataset:
    """The reader of benchmark ``name`` (a key of :data:`DATASETS`) at ``root``.

    Raises:
        ValueError: an unknown name, or the reader's error for a wrong folder.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; use one of {sorted(DATASETS)}")
    background = DATASETS[name]
    if name.startswith("voc"):
        return VOCSegmentation(root, split, background=background, limit=limit)
    if name.startswith("context"):
        return PascalContext(root, split, background=background, limit=limit)
    return COCOObject(root, split, limit=limit)
