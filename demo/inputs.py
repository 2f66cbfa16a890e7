"""Validation of what visitors type, upload and click. No Gradio here: plain ``ValueError``s.

Every function either returns clean data or raises ``ValueError`` with a message that
says what to do; the app turns those into ``gr.Error`` pop-ups. Conversions that change
an upload (grayscale to RGB, 16-bit to 8-bit, downscaling...) are never silent: they are
returned as human-readable notes that the app shows as warnings.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ovdiff_core.pipeline import clean_category_name

__all__ = [
    "MAX_CATEGORIES",
    "MAX_SIDE",
    "MIN_SIDE",
    "LoadedImage",
    "click_point",
    "load_image",
    "mask_from_editor",
    "parse_category_names",
    "split_names_leniently",
]

MAX_CATEGORIES = 20  # categories per build / segmentation
MAX_SIDE = 1024  # uploads are downscaled so that their long side is at most this, pixels
MIN_SIDE = 8  # smaller uploads are refused, pixels
MAX_PIXELS = 200_000_000  # decoding refused beyond this (decompression bombs)
MAX_FILE_BYTES = 50 * 1024 * 1024  # refuse larger uploads before decoding them

_SEPARATORS = re.compile(r"[,;\n]")


def split_names_leniently(text: str | None) -> list[str]:
    """Names in ``text`` for live UI hints (never raises): split, cleaned, deduplicated.

    Invalid entries are skipped; use :func:`parse_category_names` before acting.
    """
    out: list[str] = []
    seen: set[str] = set()
    for part in _SEPARATORS.split(text or ""):
        try:
            name = clean_category_name(part)
        except ValueError:
            continue
        if name.lower() not in seen:
            seen.add(name.lower())
            out.append(name)
    return out


def parse_category_names(text: str | None, limit: int = MAX_CATEGORIES) -> list[str]:
    """Parse a comma-separated list of category names.

    Commas, semicolons and new lines separate names; whitespace inside a name is collapsed
    (``"potted   plant"`` -> ``"potted plant"``). Separators at the very end are allowed
    (``"cat, dog,"``); an empty entry in the middle is an error.

    Returns:
        1..``limit`` distinct names (case-insensitively distinct), in the order typed.

    Raises:
        ValueError: no names, an empty entry, a duplicate, an invalid name (see
            :func:`ovdiff_core.pipeline.clean_category_name`) or more than ``limit`` names.
    """
    parts = _SEPARATORS.split(text or "")
    while parts and not parts[-1].strip():
        parts.pop()
    if not parts:
        raise ValueError("No categories: type names separated by commas, e.g. 'cat, sofa, lamp'.")
    names: list[str] = []
    first_seen: dict[str, int] = {}
    for i, part in enumerate(parts, start=1):
        if not part.strip():
            raise ValueError(
                f"Category {i} is empty (two commas in a row?): remove the extra separator."
            )
        try:
            name = clean_category_name(part)
        except ValueError as err:
            raise ValueError(f"Category {i} ({part.strip()[:40]!r}...): {err}") from None
        key = name.lower()
        if key in first_seen:
            raise ValueError(
                f"'{name}' is listed twice (categories {first_seen[key]} and {i}): "
                "remove the duplicate."
            )
        first_seen[key] = i
        names.append(name)
    if len(names) > limit:
        raise ValueError(
            f"{len(names)} categories is too many: use at most {limit} at a time "
            "(every category costs a support set and its prototypes)."
        )
    return names


@dataclass
class LoadedImage:
    """An upload converted to the form the model takes.

    Attributes:
        image: (H, W, 3) uint8 RGB, long side <= ``MAX_SIDE``.
        notes: what was changed on the way, one sentence each (empty if nothing).
        original_size: (H, W) of the upload before any downscaling.
    """

    image: np.ndarray
    notes: list[str] = field(default_factory=list)
    original_size: tuple[int, int] = (0, 0)


def _open(value: str | os.PathLike[str]) -> tuple[Image.Image, tuple[int, int]]:
    """Open and decode a file; returns the image and its stored (H, W)."""
    path = Path(value)
    if not path.is_file():
        raise ValueError(f"The upload {path.name!r} could not be found; upload it again.")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise ValueError(
            f"The file is {path.stat().st_size / 2**20:.0f} MB; upload an image under "
            f"{MAX_FILE_BYTES // 2**20} MB."
        )
    try:
        im = Image.open(path)
        if im.width * im.height > MAX_PIXELS:
            raise ValueError(
                f"The image is {im.width}x{im.height} pixels, too large to decode; "
                f"upload one under {MAX_PIXELS // 1_000_000} megapixels."
            )
        stored = (im.height, im.width)
        if im.format == "JPEG":  # decode huge JPEGs at reduced size straight away
            im.draft("RGB", (MAX_SIDE, MAX_SIDE))
        im.load()
    except (UnidentifiedImageError, Image.DecompressionBombError) as err:
        raise ValueError(
            f"{path.name!r} is not an image this app can read ({type(err).__name__}); "
            "upload a PNG, JPEG or WebP photo."
        ) from None
    except (OSError, SyntaxError, EOFError) as err:
        raise ValueError(
            f"{path.name!r} looks corrupt or truncated ({err}); upload an intact PNG, JPEG "
            "or WebP photo."
        ) from None
    return im, stored


def _to_rgb_array(im: Image.Image, notes: list[str]) -> np.ndarray:
    frames = int(getattr(im, "n_frames", 1))
    if frames > 1:
        notes.append(f"The image has {frames} frames; only the first one is used.")
        im.seek(0)
    try:
        transposed = ImageOps.exif_transpose(im)
    except (OSError, ValueError, SyntaxError):  # broken EXIF: keep the pixels as stored
        transposed = None
    if transposed is not None and transposed.size != im.size:
        notes.append("The image was rotated upright as its EXIF orientation asks.")
    im = transposed if transposed is not None else im
    mode = im.mode
    if mode == "P" or mode == "PA":
        im = im.convert("RGBA")
        notes.append("Palette image converted to RGB.")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "La", "RGBa"):
        arr = np.asarray(im.convert("RGBA"), dtype=np.float64)
        alpha = arr[..., 3:] / 255.0
        if float(alpha.min()) < 1.0:
            notes.append("Transparent pixels were placed on a white background.")
        rgb = arr[..., :3] * alpha + 255.0 * (1.0 - alpha)
        if mode in ("LA", "La"):
            notes.append("Grayscale image converted to RGB.")
        return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    if mode in ("1", "L"):
        notes.append("Grayscale image converted to RGB.")
        return np.asarray(im.convert("RGB"), dtype=np.uint8)
    if mode.startswith("I") or mode == "F":
        return array_to_rgb(np.asarray(im), notes)
    if mode != "RGB":
        notes.append(f"{mode} image converted to RGB.")
        im = im.convert("RGB")
    return np.asarray(im, dtype=np.uint8)


def array_to_rgb(arr: np.ndarray, notes: list[str] | None = None) -> np.ndarray:
    """Convert an array image to (H, W, 3) uint8 RGB, describing changes in ``notes``.

    Accepts (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) arrays of bool, unsigned or signed
    integers (8, 16 or 32 bits) or floats (in [0, 1], else min-max scaled).

    Raises:
        ValueError: other shapes, complex or object arrays, or non-finite floats only.
    """
    notes = notes if notes is not None else []
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise ValueError(
            f"An image must be (H, W), (H, W, 3) or (H, W, 4); got shape {arr.shape}. "
            "Upload an ordinary photo."
        )
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    if arr.dtype.kind not in "uif":
        raise ValueError(f"Unsupported pixel type {arr.dtype}; upload an ordinary photo.")
    if arr.dtype != np.uint8:
        data = arr.astype(np.float64)
        finite = np.isfinite(data)
        if not finite.any():
            raise ValueError("The image has no finite pixel values; upload another image.")
        data = np.where(finite, data, 0.0)
        lo, hi = float(data.min()), float(data.max())
        if arr.dtype.kind == "f" and lo >= 0.0 and hi <= 1.0:
            data = data * 255.0
            notes.append("Floating-point image in [0, 1] converted to 8 bits.")
        elif arr.dtype.kind in "ui" and lo >= 0 and hi <= 255:
            notes.append(f"{arr.dtype} image with values 0..255 converted to 8 bits.")
        elif arr.dtype.kind in "ui" and lo >= 0 and hi <= 65535:
            data = data / 257.0
            notes.append("16-bit image reduced to 8 bits per channel.")
        else:
            data = (data - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(data)
            notes.append(f"Image values {lo:g}..{hi:g} rescaled to 0..255.")
        arr = np.clip(np.rint(data), 0, 255).astype(np.uint8)
    if arr.ndim == 2:
        notes.append("Grayscale image converted to RGB.")
        return np.repeat(arr[..., None], 3, axis=2)
    if arr.shape[2] == 4:
        alpha = arr[..., 3:].astype(np.float64) / 255.0
        if float(alpha.min()) < 1.0:
            notes.append("Transparent pixels were placed on a white background.")
        rgb = arr[..., :3] * alpha + 255.0 * (1.0 - alpha)
        return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(arr)


def _downscale(
    image: np.ndarray, max_side: int, notes: list[str], stored: tuple[int, int]
) -> np.ndarray:
    h, w = image.shape[:2]
    if max(h, w) <= max_side and (h, w) == stored:
        return image
    s = min(1.0, max_side / max(h, w))
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    notes.append(
        f"The image was downscaled from {stored[1]}x{stored[0]} to {nw}x{nh} pixels "
        f"(limit {max_side})."
    )
    if (nh, nw) == (h, w):
        return image
    return np.asarray(Image.fromarray(image).resize((nw, nh), Image.Resampling.LANCZOS))


def load_image(value: Any, max_side: int = MAX_SIDE) -> LoadedImage:
    """Turn an upload into an (H, W, 3) uint8 RGB array the model can take.

    Args:
        value: a file path (what ``gr.Image(type="filepath")`` gives), a PIL image or a
            numpy array (see :func:`array_to_rgb`).
        max_side: the long side is downscaled to at most this many pixels.

    Returns:
        :class:`LoadedImage` with the converted image and notes on every conversion.

    Raises:
        ValueError: nothing uploaded, not an image, corrupt, too small, or too large to
            decode.
    """
    if value is None or (isinstance(value, str) and not value):
        raise ValueError("No image: upload a photo or pick one of the examples first.")
    notes: list[str] = []
    stored: tuple[int, int] | None = None
    if isinstance(value, (str, os.PathLike)):
        im, stored = _open(value)
        image = _to_rgb_array(im, notes)
        if (image.shape[0] > image.shape[1]) != (stored[0] > stored[1]):
            stored = (stored[1], stored[0])  # rotated upright from EXIF
    elif isinstance(value, Image.Image):
        image = _to_rgb_array(value, notes)
    elif isinstance(value, np.ndarray):
        image = array_to_rgb(value, notes)
    else:
        raise ValueError(
            f"Cannot read an image from a {type(value).__name__}; upload a PNG, JPEG or WebP."
        )
    h, w = stored or image.shape[:2]
    if min(h, w) < MIN_SIDE:
        raise ValueError(
            f"The image is only {w}x{h} pixels; upload one at least {MIN_SIDE} pixels on each side."
        )
    image = _downscale(image, max_side, notes, (h, w))
    if not image.flags.writeable or not image.flags.c_contiguous:
        image = np.array(image, order="C")  # torch.from_numpy wants writable memory
    return LoadedImage(image, notes, (h, w))


def mask_from_editor(value: Any, size: tuple[int, int]) -> np.ndarray | None:
    """Foreground painted in a ``gr.ImageEditor`` (numpy type), as an (H, W) bool mask.

    Args:
        value: the editor's value: a dict with ``"layers"`` (list of (h, w, 4) uint8
            RGBA arrays; painted pixels have alpha > 0), or None.
        size: (H, W) the mask must have (the photo's size after :func:`load_image`);
            layers of another size are resized with nearest neighbours.

    Returns:
        The painted pixels, or None when nothing was painted.
    """
    if not isinstance(value, dict):
        return None
    mask: np.ndarray | None = None
    for layer in value.get("layers") or []:
        arr = np.asarray(layer)
        if arr.ndim != 3 or arr.shape[2] < 4:
            continue
        painted = arr[..., 3] > 0
        if not painted.any():
            continue
        if painted.shape != tuple(size):
            im = Image.fromarray(painted.astype(np.uint8) * 255)
            painted = np.asarray(im.resize((size[1], size[0]), Image.Resampling.NEAREST)) > 0
        mask = painted if mask is None else (mask | painted)
    return mask


def click_point(index: Sequence[Any] | None, size: tuple[int, int] | None) -> tuple[int, int]:
    """Validate a click on an image.

    Args:
        index: ``gr.SelectData.index`` of a ``gr.Image`` click: [x, y] in the displayed
            image's original pixels (x = column, y = row).
        size: (H, W) of the segmented image, or None if nothing has been segmented yet.

    Returns:
        (x, y) integer pixel coordinates inside the image.

    Raises:
        ValueError: nothing segmented yet, a malformed index or a point outside the image.
    """
    if size is None:
        raise ValueError("Nothing to trace yet: segment an image first, then click on the result.")
    if (
        index is None
        or isinstance(index, (str, bytes))
        or not isinstance(index, Sequence)
        or len(index) != 2
    ):
        raise ValueError(f"Click on the segmented image itself (got position {index!r}).")
    try:
        x, y = (round(float(v)) for v in index)
    except (TypeError, ValueError):
        raise ValueError(f"Click on the segmented image itself (got position {index!r}).") from None
    h, w = size
    if not (0 <= x < w and 0 <= y < h):
        raise ValueError(f"The click (x={x}, y={y}) is outside the {w}x{h} image; click inside it.")
    return x, y
