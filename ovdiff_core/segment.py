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
labels were taken from.
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
from ovdiff_core.geometry import AxisTaps, bilinear_taps, blend, pixel_centres
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
# Tiles (input pixels a side) on which channels that cannot win are pruned, and the
# fixed cost of blending one more block, in channel-pixels (a few dozen small calls).
TILE = 32
BLOCK_OVERHEAD = 50_000
# A channel is kept in a tile unless its upper bound is this far below the best lower
# bound; larger than the float32 rounding of a score (about 1e-6).
PRUNE_MARGIN = 1e-5
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
    """One (view, extractor) pass.

    Attributes:
        extractor: extractor name.
        box: (top, left, height, width) of the view in processed-image pixels.
        values: (C + 1, h, w) float32; per label channel and feature cell the best
            prototype cosine after the score floor (channel 0 = background).
        winners: (C + 1, h, w) int16 (int32 when the scoring set has 32,767 or more
            prototypes); index into the extractor's :class:`ScoringSet` of the prototype
            that attained ``values`` (-1 where the channel has none).
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


class SimilarityMaps:
    """Whole-image-view cosine maps of the prototypes that can explain a pixel.

    Only prototypes that some pixel's trace can name are kept: those that won their
    channel at a cell tapped by a pixel carrying that channel's label. ``maps[q]`` is the
    (h, w) float16 cosine of scoring-set prototype ``q`` over the whole view's grid.
    """

    def __init__(self, index: torch.Tensor, maps: torch.Tensor) -> None:
        """``index``: (K,) int64 scoring-set indices; ``maps``: (K, h, w) float16."""
        self.index = index
        self.maps = maps
        self._row = {int(q): k for k, q in enumerate(index.tolist())}

    def __getitem__(self, q: int) -> torch.Tensor:
        row = self._row.get(int(q))
        if row is None:
            raise KeyError(
                f"no similarity map for prototype {int(q)}: it explains no pixel of this "
                "segmentation"
            )
        return self.maps[row]

    def __contains__(self, q: object) -> bool:
        return isinstance(q, (int, np.integer)) and int(q) in self._row

    def __len__(self) -> int:
        return len(self._row)

    @property
    def nbytes(self) -> int:
        return int(self.maps.numel() * self.maps.element_size() + self.index.numel() * 8)


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
            (h, w) float16 cosine of prototype ``q`` over the whole-image view's grid, for
            every prototype a trace can name.
        config: the settings used.
        features: with ``segment(..., keep_features=True)``, the target's features of
            every pass, ``features[i]`` the (D, h, w) float32 CPU tensor that
            ``views[i]`` was scored from (D the extractor's dimension, (h, w) its grid);
            what :func:`rescore` and :func:`ovdiff_core.explain.what_if` re-score with
            edited banks. None when not asked for or over the budget
            (:data:`WHATIF_MAX_MB`); about 3 MB for the cpu preset.

    Scores are not stored: :meth:`score_map`, :meth:`scores_at` and :attr:`scores` compute
    them from ``views`` (exactly the numbers ``labels`` is the argmax of).
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
        for v in self.views:
            total += v.values.numel() * v.values.element_size()
            total += v.winners.numel() * v.winners.element_size()
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


def _range_reduce(
    grid: torch.Tensor, first: torch.Tensor, last: torch.Tensor, dim: int, largest: bool
) -> torch.Tensor:
    """Max (or min) of ``grid`` along ``dim`` over each inclusive index range
    ``first[t]..last[t]``; the result has ``len(first)`` entries along ``dim``."""
    out = grid.index_select(dim, first)
    longest = int((last - first).max()) + 1 if len(first) else 0
    for step in range(1, longest):
        more = grid.index_select(dim, torch.minimum(first + step, last))
        out = torch.maximum(out, more) if largest else torch.minimum(out, more)
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
        grids = [v.values for v in views] if values is None else list(values)
        self.device = grids[0].device if grids else torch.device("cpu")
        self.cpu = self.device.type == "cpu" if numpy is None else numpy
        self.passes: list[tuple[torch.Tensor, _Span, _Span]] = []
        self.pass_view: list[int] = []  # index in ``views`` of each pass
        for vi, (v, grid) in enumerate(zip(views, grids, strict=True)):
            top, left, vh, vw = v.box
            gh, gw = v.grid_size
            rows = _Span.build(ys, top, vh, gh, self.device, self.cpu)
            cols = _Span.build(xs, left, vw, gw, self.device, self.cpu)
            if rows is not None and cols is not None:
                self.passes.append((grid, rows, cols))
                self.pass_view.append(vi)
        self.n_channels = int(views[0].values.shape[0]) if views else 1

    def block(self, channels: Sequence[int] | None, r0: int, r1: int, c0: int, c1: int) -> Any:
        """(k, r1 - r0, c1 - c0) float32 scores of ``channels`` (all when None) on input
        rows ``r0:r1`` and columns ``c0:c1``: a numpy array on the CPU, else a tensor on
        the records' device."""
        k = self.n_channels if channels is None else len(channels)
        shape = (k, r1 - r0, c1 - c0)
        if self.cpu:
            acc: Any = np.zeros(shape, dtype=np.float32)
            count: Any = np.zeros(shape[1:], dtype=np.float32)
            pick: Any = None if channels is None else np.asarray(channels, dtype=np.int64)
        else:
            acc = torch.zeros(shape, device=self.device)
            count = torch.zeros(shape[1:], device=self.device)
            pick = None if channels is None else torch.tensor(channels, device=self.device)
        for grid, rows, cols in self.passes:
            a, b = rows.clip(r0, r1)
            c, d = cols.clip(c0, c1)
            if a >= b or c >= d:
                continue
            i, j = slice(a - rows.start, b - rows.start), slice(c - cols.start, d - cols.start)
            first, last = int(cols.lo[j][0]), int(cols.hi[j][-1]) + 1  # grid columns tapped
            g: Any = grid.numpy() if self.cpu else grid
            g = g[:, :, first:last] if pick is None else g[pick, :, first:last]
            up = blend(g, rows.taps.part(i), cols.taps.part(j, first))
            acc[:, a - r0 : b - r0, c - c0 : d - c0] += up
            count[a - r0 : b - r0, c - c0 : d - c0] += 1.0
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
        for _, rows, cols in self.passes:
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
        upper = torch.zeros(k, nt, nu, device=dev)
        lower = torch.zeros(k, nt, nu, device=dev)
        passes = torch.zeros(nt, nu, device=dev)
        for grid, rows, cols in self.passes:
            rt, r_first, r_last = _tile_cells(rows, row_edges, dev)
            ct, c_first, c_last = _tile_cells(cols, col_edges, dev)
            g = grid.index_select(0, channels)
            hi = _range_reduce(_range_reduce(g, r_first, r_last, 1, True), c_first, c_last, 2, True)
            lo = _range_reduce(
                _range_reduce(g, r_first, r_last, 1, False), c_first, c_last, 2, False
            )
            upper[:, rt[0] : rt[-1] + 1, ct[0] : ct[-1] + 1] += hi
            lower[:, rt[0] : rt[-1] + 1, ct[0] : ct[-1] + 1] += lo
            passes[rt[0] : rt[-1] + 1, ct[0] : ct[-1] + 1] += 1.0
        return lower / passes, upper / passes

    def argmax(self, channels: Sequence[int]) -> np.ndarray:
        """(H, W) best of ``channels`` (ascending) at every pixel, the first on ties.

        Channels that cannot win a tile (see :meth:`bounds`) are not blended there; the
        image is blended in blocks of whole tiles (see :class:`_Planner`), each with the
        channels that can win in it.
        """
        h, w = self.size
        ids = np.asarray(channels, dtype=np.int64)
        labels = np.empty((h, w), dtype=np.uint8 if ids.max() < 256 else np.int32)
        if len(ids) == 1:
            labels[:] = ids[0]
            return labels
        if len(ids) * h * w <= BLOCK_ELEMENTS:  # small: nothing worth pruning
            labels[:] = ids[self._best(ids, 0, h, w)]
            return labels
        row_edges, col_edges = self.edges(0), self.edges(1)
        lower, upper = self.bounds(torch.from_numpy(ids).to(self.device), row_edges, col_edges)
        live = upper >= lower.amax(0, keepdim=True) - PRUNE_MARGIN  # (k, tile rows, cols)
        plan = _Planner(live.cpu().numpy(), row_edges, col_edges)
        for t0, t1, u0, u1, keep in plan.blocks(0, len(row_edges) - 1, 0, len(col_edges) - 1):
            r0, r1, c0, c1 = (
                int(e) for e in (row_edges[t0], row_edges[t1], col_edges[u0], col_edges[u1])
            )
            sub = ids[keep]
            got = self.block(sub.tolist(), r0, r1, c0, c1).argmax(0)
            labels[r0:r1, c0:c1] = sub[got if self.cpu else got.cpu().numpy()]
        return labels

    def _best(self, ids: np.ndarray, r0: int, r1: int, w: int) -> np.ndarray:
        """(r1 - r0, W) int64 position in ``ids`` of the best channel on rows r0:r1."""
        got = self.block(ids.tolist(), r0, r1, 0, w).argmax(0)
        return got if self.cpu else got.cpu().numpy()

    def tapped(self, pass_index: int, integral: np.ndarray) -> np.ndarray:
        """(h, w) bool: cells of a pass's grid that some pixel of a mask taps.

        Args:
            pass_index: index in ``passes``.
            integral: the mask's :func:`_integral` table ((H + 1, W + 1)).
        """
        grid, rows, cols = self.passes[pass_index]
        r_a, r_b = _tapping(rows, int(grid.shape[1]))
        c_a, c_b = _tapping(cols, int(grid.shape[2]))
        r_a, r_b = r_a[:, None], r_b[:, None]
        count = integral[r_b, c_b] - integral[r_a, c_b] - integral[r_b, c_a] + integral[r_a, c_a]
        return count > 0


