"""Pixel traces are exact: every score is the sum of its listed prototype contributions."""

from __future__ import annotations

import importlib
from collections import defaultdict

import numpy as np
import pytest
from helpers import PaletteExtractor, make_category, support_from_boxes, unit

from ovdiff_core.colorworld import ColorExtractor, ColorGenerator, ColorWorld, paint_scene
from ovdiff_core.config import PrototypeConfig, SegmentConfig
from ovdiff_core.pipeline import OVDiff
from ovdiff_core.segment import Segmentation, interp_matrix, pixel_centres, segment
from ovdiff_core.standins import CodedExtractor, coded_scene, random_categories
from ovdiff_core.trace import decompose, trace
from ovdiff_core.types import PrototypeKind

WORLD = ColorWorld.default()
segment_module = importlib.import_module("ovdiff_core.segment")


@pytest.fixture(scope="module")
def model() -> OVDiff:
    """Two extractors with different strides (8 and 4) and dimensions."""
    extractors = [ColorExtractor("c8", stride=8), ColorExtractor("c4", stride=4, dim=32, seed=1)]
    m = OVDiff(
        ColorGenerator(WORLD, n_images=4), extractors, prototype_config=PrototypeConfig(n_parts=6)
    )
    m.build(["cat", "sofa", "lamp"])
    return m


