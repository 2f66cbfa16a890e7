"""Explain one pixel of a segmentation: which prototypes made its scores, and from where.

No model runs here: :class:`~ovdiff_core.segment.Segmentation` keeps, for every (view,
extractor) pass, the best prototype per cell and channel. A pixel's score for a channel
is the average over the passes covering it of a bilinear blend of up to four cells, so

    score[c, y, x] = sum over contributions of weight * cosine

exactly (up to float rounding). :func:`trace` lists those contributions for the winning
channel, groups them by prototype, and resolves the largest one to its support regions.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np
import torch

from ovdiff_core.geometry import AxisTaps, GridTaps, bilinear_taps, pixel_centres
from ovdiff_core.segment import Segmentation, ViewRecord
from ovdiff_core.types import PrototypeKind

__all__ = ["Contribution", "PixelTrace", "PrototypeRef", "SupportRegion", "decompose", "trace"]


@dataclass(frozen=True)
class PrototypeRef:
    """A prototype of a category's bank.

    Attributes:
        extractor: extractor name.
        category: the category whose bank holds it.
        index: row in that :class:`~ovdiff_core.types.PrototypeBank`.
        kind: class / instance / part.
        foreground: False for a background prototype.
        image_index: the support image of an instance prototype, else -1.
    """

    extractor: str
    category: str
    index: int
    kind: PrototypeKind
    foreground: bool
    image_index: int


@dataclass(frozen=True)
class Contribution:
    """One term of a pixel's score: ``weight * cosine`` of one prototype at one cell.

    ``view`` indexes ``Segmentation.views``; ``cell`` is (row, col) in that view's grid.
    """

    view: int
    cell: tuple[int, int]
    prototype: PrototypeRef | None  # None when the channel had no prototypes
    cosine: float
    weight: float


@dataclass
class SupportRegion:
    """Pixels of one support image that formed a prototype.

    Attributes:
        image_index: index in the category's support set.
        mask: (H, W) bool at support-image resolution.
        image: (H, W, 3) uint8 support image, or None if the category has no support set.
    """

    image_index: int
    mask: np.ndarray
    image: np.ndarray | None


@dataclass
class PixelTrace:
    """Why pixel (x, y) got its label.

    Attributes:
        x, y: the pixel (x = column, y = row) of the input image.
        label: winning channel (0 = background).
        label_name: ``class_names[label]``.
        class_scores: ``{name: score}`` of every channel at the pixel, background included,
            from :meth:`Segmentation.scores_at` (the numbers of ``Segmentation.scores``).
        score: the winning channel's score (== ``class_scores[label_name]``).
        contributions: the terms that sum to ``score`` (see module docstring).
        winner: the prototype with the largest summed contribution (None if none).
        winner_share: its summed contribution (<= score).
        winner_cosine: its contribution-weighted mean cosine at this pixel.
        regions: the support pixels that formed the winner, one entry per support image
            (all member images for class prototypes, the one image for instance ones).
        similarity_map: (H, W) float32 cosine of the winner over the input image, from the
            whole-image view (zeros if there is no winner); None when the segmentation
            did not keep the winner's map (over its budget, see
            :class:`~ovdiff_core.segment.SimilarityMaps`).
    """

    x: int
    y: int
    label: int
    label_name: str
    class_scores: dict[str, float]
    score: float
    contributions: list[Contribution]
    winner: PrototypeRef | None
    winner_share: float
    winner_cosine: float
    regions: list[SupportRegion]
    similarity_map: np.ndarray | None


def _check_point(seg: Segmentation, x: int, y: int) -> None:
    h, w = seg.size
    for name, v, hi in (("x", x, w), ("y", y, h)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise ValueError(f"trace: {name} must be an integer pixel index, got {v!r}")
        if not 0 <= int(v) < hi:
            raise ValueError(
                f"trace: point (x={x}, y={y}) is outside the {w}x{h} image; "
                f"need 0 <= x < {w} and 0 <= y < {h}"
            )


@dataclass
class _Axis:
    """Bilinear taps of every input pixel along one axis of one view.

    For input pixel ``i`` (a row or a column) inside the view, the view's cell map is
    sampled at cells ``lo[i]`` and ``hi[i]`` with weights ``1 - frac[i]`` and ``frac[i]``
    (:func:`ovdiff_core.segment.bilinear_taps`, as scores are made).
    """

    inside: np.ndarray  # (n,) bool: pixel centre lies in the view
    lo: np.ndarray  # (n,) int64
    hi: np.ndarray  # (n,) int64
    frac: np.ndarray  # (n,) float64

    @staticmethod
    def build(coords: np.ndarray, start: int, length: int, cells: int) -> _Axis:
        lo, hi, frac = bilinear_taps(coords, start, length, cells)
        return _Axis(inside=(coords >= start) & (coords < start + length), lo=lo, hi=hi, frac=frac)

    def taps(self, i: int) -> list[tuple[int, float]]:
        """Non-zero (cell, weight) pairs of pixel ``i`` (cells merged when they coincide)."""
        lo, hi, f = int(self.lo[i]), int(self.hi[i]), float(self.frac[i])
        if lo == hi:
            return [(lo, 1.0)]
        return [(c, wt) for c, wt in ((lo, 1.0 - f), (hi, f)) if wt != 0.0]


class _Cells:
    """One pass's records read a channel at a time through :class:`ViewRecord` (which
    decodes compact ones); the last channel read is kept as numpy arrays, swapped in as
    one tuple so that concurrent traces never see a mix of two channels."""

    def __init__(self, v: ViewRecord) -> None:
        self.view = v
        self.last: tuple[int, np.ndarray, np.ndarray] | None = None

    def at(self, channel: int, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(n,) float32 values and int64 scoring-set winners of ``channel`` at cells
        (rows[k], cols[k])."""
        got = self.last
        if got is None or got[0] != channel:
            v = self.view
            got = (channel, v.channel_values(channel).numpy(), v.channel_winners(channel).numpy())
            self.last = got
        return got[1][rows, cols], got[2][rows, cols]


