"""Explanations beyond one pixel's winner: top prototypes, what-if edits, prototype atlas.

No model runs here. Three views of a :class:`~ovdiff_core.segment.Segmentation`:

* :func:`top_prototypes`: the k prototypes that contribute most to the scores of one
  pixel, across every label (a local analysis, exact: the contributions of one label's
  prototypes sum to its score).
* :func:`what_if`: the segmentation with support images or single prototypes removed from
  the banks, re-scored from the target features kept by ``segment(...,
  keep_features=True)``; :func:`edited_categories` makes the same edited banks for a
  from-scratch :func:`~ovdiff_core.segment.segment`.
* :func:`atlas`: every prototype of one category's bank as a card (a global analysis):
  its member cells and images, where it fires on the image and how many pixels it wins.

**Removing a support image.** Banks keep each prototype's member cells but not the
support features, so a prototype cannot be re-averaged without an image. Excluding
support image ``i`` of a category therefore removes, from that category's bank of every
extractor, every prototype *with at least one member cell in image i*: its instance
prototype, the class prototype of each region (foreground, background) image ``i`` has
cells in, and every part prototype whose cluster holds one of its cells. Prototypes formed
without image ``i`` stay exactly as they were. The edit is exact: the result equals
:func:`~ovdiff_core.segment.segment` run from scratch on the banks that
:func:`edited_categories` returns.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from ovdiff_core.segment import Segmentation, pixel_centres, rescore
from ovdiff_core.trace import (
    PrototypeRef,
    SupportRegion,
    _check_point,
    _index,
    decompose,
)
from ovdiff_core.types import Category, PrototypeBank, PrototypeKind

__all__ = [
    "AtlasCard",
    "PrototypeShare",
    "WhatIf",
    "atlas",
    "edited_categories",
    "fire_map",
    "support_regions",
    "top_prototypes",
    "what_if",
]


# --------------------------------------------------------------------------- top prototypes


@dataclass(frozen=True)
class PrototypeShare:
    """One prototype's part in the scores of one pixel.

    Attributes:
        prototype: the prototype.
        channel: the label channel it scores for (0 = background).
        label_name: ``class_names[channel]``.
        contribution: the sum of its ``weight * cosine`` terms in that channel's score.
        share: ``contribution / score`` of the channel (0 when the score is 0); the shares
            of all prototypes of a channel sum to 1.
        cosine: its contribution-weighted mean cosine, ``contribution / weight``.
        weight: the blend weight of the cells it won (at most 1).
        source: the category whose support images formed it; for a background prototype,
            the category whose background it is (``prototype.category``).
    """

    prototype: PrototypeRef
    channel: int
    label_name: str
    contribution: float
    share: float
    cosine: float
    weight: float
    source: str


def top_prototypes(seg: Segmentation, x: int, y: int, k: int = 5) -> list[PrototypeShare]:
    """The ``k`` prototypes with the largest contributions at input pixel (x, y).

    Every channel's score is decomposed (:func:`~ovdiff_core.trace.decompose`) and its
    terms are summed per prototype; the prototypes of all channels are ranked together,
    largest contribution first (ties: larger weight, then channel, extractor, row).
    Support regions are not resolved here: see :func:`support_regions`.

    Args:
        x, y: input-image pixel (x = column, y = row).
        k: how many to return (>= 1); fewer when fewer prototypes take part.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"top_prototypes: k must be a positive integer, got {k!r}")
    _check_point(seg, x, y)
    scores = seg.scores_at(int(x), int(y))
    groups: dict[tuple[int, PrototypeRef], list[float]] = {}
    for c in range(len(seg.class_names)):
        for t in decompose(seg, x, y, c):
            if t.prototype is None:
                continue
            acc = groups.setdefault((c, t.prototype), [0.0, 0.0])
            acc[0] += t.weight * t.cosine
            acc[1] += t.weight
    order = sorted(
        groups.items(),
        key=lambda kv: (-kv[1][0], -kv[1][1], kv[0][0], kv[0][1].extractor, kv[0][1].index),
    )
    out = []
    for (c, ref), (contribution, weight) in order[: int(k)]:
        score = float(scores[c])
        out.append(
            PrototypeShare(
                prototype=ref,
                channel=c,
                label_name=seg.class_names[c],
                contribution=contribution,
                share=contribution / score if score != 0 else 0.0,
                cosine=contribution / weight if weight > 0 else 0.0,
                weight=weight,
                source=ref.category,
            )
        )
    return out


