"""Stage 3 as it was before issue 8 (commit b517b8e), kept verbatim for side-by-side
benchmarks: dense float64 upsampling of every class map, full score maps and float16
similarity maps of every prototype kept in the result.

Stage 3: segment a target image by nearest-prototype matching.

How a score is made (and why a click can be explained exactly):

1. The target is resized so that its short side is ``config.short_side`` ("processed"
   image). Views: the whole processed image, plus square sliding windows.
2. For every view and every extractor, each feature cell's cosine similarity to every
   prototype of the kept classes is computed; per label channel (0 = background, the union
   of the kept classes' background prototypes; c >= 1 = class c's foreground prototypes)
   the maximum is kept together with the prototype that attained it. Values <= the score
   floor become 0.
3. Each view's cell maps are interpolated bilinearly (cell centres, edge-clamped, like
   ``align_corners=False``) straight onto the *input* pixels whose centres fall inside
   the view, using separable interpolation matrices, summed, and divided by the number of
   (view, extractor) pairs covering the pixel.

So every score at every pixel is a weighted sum of single-prototype cosines at single
cells; :mod:`ovdiff_core.trace` recomputes that sum for one pixel from the per-cell
records kept here and names the prototype that contributed most.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ovdiff_core.config import SegmentConfig
from ovdiff_core.prefilter import PrefilterResult, prefilter
from ovdiff_core.protocols import FeatureExtractor, ImageTextScorer
from ovdiff_core.types import Category, PrototypeBank

__all__ = ["ScoringSet", "Segmentation", "ViewRecord", "segment"]

# Longest accepted side ratio: the short side is resized to 448 px, so a 2x1000 image
# would otherwise become 448x224,000 px.
MAX_ASPECT = 10


@dataclass
class ViewRecord:
    """One (view, extractor) pass.

    Attributes:
        extractor: extractor name.
        box: (top, left, height, width) of the view in processed-image pixels.
        values: (C + 1, h, w) float32; per label channel and feature cell the best
            prototype cosine after the score floor (channel 0 = background).
        winners: (C + 1, h, w) int64; index into the extractor's :class:`ScoringSet` of
            the prototype that attained ``values`` (-1 where the channel has none).
    """

    extractor: str
    box: tuple[int, int, int, int]
    values: torch.Tensor
    winners: torch.Tensor

    @property
    def grid_size(self) -> tuple[int, int]:
        return int(self.values.shape[1]), int(self.values.shape[2])


@dataclass
class ScoringSet:
    """The prototypes one extractor scored with, sorted by label channel.

    Q prototypes. ``channel[q]`` is the label channel prototype q scores for (0 =
    background); ``source[q]`` indexes ``Segmentation.class_names`` with the category whose
    bank it came from (for background prototypes, the class whose background it is);
    ``bank_index[q]`` is its row in that category's :class:`PrototypeBank`.
    """

    extractor: str
    channel: torch.Tensor  # (Q,) int64
    source: torch.Tensor  # (Q,) int64
    bank_index: torch.Tensor  # (Q,) int64
    dropped_by_stuff: int = 0  # background prototypes removed by the stuff filter


@dataclass
class Segmentation:
    """Result of :func:`segment`: everything needed to display and trace it.

    Attributes:
        image: (H, W, 3) uint8, the input image.
        labels: (H, W) int64; 0 = background, i >= 1 = ``class_names[i]``.
        scores: (C + 1, H, W) float32 in [0, 1]; channel 0 = background.
        class_names: ``["background", kept class names...]``.
        categories: the kept :class:`Category` objects, in label order (index i - 1).
        queried: every class name that was asked for, in the given order.
        prefilter: the pre-filter's outcome, or None when it did not run.
        processed_size: (H', W') of the processed (resized) image.
        views: every (view, extractor) pass; see :class:`ViewRecord`.
        scoring: ``{extractor name: ScoringSet}``.
        whole_view_sims: ``{extractor name: (Q, h, w) float16}`` cosine of every scored
            prototype over the whole-image view's grid (for similarity maps).
        config: the settings used.
    """

    image: np.ndarray
    labels: np.ndarray
    scores: np.ndarray
    class_names: list[str]
    categories: list[Category]
    queried: list[str]
    prefilter: PrefilterResult | None
    processed_size: tuple[int, int]
    views: list[ViewRecord]
    scoring: dict[str, ScoringSet]
    whole_view_sims: dict[str, torch.Tensor]
    config: SegmentConfig = field(default_factory=SegmentConfig)

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) of the input image."""
        return int(self.labels.shape[0]), int(self.labels.shape[1])

    @property
    def extractors(self) -> list[str]:
        return list(self.scoring)

    def view_boxes(self) -> list[tuple[int, int, int, int]]:
        """Distinct view boxes (top, left, height, width), whole image first."""
        seen: list[tuple[int, int, int, int]] = []
        for v in self.views:
            if v.box not in seen:
                seen.append(v.box)
        return seen


