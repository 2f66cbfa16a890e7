"""Validation of what visitors type, upload and click. No Gradio here: plain ``ValueError``s.

Every function either returns clean data or raises ``ValueError`` with a message that
says what to do; the app turns those into ``gr.Error`` pop-ups. Conversions that change
an upload (grayscale to RGB, 16-bit to 8-bit, downscaling...) are never silent: they are
returned as human-readable notes that the app shows as warnings.
"""

from __future__ import annotations

import math
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from ovdiff_core.pipeline import clean_category_name

__all__ = [
    "MAX_CATEGORIES",
    "MAX_DECODE_PIXELS",
    "MAX_SIDE",
    "MIN_SIDE",
    "LoadedImage",
    "array_to_rgb",
    "bounded_number",
    "click_point",
    "load_image",
    "load_upload",
    "mask_from_editor",
    "parse_category_names",
    "split_names_leniently",
]

MAX_CATEGORIES = 20  # categories per visitor session (all builds and own photos together)
MAX_SIDE = 1024  # uploads are downscaled so that their long side is at most this, pixels
MIN_SIDE = 8  # smaller uploads are refused, pixels
# Decompression bombs: the most pixels this server decodes for one image (a file's size
# is read from its header, before decoding; JPEGs count at their reduced draft size).
# 48 Mpx is an 8000x6000 photo: at most 4 bytes a pixel while decoding (RGBA or 32-bit),
# so under ~200 MB plus one same-size copy while downscaling; see benchmarks/bench_upload.py.
MAX_DECODE_PIXELS = 48_000_000
MAX_FILE_BYTES = 50 * 1024 * 1024  # refuse larger uploads before decoding them
UPLOAD_CACHE_SIZE = 8  # decoded uploads kept (<= MAX_SIDE^2 * 3 bytes each) by load_upload
_ROWS_PER_CHUNK = 256  # array_to_rgb converts non-8-bit arrays this many rows at a time

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


def _too_many_pixels(width: int, height: int) -> ValueError:
    return ValueError(
        f"The image is {width}x{height} pixels ({width * height / 1e6:.0f} megapixels); "
        f"this server decodes at most {MAX_DECODE_PIXELS / 1e6:.0f} megapixels. Downscale "
        f"it (a long side of {MAX_SIDE} pixels is plenty) and upload it again."
    )


def _open(value: str | os.PathLike[str]) -> tuple[Image.Image, tuple[int, int]]:
    """Open and decode a file; returns the image and its stored (H, W).

    The pixel budget (:data:`MAX_DECODE_PIXELS`) is checked on the size in the file's
    header, before anything is decoded; JPEGs are decoded at a reduced size (``draft``).
    """
    path = Path(value)
    if not path.is_file():
        raise ValueError(f"The upload {path.name!r} could not be found; upload it again.")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise ValueError(
            f"The file is {path.stat().st_size / 2**20:.0f} MB; upload an image under "
            f"{MAX_FILE_BYTES // 2**20} MB."
        )
    try:
        im = Image.open(path)  # reads the header only
        stored = (im.height, im.width)
        if im.format == "JPEG":  # decode huge JPEGs at reduced size straight away
            im.draft("RGB", (MAX_SIDE, MAX_SIDE))
        if im.width * im.height > MAX_DECODE_PIXELS:
            raise _too_many_pixels(stored[1], stored[0])
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


# EXIF orientation tag value -> the transpose that makes the picture upright
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _orientation(im: Image.Image) -> int:
    try:
        value = im.getexif().get(0x0112, 1)
        return int(value) if value in _UPRIGHT else 1
    except (OSError, ValueError, SyntaxError, TypeError):  # broken EXIF: keep as stored
        return 1


def _native_mode(im: Image.Image, notes: list[str]) -> Image.Image:
    """``im`` in a mode that resizes well and takes at most 4 bytes a pixel:
    L, LA, RGB, RGBA, I or F."""
    mode = im.mode
    if mode in ("P", "PA"):
        notes.append("Palette image converted to RGB.")
        return im.convert("RGBA")
    if mode == "1":
        return im.convert("L")
    if mode in ("RGBa", "La"):
        return im.convert(mode[:-1] + "A")
    if mode.startswith("I;16"):
        return im.convert("I")
    if mode in ("L", "LA", "RGB", "RGBA", "I", "F"):
        return im
    notes.append(f"{mode} image converted to RGB.")
    return im.convert("RGB")