def _category(seg: Segmentation, name: str, who: str) -> Category:
    for c in seg.categories:
        if c.name == name:
            return c
    raise ValueError(f"{who}: {name!r} is not a class of this segmentation {seg.class_names[1:]}")


def support_regions(seg: Segmentation, prototype: PrototypeRef) -> list[SupportRegion]:
    """The support pixels that formed ``prototype``, one entry per support image with
    member cells, in increasing image order; masks are (H, W) bool at support-image
    resolution (see :class:`~ovdiff_core.trace.SupportRegion`)."""
    cat = _category(seg, prototype.category, "support_regions")
    bank = _bank(cat, prototype.extractor, "support_regions")
    _check_row(bank, prototype, "support_regions")
    images = cat.support.images if cat.support is not None else None
    return [
        SupportRegion(image_index=i, mask=m, image=images[i] if images is not None else None)
        for i, m in bank.member_masks(prototype.index).items()
    ]


def _bank(cat: Category, extractor: str, who: str) -> PrototypeBank:
    bank = cat.banks.get(extractor)
    if bank is None:
        raise ValueError(
            f"{who}: category {cat.name!r} has no bank for extractor {extractor!r}; "
            f"it has {sorted(cat.banks)}"
        )
    return bank


def _check_row(bank: PrototypeBank, ref: PrototypeRef, who: str) -> None:
    i = ref.index
    if not 0 <= i < len(bank) or (
        PrototypeKind(int(bank.kinds[i])) != ref.kind
        or bool(bank.foreground[i]) != ref.foreground
        or int(bank.image_index[i]) != ref.image_index
    ):
        raise ValueError(
            f"{who}: prototype {i} of {ref.category!r} ({ref.extractor}) is not in the "
            "segmentation's bank; take prototype references from this segmentation"
        )


# --------------------------------------------------------------------------- what-if


@dataclass
class WhatIf:
    """A segmentation with prototypes removed from the banks.

    Attributes:
        segmentation: the edited :class:`Segmentation` (same image, features and config;
            edited categories); the original is not changed, so restoring is using it.
        changed: (H, W) bool, pixels whose label differs from the original's.
        removed: every prototype taken out of the banks, in category, extractor, row order.
    """

    segmentation: Segmentation
    changed: np.ndarray
    removed: list[PrototypeRef]


def _ref(bank: PrototypeBank, cat: str, extractor: str, i: int) -> PrototypeRef:
    return PrototypeRef(
        extractor=extractor,
        category=cat,
        index=i,
        kind=PrototypeKind(int(bank.kinds[i])),
        foreground=bool(bank.foreground[i]),
        image_index=int(bank.image_index[i]),
    )


