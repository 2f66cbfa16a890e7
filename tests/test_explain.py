"""Explanations: top prototypes sum to the scores, what-if edits equal from-scratch runs,
atlas cards count what they claim."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from ovdiff_core.colorworld import ColorExtractor, ColorGenerator, ColorWorld, paint_scene
from ovdiff_core.config import PrototypeConfig, SegmentConfig
from ovdiff_core.explain import (
    atlas,
    edited_categories,
    fire_map,
    support_regions,
    top_prototypes,
    what_if,
)
from ovdiff_core.pipeline import OVDiff
from ovdiff_core.segment import Segmentation, segment
from ovdiff_core.trace import trace
from ovdiff_core.types import Category, PrototypeKind

WORLD = ColorWorld.default()


@pytest.fixture(scope="module")
def model() -> OVDiff:
    """Two extractors (strides 8 and 4); grass is a stuff class (stuff filter active)."""
    extractors = [ColorExtractor("c8", stride=8), ColorExtractor("c4", stride=4, dim=32, seed=1)]
    m = OVDiff(
        ColorGenerator(WORLD, n_images=4), extractors, prototype_config=PrototypeConfig(n_parts=6)
    )
    m.build(["cat", "sofa", "lamp", "grass"])
    return m


def target(size: tuple[int, int]) -> np.ndarray:
    h, w = size
    img, _ = paint_scene(
        size,
        (40, 40, 40),
        [
            (WORLD.parts["cat"], (h // 8, w // 8, h // 2, w // 3)),
            (WORLD.parts["sofa"], (h // 2, w // 2, h // 3, w // 3)),
            (WORLD.parts["grass"], (h - h // 6, 0, h // 6, w // 4)),
        ],
        seed=1,
    )
    return img


CONFIGS = {
    "one-view": (["c8"], (30, 45), SegmentConfig(short_side=24, windows=False)),
    "windows-two-extractors": (
        ["c8", "c4"],
        (40, 52),
        SegmentConfig(short_side=32, window_sizes=(24, 16), window_stride=8),
    ),
}


def run(model: OVDiff, key: str, cats: list[Category] | None = None, **kw) -> Segmentation:
    names, size, cfg = CONFIGS[key]
    extractors = [e for e in model.extractors if e.name in names]
    categories = list(model.categories.values()) if cats is None else cats
    return segment(target(size), categories, extractors, cfg, **kw)


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request: pytest.FixtureRequest, model: OVDiff) -> tuple[str, Segmentation]:
    return request.param, run(model, request.param, keep_features=True)


# --------------------------------------------------------------------------- top prototypes


def test_top_prototypes_sum_to_every_score(case: tuple[str, Segmentation]) -> None:
    _, seg = case
    h, w = seg.size
    for x, y in ((0, 0), (w // 4, h // 4), (w // 2, 2 * h // 3), (w - 1, h - 1)):
        every = top_prototypes(seg, x, y, k=10**6)
        at = seg.scores_at(x, y)
        contributions = [e.contribution for e in every]
        assert contributions == sorted(contributions, reverse=True)
        assert {e.channel for e in every} == set(range(len(seg.class_names)))
        for c in range(len(seg.class_names)):
            mine = [e for e in every if e.channel == c]
            assert sum(e.contribution for e in mine) == pytest.approx(float(at[c]), abs=1e-5)
            # every cell of every pass has a winner: blend weights sum to 1 per channel
            assert sum(e.weight for e in mine) == pytest.approx(1.0, abs=1e-9)
            if at[c] > 0:
                assert sum(e.share for e in mine) == pytest.approx(1.0, abs=1e-4)
        for e in every:
            ref = e.prototype
            assert e.label_name == seg.class_names[e.channel]
            assert ref.foreground == (e.channel > 0) and e.source == ref.category
            if e.channel > 0:
                assert ref.category == seg.class_names[e.channel]
            assert e.cosine == pytest.approx(e.contribution / e.weight)
            assert -1.0 - 1e-6 <= e.cosine <= 1.0 + 1e-6
        # the best prototype of the pixel's own label is trace's winner
        tr = trace(seg, x, y)
        own = [e for e in every if e.channel == tr.label]
        assert own[0].prototype == tr.winner
        assert own[0].contribution == pytest.approx(tr.winner_share, abs=1e-9)
        # k keeps a prefix
        assert top_prototypes(seg, x, y, k=3) == every[:3]


def test_background_prototypes_name_their_support_category(case: tuple[str, Segmentation]) -> None:
    _, seg = case
    bg = [e for e in top_prototypes(seg, 1, 1, k=10**6) if e.channel == 0]
    assert bg and {e.source for e in bg} <= set(seg.class_names[1:])
    for e in bg:
        bank = next(c for c in seg.categories if c.name == e.source).banks[e.prototype.extractor]
        assert not bool(bank.foreground[e.prototype.index])


def test_support_regions_are_the_member_cells(case: tuple[str, Segmentation]) -> None:
    _, seg = case
    h, w = seg.size
    for e in top_prototypes(seg, w // 4, h // 4, k=4):
        cat = next(c for c in seg.categories if c.name == e.prototype.category)
        expected = cat.banks[e.prototype.extractor].member_masks(e.prototype.index)
        regions = support_regions(seg, e.prototype)
        assert [r.image_index for r in regions] == list(expected)
        assert cat.support is not None
        for r in regions:
            assert np.array_equal(r.mask, expected[r.image_index])
            assert np.array_equal(r.image, cat.support.images[r.image_index])


@pytest.mark.parametrize("k", [0, -1, 1.5, True])
def test_top_prototypes_bad_k(case: tuple[str, Segmentation], k: object) -> None:
    with pytest.raises(ValueError, match="k must be"):
        top_prototypes(case[1], 0, 0, k=k)  # type: ignore[arg-type]


def test_top_prototypes_bad_point(case: tuple[str, Segmentation]) -> None:
    w = case[1].size[1]
    with pytest.raises(ValueError, match="outside"):
        top_prototypes(case[1], w, 0)


# --------------------------------------------------------------------------- what-if


def assert_same(edited: Segmentation, fresh: Segmentation) -> None:
    assert edited.class_names == fresh.class_names
    np.testing.assert_allclose(edited.scores, fresh.scores, rtol=0, atol=1e-5)
    differ = edited.labels != fresh.labels
    if differ.any():  # only where two channels tie
        top2 = np.sort(fresh.scores, axis=0)[-2:]
        assert np.all((top2[1] - top2[0])[differ] < 1e-5)
    for a, b in zip(edited.views, fresh.views, strict=True):
        assert a.box == b.box and a.extractor == b.extractor
        torch.testing.assert_close(a.values, b.values, rtol=0, atol=1e-5)
    for ex in fresh.scoring:
        assert edited.scoring[ex].dropped_by_stuff == fresh.scoring[ex].dropped_by_stuff
        for name in ("channel", "source", "bank_index"):
            assert torch.equal(getattr(edited.scoring[ex], name), getattr(fresh.scoring[ex], name))


def snapshot(seg: Segmentation) -> tuple:
    return (
        seg.labels.copy(),
        [v.values.clone() for v in seg.views],
        [v.winners.clone() for v in seg.views],
        [(c.name, {e: len(b) for e, b in c.banks.items()}) for c in seg.categories],
        copy.deepcopy(seg.class_names),
    )


def assert_unchanged(seg: Segmentation, snap: tuple) -> None:
    labels, values, winners, banks, names = snap
    assert np.array_equal(seg.labels, labels) and seg.class_names == names
    assert all(torch.equal(a.values, b) for a, b in zip(seg.views, values, strict=True))
    assert all(torch.equal(a.winners, b) for a, b in zip(seg.views, winners, strict=True))
    assert [(c.name, {e: len(b) for e, b in c.banks.items()}) for c in seg.categories] == banks


def test_excluding_a_prototype_equals_a_fresh_segmentation(
    case: tuple[str, Segmentation], model: OVDiff
) -> None:
    key, seg = case
    h, w = seg.size
    snap = snapshot(seg)
    # the prototype that dominates the cat region
    ref = next(e for e in top_prototypes(seg, w // 4, h // 4, k=50) if e.channel > 0).prototype
    result = what_if(seg, exclude_prototypes=[ref])
    assert result.removed == [ref]
    cats, removed = edited_categories(seg.categories, exclude_prototypes=[ref])
    assert removed == [ref]
    bank = next(c for c in cats if c.name == ref.category).banks[ref.extractor]
    old = next(c for c in seg.categories if c.name == ref.category).banks[ref.extractor]
    assert len(bank) == len(old) - 1
    fresh = run(model, key, cats)
    assert_same(result.segmentation, fresh)
    # the edit did something, and `changed` marks exactly the relabelled pixels
    assert not np.array_equal(result.segmentation.scores, seg.scores)
    assert np.array_equal(result.changed, result.segmentation.labels != seg.labels)
    assert_unchanged(seg, snap)  # restore = the original, untouched


def test_excluding_support_images_equals_a_fresh_segmentation(
    case: tuple[str, Segmentation], model: OVDiff
) -> None:
    key, seg = case
    snap = snapshot(seg)
    drop = {"cat": [0, 2], "sofa": [1]}
    result = what_if(seg, exclude_images=drop)
    cats, removed = edited_categories(seg.categories, exclude_images=drop)
    assert result.removed == removed
    # removed: exactly the prototypes with a member cell in an excluded image
    expected = set()
    for c in seg.categories:
        for ex, bank in c.banks.items():
            for p in range(len(bank)):
                if set(bank.members(p)[0].tolist()) & set(drop.get(c.name, [])):
                    expected.add((c.name, ex, p))
    assert {(r.category, r.extractor, r.index) for r in removed} == expected
    kinds = {r.kind for r in removed}
    assert PrototypeKind.INSTANCE in kinds and PrototypeKind.CLASS in kinds
    # the kept prototypes are the old rows, unchanged and in order
    for old, new in zip(seg.categories, cats, strict=True):
        for ex, bank in old.banks.items():
            gone = {r.index for r in removed if r.category == old.name and r.extractor == ex}
            keep = [p for p in range(len(bank)) if p not in gone]
            assert torch.equal(new.banks[ex].vectors, bank.vectors[keep])
            for j, p in enumerate(keep):
                assert all(
                    np.array_equal(a, b)
                    for a, b in zip(new.banks[ex].members(j), bank.members(p), strict=True)
                )
        if old.name not in drop:
            assert new is old
    fresh = run(model, key, cats)
    assert_same(result.segmentation, fresh)
    assert not np.array_equal(result.segmentation.scores, seg.scores)
    assert np.array_equal(result.changed, result.segmentation.labels != seg.labels)
    assert_unchanged(seg, snap)


def test_removing_a_whole_label_relabels_its_pixels(case: tuple[str, Segmentation]) -> None:
    _, seg = case
    cat_ch = seg.class_names.index("cat")
    assert (seg.labels == cat_ch).any()
    cat = seg.categories[cat_ch - 1]
    n = len(cat.support) if cat.support is not None else 0
    result = what_if(seg, exclude_images={"cat": list(range(n))})
    # no cat prototypes left: the cat channel scores 0 and wins nowhere a rival scores > 0
    assert np.all(result.segmentation.score_map(cat_ch) == 0)
    assert result.changed[seg.labels == cat_ch].all()
    # chained edits work on the edited segmentation
    again = what_if(result.segmentation, exclude_images={"sofa": [0]})
    assert again.removed and all(r.category == "sofa" for r in again.removed)


def test_what_if_needs_kept_features(model: OVDiff) -> None:
    seg = run(model, "one-view")
    assert seg.features is None
    with pytest.raises(ValueError, match="keep_features=True"):
        what_if(seg, exclude_images={"cat": [0]})


def test_features_are_the_passes_inputs(case: tuple[str, Segmentation], model: OVDiff) -> None:
    key, seg = case
    assert seg.features is not None and len(seg.features) == len(seg.views)
    extra = 0
    for v, f in zip(seg.views, seg.features, strict=True):
        assert f.dtype == torch.float32 and f.device.type == "cpu"
        assert tuple(f.shape[1:]) == v.grid_size
        assert f.shape[0] == seg.categories[0].banks[v.extractor].dim
        extra += f.numel() * 4
    kept, plain = run(model, key, keep_features=True), run(model, key)  # no cached scores
    assert kept.nbytes == plain.nbytes + extra
    assert np.array_equal(kept.labels, plain.labels)


def test_feature_budget(model: OVDiff, monkeypatch: pytest.MonkeyPatch) -> None:
    need = sum(f.numel() * 4 for f in run(model, "one-view", keep_features=True).features or [])
    monkeypatch.setenv("OVDIFF_WHATIF_MAX_MB", str(need / 2**20))
    assert run(model, "one-view", keep_features=True).features is not None  # exactly fits
    monkeypatch.setenv("OVDIFF_WHATIF_MAX_MB", str((need - 4) / 2**20))
    over = run(model, "one-view", keep_features=True)
    assert over.features is None
    with pytest.raises(ValueError, match="OVDIFF_WHATIF_MAX_MB"):
        what_if(over, exclude_images={"cat": [0]})
    monkeypatch.setenv("OVDIFF_WHATIF_MAX_MB", "lots")
    with pytest.raises(ValueError, match="OVDIFF_WHATIF_MAX_MB"):
        run(model, "one-view", keep_features=True)


def test_what_if_bad_edits(case: tuple[str, Segmentation]) -> None:
    _, seg = case
    ref = top_prototypes(seg, 0, 0, k=1)[0].prototype
    with pytest.raises(ValueError, match="not a category"):
        what_if(seg, exclude_images={"dog": [0]})
    with pytest.raises(ValueError, match="support images"):
        what_if(seg, exclude_images={"cat": [99]})
    with pytest.raises(ValueError, match="integers >= 0"):
        what_if(seg, exclude_images={"cat": [-1]})
    stale = type(ref)(ref.extractor, ref.category, 10**4, ref.kind, ref.foreground, -1)
    with pytest.raises(ValueError, match="not in the segmentation's bank"):
        what_if(seg, exclude_prototypes=[stale])
    with pytest.raises(ValueError, match="PrototypeRef"):
        what_if(seg, exclude_prototypes=["cat"])  # type: ignore[list-item]


# --------------------------------------------------------------------------- atlas


def nearest_cell_winners(seg: Segmentation, extractor: str) -> np.ndarray:
    """(H, W) scoring-set index winning each pixel's label at its nearest whole-view cell,
    computed pixel by pixel."""
    v = next(v for v in seg.views if v.extractor == extractor)
    assert v.box == (0, 0, *seg.processed_size)
    gh, gw = v.grid_size
    (h, w), (hp, wp) = seg.size, seg.processed_size
    out = np.empty((h, w), dtype=np.int64)
    for y in range(h):
        for x in range(w):
            cy, cx = (y + 0.5) * hp / h, (x + 0.5) * wp / w  # processed-pixel centre
            i, j = min(int(cy // (hp / gh)), gh - 1), min(int(cx // (wp / gw)), gw - 1)
            out[y, x] = int(v.winners[int(seg.labels[y, x]), i, j])
    return out


def test_atlas_cards(case: tuple[str, Segmentation]) -> None:
    _, seg = case
    for ex in seg.extractors:
        winners = nearest_cell_winners(seg, ex)
        total = 0
        for name in seg.class_names[1:]:
            cat = next(c for c in seg.categories if c.name == name)
            bank = cat.banks[ex]
            cards = atlas(seg, name, ex, sort_by="index")
            assert [c.prototype.index for c in cards] == list(range(len(bank)))
            sc = seg.scoring[ex]
            for card in cards:
                p = card.prototype.index
                imgs = bank.members(p)[0]
                assert card.members == len(imgs)
                assert card.member_images == sorted(set(imgs.tolist()))
                counts = [(i, int((imgs == i).sum())) for i in card.member_images]
                counts.sort(key=lambda t: (-t[1], t[0]))
                assert card.top_images == counts[:3]
                hit = np.flatnonzero(
                    (sc.source.numpy() == seg.class_names.index(name))
                    & (sc.bank_index.numpy() == p)
                )
                if len(hit):
                    q = int(hit[0])
                    assert card.channel == int(sc.channel[q])
                    assert card.pixels_won == int((winners == q).sum())
                else:  # dropped by the stuff filter
                    assert card.channel is None and card.pixels_won == 0
                    assert not card.prototype.foreground
                assert card.channel is None or (card.channel > 0) == card.prototype.foreground
                total += card.pixels_won
        assert total == seg.labels.size  # every pixel is won by exactly one prototype


def test_atlas_fires_and_sorting(case: tuple[str, Segmentation], model: OVDiff) -> None:
    key, seg = case
    ex = seg.extractors[0]
    sims = seg.whole_view_sims[ex]
    sc = seg.scoring[ex]
    cards = atlas(seg, "cat", ex)
    plain = run(model, key)  # no kept features: maps only where whole_view_sims has them
    plain_cards = {c.prototype.index: c for c in atlas(plain, "cat", ex)}
    cat_ch = seg.class_names.index("cat")
    n_maps = 0
    for card in cards:
        assert card.fires is not None and card.fires.dtype == np.float32
        assert card.peak == pytest.approx(float(card.fires.max()))
        hit = np.flatnonzero(
            (sc.source.numpy() == cat_ch) & (sc.bank_index.numpy() == card.prototype.index)
        )
        q = int(hit[0]) if len(hit) else -1
        other = plain_cards[card.prototype.index]
        if q in sims:
            n_maps += 1
            np.testing.assert_allclose(card.fires, sims[q].float().numpy(), atol=2e-3)
            assert other.fires is not None
            np.testing.assert_array_equal(other.fires, sims[q].float().numpy())
        else:
            assert other.fires is None and other.peak is None
        up = fire_map(seg, card)
        assert up is not None and up.shape == seg.size
        assert up.max() <= card.fires.max() + 1e-6 and up.min() >= card.fires.min() - 1e-6
    assert n_maps > 0
    # fire_map of the trace winner is the trace's similarity map
    h, w = seg.size
    tr = trace(seg, w // 4, h // 4)
    assert tr.winner is not None and tr.winner.category == "cat"
    won = atlas(plain, "cat", tr.winner.extractor)
    card = next(c for c in won if c.prototype == tr.winner)
    np.testing.assert_allclose(fire_map(plain, card), tr.similarity_map, atol=1e-6)
    # sorting
    assert [c.pixels_won for c in cards] == sorted((c.pixels_won for c in cards), reverse=True)
    assert cards[0].pixels_won > 0
    by_members = atlas(seg, "cat", ex, sort_by="members")
    assert [c.members for c in by_members] == sorted((c.members for c in cards), reverse=True)
    by_peak = atlas(seg, "cat", ex, sort_by="peak")
    peaks = [c.peak for c in by_peak]
    assert peaks == sorted(peaks, reverse=True)  # type: ignore[type-var]
    by_peak_plain = [c.peak for c in atlas(plain, "cat", ex, sort_by="peak")]
    known = [p for p in by_peak_plain if p is not None]
    assert by_peak_plain[: len(known)] == sorted(known, reverse=True)
    assert all(p is None for p in by_peak_plain[len(known) :])


def test_atlas_bad_arguments(case: tuple[str, Segmentation]) -> None:
    _, seg = case
    ex = seg.extractors[0]
    with pytest.raises(ValueError, match="not a class"):
        atlas(seg, "dog", ex)
    with pytest.raises(ValueError, match="extractor"):
        atlas(seg, "cat", "nope")
    with pytest.raises(ValueError, match="sort_by"):
        atlas(seg, "cat", ex, sort_by="size")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n_images"):
        atlas(seg, "cat", ex, n_images=0)


def test_what_if_redoes_the_stuff_filter() -> None:
    # Support backgrounds are often grass; grass is stuff, so background prototypes close
    # to grass are dropped. Excluding grass's support images removes its prototypes, so
    # those background prototypes must come back, as in a fresh segmentation.
    world = ColorWorld(
        parts={"cat": WORLD.parts["cat"], "grass": WORLD.parts["grass"]},
        backgrounds=[(30, 170, 40), (40, 40, 40)],
    )
    m = OVDiff(
        ColorGenerator(world, n_images=4),
        [ColorExtractor("c8", stride=8)],
        prototype_config=PrototypeConfig(n_parts=4),
    )
    m.build(["cat", "grass"])
    assert m.categories["grass"].stuff and not m.categories["cat"].stuff
    image = target((30, 45))
    cfg = SegmentConfig(short_side=24, windows=False)
    seg = segment(image, list(m.categories.values()), m.extractors, cfg, keep_features=True)
    assert seg.scoring["c8"].dropped_by_stuff > 0
    n = len(m.categories["grass"].support or [])
    result = what_if(seg, exclude_images={"grass": list(range(n))})
    assert result.segmentation.scoring["c8"].dropped_by_stuff == 0
    n_bg = int((seg.scoring["c8"].channel == 0).sum())
    assert int((result.segmentation.scoring["c8"].channel == 0).sum()) > n_bg
    cats, _ = edited_categories(seg.categories, exclude_images={"grass": list(range(n))})
    assert_same(result.segmentation, segment(image, cats, m.extractors, cfg))
    # editing only a non-stuff bank: background rows the filter dropped may go too
    dropped = set()
    for images in ([0], [1, 3], [2]):
        edit = {"cat": images}
        result = what_if(seg, exclude_images=edit)
        cats, _ = edited_categories(seg.categories, exclude_images=edit)
        fresh = segment(image, cats, m.extractors, cfg)
        assert_same(result.segmentation, fresh)
        dropped.add(fresh.scoring["c8"].dropped_by_stuff)
    assert len(dropped) > 1  # some edit removed rows the stuff filter had dropped