# --------------------------------------------------------------------------- geometry


def processed_size(size: tuple[int, int], short_side: int) -> tuple[int, int]:
    """(H', W') with min(H', W') == short_side and the aspect ratio kept."""
    h, w = size
    s = short_side / min(h, w)
    return max(1, round(h * s)), max(1, round(w * s))


def _starts(total: int, win: int, stride: int) -> list[int]:
    if win >= total:
        return []
    starts = list(range(0, total - win + 1, stride))
    if starts[-1] != total - win:
        starts.append(total - win)
    return starts


def view_boxes(size: tuple[int, int], config: SegmentConfig) -> list[tuple[int, int, int, int]]:
    """Views of a processed image of ``size`` (H', W'): whole image, then windows.

    Returns:
        Distinct (top, left, height, width) boxes in processed pixels. A window size not
        smaller than the image in both directions adds nothing (it is the whole image);
        one smaller in just one direction slides along that direction only.
    """
    h, w = size
    boxes = [(0, 0, h, w)]
    if config.windows:
        for s in config.window_sizes:
            wh, ww = min(s, h), min(s, w)
            tops = _starts(h, wh, config.window_stride) or [0]
            lefts = _starts(w, ww, config.window_stride) or [0]
            for t in tops:
                for left in lefts:
                    box = (t, left, wh, ww)
                    if box not in boxes:
                        boxes.append(box)
    return boxes


def pixel_centres(n_input: int, n_processed: int) -> np.ndarray:
    """(n_input,) float64 processed-image coordinates of the input pixels' centres."""
    return (np.arange(n_input, dtype=np.float64) + 0.5) * (n_processed / n_input)


def interp_matrix(coords: np.ndarray, start: int, length: int, cells: int) -> np.ndarray:
    """Bilinear weights from a view's cell grid to points along one axis.

    Args:
        coords: (n,) processed-image coordinates of the points (inside the view).
        start, length: the view's extent on this axis, processed pixels.
        cells: the view's feature grid size on this axis.

    Returns:
        (n, cells) float64; each row has at most two non-zero weights summing to 1
        (cell centres at ``start + (i + 0.5) * length / cells``, clamped at the edges).
    """
    u = (coords - start) * (cells / length) - 0.5
    u = np.clip(u, 0.0, cells - 1)
    i0 = np.floor(u).astype(np.int64)
    i1 = np.minimum(i0 + 1, cells - 1)
    w1 = u - i0
    m = np.zeros((len(coords), cells), dtype=np.float64)
    rows = np.arange(len(coords))
    m[rows, i0] += 1.0 - w1
    m[rows, i1] += w1
    return m


def covered(coords: np.ndarray, start: int, length: int) -> np.ndarray:
    """Indices of points whose centre lies in ``[start, start + length)``."""
    return np.flatnonzero((coords >= start) & (coords < start + length))