def _rows_with_images(bank: PrototypeBank, images: Sequence[int]) -> set[int]:
    """Rows of ``bank`` with at least one member cell in a support image of ``images``."""
    gh, gw = bank.grid_size
    lengths = torch.diff(bank.member_offsets)
    owner = torch.repeat_interleave(torch.arange(len(bank)), lengths)
    hit = torch.isin(bank.member_cells // (gh * gw), torch.tensor(list(images), dtype=torch.long))
    return {int(p) for p in owner[hit].unique().tolist()}


def without_rows(bank: PrototypeBank, rows: Iterable[int]) -> PrototypeBank:
    """A copy of ``bank`` without prototypes ``rows`` (members and order of the others
    kept; ``bank`` is not changed)."""
    drop = set(rows)
    keep = torch.tensor([p for p in range(len(bank)) if p not in drop], dtype=torch.long)
    offsets = bank.member_offsets
    lengths = torch.diff(offsets)[keep]
    new_offsets = torch.zeros(len(keep) + 1, dtype=offsets.dtype)
    new_offsets[1:] = torch.cumsum(lengths, 0)
    pieces = [bank.member_cells[int(offsets[p]) : int(offsets[p + 1])] for p in keep.tolist()]
    cells = torch.cat(pieces) if pieces else bank.member_cells[:0]
    return PrototypeBank(
        category=bank.category,
        extractor=bank.extractor,
        vectors=bank.vectors[keep].contiguous(),
        foreground=bank.foreground[keep],
        kinds=bank.kinds[keep],
        image_index=bank.image_index[keep],
        member_offsets=new_offsets,
        member_cells=cells,
        grid_size=bank.grid_size,
        image_size=bank.image_size,
        settings=dict(bank.settings),
    )


def edited_categories(
    categories: Sequence[Category],
    exclude_prototypes: Iterable[PrototypeRef] = (),
    exclude_images: Mapping[str, Iterable[int]] | None = None,
) -> tuple[list[Category], list[PrototypeRef]]:
    """``categories`` with prototypes removed from their banks (inputs are not changed).

    Args:
        categories: the categories (e.g. ``seg.categories``).
        exclude_prototypes: prototypes to remove (from their own extractor's bank only).
        exclude_images: ``{category name: [support image index, ...]}``; removes from
            that category's bank of every extractor each prototype with a member cell in
            one of those images (see the module docstring).

    Returns:
        The edited categories (unedited ones are the same objects; edited ones are new
        :class:`Category` objects with new banks) and the removed prototypes.

    Raises:
        ValueError: an unknown category, extractor, prototype or image index.
    """
    by_name = {c.name: c for c in categories}
    drop: dict[tuple[str, str], set[int]] = {}
    for ref in exclude_prototypes:
        if not isinstance(ref, PrototypeRef):
            raise ValueError(f"exclude_prototypes: expected PrototypeRef objects, got {ref!r}")
        if ref.category not in by_name:
            raise ValueError(f"exclude_prototypes: {ref.category!r} is not a category here")
        bank = _bank(by_name[ref.category], ref.extractor, "exclude_prototypes")
        _check_row(bank, ref, "exclude_prototypes")
        drop.setdefault((ref.category, ref.extractor), set()).add(ref.index)
    for name, images in (exclude_images or {}).items():
        if name not in by_name:
            raise ValueError(
                f"exclude_images: {name!r} is not a category here; have {sorted(by_name)}"
            )
        cat = by_name[name]
        idx = list(images)
        n = len(cat.support) if cat.support is not None else None
        for i in idx:
            if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or i < 0:
                raise ValueError(f"exclude_images: image indices must be integers >= 0, got {i!r}")
            if n is not None and i >= n:
                raise ValueError(
                    f"exclude_images: {name!r} has {n} support images (0..{n - 1}), not {i}"
                )
        for ex, bank in cat.banks.items():
            if idx:
                drop.setdefault((name, ex), set()).update(_rows_with_images(bank, idx))
    out: list[Category] = []
    removed: list[PrototypeRef] = []
    for cat in categories:
        banks = dict(cat.banks)
        edited = False
        for ex, bank in cat.banks.items():
            rows = drop.get((cat.name, ex))
            if rows:
                removed += [_ref(bank, cat.name, ex, i) for i in sorted(rows)]
                banks[ex] = without_rows(bank, rows)
                edited = True
        out.append(Category(cat.name, banks, cat.support, cat.stuff) if edited else cat)
    return out, removed


def what_if(
    seg: Segmentation,
    exclude_prototypes: Iterable[PrototypeRef] = (),
    exclude_images: Mapping[str, Iterable[int]] | None = None,
) -> WhatIf:
    """``seg`` re-scored without some prototypes or support images; no model runs.

    Only stage 3's scoring runs again, on the target features ``seg`` kept
    (``segment(..., keep_features=True)``), with the banks of :func:`edited_categories`.
    The result equals a from-scratch ``segment()`` with those banks (scores to float
    rounding). ``seg`` is not changed: restoring means showing ``seg`` again.

    Args:
        exclude_prototypes: prototypes to remove, e.g. from :func:`top_prototypes`.
        exclude_images: ``{category name: [support image index, ...]}``.

    Raises:
        ValueError: ``seg`` kept no features (the message says why and what to do), or an
            unknown category, prototype or image.
    """
    cats, removed = edited_categories(seg.categories, exclude_prototypes, exclude_images)
    rows: dict[tuple[str, str], list[int]] = {}
    for r in removed:
        rows.setdefault((r.category, r.extractor), []).append(r.index)
    edited = rescore(seg, cats, rows)
    return WhatIf(segmentation=edited, changed=edited.labels != seg.labels, removed=removed)


# --------------------------------------------------------------------------- atlas


@dataclass
class AtlasCard:
    """One prototype of a category's bank, as seen in one segmentation.

    Attributes:
        prototype: the prototype.
        channel: the label channel it scores for in this segmentation (0 = background), or
            None when it is not scored (a background prototype removed by the stuff filter
            or with ``background`` off).
        members: its number of member cells (support feature cells it is the mean of).
        member_images: support images holding its member cells, increasing.
        top_images: its "strongest support patches": (support image, member cells in it)
            for the images with the most member cells, most first (ties: lower index);
            masks via :func:`support_regions`.
        fires: (gh, gw) float32 cosine of the prototype at every cell of the whole-image
            view of its extractor (:func:`fire_map` resamples it to (H, W)); from the kept
            features when ``seg`` has them, else from ``seg.whole_view_sims`` (float16 or 8-bit
            maps of the prototypes some pixel's trace can name), else None.
        peak: the largest value of ``fires`` (None with it).
        pixels_won: input pixels it wins: pixels labelled with its channel whose nearest
            whole-view cell (the cell containing the pixel's centre) has it as that
            channel's best prototype.
    """

    prototype: PrototypeRef
    channel: int | None
    members: int
    member_images: list[int]
    top_images: list[tuple[int, int]]
    fires: np.ndarray | None
    peak: float | None
    pixels_won: int


AtlasSort = Literal["pixels", "members", "peak", "index"]


def _whole_pass(seg: Segmentation, extractor: str) -> int:
    for i, v in enumerate(seg.views):
        if v.extractor == extractor and v.box == (0, 0, *seg.processed_size):
            return i
    raise ValueError(f"no whole-image view for extractor {extractor!r}")


def pixels_won(seg: Segmentation, extractor: str) -> np.ndarray:
    """(Q,) int64: per scoring-set prototype of ``extractor``, the pixels it wins (see
    :attr:`AtlasCard.pixels_won`)."""
    v = seg.views[_whole_pass(seg, extractor)]
    gh, gw = v.grid_size
    hp, wp = seg.processed_size
    h, w = seg.size
    rows = np.minimum((pixel_centres(h, hp) * (gh / hp)).astype(np.int64), gh - 1)
    cols = np.minimum((pixel_centres(w, wp) * (gw / wp)).astype(np.int64), gw - 1)
    q = np.full(seg.size, -1, dtype=np.int64)
    for label in np.unique(seg.labels).tolist():  # per label: one channel's winners
        at = seg.labels == label
        ys, xs = np.nonzero(at)
        q[at] = v.channel_winners(int(label)).numpy()[rows[ys], cols[xs]]
    n_q = len(seg.scoring[extractor].channel)
    return np.bincount(q[q >= 0], minlength=n_q)


def atlas(
    seg: Segmentation,
    category_name: str,
    extractor: str,
    sort_by: AtlasSort = "pixels",
    n_images: int = 3,
) -> list[AtlasCard]:
    """Every prototype (foreground and background) of one category's bank, as cards.

    Args:
        category_name: a class of ``seg`` (``seg.class_names[1:]``).
        extractor: one of ``seg.extractors``.
        sort_by: ``"pixels"`` (pixels won), ``"members"`` (member cells), ``"peak"``
            (largest cosine on the image; cards without a map last): largest first;
            ``"index"``: bank order. Ties keep bank order.
        n_images: how many support images ``top_images`` lists (>= 1).
    """
    if sort_by not in ("pixels", "members", "peak", "index"):
        raise ValueError(
            f"atlas: sort_by must be 'pixels', 'members', 'peak' or 'index', got {sort_by!r}"
        )
    if isinstance(n_images, bool) or not isinstance(n_images, int) or n_images < 1:
        raise ValueError(f"atlas: n_images must be a positive integer, got {n_images!r}")
    if extractor not in seg.scoring:
        raise ValueError(f"atlas: extractor {extractor!r} is not one of {seg.extractors}")
    cat = _category(seg, category_name, "atlas")
    bank = _bank(cat, extractor, "atlas")
    source = seg.class_names.index(category_name)
    sc = seg.scoring[extractor]
    mine = torch.nonzero(sc.source == source).flatten().tolist()
    q_of = {int(sc.bank_index[q]): q for q in mine}
    won = pixels_won(seg, extractor)
    fires = _fires(seg, bank, extractor, q_of)
    gh, gw = bank.grid_size
    cards = []
    for p in range(len(bank)):
        lo, hi = int(bank.member_offsets[p]), int(bank.member_offsets[p + 1])
        imgs, counts = np.unique(bank.member_cells[lo:hi].numpy() // (gh * gw), return_counts=True)
        top = sorted(zip(imgs.tolist(), counts.tolist(), strict=True), key=lambda t: (-t[1], t[0]))
        q = q_of.get(p)
        f = fires.get(p)
        cards.append(
            AtlasCard(
                prototype=_ref(bank, category_name, extractor, p),
                channel=int(sc.channel[q]) if q is not None else None,
                members=hi - lo,
                member_images=imgs.tolist(),
                top_images=top[:n_images],
                fires=f,
                peak=float(f.max()) if f is not None and f.size else None,
                pixels_won=int(won[q]) if q is not None else 0,
            )
        )
    keys = {
        "pixels": lambda c: -c.pixels_won,
        "members": lambda c: -c.members,
        "peak": lambda c: -c.peak if c.peak is not None else np.inf,
        "index": lambda c: 0,
    }
    return sorted(cards, key=keys[sort_by])  # stable: ties stay in bank order


def _fires(
    seg: Segmentation, bank: PrototypeBank, extractor: str, q_of: dict[int, int]
) -> dict[int, np.ndarray]:
    """Bank row -> (gh, gw) float32 whole-view cosine map, for the rows that have one."""
    vi = _whole_pass(seg, extractor)
    if seg.features is not None:
        f = seg.features[vi]
        d, gh, gw = f.shape
        flat = f.reshape(d, gh * gw).to(torch.float32)
        inv_norm = torch.linalg.vector_norm(flat, dim=0).clamp(min=1e-12).reciprocal()
        cos = (bank.vectors.to(torch.float32) @ flat) * inv_norm
        maps = cos.reshape(len(bank), gh, gw).numpy()
        return {p: maps[p] for p in range(len(bank))}
    sims = seg.whole_view_sims.get(extractor)
    if sims is None:
        return {}
    return {p: sims[q].to(torch.float32).numpy() for p, q in q_of.items() if q in sims}


def fire_map(seg: Segmentation, card: AtlasCard) -> np.ndarray | None:
    """(H, W) float32: ``card.fires`` resampled to the input pixels (bilinear at pixel
    centres, edge-clamped, as the scores are made), or None when the card has no map."""
    if card.fires is None:
        return None
    grid = card.fires.astype(np.float32, copy=False)
    return _index(seg).whole_view_taps((int(grid.shape[0]), int(grid.shape[1]))).apply(grid)
