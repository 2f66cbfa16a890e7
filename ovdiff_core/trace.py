"""Explain one pixel of a segmentation: which prototypes made its scores, and from where.

No model runs here: :class:`~ovdiff_core.segment.Segmentation` keeps, for every (view,
extractor) pass, the best prototype per cell and channel. A pixel's score for a channel
is the average over the passes covering it of a bilinear blend of up to four cells, so

    score[c, y, x] = sum over contributions of weight * cosine

exactly (up to float rounding). :func:`trace` lists those contributions for the winning
channel, groups them by prototype, and resolves the largest one to its support regions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ovdiff_core.segment import Segmentation, covered, interp_matrix, pixel_centres
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
            read from ``Segmentation.scores``.
        score: the winning channel's score (== ``class_scores[label_name]``).
        contributions: the terms that sum to ``score`` (see module docstring).
        winner: the prototype with the largest summed contribution (None if none).
        winner_share: its summed contribution (<= score).
        winner_cosine: its contribution-weighted mean cosine at this pixel.
        regions: the support pixels that formed the winner, one entry per support image
            (all member images for class prototypes, the one image for instance ones).
        similarity_map: (H, W) float32 cosine of the winner over the input image, from the
            whole-image view (zeros if there is no winner).
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
    similarity_map: np.ndarray


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


def _ref(seg: Segmentation, extractor: str, q: int) -> PrototypeRef:
    sc = seg.scoring[extractor]
    cat = seg.categories[int(sc.source[q]) - 1]
    bank = cat.banks[extractor]
    i = int(sc.bank_index[q])
    return PrototypeRef(
        extractor=extractor,
        category=cat.name,
        index=i,
        kind=PrototypeKind(int(bank.kinds[i])),
        foreground=bool(bank.foreground[i]),
        image_index=int(bank.image_index[i]),
    )


def decompose(seg: Segmentation, x: int, y: int, channel: int) -> list[Contribution]:
    """The terms of ``seg.scores[channel, y, x]``; their ``weight * cosine`` sum to it.

    Args:
        x, y: input-image pixel (column, row).
        channel: label channel (0 = background).
    """
    _check_point(seg, x, y)
    h, w = seg.size
    hp, wp = seg.processed_size
    yc = pixel_centres(h, hp)[y : y + 1]
    xc = pixel_centres(w, wp)[x : x + 1]
    passes = []
    for vi, v in enumerate(seg.views):
        top, left, vh, vw = v.box
        if len(covered(yc, top, vh)) and len(covered(xc, left, vw)):
            passes.append(vi)
    out: list[Contribution] = []
    for vi in passes:
        v = seg.views[vi]
        top, left, vh, vw = v.box
        gh, gw = v.grid_size
        wy = interp_matrix(yc, top, vh, gh)[0]
        wx = interp_matrix(xc, left, vw, gw)[0]
        for i in np.flatnonzero(wy):
            for j in np.flatnonzero(wx):
                q = int(v.winners[channel, i, j])
                out.append(
                    Contribution(
                        view=vi,
                        cell=(int(i), int(j)),
                        prototype=_ref(seg, v.extractor, q) if q >= 0 else None,
                        cosine=float(v.values[channel, i, j]),
                        weight=float(wy[i] * wx[j]) / len(passes),
                    )
                )
    return out


def _similarity_map(seg: Segmentation, ref: PrototypeRef, q: int) -> np.ndarray:
    h, w = seg.size
    hp, wp = seg.processed_size
    sims = seg.whole_view_sims[ref.extractor][q].double()  # (gh, gw)
    gh, gw = sims.shape
    wy = torch.from_numpy(interp_matrix(pixel_centres(h, hp), 0, hp, gh))
    wx = torch.from_numpy(interp_matrix(pixel_centres(w, wp), 0, wp, gw))
    return (wy @ sims @ wx.T).to(torch.float32).numpy()


def trace(seg: Segmentation, x: int, y: int) -> PixelTrace:
    """Explain the label of input pixel (x, y) (x = column, y = row).

    Raises:
        ValueError: if (x, y) is not a pixel of the image.
    """
    _check_point(seg, x, y)
    x, y = int(x), int(y)
    label = int(seg.labels[y, x])
    contribs = decompose(seg, x, y, label)
    totals: dict[tuple[str, int], float] = {}
    weights: dict[tuple[str, int], float] = {}
    for c in contribs:
        if c.prototype is None:
            continue
        key = (
            seg.views[c.view].extractor,
            int(seg.views[c.view].winners[label, c.cell[0], c.cell[1]]),
        )
        totals[key] = totals.get(key, 0.0) + c.weight * c.cosine
        weights[key] = weights.get(key, 0.0) + c.weight
    winner = None
    share = cosine = 0.0
    regions: list[SupportRegion] = []
    sim_map = np.zeros(seg.size, dtype=np.float32)
    if totals:
        best = max(totals, key=lambda k: (totals[k], weights[k]))
        winner = _ref(seg, best[0], best[1])
        share = totals[best]
        cosine = share / weights[best] if weights[best] > 0 else 0.0
        cat = next(c for c in seg.categories if c.name == winner.category)
        bank = cat.banks[winner.extractor]
        for idx, mask in bank.member_masks(winner.index).items():
            img = cat.support.images[idx] if cat.support is not None else None
            regions.append(SupportRegion(image_index=idx, mask=mask, image=img))
        sim_map = _similarity_map(seg, winner, best[1])
    scores = {n: float(seg.scores[k, y, x]) for k, n in enumerate(seg.class_names)}
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
