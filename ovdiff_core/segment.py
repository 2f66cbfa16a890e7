"""Stage 3: segment a target image by nearest-prototype matching.

How a score is made (and why a click can be explained exactly):

1. The target is resized so that its short side is ``config.short_side`` ("processed"
   image). Views: the whole processed image, plus square sliding windows.
2. For every view and every extractor, each feature cell's cosine similarity to every
   prototype of the kept classes is computed; per label channel (0 = background, the union
   of the kept classes' background prototypes; c >= 1 = class c's foreground prototypes)
   the maximum is kept together with the prototype that attained it. Values <= the score
   floor become 0. These per-cell records (:class:`ViewRecord`) are all a
   :class:`Segmentation` keeps of the models' output.
3. A channel's score at an *input* pixel is the bilinear blend (cell centres, edge-clamped,
   like ``align_corners=False``) of each covering pass's cell map at the pixel's centre,
   averaged over the (view, extractor) passes covering the pixel.

So every score at every pixel is a weighted sum of single-prototype cosines at single
cells; :mod:`ovdiff_core.trace` recomputes that sum for one pixel from the records and
names the prototype that contributed most.

Cost and memory. Only the label map is computed eagerly, block by block, and only for
the channels that can win in a block: a bilinear blend is a convex combination, so at
every pixel of a tile a channel's score lies between the average (over passes) of its
smallest and of its largest cell value among the cells the tile taps. A channel whose
upper bound is below another channel's lower bound cannot win anywhere in the tile and is
skipped. Score maps, the scores at one pixel and similarity maps are computed from the
records on request (:meth:`Segmentation.score_map`, :meth:`Segmentation.scores_at`), with
the same float32 operations in the same order, so they are bit-for-bit the numbers the
labels were taken from. Passes of extractors with equal strides share their taps, so their
grids are summed and blended once.

Large vocabularies. Beyond ``COMPACT_ABOVE_BYTES`` of records (about 40 classes with the
paper's extractors and windows) a segmentation keeps its records compact: values as
16-bit codes per channel (within 9.6e-6), winners as 8-bit offsets within their channel,
similarity maps as 8-bit codes. The labels are taken from the exact values first.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ovdiff_core.config import SegmentConfig
from ovdiff_core.geometry import AxisTaps, bilinear_taps, blend, pixel_centres, take
from ovdiff_core.prefilter import PrefilterResult, prefilter
from ovdiff_core.protocols import FeatureExtractor, ImageTextScorer
from ovdiff_core.types import Category, PrototypeBank

__all__ = ["ScoringSet", "Segmentation", "SimilarityMaps", "ViewRecord", "rescore", "segment"]

# Longest accepted side ratio: the short side is resized to 448 px, so a 2x1000 image
# would otherwise become 448x224,000 px.
MAX_ASPECT = 10

# Working-set sizes, in float32 elements: one block of blended scores while labelling
# (channels x pixels), and one chunk of prototype-by-cell cosines while scoring a view.
BLOCK_ELEMENTS = 4 << 20
SIMS_ELEMENTS = 16 << 20
# Cells of channels-last features scored at a time (512 x 7680 float32 = 15 MB: their
# norms and products are taken while they are in the cache).
CELL_CHUNK = 512
# Tiles (input pixels a side) on which channels that cannot win are pruned, and the
# fixed cost of blending one more block, in channel-pixels (a few dozen small calls).
TILE = 32
BLOCK_OVERHEAD = 20_000
# A channel is kept in a tile unless its upper bound is this far below the best lower
# bound; larger than the float32 rounding of a score (about 1e-6).
PRUNE_MARGIN = 1e-5
# Beyond this many bytes of float32 per-cell values (all passes together), a segmentation
# keeps them as 16-bit codes, its winners as 8-bit offsets and its similarity maps as
# 8-bit codes (see ViewRecord, SimilarityMaps): 150 classes at 1024 px take 43 MB of
# values and winners exactly and 22 MB compact. Labels are taken before, from the exact
# values.
COMPACT_ABOVE_BYTES = 8 << 20
# A pass is kept compact only when every channel's values span at most this (with the
# default score floor of 0 they lie in [0, 1]): a code's error is then at most
# span / 131,070 <= 9.6e-6.
COMPACT_MAX_SPAN = 1.25
# Most bytes of similarity maps a segmentation keeps (all extractors together). Beyond it
# they are kept as 8-bit codes, and if these pass it too, only the maps of the prototypes
# that win the most tapped cells are kept (a trace of a pixel whose winner has none says
# so). The benchmark's photo-like scene needs 17 MB (8-bit
# maps) at 150 classes and keeps them all; a scene where winners change from cell to cell
# (noise, or a vast background scored by thousands of prototypes) would need far more.
SIMS_MAX_BYTES = 18 << 20
# Whole-view cosines of every prototype (float16) kept while segmenting, so that the
# similarity maps need no second product; beyond this many bytes they are recomputed
# for the prototypes that need them.
WHOLE_SIMS_BYTES = 64 << 20
# Most target features (MB, float32, all passes together) that ``segment(...,
# keep_features=True)`` keeps for what-if edits; ``OVDIFF_WHATIF_MAX_MB`` overrides it.
# The cpu preset (320 px, one view, CLIP 768 x 20 x 27 + DINOv2-S 384 x 23 x 30) needs
# about 3 MB; the paper preset does not fit (SD 7680 x 56 x 75 floats, 129 MB, per view).
WHATIF_MAX_MB = 64.0


def whatif_budget_bytes() -> int:
    """The feature budget of ``keep_features`` in bytes (``OVDIFF_WHATIF_MAX_MB`` or
    :data:`WHATIF_MAX_MB` megabytes)."""
    raw = os.environ.get("OVDIFF_WHATIF_MAX_MB", "").strip()
    if not raw:
        return int(WHATIF_MAX_MB * 2**20)
    try:
        mb = float(raw)
    except ValueError:
        mb = -1.0
    if not mb >= 0:  # also rejects nan
        raise ValueError(
            f"OVDIFF_WHATIF_MAX_MB must be a number of megabytes >= 0, got {raw!r}; "
            "unset it to use the default of 64"
        )
    return int(mb * 2**20)


@dataclass
class ViewRecord:
    """One (view, extractor) pass: per label channel and feature cell, the best prototype
    cosine and the prototype that attained it.

    Two storage forms, read the same way (:meth:`channel_values`,
    :meth:`channel_winners`, :attr:`values`, :attr:`winners`):

    * exact: ``data`` (C + 1, h, w) float32 values; ``picks`` (C + 1, h, w) int16 (int32
      when the scoring set has 32,767 or more prototypes) scoring-set indices (-1 where
      the channel has none).
    * compact (:func:`segment` chooses it beyond ``COMPACT_ABOVE_BYTES`` of values):
      ``data`` holds 16-bit codes (int16, offset by 32,768) and a value is
      ``(code + 32768) * step[c] + low[c]`` in float32, within ``step[c] / 2`` (at most
      9.6e-6) of the exact one; foreground ``picks`` may be uint8 offsets from
      ``starts[c]`` (255 = none), the background channel's in ``bg_picks``.

    Attributes:
        extractor: extractor name.
        box: (top, left, height, width) of the view in processed-image pixels.
    """

    extractor: str
    box: tuple[int, int, int, int]
    data: torch.Tensor
    picks: torch.Tensor
    low: torch.Tensor | None = None  # (C + 1,) float32, with ``step``: 16-bit codes
    step: torch.Tensor | None = None
    starts: torch.Tensor | None = None  # (C + 1,) int64: ``picks`` are uint8 offsets
    bg_picks: torch.Tensor | None = None  # (h, w) scoring-set indices of channel 0

    @staticmethod
    def store(
        extractor: str,
        box: tuple[int, int, int, int],
        values: torch.Tensor,
        winners: torch.Tensor,
        offsets: Sequence[int],
        compact: bool,
    ) -> ViewRecord:
        """The record of exact ``values`` and ``winners`` ((C + 1, h, w), on any device),
        on the CPU; compact when asked and possible (every channel's values span at
        most ``COMPACT_MAX_SPAN``; uint8 winners when every foreground channel has at
        most 255 prototypes). ``offsets``: the scoring set's channel offsets."""
        values, winners = values.cpu(), winners.cpu()
        if not compact:
            return ViewRecord(extractor, box, values, winners)
        n_ch = values.shape[0]
        flat = values.reshape(n_ch, -1)
        low = flat.amin(1).clamp(max=0.0) if flat.shape[1] else torch.zeros(n_ch)
        high = torch.maximum(flat.amax(1), low) if flat.shape[1] else low
        if bool(((high - low) > COMPACT_MAX_SPAN).any()):
            return ViewRecord(extractor, box, values, winners)
        step = (high - low) / 65535.0
        safe = torch.where(step > 0, step, torch.ones(()))
        q = ((values - low[:, None, None]) / safe[:, None, None]).round_().clamp_(0, 65535)
        data = (q - 32768.0).to(torch.int16)
        starts = torch.tensor(offsets[:-1], dtype=torch.long)
        counts = torch.tensor(offsets[1:], dtype=torch.long) - starts
        if n_ch < 2 or int(counts[1:].max()) > 255:
            return ViewRecord(extractor, box, data, winners, low, step)
        local = winners[1:].long() - starts[1:, None, None]
        local = torch.where(winners[1:] >= 0, local, torch.full((), 255))
        return ViewRecord(
            extractor, box, data, local.to(torch.uint8), low, step, starts, winners[0].clone()
        )

    @property
    def grid_size(self) -> tuple[int, int]:
        return int(self.data.shape[1]), int(self.data.shape[2])

    @property
    def compact(self) -> bool:
        return self.low is not None

    def channel_values(self, channel: int) -> torch.Tensor:
        """(h, w) float32 values of one channel."""
        if self.low is None or self.step is None:
            return self.data[channel]
        return decode_values(self.data[channel], self.low[channel], self.step[channel])

    def channel_winners(self, channel: int) -> torch.Tensor:
        """(h, w) int64 scoring-set indices of one channel's winners (-1: none)."""
        if self.starts is None or self.bg_picks is None:
            return self.picks[channel].long()
        if channel == 0:
            return self.bg_picks.long()
        local = self.picks[channel - 1].long()
        return torch.where(local < 255, local + self.starts[channel], torch.full((), -1))

    @property
    def values(self) -> torch.Tensor:
        """(C + 1, h, w) float32 values (decoded into a new tensor when compact)."""
        if self.low is None or self.step is None:
            return self.data
        return decode_values(self.data, self.low[:, None, None], self.step[:, None, None])

    @property
    def winners(self) -> torch.Tensor:
        """(C + 1, h, w) scoring-set indices, int16 (int32 from 32,767 prototypes on;
        decoded into a new tensor when compact)."""
        if self.starts is None or self.bg_picks is None:
            return self.picks
        rows = [self.channel_winners(c) for c in range(int(self.starts.shape[0]))]
        return torch.stack(rows).to(self.bg_picks.dtype)

    @property
    def nbytes(self) -> int:
        parts = (self.data, self.picks, self.low, self.step, self.starts, self.bg_picks)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)