# --------------------------------------------------------------------------- scoring sets


@dataclass
class _Packed:
    """Prototypes of one extractor in scoring-set order (sorted by label channel)."""

    vectors: torch.Tensor  # (Q, D) float32, L2-normalised
    offsets: list[int]  # (C + 2) channel c owns rows offsets[c]:offsets[c + 1]
    scoring: ScoringSet

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])


def _pack(extractor: str, kept: Sequence[Category], config: SegmentConfig) -> _Packed:
    per_channel: list[list[tuple[torch.Tensor, int, torch.Tensor]]] = [
        [] for _ in range(len(kept) + 1)
    ]
    stuff_fg = [c.banks[extractor].vectors[c.banks[extractor].foreground] for c in kept if c.stuff]
    stuff_mat = torch.cat(stuff_fg) if stuff_fg else None
    dropped = 0
    for ci, cat in enumerate(kept, start=1):
        bank = cat.banks[extractor]
        fg_idx = torch.nonzero(bank.foreground).flatten()
        per_channel[ci].append((bank.vectors[fg_idx], ci, fg_idx))
        if not config.background or cat.stuff:
            continue
        bg_idx = torch.nonzero(~bank.foreground).flatten()
        if stuff_mat is not None and len(bg_idx):
            close = (bank.vectors[bg_idx] @ stuff_mat.T).amax(1) > config.stuff_threshold
            dropped += int(close.sum())
            bg_idx = bg_idx[~close]
        per_channel[0].append((bank.vectors[bg_idx], ci, bg_idx))

    dim = kept[0].banks[extractor].dim
    vectors: list[torch.Tensor] = [torch.zeros(0, dim)]
    channel: list[torch.Tensor] = []
    source: list[torch.Tensor] = []
    bank_index: list[torch.Tensor] = []
    offsets = [0]
    for c, entries in enumerate(per_channel):
        for vec, src, idx in entries:
            vectors.append(vec.float())
            channel.append(torch.full((len(idx),), c, dtype=torch.long))
            source.append(torch.full((len(idx),), src, dtype=torch.long))
            bank_index.append(idx.long())
        offsets.append(offsets[-1] + sum(len(e[2]) for e in entries))
    empty = torch.zeros(0, dtype=torch.long)
    scoring = ScoringSet(
        extractor=extractor,
        channel=torch.cat(channel) if channel else empty,
        source=torch.cat(source) if source else empty,
        bank_index=torch.cat(bank_index) if bank_index else empty,
        dropped_by_stuff=dropped,
    )
    return _Packed(torch.cat(vectors).contiguous(), offsets, scoring)


# Recently packed scoring sets, keyed by the identity of the banks they were built from
# (plus everything else _pack reads). Packing copies every prototype vector into one
# matrix (80 MB for 20 classes of 7680-d prototypes); segmenting several images with the
# same categories reuses it. Banks are treated as immutable once built.
_PACK_CACHE: OrderedDict[tuple, tuple[list[weakref.ref[PrototypeBank]], _Packed]] = OrderedDict()
_PACK_CACHE_SIZE = 6  # entries (one per extractor and category set)
_PACK_LOCK = threading.Lock()


def _pack_cached(extractor: str, kept: Sequence[Category], config: SegmentConfig) -> _Packed:
    """:func:`_pack`, reusing the result of an earlier call with the very same banks."""
    banks = [c.banks[extractor] for c in kept]
    key = (
        extractor,
        tuple(id(b) for b in banks),
        tuple(c.stuff for c in kept),
        config.background,
        config.stuff_threshold,
    )
    with _PACK_LOCK:
        hit = _PACK_CACHE.get(key)
        if hit is not None and all(r() is b for r, b in zip(hit[0], banks, strict=True)):
            _PACK_CACHE.move_to_end(key)
            return hit[1]
    packed = _pack(extractor, kept, config)
    with _PACK_LOCK:
        _PACK_CACHE[key] = ([weakref.ref(b) for b in banks], packed)
        while len(_PACK_CACHE) > _PACK_CACHE_SIZE:
            _PACK_CACHE.popitem(last=False)
    return packed