class _TraceIndex:
    """Per-segmentation lookup tables, built on the first trace of a segmentation.

    Holds the bilinear taps of every input row and column for every view, numpy views of
    the per-cell records, and :class:`PrototypeRef` objects as they are first needed, so
    that one trace costs a few dictionary and array lookups.
    """

    def __init__(self, seg: Segmentation) -> None:
        h, w = seg.size
        hp, wp = seg.processed_size
        ys, xs = pixel_centres(h, hp), pixel_centres(w, wp)
        self.key = (id(seg.views), len(seg.views), seg.size, seg.processed_size)
        self.rows: list[_Axis] = []
        self.cols: list[_Axis] = []
        self.cells: list[_Cells] = []
        for v in seg.views:
            top, left, vh, vw = v.box
            gh, gw = v.grid_size
            self.rows.append(_Axis.build(ys, top, vh, gh))
            self.cols.append(_Axis.build(xs, left, vw, gw))
            self.cells.append(_Cells(v))
        self.source = {e: sc.source.numpy() for e, sc in seg.scoring.items()}
        self.bank_index = {e: sc.bank_index.numpy() for e, sc in seg.scoring.items()}
        self.refs: dict[tuple[str, int], PrototypeRef] = {}
        self.ys, self.xs = ys, xs
        self.hp, self.wp = hp, wp
        # whole-view grid (gh, gw) -> bilinear taps of every input row and column
        self.whole_taps: dict[tuple[int, int], GridTaps] = {}

    def whole_view_taps(self, grid: tuple[int, int]) -> GridTaps:
        """Taps that resample a whole-image view's (gh, gw) map onto the input pixels."""
        got = self.whole_taps.get(grid)
        if got is None:
            got = GridTaps(
                AxisTaps.build(self.ys, 0, self.hp, grid[0]),
                AxisTaps.build(self.xs, 0, self.wp, grid[1]),
            )
            self.whole_taps[grid] = got
        return got

    def ref(self, seg: Segmentation, extractor: str, q: int) -> PrototypeRef:
        key = (extractor, q)
        got = self.refs.get(key)
        if got is None:
            cat = seg.categories[int(self.source[extractor][q]) - 1]
            bank = cat.banks[extractor]
            i = int(self.bank_index[extractor][q])
            got = PrototypeRef(
                extractor=extractor,
                category=cat.name,
                index=i,
                kind=PrototypeKind(int(bank.kinds[i])),
                foreground=bool(bank.foreground[i]),
                image_index=int(bank.image_index[i]),
            )
            self.refs[key] = got
        return got


# id(segmentation) -> (weak reference to it, its index); entries leave with the object.
_INDEXES: dict[int, tuple[weakref.ref[Segmentation], _TraceIndex]] = {}


def _index(seg: Segmentation) -> _TraceIndex:
    """The segmentation's :class:`_TraceIndex`, built on first use and kept while the
    segmentation lives (outside the object, so copying or pickling it copies nothing)."""
    key = (id(seg.views), len(seg.views), seg.size, seg.processed_size)
    entry = _INDEXES.get(id(seg))
    if entry is not None and entry[0]() is seg and entry[1].key == key:
        return entry[1]
    idx = _TraceIndex(seg)
    ident = id(seg)

    def forget(_: object) -> None:
        _INDEXES.pop(ident, None)

    _INDEXES[ident] = (weakref.ref(seg, forget), idx)
    return idx