def _pil_to_rgb(im: Image.Image, notes: list[str], max_side: int) -> np.ndarray:
    """A decoded PIL image as (H, W, 3) uint8, first frame, upright, long side <= max_side.

    The image is downscaled in its own mode before any array is made, so nothing of the
    full size is ever converted to floats.
    """
    w, h = im.size
    if w * h > MAX_DECODE_PIXELS:
        raise _too_many_pixels(w, h)
    frames = int(getattr(im, "n_frames", 1))
    if frames > 1:
        notes.append(f"The image has {frames} frames; only the first one is used.")
        im.seek(0)
    orientation = _orientation(im)
    im = _native_mode(im, notes)
    s = min(1.0, max_side / max(w, h))
    nw, nh = max(1, round(w * s)), max(1, round(h * s))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.Resampling.LANCZOS, reducing_gap=3.0)
    if orientation != 1:
        im = im.transpose(_UPRIGHT[orientation])
        if orientation >= 5:
            notes.append("The image was rotated upright as its EXIF orientation asks.")
    mode = im.mode
    if mode in ("L", "LA"):
        notes.append("Grayscale image converted to RGB.")
        im = im.convert("RGBA" if mode == "LA" else "RGB")
    if mode in ("I", "F"):
        return array_to_rgb(np.asarray(im), notes)
    arr = np.asarray(im)
    if arr.shape[-1] == 4:
        return _on_white(arr, notes)
    return np.ascontiguousarray(arr, dtype=np.uint8)


def _on_white(rgba: np.ndarray, notes: list[str]) -> np.ndarray:
    """(H, W, 4) uint8 composited on white, in integers (no float copy)."""
    alpha = rgba[..., 3:].astype(np.uint16)
    if int(alpha.min()) < 255:
        notes.append("Transparent pixels were placed on a white background.")
    # round(c * a / 255 + 255 * (1 - a / 255)); the numerator is < 2**16
    out = rgba[..., :3] * alpha
    out += 255 * (255 - alpha) + 127
    out //= 255
    return out.astype(np.uint8)


def _finite_range(arr: np.ndarray) -> tuple[float, float] | None:
    """(min, max) of the finite values of ``arr`` (None if there are none), by row chunks."""
    if arr.dtype.kind in "ui":
        return float(arr.min()), float(arr.max())
    lo, hi = math.inf, -math.inf
    for r in range(0, arr.shape[0], _ROWS_PER_CHUNK):
        block = arr[r : r + _ROWS_PER_CHUNK]
        finite = block[np.isfinite(block)]
        if finite.size:
            lo, hi = min(lo, float(finite.min())), max(hi, float(finite.max()))
    return (lo, hi) if lo <= hi else None


def array_to_rgb(arr: np.ndarray, notes: list[str] | None = None) -> np.ndarray:
    """Convert an array image to (H, W, 3) uint8 RGB, describing changes in ``notes``.

    Accepts (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) arrays of bool, unsigned or signed
    integers (8, 16 or 32 bits) or floats (in [0, 1], else min-max scaled), of at most
    :data:`MAX_DECODE_PIXELS` pixels. Other depths than 8 bits are converted a few rows at
    a time in float32, so the extra memory is about that of the uint8 result.

    Raises:
        ValueError: other shapes, complex or object arrays, non-finite floats only, or
            more pixels than :data:`MAX_DECODE_PIXELS`.
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
    if arr.shape[0] * arr.shape[1] > MAX_DECODE_PIXELS:
        raise _too_many_pixels(arr.shape[1], arr.shape[0])
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    if arr.dtype.kind not in "uif":
        raise ValueError(f"Unsupported pixel type {arr.dtype}; upload an ordinary photo.")
    if arr.dtype != np.uint8:
        span = _finite_range(arr)
        if span is None:
            raise ValueError("The image has no finite pixel values; upload another image.")
        lo, hi = span
        scale, offset = 1.0, 0.0
        if arr.dtype.kind == "f" and lo >= 0.0 and hi <= 1.0:
            scale = 255.0
            notes.append("Floating-point image in [0, 1] converted to 8 bits.")
        elif arr.dtype.kind in "ui" and lo >= 0 and hi <= 255:
            notes.append(f"{arr.dtype} image with values 0..255 converted to 8 bits.")
        elif arr.dtype.kind in "ui" and lo >= 0 and hi <= 65535:
            scale = 1.0 / 257.0
            notes.append("16-bit image reduced to 8 bits per channel.")
        else:
            scale, offset = (255.0 / (hi - lo), lo) if hi > lo else (0.0, lo)
            notes.append(f"Image values {lo:g}..{hi:g} rescaled to 0..255.")
        out = np.empty(arr.shape, dtype=np.uint8)
        for r in range(0, arr.shape[0], _ROWS_PER_CHUNK):
            block = arr[r : r + _ROWS_PER_CHUNK].astype(np.float32)
            if arr.dtype.kind == "f":
                block[~np.isfinite(block)] = offset  # non-finite pixels -> the lowest value
            if offset:
                block -= np.float32(offset)
            block *= np.float32(scale)
            np.rint(block, out=block)
            np.clip(block, 0, 255, out=block)
            out[r : r + _ROWS_PER_CHUNK] = block
        arr = out
    if arr.ndim == 2:
        notes.append("Grayscale image converted to RGB.")
        return np.repeat(arr[..., None], 3, axis=2)
    if arr.shape[2] == 4:
        return _on_white(arr, notes)
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

    Files are checked against :data:`MAX_DECODE_PIXELS` from their header, then decoded
    once and downscaled in their own pixel format before becoming an array, so memory
    stays bounded by the budget (about 4 bytes a budget pixel, twice) whatever the file.

    Args:
        value: a file path (what ``gr.Image(type="filepath")`` gives), a PIL image or a
            numpy array (see :func:`array_to_rgb`).
        max_side: the long side is downscaled to at most this many pixels.

    Returns:
        :class:`LoadedImage` with the converted image and notes on every conversion.

    Raises:
        ValueError: nothing uploaded, not an image, corrupt, too small, or more pixels
            than :data:`MAX_DECODE_PIXELS`.
    """
    if value is None or (isinstance(value, str) and not value):
        raise ValueError("No image: upload a photo or pick one of the examples first.")
    notes: list[str] = []
    stored: tuple[int, int] | None = None
    if isinstance(value, (str, os.PathLike)):
        im, stored = _open(value)
        if min(stored) >= MIN_SIDE:
            image = _pil_to_rgb(im, notes, max_side)
            if (image.shape[0] > image.shape[1]) != (stored[0] > stored[1]):
                stored = (stored[1], stored[0])  # rotated upright from EXIF
    elif isinstance(value, Image.Image):
        stored = (value.height, value.width)
        if min(stored) >= MIN_SIDE:
            image = _pil_to_rgb(value, notes, max_side)
            if (image.shape[0] > image.shape[1]) != (stored[0] > stored[1]):
                stored = (stored[1], stored[0])
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