def decode_values(codes: Any, low: Any, step: Any) -> Any:
    """Float32 values of 16-bit codes (int16 offset by 32,768; numpy or torch, ``low`` and
    ``step`` broadcastable): ``(code + 32768) * step + low``, the same float32 operations
    wherever it runs."""
    if isinstance(codes, np.ndarray):
        out = codes.astype(np.float32)
        out += 32768.0
        out *= step
        out += low
        return out
    out = codes.to(torch.float32).add_(32768.0)
    return out.mul_(step).add_(low)


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


class SimilarityMaps:
    """Whole-image-view cosine maps of the prototypes that can explain a pixel.

    Only prototypes that some pixel's trace can name are kept: those that won their
    channel at a cell tapped by a pixel carrying that channel's label, and at most
    ``SIMS_MAX_BYTES`` of them (the prototypes that win the most such cells first;
    ``omitted`` counts the others). ``self[q]`` is the (h, w) float32 cosine of
    scoring-set prototype ``q`` over the whole view's grid.

    Stored as float16 (``maps`` (K, h, w)), or, in a compact segmentation or when float16
    maps would pass ``SIMS_MAX_BYTES``, as 8-bit codes per map (``maps`` uint8, ``low``
    and ``step`` (K,) float32: a cosine is ``code * step + low``, within half a step,
    1/510 of the map's range, of the float16 one): these maps are drawn as heat maps, not
    summed into scores.
    """

    def __init__(
        self,
        index: torch.Tensor,
        maps: torch.Tensor,
        low: torch.Tensor | None = None,
        step: torch.Tensor | None = None,
    ) -> None:
        """``index``: (K,) int64 scoring-set indices; ``maps``: (K, h, w) float16 or uint8
        codes (with ``low`` and ``step``)."""
        self.index = index
        self.maps = maps
        self.low, self.step = low, step
        self.omitted = 0  # prototypes a trace can name whose map is not kept (budget)
        self._row = {int(q): k for k, q in enumerate(index.tolist())}

    @staticmethod
    def compact(index: torch.Tensor, maps: torch.Tensor) -> SimilarityMaps:
        """8-bit codes of (K, h, w) maps, each scaled to its own range."""
        if maps.numel() == 0:
            return SimilarityMaps(
                index, maps.to(torch.uint8), torch.zeros(len(maps)), torch.zeros(len(maps))
            )
        flat = maps.reshape(len(maps), -1).to(torch.float32)
        low, high = flat.amin(1), flat.amax(1)
        step = (high - low) / 255.0
        safe = torch.where(step > 0, step, torch.ones(()))
        codes = ((flat - low[:, None]) / safe[:, None]).round_().clamp_(0, 255).to(torch.uint8)
        return SimilarityMaps(index, codes.reshape(maps.shape), low, step)

    def __getitem__(self, q: int) -> torch.Tensor:
        row = self._row.get(int(q))
        if row is None:
            raise KeyError(
                f"no similarity map for prototype {int(q)}: it explains no pixel of this "
                "segmentation"
            )
        if self.low is None or self.step is None:
            return self.maps[row].to(torch.float32)
        return self.maps[row].to(torch.float32).mul_(self.step[row]).add_(self.low[row])

    def __contains__(self, q: object) -> bool:
        return isinstance(q, (int, np.integer)) and int(q) in self._row

    def __len__(self) -> int:
        return len(self._row)

    @property
    def nbytes(self) -> int:
        parts = (self.maps, self.index, self.low, self.step)
        return sum(int(t.numel() * t.element_size()) for t in parts if t is not None)