class _Planner:
    """Splits the image into tile-aligned blocks to blend, each with the channels that
    can win somewhere in it.

    A block is halved (along its longer side, at a tile edge) when its work, channels x
    pixels, exceeds ``BLOCK_ELEMENTS`` or when the halves' work plus the fixed cost of
    one more block (``BLOCK_OVERHEAD`` element-equivalents) is smaller than its own.
    """

    def __init__(self, live: np.ndarray, row_edges: np.ndarray, col_edges: np.ndarray) -> None:
        self.live, self.rows, self.cols = live, row_edges, col_edges

    def _cost(self, t0: int, t1: int, u0: int, u1: int) -> tuple[int, np.ndarray]:
        keep = np.asarray(self.live[:, t0:t1, u0:u1].any(axis=(1, 2)))
        area = int(self.rows[t1] - self.rows[t0]) * int(self.cols[u1] - self.cols[u0])
        return int(keep.sum()) * area, keep

    def blocks(
        self, t0: int, t1: int, u0: int, u1: int
    ) -> Iterator[tuple[int, int, int, int, np.ndarray]]:
        """(first tile row, end tile row, first tile col, end tile col, channel mask)."""
        work, keep = self._cost(t0, t1, u0, u1)
        if t1 - t0 == 1 and u1 - u0 == 1:
            yield t0, t1, u0, u1, keep
            return
        tall = (self.rows[t1] - self.rows[t0] >= self.cols[u1] - self.cols[u0]) and t1 - t0 > 1
        if tall or u1 - u0 == 1:
            m = (t0 + t1) // 2
            halves = [(t0, m, u0, u1), (m, t1, u0, u1)]
        else:
            m = (u0 + u1) // 2
            halves = [(t0, t1, u0, m), (t0, t1, m, u1)]
        split = sum(self._cost(*half)[0] for half in halves) + BLOCK_OVERHEAD
        if work <= BLOCK_ELEMENTS and split >= work:
            yield t0, t1, u0, u1, keep
            return
        for half in halves:
            yield from self.blocks(*half)