def score_cells(
    feats: torch.Tensor, packed: _Packed, floor: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel best prototype cosine at every cell of one view.

    One (Q, D) x (D, h*w) product gives every prototype's cosine at every cell; each
    channel's maximum is then taken over its contiguous rows.

    Args:
        feats: (D, h, w) features of the view.

    Returns:
        values (C + 1, h, w) float32 (floored), winners (C + 1, h, w) int64 scoring-set
        indices (-1 for channels without prototypes), sims (Q, h, w) float32 cosine of
        every scoring-set prototype.
    """
    d, h, w = feats.shape
    f = feats.reshape(d, h * w).to(torch.float32)
    # Cosine = (prototype . feature) / |feature| (prototypes are unit vectors): scaling the
    # product's columns is cheaper than writing a normalised copy of the features.
    inv_norm = f.square().sum(0).sqrt_().clamp_(min=1e-12).reciprocal_()
    sims = torch.mm(packed.vectors, f).mul_(inv_norm)  # (Q, h*w)
    n_ch = len(packed.offsets) - 1
    values = torch.zeros(n_ch, h * w)
    winners = torch.full((n_ch, h * w), -1, dtype=torch.long)
    for c in range(n_ch):
        lo, hi = packed.offsets[c], packed.offsets[c + 1]
        if hi > lo:
            v, a = sims[lo:hi].max(0)
            values[c] = torch.where(v > floor, v, torch.zeros(()))
            winners[c] = a + lo
    return values.reshape(n_ch, h, w), winners.reshape(n_ch, h, w), sims.reshape(-1, h, w)


# --------------------------------------------------------------------------- segment


def _check_inputs(
    image: np.ndarray, categories: Sequence[Category], extractors: Sequence[FeatureExtractor]
) -> None:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", type(image).__name__)
        raise ValueError(f"segment: image must be an (H, W, 3) uint8 RGB array, got {shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"segment: image must be uint8 (0..255), got {image.dtype}")
    if min(image.shape[:2]) < 2:
        raise ValueError(f"segment: image is too small ({image.shape[1]}x{image.shape[0]} px)")
    if max(image.shape[:2]) > MAX_ASPECT * min(image.shape[:2]):
        raise ValueError(
            f"segment: image is {image.shape[1]}x{image.shape[0]} px, more than {MAX_ASPECT}:1; "
            "crop it to a less elongated region first"
        )
    if not categories:
        raise ValueError("segment: no categories; build at least one category first")
    names = [c.name for c in categories]
    if len(set(names)) != len(names):
        raise ValueError(f"segment: category names must be distinct, got {names}")
    if not extractors:
        raise ValueError("segment: pass at least one feature extractor")
    ex_names = [e.name for e in extractors]
    if len(set(ex_names)) != len(ex_names):
        raise ValueError(f"segment: extractor names must be distinct, got {ex_names}")
    for c in categories:
        missing = [e for e in ex_names if e not in c.banks]
        if missing:
            raise ValueError(
                f"segment: category {c.name!r} has no prototype bank for extractor(s) "
                f"{missing}; rebuild it with the same extractors"
            )
    for e in ex_names:
        dims = {c.banks[e].dim for c in categories}
        if len(dims) > 1:
            raise ValueError(
                f"segment: banks of extractor {e!r} have different dimensions {sorted(dims)}; "
                "rebuild them with the same extractor"
            )


def segment(
    image: np.ndarray,
    categories: Sequence[Category],
    extractors: Sequence[FeatureExtractor],
    config: SegmentConfig | None = None,
    scorer: ImageTextScorer | None = None,
) -> Segmentation:
    """Segment ``image`` into the given categories and background.

    Args:
        image: (H, W, 3) uint8 RGB target.
        categories: candidate categories, each with a bank for every extractor.
        extractors: feature extractors; their cosine scores are averaged.
        config: stage-3 settings (defaults to the paper's).
        scorer: image-text scorer for the CLIP pre-filter; without one (or with
            ``config.prefilter`` off) every category is kept.

    Returns:
        :class:`Segmentation` at the input's resolution (H, W).
    """
    config = config or SegmentConfig()
    _check_inputs(image, categories, extractors)
    h, w = image.shape[:2]

    pre: PrefilterResult | None = None
    kept = list(categories)
    things = [c for c in categories if not c.stuff]
    if scorer is not None and config.prefilter and things:
        pre = prefilter(
            image,
            [c.name for c in things],
            scorer,
            template=config.prompt,
            max_classes=config.prefilter_max,
            subsets=config.prefilter_subsets,
        )
        keep = set(pre.kept)
        kept = [c for c in categories if c.stuff or c.name in keep]

    hp, wp = processed_size((h, w), config.short_side)
    tensor = (
        torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1)[None].float()
        / 255.0
    )
    if (hp, wp) != (h, w):
        tensor = F.interpolate(tensor, size=(hp, wp), mode="bilinear", antialias=True)
        tensor = tensor.clamp_(0.0, 1.0)
    boxes = view_boxes((hp, wp), config)
    ys, xs = pixel_centres(h, hp), pixel_centres(w, wp)

    n_ch = len(kept) + 1
    acc = torch.zeros(n_ch, h, w, dtype=torch.float64)
    count = torch.zeros(h, w, dtype=torch.float64)
    views: list[ViewRecord] = []
    scoring: dict[str, ScoringSet] = {}
    whole: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        for ex in extractors:
            packed = _pack_cached(ex.name, kept, config)
            scoring[ex.name] = packed.scoring
            for vi, (top, left, vh, vw) in enumerate(boxes):
                crop = tensor[:, :, top : top + vh, left : left + vw]
                feats = ex(crop)
                if feats.ndim != 4 or feats.shape[0] != 1:
                    raise ValueError(
                        f"extractor {ex.name!r} returned {tuple(feats.shape)}, "
                        "expected (1, D, h, w)"
                    )
                if feats.shape[1] != packed.dim:
                    raise ValueError(
                        f"extractor {ex.name!r} gives {feats.shape[1]}-d features but the banks "
                        f"hold {packed.dim}-d prototypes; rebuild the banks"
                    )
                values, winners, sims = score_cells(
                    feats[0].float().cpu(), packed, config.score_floor
                )
                views.append(ViewRecord(ex.name, (top, left, vh, vw), values, winners))
                if vi == 0:
                    whole[ex.name] = sims.to(torch.float16)
                rows, cols = covered(ys, top, vh), covered(xs, left, vw)
                if len(rows) == 0 or len(cols) == 0:
                    continue
                wy = torch.from_numpy(interp_matrix(ys[rows], top, vh, values.shape[1]))
                wx = torch.from_numpy(interp_matrix(xs[cols], left, vw, values.shape[2]))
                up = torch.matmul(torch.matmul(wy, values.double()), wx.T)  # (C+1, R, S)
                r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
                acc[:, r0:r1, c0:c1] += up
                count[r0:r1, c0:c1] += 1.0

    scores = (acc / count.clamp(min=1.0)).to(torch.float32)
    labels = scores.argmax(0)
    return Segmentation(
        image=image,
        labels=labels.numpy().astype(np.int64),
        scores=scores.numpy(),
        class_names=["background"] + [c.name for c in kept],
        categories=kept,
        queried=[c.name for c in categories],
        prefilter=pre,
        processed_size=(hp, wp),
        views=views,
        scoring=scoring,
        whole_view_sims=whole,
        config=config,
    )