_UPLOADS: OrderedDict[tuple[str, int, int, int], LoadedImage] = OrderedDict()
_UPLOADS_LOCK = threading.Lock()


def load_upload(value: Any, max_side: int = MAX_SIDE) -> LoadedImage:
    """:func:`load_image`, decoding each uploaded file once.

    The result for a file path is kept in a small LRU (:data:`UPLOAD_CACHE_SIZE`
    entries) keyed by (path, modification time, size, ``max_side``), so the app's quick
    check and the segmentation that follows it share one decode. Failures are not kept.
    Other values (arrays, PIL images) are converted every time.
    """
    if not isinstance(value, (str, os.PathLike)) or not value:
        return load_image(value, max_side)
    try:
        st = os.stat(value)
        key = (os.path.abspath(value), st.st_mtime_ns, st.st_size, max_side)
    except OSError:
        return load_image(value, max_side)  # raises the usual "could not be found"
    with _UPLOADS_LOCK:
        hit = _UPLOADS.get(key)
        if hit is not None:
            _UPLOADS.move_to_end(key)
    if hit is None:
        hit = load_image(value, max_side)
        with _UPLOADS_LOCK:
            _UPLOADS[key] = hit
            while len(_UPLOADS) > UPLOAD_CACHE_SIZE:
                _UPLOADS.popitem(last=False)
    return LoadedImage(hit.image, list(hit.notes), hit.original_size)


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
        fx, fy = (float(v) for v in index)
        if not (math.isfinite(fx) and math.isfinite(fy)):
            raise ValueError("not finite")
        x, y = round(fx), round(fy)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"Click on the segmented image itself (got position {index!r}).") from None
    h, w = size
    if not (0 <= x < w and 0 <= y < h):
        raise ValueError(f"The click (x={x}, y={y}) is outside the {w}x{h} image; click inside it.")
    return x, y


def bounded_number(value: Any, what: str, lo: int, hi: int) -> int:
    """Validate a number from a slider or number box (what the browser sent, unchecked).

    Args:
        value: the number (int, float or numeric string).
        what: its name in the message, e.g. ``"Support-set size"``.
        lo, hi: the allowed range, inclusive.

    Returns:
        ``value`` rounded to the nearest integer.

    Raises:
        ValueError: not a number, NaN, infinite or outside ``lo..hi``.
    """
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        number = math.nan
    if not math.isfinite(number) or not lo <= number <= hi:
        shown = f"{number:g}" if math.isfinite(number) else repr(value)[:40]
        raise ValueError(
            f"{what} must be {lo}..{hi}, got {shown}; set a whole number from {lo} to {hi}."
        )
    return round(number)