def target(size: tuple[int, int]) -> np.ndarray:
    h, w = size
    img, _ = paint_scene(
        size,
        (40, 40, 40),
        [
            (WORLD.parts["cat"], (h // 8, w // 8, h // 2, w // 3)),
            (WORLD.parts["sofa"], (h // 2, w // 2, h // 3, w // 3)),
        ],
        seed=1,
    )
    return img


CONFIGS = {
    # one extractor, no windows, input resized 18x26 -> 24x35
    "single": (["c8"], (18, 26), SegmentConfig(short_side=24, windows=False)),
    # windows (24 and 16 px, stride 8) over a 32x48 processed image
    "windows": (
        ["c8"],
        (30, 45),
        SegmentConfig(short_side=32, window_sizes=(24, 16), window_stride=8),
    ),
    # two extractors (strides 8 and 4) with windows, no resizing, odd sizes
    "two-extractors": (
        ["c8", "c4"],
        (21, 27),
        SegmentConfig(short_side=21, window_sizes=(16,), window_stride=5),
    ),
    # two extractors, downscaled 40x52 -> 20x26, with windows
    "downscaled": (
        ["c8", "c4"],
        (40, 52),
        SegmentConfig(short_side=20, window_sizes=(16,), window_stride=6),
    ),
}


# vocabularies of evaluation size: stand-in banks shaped like real ones (1 class, 3
# instance, 4 part prototypes each side), a coded scene of 12 regions, two extractors,
# windows; labels are made with tiny tiles and blocks so that pruning and banding run
MANY_CLASSES = {"80-classes": 80, "150-classes": 150}


def many_class_segmentation(n_classes: int) -> Segmentation:
    extractors = [CodedExtractor("k4", 12, 4, 0, noise=0.8), CodedExtractor("k8", 10, 8, 1)]
    cats = random_categories(extractors, n_classes, n_images=3, image_px=16, n_parts=4)
    for ex in extractors:
        ex.categories = cats
    image = coded_scene((26, 34), n_classes, 12, seed=n_classes)
    cfg = SegmentConfig(short_side=24, window_sizes=(16,), window_stride=6, prefilter=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(segment_module, "TILE", 4)
        mp.setattr(segment_module, "BLOCK_ELEMENTS", 2000)
        mp.setattr(segment_module, "BLOCK_OVERHEAD", 0)
        return segment(image, cats, extractors, cfg)


# the same segmentations stored compact (16-bit values, 8-bit winners and maps), as
# segment() stores large ones
COMPACT = {"windows-compact": "windows", "150-classes-compact": "150-classes"}


@pytest.fixture(scope="module", params=[*CONFIGS, *MANY_CLASSES, *COMPACT])
def seg(request: pytest.FixtureRequest, model: OVDiff) -> Segmentation:
    name = COMPACT.get(request.param, request.param)
    with pytest.MonkeyPatch.context() as mp:
        if request.param in COMPACT:
            mp.setattr(segment_module, "COMPACT_ABOVE_BYTES", 0)
        if name in MANY_CLASSES:
            got = many_class_segmentation(MANY_CLASSES[name])
        else:
            names, size, cfg = CONFIGS[name]
            extractors = [e for e in model.extractors if e.name in names]
            got = segment(target(size), list(model.categories.values()), extractors, cfg)
    assert all(v.compact for v in got.views) == (request.param in COMPACT)
    return got


def test_decompose_reproduces_every_score(seg: Segmentation) -> None:
    h, w = seg.size
    n_ch = len(seg.class_names)
    assert len(seg.views) > (1 if seg.config.windows else 0)
    rebuilt = np.zeros((n_ch, h, w))
    for y in range(h):
        for x in range(w):
            for c in range(n_ch):
                terms = decompose(seg, x, y, c)
                assert terms, "every pixel is covered by at least the whole view"
                rebuilt[c, y, x] = sum(t.weight * t.cosine for t in terms)
    np.testing.assert_allclose(rebuilt, seg.scores, rtol=0, atol=1e-5)


def test_contribution_fields(seg: Segmentation) -> None:
    h, w = seg.size
    for x, y in ((0, 0), (w - 1, h - 1), (w // 2, h // 3)):
        for c in range(len(seg.class_names)):
            terms = decompose(seg, x, y, c)
            passes = {t.view for t in terms}
            # weights of each pass sum to 1 / (number of passes covering the pixel)
            for v in passes:
                total = sum(t.weight for t in terms if t.view == v)
                assert total == pytest.approx(1.0 / len(passes))
            for t in terms:
                view = seg.views[t.view]
                i, j = t.cell
                assert t.cosine == pytest.approx(float(view.values[c, i, j]))
                assert t.weight > 0
                ref = t.prototype
                assert ref is not None
                assert ref.extractor == view.extractor
                assert ref.foreground == (c > 0)
                if c > 0:
                    assert ref.category == seg.class_names[c]
                bank = next(k for k in seg.categories if k.name == ref.category).banks[
                    ref.extractor
                ]
                assert ref.kind == PrototypeKind(int(bank.kinds[ref.index]))
                assert ref.image_index == int(bank.image_index[ref.index])
                # the cosine is that prototype's cosine at that cell (unless floored)
                q = int(view.winners[c, i, j])
                sc = seg.scoring[ref.extractor]
                assert int(sc.bank_index[q]) == ref.index and int(sc.channel[q]) == c


def test_trace_every_pixel(seg: Segmentation) -> None:
    h, w = seg.size
    for y in range(h):
        for x in range(w):
            tr = trace(seg, x, y)
            assert (tr.x, tr.y) == (x, y)
            assert tr.label == seg.labels[y, x]
            assert tr.label_name == seg.class_names[tr.label]
            assert tr.score == pytest.approx(float(seg.scores[tr.label, y, x]), abs=0)
            assert tr.class_scores == {
                n: float(seg.scores[k, y, x]) for k, n in enumerate(seg.class_names)
            }
            total = sum(c.weight * c.cosine for c in tr.contributions)
            assert total == pytest.approx(tr.score, abs=1e-5)
            assert tr.winner_share <= tr.score + 1e-6
            assert tr.winner is not None
            # the winner is the prototype with the largest summed contribution
            groups: dict[tuple, float] = defaultdict(float)
            for c in tr.contributions:
                assert c.prototype is not None
                groups[(c.prototype.extractor, c.prototype.category, c.prototype.index)] += (
                    c.weight * c.cosine
                )
            key = (tr.winner.extractor, tr.winner.category, tr.winner.index)
            assert tr.winner_share == pytest.approx(groups[key], abs=1e-9)
            assert tr.winner_share >= max(groups.values()) - 1e-9
            assert tr.winner.foreground == (tr.label > 0)
            if tr.score > 0:
                assert tr.winner_share > 0 and -1.0 <= tr.winner_cosine <= 1.0 + 1e-6


def test_trace_regions_and_similarity_map(seg: Segmentation) -> None:
    h, w = seg.size
    hp, wp = seg.processed_size
    for x, y in ((1, 1), (w // 3, h // 2), (w - 2, h - 1)):
        tr = trace(seg, x, y)
        assert tr.winner is not None
        cat = next(k for k in seg.categories if k.name == tr.winner.category)
        bank = cat.banks[tr.winner.extractor]
        expected = bank.member_masks(tr.winner.index)
        assert [r.image_index for r in tr.regions] == list(expected)
        assert cat.support is not None
        for r in tr.regions:
            assert r.mask.dtype == bool and r.mask.shape == cat.support.image_size
            assert np.array_equal(r.mask, expected[r.image_index])
            assert r.image is cat.support.images[r.image_index] or np.array_equal(
                r.image, cat.support.images[r.image_index]
            )
        if tr.winner.kind == PrototypeKind.INSTANCE:
            assert [r.image_index for r in tr.regions] == [tr.winner.image_index]
        # similarity map: the winner's whole-view cosine map, bilinear onto input pixels
        sc = seg.scoring[tr.winner.extractor]
        q = int(
            np.flatnonzero(
                (sc.bank_index.numpy() == tr.winner.index)
                & (np.array([seg.categories[s - 1].name for s in sc.source]) == cat.name)
                & ((sc.channel.numpy() > 0) == tr.winner.foreground)
            )[0]
        )
        sims = seg.whole_view_sims[tr.winner.extractor][q].double().numpy()
        wy = interp_matrix(pixel_centres(h, hp), 0, hp, sims.shape[0])
        wx = interp_matrix(pixel_centres(w, wp), 0, wp, sims.shape[1])
        assert tr.similarity_map.shape == (h, w) and tr.similarity_map.dtype == np.float32
        np.testing.assert_allclose(tr.similarity_map, wy @ sims @ wx.T, atol=1e-5)


def test_repeated_traces_agree(seg: Segmentation) -> None:
    a, b = trace(seg, 2, 3), trace(seg, 2, 3)
    assert a.contributions == b.contributions and a.winner == b.winner
    assert np.array_equal(a.similarity_map, b.similarity_map)


@pytest.mark.parametrize(
    "point",
    [(-1, 0), (0, -1), ("W", 0), (0, "H"), (1.0, 2), (2, 2.5), (True, 1), (1, False), (None, 1)],
)
def test_bad_points_raise(seg: Segmentation, point: tuple) -> None:
    h, w = seg.size
    x, y = (w if v == "W" else h if v == "H" else v for v in point)
    with pytest.raises(ValueError, match="trace: "):
        trace(seg, x, y)
    with pytest.raises(ValueError, match="trace: "):
        decompose(seg, x, y, 0)


def test_numpy_integer_points_and_channel_checks(seg: Segmentation) -> None:
    h, w = seg.size
    tr = trace(seg, np.int64(w - 1), np.int32(h - 1))
    assert (tr.x, tr.y) == (w - 1, h - 1) and type(tr.x) is int
    n_ch = len(seg.class_names)
    for bad in (-1, n_ch, 1.0, True):
        with pytest.raises(ValueError, match="channel"):
            decompose(seg, 0, 0, bad)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- provenance

PALETTE_COLOURS = [(200, 0, 0), (0, 200, 0), (0, 0, 200), (200, 200, 0)]
BG = (60, 60, 60)


def test_trace_points_at_the_only_support_image_with_that_colour() -> None:
    # Support image i shows one object of colour i; the target shows colour 2 only. The
    # pixel's winner must come from support image 2 and its region must be that object.
    palette = {c: unit(*np.eye(6)[i], dim=6) for i, c in enumerate(PALETTE_COLOURS)}
    palette[BG] = unit(0, 0, 0, 0, 1, dim=6)
    ex = PaletteExtractor(palette, stride=8)
    boxes = [(8, 8, 24, 32), (16, 24, 32, 24), (24, 16, 32, 32), (8, 32, 40, 24)]
    support = support_from_boxes(
        "thing", (64, 64), BG, [[([c], b)] for c, b in zip(PALETTE_COLOURS, boxes, strict=True)]
    )
    cat = make_category(support, [ex], PrototypeConfig(n_parts=8))
    image, _ = paint_scene((48, 64), BG, [([PALETTE_COLOURS[2]], (8, 16, 32, 32))], noise=0)
    seg = segment(image, [cat], [ex], SegmentConfig(short_side=48, windows=False))
    tr = trace(seg, 32, 24)
    assert tr.label_name == "thing" and tr.score == pytest.approx(1.0, abs=1e-5)
    assert tr.winner is not None and tr.winner.category == "thing"
    assert tr.winner.kind in (PrototypeKind.INSTANCE, PrototypeKind.PART)
    assert [r.image_index for r in tr.regions] == [2]
    region = tr.regions[0]
    assert np.array_equal(region.mask, support.foreground[2])
    assert region.image is not None
    assert (region.image[region.mask] == PALETTE_COLOURS[2]).all()
    assert tr.winner_cosine == pytest.approx(1.0, abs=1e-5)
    # and a background pixel is explained by the background prototypes
    bg = trace(seg, 2, 2)
    assert bg.label == 0 and bg.winner is not None and not bg.winner.foreground


def test_trace_without_support_images_has_regions_without_pictures(model: OVDiff) -> None:
    cats = list(model.categories.values())
    from ovdiff_core.types import Category

    bare = [Category(c.name, c.banks, support=None) for c in cats]
    seg = segment(target((24, 32)), bare, model.extractors[:1], SegmentConfig(short_side=24))
    tr = trace(seg, 5, 5)
    assert tr.regions and all(r.image is None for r in tr.regions)


def test_channel_without_prototypes_has_no_winner() -> None:
    # Without background prototypes channel 0 has none; on a pixel orthogonal to every
    # class all scores are 0, background wins the tie and there is nothing to trace.
    red, blue = (200, 0, 0), (0, 0, 200)
    ex = PaletteExtractor({red: unit(1, 0), blue: unit(0, 1)}, stride=8)
    support = support_from_boxes("red", (32, 32), blue, [[([red], (8, 8, 16, 16))]])
    cat = make_category(support, [ex], PrototypeConfig(n_parts=2))
    image = np.zeros((16, 16, 3), dtype=np.uint8)
    image[:] = blue
    cfg = SegmentConfig(short_side=16, windows=False, background=False)
    seg = segment(image, [cat], [ex], cfg)
    assert (seg.scores == 0).all() and (seg.labels == 0).all()
    terms = decompose(seg, 3, 3, 0)
    assert terms and all(t.prototype is None and t.cosine == 0 for t in terms)
    tr = trace(seg, 3, 3)
    assert tr.label == 0 and tr.score == 0
    assert tr.winner is None and tr.regions == [] and tr.winner_share == 0
    assert tr.similarity_map.shape == (16, 16) and not tr.similarity_map.any()
    # class channel: prototypes exist, their cosine is 0
    terms = decompose(seg, 3, 3, 1)
    assert all(t.prototype is not None and t.prototype.category == "red" for t in terms)


def test_trace_cache_follows_the_segmentation(model: OVDiff) -> None:
    import copy
    import gc
    import weakref

    cats = list(model.categories.values())
    seg = segment(target((16, 20)), cats, model.extractors[:1], SegmentConfig(short_side=16))
    first = trace(seg, 4, 5)
    twin = copy.deepcopy(seg)
    assert trace(twin, 4, 5).contributions == first.contributions
    alive = weakref.ref(seg)
    # White-box on purpose: the lookup tables hold only numpy views of the records, so
    # no public object shows whether they leak; count the module's entries.
    trace_module = importlib.import_module("ovdiff_core.trace")  # the package exports trace()
    before = len(trace_module._INDEXES)
    del seg, twin
    gc.collect()
    assert alive() is None, "the trace cache must not keep a segmentation alive"
    assert len(trace_module._INDEXES) <= before - 2, "the trace cache must drop its tables"