@dataclass
class Segmentation:
    """Result of :func:`segment`: everything needed to display and trace it.

    Attributes:
        image: (H, W, 3) uint8, the input image.
        labels: (H, W) uint8 (int32 beyond 256 labels); 0 = background, i >= 1 =
            ``class_names[i]``.
        class_names: ``["background", kept class names...]``.
        categories: the kept :class:`Category` objects, in label order (index i - 1).
        queried: every class name that was asked for, in the given order.
        prefilter: the pre-filter's outcome, or None when it did not run.
        processed_size: (H', W') of the processed (resized) image.
        views: every (view, extractor) pass; see :class:`ViewRecord`.
        scoring: ``{extractor name: ScoringSet}``.
        whole_view_sims: ``{extractor name: SimilarityMaps}``; ``[extractor][q]`` is the
            (h, w) float32 cosine of prototype ``q`` over the whole-image view's grid, for
            every prototype a trace can name (kept as float16, or 8-bit when compact).
        config: the settings used.
        features: with ``segment(..., keep_features=True)``, the target's features of
            every pass, ``features[i]`` the (D, h, w) float32 CPU tensor that
            ``views[i]`` was scored from (D the extractor's dimension, (h, w) its grid);
            what :func:`rescore` and :func:`ovdiff_core.explain.what_if` re-score with
            edited banks. None when not asked for or over the budget
            (:data:`WHATIF_MAX_MB`); about 3 MB for the cpu preset.

    Scores are not stored: :meth:`score_map`, :meth:`scores_at` and :attr:`scores` compute
    them from ``views``: exactly the numbers ``labels`` is the argmax of, or, when the
    records are compact (more than ``COMPACT_ABOVE_BYTES`` of them), within 9.6e-6 of
    those numbers (the labels are then the exact argmax).
    """

    image: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    categories: list[Category]
    queried: list[str]
    prefilter: PrefilterResult | None
    processed_size: tuple[int, int]
    views: list[ViewRecord]
    scoring: dict[str, ScoringSet]
    whole_view_sims: dict[str, SimilarityMaps]
    config: SegmentConfig = field(default_factory=SegmentConfig)
    features: list[torch.Tensor] | None = None

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) of the input image."""
        return int(self.labels.shape[0]), int(self.labels.shape[1])

    @property
    def extractors(self) -> list[str]:
        return list(self.scoring)

    def _field(self) -> _ScoreField:
        key = (id(self.views), len(self.views), self.size, self.processed_size)
        got = self.__dict__.get("_score_field")
        if got is None or got.key != key:
            got = _ScoreField(self.views, self.size, self.processed_size)
            self.__dict__["_score_field"] = got
        return got

    def score_map(self, channel: int) -> np.ndarray:
        """(H, W) float32 score of one label channel (0 = background) at every pixel."""
        n = len(self.class_names)
        if isinstance(channel, bool) or not isinstance(channel, (int, np.integer)):
            raise ValueError(f"score_map: channel must be an integer label, got {channel!r}")
        if not 0 <= int(channel) < n:
            raise ValueError(f"score_map: channel {channel} is not a label; need 0..{n - 1}")
        return self._field().dense([int(channel)])[0]

    def scores_at(self, x: int, y: int) -> np.ndarray:
        """(C + 1,) float32 score of every channel at input pixel (x = column, y = row)."""
        h, w = self.size
        if not (0 <= int(x) < w and 0 <= int(y) < h):
            raise ValueError(f"scores_at: ({x}, {y}) is outside the {w}x{h} image")
        return np.asarray(
            self._field().block(None, int(y), int(y) + 1, int(x), int(x) + 1)[:, 0, 0]
        )

    @property
    def scores(self) -> np.ndarray:
        """(C + 1, H, W) float32 scores of every channel, background first.

        Computed on first use and kept: (C + 1) x H x W x 4 bytes, 600 MB for 150 classes
        at 1024x1024. Prefer :meth:`score_map` or :meth:`scores_at` where they do.
        """
        got = self.__dict__.get("_scores")
        if got is None:
            got = self._field().dense(None)
            self.__dict__["_scores"] = got
        return got

    def object_labels(self) -> np.ndarray:
        """(H, W) int64 best *object* channel (>= 1) at every pixel, background ignored.

        The prediction of the literature's protocols without a background class (VOC20,
        Pascal Context 59); equal to ``scores[1:].argmax(0) + 1``. All zeros if no class
        was kept.
        """
        if len(self.class_names) < 2:
            return np.zeros(self.size, dtype=np.int64)
        return self._field().argmax(list(range(1, len(self.class_names)))).astype(np.int64)

    @property
    def nbytes(self) -> int:
        """Bytes this segmentation holds itself (not its categories' banks)."""
        total = self.image.nbytes + self.labels.nbytes
        total += sum(v.nbytes for v in self.views)
        for s in self.scoring.values():
            total += sum(t.numel() * t.element_size() for t in (s.channel, s.source, s.bank_index))
        total += sum(m.nbytes for m in self.whole_view_sims.values())
        for f in self.features or ():
            total += f.numel() * f.element_size()
        cached = self.__dict__.get("_scores")
        return total + (cached.nbytes if cached is not None else 0)


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


def interp_matrix(coords: np.ndarray, start: int, length: int, cells: int) -> np.ndarray:
    """Bilinear weights from a view's cell grid to points along one axis.

    Returns:
        (n, cells) float64; row i holds :func:`bilinear_taps`' two weights of point i
        (at most two non-zero entries, summing to 1).
    """
    lo, hi, w1 = bilinear_taps(coords, start, length, cells)
    m = np.zeros((len(coords), cells), dtype=np.float64)
    rows = np.arange(len(coords))
    m[rows, lo] += 1.0 - w1
    m[rows, hi] += w1
    return m


def covered(coords: np.ndarray, start: int, length: int) -> np.ndarray:
    """Indices of points whose centre lies in ``[start, start + length)``."""
    return np.flatnonzero((coords >= start) & (coords < start + length))


# --------------------------------------------------------------------------- score field


@dataclass
class _Span:
    """The input pixels one pass covers along one axis, ``start:stop`` (contiguous), and
    their bilinear taps into the pass's grid, as numpy arrays on the CPU or tensors on
    another device (whichever the pass's records are)."""

    start: int
    stop: int
    taps: AxisTaps  # of the stop - start pixels

    @staticmethod
    def build(
        coords: np.ndarray, start: int, length: int, cells: int, device: torch.device, numpy: bool
    ) -> _Span | None:
        idx = covered(coords, start, length)
        if len(idx) == 0:
            return None
        taps = AxisTaps.build(coords[idx], start, length, cells)
        return _Span(int(idx[0]), int(idx[-1]) + 1, taps if numpy else taps.to(device))

    @property
    def lo(self) -> Any:
        return self.taps.lo

    @property
    def hi(self) -> Any:
        return self.taps.hi

    def clip(self, a: int, b: int) -> tuple[int, int]:
        """``[a, b)`` intersected with the span (empty when ``a >= b``)."""
        return max(a, self.start), min(b, self.stop)

    def torch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``lo`` and ``hi`` as tensors."""
        return torch.as_tensor(self.lo), torch.as_tensor(self.hi)


class _Values:
    """One pass's values as the score field reads them: float32 slices of the exact
    values or of decoded 16-bit codes (see :class:`ViewRecord`), as numpy arrays on the
    CPU (views where nothing is decoded or picked) or tensors on the values' device."""

    def __init__(self, source: torch.Tensor | ViewRecord, numpy: bool) -> None:
        record = source if isinstance(source, ViewRecord) else None
        data = record.data if record is not None else source
        assert isinstance(data, torch.Tensor)
        self.data = data
        self.shape = tuple(int(n) for n in data.shape)
        self.numpy = numpy
        self.low = self.step = None
        if record is not None and record.low is not None and record.step is not None:
            self.low, self.step = record.low.to(data.device), record.step.to(data.device)
        self.array = data.numpy() if numpy else None
        self.low_np = self.low.numpy() if numpy and self.low is not None else None
        self.step_np = self.step.numpy() if numpy and self.step is not None else None

    def take(self, pick: Any, first: int, last: int) -> Any:
        """(k, h, last - first) float32 values of channels ``pick`` (numpy or tensor index
        array, all when None) on grid columns ``first:last``."""
        src: Any = self.array if self.numpy else self.data
        part = src[:, :, first:last] if pick is None else src[pick, :, first:last]
        if self.low is None:
            return part
        low: Any = self.low_np if self.numpy else self.low
        step: Any = self.step_np if self.numpy else self.step
        if pick is not None:
            low, step = low[pick], step[pick]
        return decode_values(part, low[:, None, None], step[:, None, None])

    def select(self, channels: Any) -> Any:
        """(k, h, w) float32 values of channels ``channels`` (a numpy index array on the
        numpy side, else a tensor), as a new array or tensor."""
        if self.array is not None:
            part: Any = self.array[channels]
            if self.low_np is None or self.step_np is None:
                return part
            low, step = self.low_np[channels], self.step_np[channels]
            return decode_values(part, low[:, None, None], step[:, None, None])
        part = self.data.index_select(0, channels)
        if self.low is None or self.step is None:
            return part
        return decode_values(part, self.low[channels, None, None], self.step[channels, None, None])


def _range_reduce(grid: Any, first: Any, last: Any, dim: int, largest: bool) -> Any:
    """Max (or min) of ``grid`` (numpy or tensor, with index arrays of the same kind)
    along ``dim`` over each inclusive index range ``first[t]..last[t]``; the result has
    ``len(first)`` entries along ``dim``."""
    lib: Any = np if isinstance(grid, np.ndarray) else torch
    out = take(grid, first, dim)
    longest = int((last - first).max()) + 1 if len(first) else 0
    for step in range(1, longest):
        more = take(grid, lib.minimum(first + step, last), dim)
        out = lib.maximum(out, more) if largest else lib.minimum(out, more)
    return out


class _ScoreField:
    """The scores of a segmentation as a function of its per-cell records.

    ``block`` blends the records of every pass onto a rectangle of input pixels; all
    other methods call it, so every number comes from the same float32 operations in the
    same order whatever the rectangle or channel subset. On the CPU it works on numpy
    views of the records, elsewhere on the tensors where they are.
    """

    def __init__(
        self,
        views: Sequence[ViewRecord],
        size: tuple[int, int],
        processed: tuple[int, int],
        values: Sequence[torch.Tensor] | None = None,
        numpy: bool | None = None,
    ) -> None:
        """``values``: the passes' value grids when they are to be read from another
        device than ``views``' (segmenting on a GPU); by default ``views[i].values``.
        ``numpy``: blend with numpy (default on the CPU) or with torch (elsewhere)."""
        self.key = (id(views), len(views), size, processed)
        self.size = size
        ys, xs = pixel_centres(size[0], processed[0]), pixel_centres(size[1], processed[1])
        sources: list[Any] = list(views) if values is None else list(values)
        self.device = (
            (sources[0].data if values is None else sources[0]).device
            if sources
            else torch.device("cpu")
        )
        self.cpu = self.device.type == "cpu" if numpy is None else numpy
        grids = [_Values(src, self.cpu) for src in sources]
        # Passes with the same box and grid size (extractors of equal stride) have the
        # same taps; a blend is linear, so each such group's grids are summed (in pass
        # order) and blended once.
        groups: dict[tuple, tuple[list[_Values], _Span, _Span]] = {}
        group_views: dict[tuple, list[int]] = {}
        for vi, (v, grid) in enumerate(zip(views, grids, strict=True)):
            key = (v.box, v.grid_size)
            if key in groups:
                groups[key][0].append(grid)
                group_views[key].append(vi)
                continue
            top, left, vh, vw = v.box
            gh, gw = v.grid_size
            rows = _Span.build(ys, top, vh, gh, self.device, self.cpu)
            cols = _Span.build(xs, left, vw, gw, self.device, self.cpu)
            if rows is not None and cols is not None:
                groups[key] = ([grid], rows, cols)
                group_views[key] = [vi]
        self.groups = list(groups.values())
        self.group_views = list(group_views.values())  # indices in ``views`` per group
        self.n_channels = int(views[0].data.shape[0]) if views else 1

    def block(
        self,
        channels: Sequence[int] | None,
        r0: int,
        r1: int,
        c0: int,
        c1: int,
        columns: np.ndarray | None = None,
    ) -> Any:
        """(k, r1 - r0, n) float32 scores of ``channels`` (all when None) on input rows
        ``r0:r1`` and columns ``c0:c1`` (n = c1 - c0), or the increasing input columns
        ``columns`` (n of them; then ``c0``, ``c1`` are ignored): a numpy array on the
        CPU, else a tensor on the records' device. Every score is the same float32
        operations on the same numbers whatever the block."""
        k = self.n_channels if channels is None else len(channels)
        if columns is None:
            columns = np.arange(c0, c1)
        shape = (k, r1 - r0, len(columns))
        if self.cpu:
            acc: Any = np.zeros(shape, dtype=np.float32)
            count: Any = np.zeros(shape[1:], dtype=np.float32)
            pick: Any = None if channels is None else np.asarray(channels, dtype=np.int64)
        else:
            acc = torch.zeros(shape, device=self.device)
            count = torch.zeros(shape[1:], device=self.device)
            pick = None if channels is None else torch.tensor(channels, device=self.device)
        for group, rows, cols in self.groups:
            a, b = rows.clip(r0, r1)
            # the block's columns this pass covers: positions p:q of ``columns``
            p, q = np.searchsorted(columns, (cols.start, cols.stop)).tolist()
            if a >= b or p >= q:
                continue
            i = slice(a - rows.start, b - rows.start)
            j: Any = columns[p:q] - cols.start
            if not self.cpu:
                j = torch.from_numpy(j).to(self.device)
            first, last = int(cols.lo[j[0]]), int(cols.hi[j[-1]]) + 1  # grid columns tapped
            g: Any = None  # the group's grids summed, in pass order
            for grid in group:
                part = grid.take(pick, first, last)
                g = part if g is None else g + part
            up = blend(g, rows.taps.part(i), cols.taps.part(j, first))
            acc[:, a - r0 : b - r0, p:q] += up
            count[a - r0 : b - r0, p:q] += float(len(group))
        acc /= count
        return acc

    def _row_bands(self, k: int) -> Iterator[tuple[int, int]]:
        h, w = self.size
        step = max(1, BLOCK_ELEMENTS // max(1, k * w))
        for r in range(0, h, step):
            yield r, min(h, r + step)

    def dense(self, channels: Sequence[int] | None) -> np.ndarray:
        """(k, H, W) float32 scores of ``channels`` (all when None), as numpy on the CPU."""
        h, w = self.size
        k = self.n_channels if channels is None else len(channels)
        out = np.empty((k, h, w), dtype=np.float32)
        for r0, r1 in self._row_bands(k):
            got = self.block(channels, r0, r1, 0, w)
            out[:, r0:r1] = got if self.cpu else got.cpu().numpy()
        return out

    def edges(self, axis: int) -> np.ndarray:
        """Tile boundaries along an axis (0 = rows, 1 = columns) of the input image: every
        ``TILE`` pixels and wherever a pass's coverage starts or stops, so that each pass
        covers every tile wholly or not at all."""
        n = self.size[axis]
        cuts = {0, n, *range(TILE, n, TILE)}
        for _, rows, cols in self.groups:
            span = rows if axis == 0 else cols
            cuts.update((span.start, span.stop))
        return np.array(sorted(cuts), dtype=np.int64)

    def bounds(
        self, channels: torch.Tensor, row_edges: np.ndarray, col_edges: np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Lower and upper bounds, (k, tile rows, tile cols) float32, of every channel's
        score on each tile (see :meth:`edges`).

        Per pass, the blend at a pixel lies between the smallest and largest of the cells
        the tile's pixels tap; the score, an average over the passes covering the tile,
        lies between the averages of those extremes.
        """
        k, nt, nu = len(channels), len(row_edges) - 1, len(col_edges) - 1
        dev = self.device
        lib: Any = np if self.cpu else torch
        pick: Any = channels.cpu().numpy() if self.cpu else channels
        if self.cpu:  # numpy: several times fewer microseconds per small call than torch
            upper: Any = np.zeros((k, nt, nu), dtype=np.float32)
            lower: Any = np.zeros((k, nt, nu), dtype=np.float32)
            passes: Any = np.zeros((nt, nu), dtype=np.float32)
        else:
            upper = torch.zeros(k, nt, nu, device=dev)
            lower = torch.zeros(k, nt, nu, device=dev)
            passes = torch.zeros(nt, nu, device=dev)
        for group, rows, cols in self.groups:
            rt, r_first, r_last = _tile_cells(rows, row_edges, dev, self.cpu)
            ct, c_first, c_last = _tile_cells(cols, col_edges, dev, self.cpu)
            g = group[0].select(pick)
            for grid in group[1:]:
                g = g + grid.select(pick)
            hi = _range_reduce(_range_reduce(g, r_first, r_last, 1, True), c_first, c_last, 2, True)
            lo = _range_reduce(
                _range_reduce(g, r_first, r_last, 1, False), c_first, c_last, 2, False
            )
            upper[:, rt[0] : rt[-1] + 1, ct[0] : ct[-1] + 1] += hi
            lower[:, rt[0] : rt[-1] + 1, ct[0] : ct[-1] + 1] += lo
            passes[rt[0] : rt[-1] + 1, ct[0] : ct[-1] + 1] += float(len(group))
        lower, upper = lower / passes, upper / passes
        if lib is np:
            return torch.from_numpy(lower), torch.from_numpy(upper)
        return lower, upper

    def argmax(self, channels: Sequence[int]) -> np.ndarray:
        """(H, W) best of ``channels`` (ascending) at every pixel, the first on ties.

        Channels that cannot win a tile (see :meth:`bounds`) are not blended there: a tile
        where one channel alone can win gets its label without blending; the others are
        blended band by band (a band is a row of tiles; see :func:`_band_blocks`), each
        block with the channels that can win in its tiles.
        """
        h, w = self.size
        ids = np.asarray(channels, dtype=np.int64)
        labels = np.empty((h, w), dtype=np.uint8 if ids.max() < 256 else np.int32)
        if len(ids) == 1:
            labels[:] = ids[0]
            return labels
        row_edges, col_edges = self.edges(0), self.edges(1)
        lower, upper = self.bounds(torch.from_numpy(ids).to(self.device), row_edges, col_edges)
        live = upper >= lower.amax(0, keepdim=True) - PRUNE_MARGIN  # (k, tile rows, cols)
        live_np = live.cpu().numpy()
        n_live = live_np.sum(0)
        only = ids[live_np.argmax(0)]  # (tile rows, cols): the live channel, where just one
        widths = np.diff(col_edges)
        for t in range(len(row_edges) - 1):
            labels[row_edges[t] : row_edges[t + 1]] = np.repeat(only[t], widths)[None, :]
        for t0, t1, tiles, keep in _merge_bands(live_np, n_live, row_edges, widths):
            r0, r1 = int(row_edges[t0]), int(row_edges[t1])
            sub = ids[keep]
            columns = np.concatenate([np.arange(col_edges[u], col_edges[u + 1]) for u in tiles])
            step = max(1, BLOCK_ELEMENTS // (len(sub) * (r1 - r0)))
            for c in range(0, len(columns), step):
                cols = columns[c : c + step]
                got = _first_max(self.block(sub.tolist(), r0, r1, 0, 0, cols))
                labels[r0:r1, cols] = sub[got if self.cpu else got.cpu().numpy()]
        return labels

    def tapping(self, group: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per cell of a group's grid, the input pixels whose taps include it: rows
        ``r_a[i]:r_b[i]`` and columns ``c_a[j]:c_b[j]`` (each (cells,) int64)."""
        grids, rows, cols = self.groups[group]
        r_a, r_b = _tapping(rows, grids[0].shape[1])
        c_a, c_b = _tapping(cols, grids[0].shape[2])
        return r_a, r_b, c_a, c_b


def _first_max(scores: Any) -> Any:
    """(r, c) int64 index of the largest of (k, r, c) scores along the first axis, the
    first on ties (``argmax(0)``; on numpy a pass per channel when there are few, several
    times faster than ``argmax`` along a non-last axis)."""
    if isinstance(scores, torch.Tensor) or len(scores) > 8:
        return scores.argmax(0)
    best = scores[0].copy()
    index = np.zeros(best.shape, dtype=np.int64)
    for k in range(1, len(scores)):
        better = scores[k] > best
        np.copyto(best, scores[k], where=better)
        index[better] = k
    return index


def _merge_bands(
    live: np.ndarray, n_live: np.ndarray, row_edges: np.ndarray, widths: np.ndarray
) -> list[tuple[int, int, list[int], np.ndarray]]:
    """Blocks to blend: (first tile row, end tile row, tile columns, channel mask).

    Every tile with more than one live channel is in a block, and a block's mask holds
    the live channels of every tile it covers (so its argmax is the true one there).
    Each band's blocks (:func:`_band_blocks`) are extended downwards by the next band's
    when blending the merged rectangle costs no more than blending both apart plus
    ``BLOCK_OVERHEAD``.
    """
    heights = np.diff(row_edges)
    done: list[tuple[int, int, np.ndarray, np.ndarray]] = []
    open_: list[tuple[int, int, np.ndarray, np.ndarray]] = []  # (t0, t1, tile cols, mask)

    def cost(t0: int, t1: int, cols: np.ndarray, mask: np.ndarray) -> int:
        return int(mask.sum()) * int(heights[t0:t1].sum()) * int(widths[cols].sum())

    for t in range(len(heights)):
        mixed = np.flatnonzero(n_live[t] > 1)
        still: list[tuple[int, int, np.ndarray, np.ndarray]] = []
        for mask, tiles in _band_blocks(live[:, t], mixed, widths, int(heights[t])):
            cols = np.zeros(len(widths), dtype=bool)
            cols[tiles] = True
            for oi, (o0, o1, ocols, omask) in enumerate(open_):
                union = ocols | cols
                merged = np.asarray(live[:, o0 : t + 1][:, :, union].any(axis=(1, 2)))
                apart = cost(o0, o1, ocols, omask) + cost(t, t + 1, cols, mask) + BLOCK_OVERHEAD
                if cost(o0, t + 1, union, merged) <= apart:
                    open_.pop(oi)
                    still.append((o0, t + 1, union, merged))
                    break
            else:
                still.append((t, t + 1, cols, mask))
        for o in open_:  # not extended into this band: finished
            done.append(o)
        open_ = still
    done += open_
    return [(t0, t1, np.flatnonzero(cols).tolist(), mask) for t0, t1, cols, mask in done]


def _band_blocks(
    live: np.ndarray, tiles: np.ndarray, widths: np.ndarray, height: int
) -> list[tuple[np.ndarray, list[int]]]:
    """Blocks to blend in one band of tiles: (channel mask, tiles), every tile of
    ``tiles`` in exactly one block.

    Args:
        live: (k, tiles in the band) bool, the channels that can win in each tile.
        tiles: the band's tiles to blend (more than one live channel).
        widths: (tiles in the band,) pixel widths; ``height``: the band's, in pixels.

    Tiles with the same live channels form a block; blocks merge (largest first) when
    blending the union of their channels over both costs no more than blending them
    apart plus the fixed cost of one more block (``BLOCK_OVERHEAD`` channel-pixels).
    """
    groups: dict[bytes, list[int]] = {}
    for u in tiles.tolist():
        groups.setdefault(live[:, u].tobytes(), []).append(u)
    blocks: list[tuple[np.ndarray, list[int], int]] = []  # (mask, tiles, pixels)
    for members in sorted(groups.values(), key=lambda m: -int(widths[m].sum())):
        mask = live[:, members[0]]
        area = int(widths[members].sum()) * height
        for bi, (bmask, btiles, barea) in enumerate(blocks):
            union = bmask | mask
            apart = int(bmask.sum()) * barea + int(mask.sum()) * area + BLOCK_OVERHEAD
            if int(union.sum()) * (barea + area) <= apart:
                blocks[bi] = (union, btiles + members, barea + area)
                break
        else:
            blocks.append((mask, members, area))
    return [(m, sorted(t)) for m, t, _ in blocks]


def _tile_cells(
    span: _Span, edges: np.ndarray, device: torch.device, numpy: bool = False
) -> tuple[np.ndarray, Any, Any]:
    """The tiles a span covers along one axis (``edges`` include its start and stop):
    their indices and the first and last grid cell their pixels tap (numpy arrays, or
    tensors on ``device``)."""
    first_tile = int(np.searchsorted(edges, span.start))
    last_tile = int(np.searchsorted(edges, span.stop)) - 1
    tiles = np.arange(first_tile, last_tile + 1)
    if numpy:
        lo_np, hi_np = (np.asarray(x) for x in (span.lo, span.hi))
        return tiles, lo_np[edges[tiles] - span.start], hi_np[edges[tiles + 1] - 1 - span.start]
    lo, hi = span.torch()
    a = torch.from_numpy(edges[tiles] - span.start).to(lo.device)
    b = torch.from_numpy(edges[tiles + 1] - 1 - span.start).to(lo.device)
    return tiles, lo[a].to(device), hi[b].to(device)


def _tapping(span: _Span, cells: int) -> tuple[np.ndarray, np.ndarray]:
    """Per grid cell, the half-open range of input pixels (image indices) whose taps
    include it (taps are non-decreasing along the span, so the range is contiguous)."""
    lo, hi = (x.cpu().numpy() if isinstance(x, torch.Tensor) else x for x in (span.lo, span.hi))
    cell = np.arange(cells)
    first = np.searchsorted(hi, cell, "left") + span.start
    return first, np.searchsorted(lo, cell, "right") + span.start


# --------------------------------------------------------------------------- scoring sets


@dataclass
class _Packed:
    """Prototypes of one extractor in scoring-set order (sorted by label channel)."""

    vectors: torch.Tensor  # (Q, D) float32, L2-normalised, on the CPU
    offsets: list[int]  # (C + 2) channel c owns rows offsets[c]:offsets[c + 1]
    scoring: ScoringSet
    copies: dict[torch.device, torch.Tensor] = field(default_factory=dict)

    def on(self, device: torch.device) -> torch.Tensor:
        """``vectors`` on ``device`` (a copy is made once per device and kept)."""
        if device.type == "cpu":
            return self.vectors
        got = self.copies.get(device)
        if got is None:
            got = self.copies[device] = self.vectors.to(device)
        return got

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])


def _pack(extractor: str, kept: Sequence[Category], config: SegmentConfig) -> _Packed:
    per_channel: list[list[tuple[torch.Tensor, int, torch.Tensor]]] = [
        [] for _ in range(len(kept) + 1)
    ]
    stuff_fg = [c.banks[extractor].vectors[c.banks[extractor].foreground] for c in kept if c.stuff]
    stuff_mat = torch.cat(stuff_fg) if stuff_fg else None
    if stuff_mat is not None and len(stuff_mat) == 0:  # stuff banks without fg prototypes
        stuff_mat = None
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


def _channel_chunks(offsets: Sequence[int], limit: int) -> list[tuple[int, int, int, int, bool]]:
    """Split scoring-set rows into chunks for :func:`score_cells`.

    Returns (first channel, end channel, first row, end row, piece) tuples. A chunk holds
    consecutive channels with the same number of prototypes (so one reshape gives their
    maxima) and at most ``limit`` rows, except that a channel with more rows than
    ``limit`` is split into pieces of its own (``piece`` True).
    """
    chunks: list[tuple[int, int, int, int, bool]] = []
    n_ch = len(offsets) - 1
    c = 0
    while c < n_ch:
        n = offsets[c + 1] - offsets[c]
        if n > limit:
            for r in range(offsets[c], offsets[c + 1], limit):
                chunks.append((c, c + 1, r, min(r + limit, offsets[c + 1]), True))
            c += 1
            continue
        end = c + 1
        while (
            end < n_ch
            and offsets[end + 1] - offsets[end] == n
            and offsets[end + 1] - offsets[c] <= limit
        ):
            end += 1
        chunks.append((c, end, offsets[c], offsets[end], False))
        c = end
    return chunks


def cell_matrix(feats: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(D, h, w) features as a float32 matrix, without a copy where the layout allows.

    Returns:
        ``(matrix, cells_major)``: the (h * w, D) matrix when the channel is the innermost
        dimension in memory (channels-last, as the ViT and SD extractors return their
        features: a permuted view of (h, w, D) tokens), else (D, h * w).
    """
    d, h, w = feats.shape
    f = feats.to(torch.float32)
    if d > 1 and f.stride(0) == 1:
        return f.permute(1, 2, 0).reshape(h * w, d), True
    return f.reshape(d, h * w), False


def inverse_norms(f: torch.Tensor, cells_major: bool = False) -> torch.Tensor:
    """(cells,) float32 ``1 / |feature|`` (at most 1e12) of a :func:`cell_matrix`.

    Cells-major ((cells, D)): one contiguous reduction per cell. Else ((D, cells)): sums
    of squares over slices of at most 2**20 values, with no (D, cells) temporary (on the
    CPU several times faster than ``torch.linalg.vector_norm(f, dim=0)``).
    """
    if cells_major:
        return torch.linalg.vector_norm(f, dim=1).clamp_(min=1e-12).reciprocal_()
    acc = torch.zeros(f.shape[1], dtype=torch.float32, device=f.device)
    rows = max(1, (1 << 20) // max(1, f.shape[1]))
    for i in range(0, f.shape[0], rows):
        acc += f[i : i + rows].square().sum(0)
    return acc.sqrt_().clamp_(min=1e-12).reciprocal_()


def score_cells(
    feats: torch.Tensor,
    packed: _Packed,
    floor: float,
    inv_norm: torch.Tensor | None = None,
    sims_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel best prototype cosine at every cell of one view.

    Cosines come from (prototypes x D) x (D x cells) products, a chunk of whole channels
    at a time (at most ``SIMS_ELEMENTS`` products held at once); each channel's maximum is
    taken over its contiguous rows, the first prototype winning ties. Channels-last
    features (see :func:`cell_matrix`) are read ``CELL_CHUNK`` cells at a time: their
    norms and their products are taken while the chunk is in the cache, so the features
    come from memory once.

    Args:
        feats: (D, h, w) features of the view, on any device.
        inv_norm: their :func:`inverse_norms` ((h * w,)), when already computed.
        sims_out: if given, a (Q, h * w) float16 tensor that receives every prototype's
            cosines (the products are made anyway), Q the scoring set's size.

    Returns:
        values (C + 1, h, w) float32 (floored), winners (C + 1, h, w) int16 (int32 for
        32,767 or more prototypes) scoring-set indices (-1 for channels without
        prototypes) and the (h * w,) inverse feature norms, on ``feats``' device.
    """
    _, h, w = feats.shape
    n_cells = h * w
    mat, cells_major = cell_matrix(feats)
    dev = mat.device
    # Cosine = (prototype . feature) / |feature| (prototypes are unit vectors). The factor
    # is positive and the same for every prototype at a cell, so maxima and winners are
    # taken on the bare products and only the (C + 1) maxima are scaled.
    norms = torch.empty(n_cells, device=dev) if inv_norm is None else inv_norm
    vectors = packed.on(dev)
    n_ch = len(packed.offsets) - 1
    index_type = torch.int16 if len(vectors) < 2**15 - 1 else torch.int32
    values = torch.full((n_ch, n_cells), -torch.inf, device=dev)
    winners = torch.full((n_ch, n_cells), -1, dtype=torch.long, device=dev)
    step = min(CELL_CHUNK, n_cells) if cells_major else n_cells
    chunks = _channel_chunks(packed.offsets, max(1, SIMS_ELEMENTS // step))
    for s0 in range(0, n_cells, step):
        s1 = min(s0 + step, n_cells)
        sub = mat[s0:s1] if cells_major else mat
        pending = inv_norm is None  # norms taken after the first product: chunk cached
        f = sub.T if cells_major else sub  # (D, cells of the chunk)
        cells = s1 - s0
        for c0, c1, lo, hi, piece in chunks:
            if hi == lo:
                continue
            products = torch.mm(vectors[lo:hi], f)  # (rows, cells)
            if pending:
                norms[s0:s1] = inverse_norms(sub, cells_major)
                pending = False
            if sims_out is not None:
                sims_out[lo:hi, s0:s1] = products * norms[s0:s1]
            if piece:  # part of one large channel: merge with what earlier pieces found
                v, a = products.max(0)
                old = values[c0, s0:s1]
                better = v > old
                values[c0, s0:s1] = torch.where(better, v, old)
                winners[c0, s0:s1] = torch.where(better, a + lo, winners[c0, s0:s1])
                continue
            n = (hi - lo) // (c1 - c0)
            v, a = products.view(c1 - c0, n, cells).max(1)
            values[c0:c1, s0:s1] = v
            winners[c0:c1, s0:s1] = a + (lo + n * torch.arange(c1 - c0, device=dev)).unsqueeze(1)
        if pending:  # no prototypes at all
            norms[s0:s1] = inverse_norms(sub, cells_major)
    values.mul_(norms)
    values = torch.where(values > floor, values, torch.zeros((), device=dev))
    return values.reshape(n_ch, h, w), winners.to(index_type).reshape(n_ch, h, w), norms


def _whole_view_maps(
    feats: torch.Tensor,
    packed: _Packed,
    wanted: torch.Tensor,
    inv_norm: torch.Tensor | None = None,
    sims: torch.Tensor | None = None,
    compact: bool = False,
) -> SimilarityMaps:
    """:class:`SimilarityMaps` of prototypes ``wanted`` ((K,) int64, sorted) over the whole
    view's features ``feats`` ((D, h, w)), computed as :func:`score_cells` does, or picked
    from ``sims`` ((Q, h * w) float16, every prototype's, when :func:`segment` kept them);
    8-bit when ``compact``."""
    _, h, w = feats.shape
    if sims is not None:
        picked = sims[wanted.to(sims.device)].cpu().reshape(-1, h, w)
        if compact:
            return SimilarityMaps.compact(wanted.cpu(), picked)
        return SimilarityMaps(wanted.cpu(), picked)
    mat, cells_major = cell_matrix(feats)
    f = mat.T if cells_major else mat
    if inv_norm is None:
        inv_norm = inverse_norms(mat, cells_major)
    vectors = packed.on(f.device)
    maps = torch.empty(len(wanted), h * w, dtype=torch.float16)
    step = max(1, SIMS_ELEMENTS // max(1, h * w))
    for k in range(0, len(wanted), step):
        rows = vectors[wanted[k : k + step].to(f.device)]
        maps[k : k + step] = torch.mm(rows, f).mul_(inv_norm).to(torch.float16).cpu()
    if compact:
        return SimilarityMaps.compact(wanted.cpu(), maps.reshape(len(wanted), h, w))
    return SimilarityMaps(wanted.cpu(), maps.reshape(len(wanted), h, w))


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
    keep_features: bool = False,
) -> Segmentation:
    """Segment ``image`` into the given categories and background.

    Everything after feature extraction runs on the device the extractors return their
    features on; only the per-cell records, the labels and the similarity maps come back
    to the CPU.

    Args:
        image: (H, W, 3) uint8 RGB target.
        categories: candidate categories, each with a bank for every extractor.
        extractors: feature extractors; their cosine scores are averaged.
        config: stage-3 settings (defaults to the paper's).
        scorer: image-text scorer for the CLIP pre-filter; without one (or with
            ``config.prefilter`` off) every category is kept.
        keep_features: keep every pass's target features (float32, on the CPU) in
            :attr:`Segmentation.features` for what-if edits, unless together they exceed
            :func:`whatif_budget_bytes` (then ``features`` is None).

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
    # resized on the 0..255 scale, then scaled to 0..1 (on the smaller image)
    tensor = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1)[None]
    tensor = tensor.float()
    if (hp, wp) != (h, w):
        tensor = F.interpolate(tensor, size=(hp, wp), mode="bilinear", antialias=True)
        tensor = tensor.clamp_(0.0, 255.0)
    tensor = tensor.div_(255.0)
    boxes = view_boxes((hp, wp), config)

    raw: list[_Pass] = []  # exact records, on the device they were made on
    packs: dict[str, _Packed] = {}
    whole_feats: dict[str, torch.Tensor] = {}
    whole_norms: dict[str, torch.Tensor] = {}
    whole_sims: dict[str, torch.Tensor] = {}
    kept_feats: list[torch.Tensor] | None = [] if keep_features else None
    budget = whatif_budget_bytes() if keep_features else 0
    kept_bytes = 0
    with torch.inference_mode():
        for ex in extractors:
            packed = packs[ex.name] = _pack_cached(ex.name, kept, config)
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
                cells = int(feats.shape[2] * feats.shape[3])
                sims: torch.Tensor | None = None
                if vi == 0 and len(packed.vectors) * cells * 2 <= WHOLE_SIMS_BYTES:
                    # keep the whole view's cosines: no second product later
                    sims = torch.empty(
                        len(packed.vectors), cells, dtype=torch.float16, device=feats.device
                    )
                values, winners, inv_norm = score_cells(
                    feats[0], packed, config.score_floor, sims_out=sims
                )
                raw.append(_Pass(ex.name, (top, left, vh, vw), values, winners))
                if vi == 0:
                    whole_feats[ex.name] = feats[0]
                    whole_norms[ex.name] = inv_norm
                    if sims is not None and len(sims):
                        whole_sims[ex.name] = sims
                if kept_feats is not None:
                    kept_bytes += feats[0].numel() * 4
                    if kept_bytes > budget:
                        kept_feats = None  # over budget: keep none
                    else:
                        kept_feats.append(feats[0].to("cpu", torch.float32, copy=True))
        views, labels, whole = _label_and_explain(
            raw,
            whole_feats,
            packs,
            (h, w),
            (hp, wp),
            len(kept) + 1,
            whole_norms,
            whole_sims,
        )
    return Segmentation(
        image=image,
        labels=labels,
        class_names=["background"] + [c.name for c in kept],
        categories=kept,
        queried=[c.name for c in categories],
        prefilter=pre,
        processed_size=(hp, wp),
        views=views,
        scoring={name: p.scoring for name, p in packs.items()},
        whole_view_sims=whole,
        config=config,
        features=kept_feats,
    )


@dataclass
class _Pass:
    """One pass's exact records as :func:`score_cells` made them (on its device)."""

    extractor: str
    box: tuple[int, int, int, int]
    values: torch.Tensor
    winners: torch.Tensor


def _label_and_explain(
    raw: Sequence[_Pass],
    whole_feats: dict[str, torch.Tensor],
    packs: dict[str, _Packed],
    size: tuple[int, int],
    processed: tuple[int, int],
    n_channels: int,
    whole_norms: Mapping[str, torch.Tensor] | None = None,
    whole_sims: Mapping[str, torch.Tensor] | None = None,
) -> tuple[list[ViewRecord], np.ndarray, dict[str, SimilarityMaps]]:
    """The end of stage 3, shared by :func:`segment` and :func:`rescore`: the passes'
    records as a segmentation keeps them (compact beyond ``COMPACT_ABOVE_BYTES``), the
    (H, W) labels of the exact records, and the whole-view similarity maps of the
    prototypes that explain them (``whole_norms``: the whole views' :func:`inverse_norms`,
    when already computed; ``whole_sims``: their (Q, cells) float16 cosines, when kept)."""
    compact = sum(p.values.numel() * 4 for p in raw) > COMPACT_ABOVE_BYTES
    views = [
        ViewRecord.store(
            p.extractor, p.box, p.values, p.winners, packs[p.extractor].offsets, compact
        )
        for p in raw
    ]
    scores = _ScoreField(views, size, processed, [p.values for p in raw])
    labels = scores.argmax(list(range(n_channels)))
    counts = _explaining_prototypes(scores, views, labels)
    # 8-bit maps when the records are compact, or when float16 maps would pass the budget
    need = sum(_map_bytes(whole_feats[e], 2) * len(q) for e, (q, _) in counts.items())
    small = compact or need > SIMS_MAX_BYTES
    explained = _within_budget(counts, whole_feats, 1 if small else 2)
    whole = {}
    for name in packs:
        wanted, omitted = explained[name]
        whole[name] = _whole_view_maps(
            whole_feats[name],
            packs[name],
            wanted,
            (whole_norms or {}).get(name),
            (whole_sims or {}).get(name),
            small,
        )
        whole[name].omitted = omitted
    return views, labels, whole


def _map_bytes(feats: torch.Tensor, cell_bytes: int) -> int:
    """Bytes of one similarity map over the grid of (D, h, w) whole-view features."""
    return int(feats.shape[1] * feats.shape[2]) * cell_bytes


def _within_budget(
    explained: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    whole_feats: Mapping[str, torch.Tensor],
    cell_bytes: int,
) -> dict[str, tuple[torch.Tensor, int]]:
    """Per extractor, the sorted prototypes whose maps are kept and how many are not:
    all of them within ``SIMS_MAX_BYTES``, else those that win the most tapped cells
    (ties: extractor order, then index) while the maps fit."""
    size = {e: _map_bytes(whole_feats[e], cell_bytes) for e in explained}
    total = sum(size[e] * len(q) for e, (q, _) in explained.items())
    if total <= SIMS_MAX_BYTES:
        return {e: (q, 0) for e, (q, _) in explained.items()}
    ranked = sorted(
        (
            (-int(n), ei, int(q))
            for ei, (e, (qs, ns)) in enumerate(explained.items())
            for q, n in zip(qs.tolist(), ns.tolist(), strict=True)
        ),
    )
    names = list(explained)
    keep: dict[str, list[int]] = {e: [] for e in names}
    used = 0
    for _, ei, q in ranked:
        if used + size[names[ei]] > SIMS_MAX_BYTES:
            break
        keep[names[ei]].append(q)
        used += size[names[ei]]
    return {
        e: (torch.tensor(sorted(keep[e]), dtype=torch.long), len(explained[e][0]) - len(keep[e]))
        for e in names
    }


def features_bytes(seg: Segmentation) -> int:
    """Bytes the target features of ``seg``'s passes take (or would take) as float32."""
    total = 0
    for v in seg.views:
        bank_dims = {c.banks[v.extractor].dim for c in seg.categories if v.extractor in c.banks}
        h, w = v.grid_size
        total += (max(bank_dims) if bank_dims else 0) * h * w * 4
    return total


def _pack_without(
    packed: _Packed, removed: Mapping[tuple[int, str], Sequence[int]], extractor: str
) -> _Packed:
    """``packed`` with bank rows removed, as :func:`_pack` gives for the edited banks
    when no stuff bank changed (so the stuff filter keeps the same rows): one row mask
    instead of a gather per bank (many small calls, slow on a busy CPU).

    ``removed``: ``{(source, extractor): sorted bank rows}``, source indexing class names.
    """
    sc = packed.scoring
    source, bank_index = sc.source.numpy(), sc.bank_index.numpy()
    keep = np.ones(len(source), dtype=bool)
    new_index = bank_index.copy()
    for (src, ex), rows in removed.items():
        if ex != extractor or not len(rows):
            continue
        r = np.asarray(rows, dtype=np.int64)
        mine = source == src
        keep &= ~(mine & np.isin(bank_index, r))
        new_index[mine] -= np.searchsorted(r, bank_index[mine])
    mask = torch.from_numpy(keep)
    channel = sc.channel[mask]
    counts = np.bincount(channel.numpy(), minlength=len(packed.offsets) - 1)
    offsets = [0, *np.cumsum(counts).tolist()]
    scoring = ScoringSet(
        extractor=sc.extractor,
        channel=channel,
        source=sc.source[mask],
        bank_index=torch.from_numpy(new_index[keep]),
        dropped_by_stuff=sc.dropped_by_stuff,
    )
    return _Packed(packed.vectors[mask].contiguous(), offsets, scoring)


def rescore(
    seg: Segmentation,
    categories: Sequence[Category],
    removed: Mapping[tuple[str, str], Sequence[int]] | None = None,
) -> Segmentation:
    """Stage 3 again on ``seg``'s kept target features, with other banks; no model runs.

    The result is what :func:`segment` gives for the same image, extractors and config
    with ``categories`` as the kept categories (same scoring, same float32 operations),
    sharing ``seg``'s image and features. ``seg`` itself is not changed.

    Args:
        seg: a segmentation made with ``keep_features=True``.
        categories: one per kept class, ``seg.class_names[1:]`` in that order, each with
            a bank for every extractor of ``seg`` (e.g. edited copies of
            ``seg.categories``).
        removed: optionally, how ``categories`` were made: ``{(category name,
            extractor): bank rows}`` removed from ``seg.categories``' banks, nothing else
            changed. Then the scoring sets are cut from ``seg``'s (faster) unless a stuff
            category's bank changed.

    Raises:
        ValueError: ``seg`` kept no features, or the categories do not match.
    """
    if seg.features is None:
        mb = features_bytes(seg) / 2**20
        raise ValueError(
            f"this segmentation kept no target features (they take {mb:.1f} MB; the limit "
            f"is {whatif_budget_bytes() / 2**20:.0f} MB): segment it again with "
            "keep_features=True, raising OVDIFF_WHATIF_MAX_MB if they are over the limit"
        )
    names = [c.name for c in categories]
    if names != seg.class_names[1:]:
        raise ValueError(
            f"rescore: categories {names} must be the segmentation's classes "
            f"{seg.class_names[1:]}, in that order"
        )
    dims = {v.extractor: int(f.shape[0]) for v, f in zip(seg.views, seg.features, strict=True)}
    for ex, dim in dims.items():
        for c in categories:
            bank = c.banks.get(ex)
            if bank is None or bank.dim != dim:
                raise ValueError(
                    f"rescore: category {c.name!r} needs a {dim}-d bank for extractor {ex!r}"
                )
    if not categories:
        return replace(seg)
    packs: dict[str, _Packed] = {}
    pos = {c.name: i for i, c in enumerate(categories, start=1)}
    stuff = {c.name for c in categories if c.stuff}
    for ex in seg.extractors:
        cut = {(pos[n], e): sorted(r) for (n, e), r in (removed or {}).items() if e == ex}
        if removed is None or any(n in stuff for (n, e) in (removed or {}) if e == ex):
            packs[ex] = _pack(ex, categories, seg.config)
            continue
        packs[ex] = _pack_without(_pack_cached(ex, seg.categories, seg.config), cut, ex)
        dropped = 0
        for (src, _), rows in cut.items():
            bank = seg.categories[src - 1].banks[ex]
            if seg.config.background and not categories[src - 1].stuff:
                old_sc = seg.scoring[ex]
                in_pack = set(old_sc.bank_index[old_sc.source == src].tolist())
                dropped += sum(1 for r in rows if not bool(bank.foreground[r]) and r not in in_pack)
        packs[ex].scoring.dropped_by_stuff -= dropped
    raw: list[_Pass] = []
    whole_feats: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        for v, f in zip(seg.views, seg.features, strict=True):
            values, winners, _ = score_cells(f, packs[v.extractor], seg.config.score_floor)
            raw.append(_Pass(v.extractor, v.box, values, winners))
            whole_feats.setdefault(v.extractor, f)
        views, labels, whole = _label_and_explain(
            raw, whole_feats, packs, seg.size, seg.processed_size, len(categories) + 1
        )
    return replace(
        seg,
        labels=labels,
        categories=list(categories),
        views=views,
        scoring={name: p.scoring for name, p in packs.items()},
        whole_view_sims=whole,
    )


def _explaining_prototypes(
    scores: _ScoreField, views: Sequence[ViewRecord], labels: np.ndarray
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per extractor, the sorted scoring-set indices (int64) a trace can name: the
    winners of channel ``l`` at cells tapped by a pixel labelled ``l``, in any pass; and
    how many such (pass, cell) each wins.

    A cell is tapped by a label's pixels when the label's summed-area table counts one
    in the cell's tapping rectangle; with two labels one table serves both (the other
    label's count is the rectangle's area minus it)."""
    tables: list[tuple[int, np.ndarray, bool]]  # (label, table, complement)
    if scores.n_channels == 2:  # labels are 0 or 1: their own table counts the 1s
        table = _integral(labels)
        tables = [(0, table, True), (1, table, False)]
    elif len(present := np.flatnonzero(np.bincount(labels.ravel()))) == 2:
        table = _integral(labels == present[1])
        tables = [(int(present[0]), table, True), (int(present[1]), table, False)]
    else:
        tables = [(int(label), _integral(labels == label), False) for label in present]
    found: dict[str, list[torch.Tensor]] = {v.extractor: [] for v in views}
    for gi, passes in enumerate(scores.group_views):
        r_a, r_b, c_a, c_b = scores.tapping(gi)
        r_a, r_b = r_a[:, None], r_b[:, None]
        area = (r_b - r_a) * (c_b - c_a)
        for label, table, complement in tables:
            count = table[r_b, c_b] - table[r_a, c_b] - table[r_b, c_a] + table[r_a, c_a]
            cells = torch.from_numpy((area - count if complement else count) > 0)
            for vi in passes:
                found[views[vi].extractor].append(views[vi].channel_winners(label)[cells])
    out = {}
    for e, qs in found.items():
        if qs:
            q, n = torch.cat(qs).long().unique(return_counts=True)
        else:
            q = n = torch.zeros(0, dtype=torch.long)
        out[e] = (q[q >= 0], n[q >= 0])
    return out


def _integral(mask: np.ndarray) -> np.ndarray:
    """(H + 1, W + 1) int32 summed-area table of an (H, W) bool (or 0/1) mask (zero first
    row and column): the count in rows a:b, columns c:d is
    ``I[b, d] - I[a, d] - I[b, c] + I[a, c]``."""
    out = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.int32)
    np.cumsum(mask, axis=0, dtype=np.int32, out=out[1:, 1:])
    np.cumsum(out[1:, 1:], axis=1, out=out[1:, 1:])
    return out