def _tile_cells(
    span: _Span, edges: np.ndarray, device: torch.device
) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """The tiles a span covers along one axis (``edges`` include its start and stop):
    their indices and the first and last grid cell their pixels tap."""
    first_tile = int(np.searchsorted(edges, span.start))
    last_tile = int(np.searchsorted(edges, span.stop)) - 1
    tiles = np.arange(first_tile, last_tile + 1)
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


def inverse_norms(f: torch.Tensor) -> torch.Tensor:
    """(cells,) float32 ``1 / |f[:, j]|`` (at most 1e12) of (D, cells) float32 features.

    Sums of squares over slices of at most 2**20 values: no (D, cells) temporary, and on
    the CPU several times faster than ``torch.linalg.vector_norm(f, dim=0)``.
    """
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
    sims_out: list[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel best prototype cosine at every cell of one view.

    Cosines come from (prototypes x D) x (D x cells) products, a chunk of whole channels
    at a time (at most ``SIMS_ELEMENTS`` products held at once); each channel's maximum is
    taken over its contiguous rows, the first prototype winning ties.

    Args:
        feats: (D, h, w) features of the view, on any device.
        inv_norm: their :func:`inverse_norms` ((h * w,)), when already computed.
        sims_out: if given, every prototype's cosines are appended to it as float16
            (rows, h * w) chunks in scoring-set order (the products are made anyway).

    Returns:
        values (C + 1, h, w) float32 (floored) and winners (C + 1, h, w) int16 (int32 for
        32,767 or more prototypes) scoring-set indices (-1 for channels without
        prototypes), on ``feats``' device.
    """
    d, h, w = feats.shape
    f = feats.reshape(d, h * w).to(torch.float32)
    dev = f.device
    # Cosine = (prototype . feature) / |feature| (prototypes are unit vectors). The factor
    # is positive and the same for every prototype at a cell, so maxima and winners are
    # taken on the bare products and only the (C + 1) maxima are scaled.
    if inv_norm is None:
        inv_norm = inverse_norms(f)
    vectors = packed.on(dev)
    n_ch = len(packed.offsets) - 1
    index_type = torch.int16 if len(vectors) < 2**15 - 1 else torch.int32
    values = torch.full((n_ch, h * w), -torch.inf, device=dev)
    winners = torch.full((n_ch, h * w), -1, dtype=torch.long, device=dev)
    limit = max(1, SIMS_ELEMENTS // max(1, h * w))
    for c0, c1, lo, hi, piece in _channel_chunks(packed.offsets, limit):
        if hi == lo:
            continue
        products = torch.mm(vectors[lo:hi], f)  # (rows, cells)
        if sims_out is not None:
            sims_out.append((products * inv_norm).to(torch.float16))
        if piece:  # part of one large channel: merge with what earlier pieces found
            v, a = products.max(0)
            better = v > values[c0]
            values[c0] = torch.where(better, v, values[c0])
            winners[c0] = torch.where(better, a + lo, winners[c0])
            continue
        n = (hi - lo) // (c1 - c0)
        v, a = products.view(c1 - c0, n, h * w).max(1)
        values[c0:c1] = v
        winners[c0:c1] = a + (lo + n * torch.arange(c1 - c0, device=dev)).unsqueeze(1)
    values.mul_(inv_norm)
    values = torch.where(values > floor, values, torch.zeros((), device=dev))
    return values.reshape(n_ch, h, w), winners.to(index_type).reshape(n_ch, h, w)


def _whole_view_maps(
    feats: torch.Tensor,
    packed: _Packed,
    wanted: torch.Tensor,
    inv_norm: torch.Tensor | None = None,
    sims: torch.Tensor | None = None,
) -> SimilarityMaps:
    """:class:`SimilarityMaps` of prototypes ``wanted`` ((K,) int64, sorted) over the whole
    view's features ``feats`` ((D, h, w)), computed as :func:`score_cells` does, or picked
    from ``sims`` ((Q, h * w) float16, every prototype's, when :func:`segment` kept them)."""
    d, h, w = feats.shape
    if sims is not None:
        return SimilarityMaps(wanted.cpu(), sims[wanted.to(sims.device)].cpu().reshape(-1, h, w))
    f = feats.reshape(d, h * w).to(torch.float32)
    if inv_norm is None:
        inv_norm = inverse_norms(f)
    vectors = packed.on(f.device)
    maps = torch.empty(len(wanted), h * w, dtype=torch.float16)
    step = max(1, SIMS_ELEMENTS // max(1, h * w))
    for k in range(0, len(wanted), step):
        rows = vectors[wanted[k : k + step].to(f.device)]
        maps[k : k + step] = torch.mm(rows, f).mul_(inv_norm).to(torch.float16).cpu()
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
    tensor = (
        torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1)[None].float()
        / 255.0
    )
    if (hp, wp) != (h, w):
        tensor = F.interpolate(tensor, size=(hp, wp), mode="bilinear", antialias=True)
        tensor = tensor.clamp_(0.0, 1.0)
    boxes = view_boxes((hp, wp), config)

    views: list[ViewRecord] = []
    grids: list[torch.Tensor] = []  # each pass's values on the device they were made on
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
                inv_norm = inverse_norms(feats[0].reshape(packed.dim, -1).to(torch.float32))
                cells = int(feats.shape[2] * feats.shape[3])
                sims: list[torch.Tensor] | None = None
                if vi == 0 and len(packed.vectors) * cells * 2 <= WHOLE_SIMS_BYTES:
                    sims = []  # keep the whole view's cosines: no second product later
                values, winners = score_cells(feats[0], packed, config.score_floor, inv_norm, sims)
                grids.append(values)
                views.append(ViewRecord(ex.name, (top, left, vh, vw), values.cpu(), winners.cpu()))
                if vi == 0:
                    whole_feats[ex.name] = feats[0]
                    whole_norms[ex.name] = inv_norm
                    if sims:
                        whole_sims[ex.name] = torch.cat(sims)
                if kept_feats is not None:
                    kept_bytes += feats[0].numel() * 4
                    if kept_bytes > budget:
                        kept_feats = None  # over budget: keep none
                    else:
                        kept_feats.append(feats[0].to("cpu", torch.float32, copy=True))
        labels, whole = _label_and_explain(
            views,
            grids,
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


def _label_and_explain(
    views: Sequence[ViewRecord],
    grids: Sequence[torch.Tensor] | None,
    whole_feats: dict[str, torch.Tensor],
    packs: dict[str, _Packed],
    size: tuple[int, int],
    processed: tuple[int, int],
    n_channels: int,
    whole_norms: Mapping[str, torch.Tensor] | None = None,
    whole_sims: Mapping[str, torch.Tensor] | None = None,
) -> tuple[np.ndarray, dict[str, SimilarityMaps]]:
    """The end of stage 3, shared by :func:`segment` and :func:`rescore`: the (H, W)
    labels of the passes' records and the whole-view similarity maps of the prototypes
    that explain them (``grids``: the records' values on the scoring device, or None;
    ``whole_norms``: the whole views' :func:`inverse_norms`, when already computed;
    ``whole_sims``: their (Q, cells) float16 cosines, when kept)."""
    scores = _ScoreField(views, size, processed, grids)
    labels = scores.argmax(list(range(n_channels)))
    explained = _explaining_prototypes(scores, views, labels)
    whole = {
        name: _whole_view_maps(
            whole_feats[name],
            packs[name],
            explained[name],
            (whole_norms or {}).get(name),
            (whole_sims or {}).get(name),
        )
        for name in packs
    }
    return labels, whole


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
    views: list[ViewRecord] = []
    whole_feats: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        for v, f in zip(seg.views, seg.features, strict=True):
            values, winners = score_cells(f, packs[v.extractor], seg.config.score_floor)
            views.append(ViewRecord(v.extractor, v.box, values, winners))
            whole_feats.setdefault(v.extractor, f)
        labels, whole = _label_and_explain(
            views, None, whole_feats, packs, seg.size, seg.processed_size, len(categories) + 1
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
) -> dict[str, torch.Tensor]:
    """Per extractor, the sorted scoring-set indices (int64) a trace can name: the
    winners of channel ``l`` at cells tapped by a pixel labelled ``l``, in any pass."""
    found: dict[str, set[int]] = {v.extractor: set() for v in views}
    for label in np.unique(labels).tolist():
        integral = _integral(labels == label)
        for pi, vi in enumerate(scores.pass_view):
            cells = torch.from_numpy(scores.tapped(pi, integral))
            q = views[vi].winners[label][cells]
            found[views[vi].extractor].update(q[q >= 0].unique().tolist())
    return {e: torch.tensor(sorted(qs), dtype=torch.long) for e, qs in found.items()}


def _integral(mask: np.ndarray) -> np.ndarray:
    """(H + 1, W + 1) int32 summed-area table of an (H, W) bool mask (zero first row and
    column): the count in rows a:b, columns c:d is ``I[b, d] - I[a, d] - I[b, c] + I[a, c]``."""
    out = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.int32)
    np.cumsum(mask, axis=0, dtype=np.int32, out=out[1:, 1:])
    np.cumsum(out[1:, 1:], axis=1, out=out[1:, 1:])
    return out