def decompose(seg: Segmentation, x: int, y: int, channel: int) -> list[Contribution]:
    """The terms of ``seg.scores[channel, y, x]``; their ``weight * cosine`` sum to it.

    Args:
        x, y: input-image pixel (column, row).
        channel: label channel (0 = background), ``0 <= channel < len(seg.class_names)``.
    """
    _check_point(seg, x, y)
    n_ch = len(seg.class_names)
    if isinstance(channel, bool) or not isinstance(channel, (int, np.integer)):
        raise ValueError(f"decompose: channel must be an integer label, got {channel!r}")
    if not 0 <= int(channel) < n_ch:
        raise ValueError(f"decompose: channel {channel} is not a label; need 0 <= channel < {n_ch}")
    return [c for c, _ in _terms(seg, int(x), int(y), int(channel))]


def _terms(seg: Segmentation, x: int, y: int, channel: int) -> list[tuple[Contribution, int]]:
    """:func:`decompose`'s terms (checked arguments), each with its winner's scoring-set
    index (-1 for none)."""
    idx = _index(seg)
    passes = [
        vi for vi in range(len(seg.views)) if idx.rows[vi].inside[y] and idx.cols[vi].inside[x]
    ]
    out: list[tuple[Contribution, int]] = []
    for vi in passes:
        ex = seg.views[vi].extractor
        taps = [(i, j, wy * wx) for i, wy in idx.rows[vi].taps(y) for j, wx in idx.cols[vi].taps(x)]
        ii = np.array([t[0] for t in taps], dtype=np.int64)
        jj = np.array([t[1] for t in taps], dtype=np.int64)
        values, winners = idx.cells[vi].at(channel, ii, jj)
        for k, (i, j, weight) in enumerate(taps):
            q = int(winners[k])
            term = Contribution(
                view=vi,
                cell=(i, j),
                prototype=idx.ref(seg, ex, q) if q >= 0 else None,
                cosine=float(values[k]),
                weight=weight / len(passes),
            )
            out.append((term, q))
    return out


def _similarity_map(seg: Segmentation, ref: PrototypeRef, q: int) -> np.ndarray:
    """(H, W) float32 cosine of scoring-set prototype ``q`` over the input image.

    Bilinear interpolation of the whole-image view's cell map onto the input pixels'
    centres (cell centres, edge-clamped), as the scores are made.
    """
    sims = seg.whole_view_sims[ref.extractor][q].to(torch.float32).numpy()  # (gh, gw)
    return _index(seg).whole_view_taps((int(sims.shape[0]), int(sims.shape[1]))).apply(sims)


def trace(seg: Segmentation, x: int, y: int) -> PixelTrace:
    """Explain the label of input pixel (x, y) (x = column, y = row).

    Raises:
        ValueError: if (x, y) is not a pixel of the image.
    """
    _check_point(seg, x, y)
    x, y = int(x), int(y)
    label = int(seg.labels[y, x])
    terms = _terms(seg, x, y, label)
    contribs = [c for c, _ in terms]
    idx = _index(seg)
    totals: dict[tuple[str, int], float] = {}
    weights: dict[tuple[str, int], float] = {}
    for c, q in terms:
        if q < 0:
            continue
        key = (seg.views[c.view].extractor, q)
        totals[key] = totals.get(key, 0.0) + c.weight * c.cosine
        weights[key] = weights.get(key, 0.0) + c.weight
    winner = None
    share = cosine = 0.0
    regions: list[SupportRegion] = []
    sim_map: np.ndarray | None = np.zeros(seg.size, dtype=np.float32)
    if totals:
        best = max(totals, key=lambda k: (totals[k], weights[k]))
        winner = idx.ref(seg, best[0], best[1])
        share = totals[best]
        cosine = share / weights[best] if weights[best] > 0 else 0.0
        cat = next(c for c in seg.categories if c.name == winner.category)
        bank = cat.banks[winner.extractor]
        for i, mask in bank.member_masks(winner.index).items():
            img = cat.support.images[i] if cat.support is not None else None
            regions.append(SupportRegion(image_index=i, mask=mask, image=img))
        kept = best[1] in seg.whole_view_sims[winner.extractor]
        sim_map = _similarity_map(seg, winner, best[1]) if kept else None
    at = seg.scores_at(x, y)
    scores = {n: float(at[k]) for k, n in enumerate(seg.class_names)}
    return PixelTrace(
        x=x,
        y=y,
        label=label,
        label_name=seg.class_names[label],
        class_scores=scores,
        score=scores[seg.class_names[label]],
        contributions=contribs,
        winner=winner,
        winner_share=share,
        winner_cosine=cosine,
        regions=regions,
        similarity_map=sim_map,
    )
