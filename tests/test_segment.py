"""Segmentation recovers known ground truth; the paper's ablations go the paper's way."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
import torch
from helpers import (
    PaletteExtractor,
    accuracy,
    iou,
    make_category,
    support_from_boxes,
    truth_labels,
    unit,
)
from scipy.ndimage import binary_erosion

from ovdiff_core.colorworld import ColorExtractor, ColorGenerator, ColorWorld, paint_scene
from ovdiff_core.config import PrototypeConfig, SegmentConfig
from ovdiff_core.pipeline import OVDiff
from ovdiff_core.segment import (
    Segmentation,
    interp_matrix,
    pixel_centres,
    processed_size,
    segment,
    view_boxes,
)
from ovdiff_core.types import Category, PrototypeBank

WORLD = ColorWorld.default()
DARK = (40, 40, 40)


@pytest.fixture(scope="module")
def model() -> OVDiff:
    m = OVDiff(ColorGenerator(WORLD, n_images=6), [ColorExtractor(stride=8)])
    m.build(["cat", "sofa", "lamp"])
    return m


def scene(
    size: tuple[int, int], objects: Sequence[tuple[str, tuple[int, int, int, int]]], seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    img, index = paint_scene(size, DARK, [(WORLD.parts[n], box) for n, box in objects], seed=seed)
    return img, index


def truth_for(seg: Segmentation, index: np.ndarray, names: Sequence[str]) -> np.ndarray:
    return truth_labels(index, [seg.class_names.index(n) for n in names])


def interior(truth: np.ndarray, margin: int) -> np.ndarray:
    """Pixels at least ``margin`` px (Chebyshev) from any label boundary."""
    keep = np.zeros(truth.shape, dtype=bool)
    for lab in np.unique(truth):
        keep |= binary_erosion(truth == lab, np.ones((3, 3)), iterations=margin)
    return keep


def check_contract(seg: Segmentation, image: np.ndarray, n_classes: int) -> None:
    h, w = image.shape[:2]
    assert seg.labels.shape == (h, w) and seg.labels.dtype == np.uint8  # compact: < 256 labels
    assert seg.scores.shape == (n_classes + 1, h, w) and seg.scores.dtype == np.float32
    assert seg.class_names[0] == "background" and len(seg.class_names) == n_classes + 1
    assert np.array_equal(seg.labels, seg.scores.argmax(0))
    assert seg.scores.min() >= 0.0 and seg.scores.max() <= 1.0 + 1e-5
    assert seg.image is image and seg.size == (h, w)
    assert [c.name for c in seg.categories] == seg.class_names[1:]


# --------------------------------------------------------------------------- geometry


def test_processed_size_keeps_aspect() -> None:
    assert processed_size((96, 128), 96) == (96, 128)
    assert processed_size((300, 420), 128) == (128, 179)
    assert processed_size((40, 200), 64) == (64, 320)
    assert processed_size((200, 40), 64) == (320, 64)


def test_view_boxes_cover_the_image() -> None:
    cfg = SegmentConfig(short_side=100, window_sizes=(60, 40), window_stride=30)
    boxes = view_boxes((100, 150), cfg)
    assert boxes[0] == (0, 0, 100, 150)
    assert len(set(boxes)) == len(boxes)
    for size in (60, 40):
        wins = [b for b in boxes[1:] if b[2:] == (size, size)]
        cover = np.zeros((100, 150), dtype=int)
        for t, left, bh, bw in wins:
            assert t >= 0 and t + bh <= 100 and left >= 0 and left + bw <= 150
            cover[t : t + bh, left : left + bw] += 1
        assert cover.min() >= 1, f"windows of {size} px leave pixels uncovered"
    assert view_boxes((100, 150), cfg.replace(windows=False)) == [(0, 0, 100, 150)]
    # a window not smaller than the image adds nothing; one smaller in one direction
    # slides along that direction only
    assert view_boxes((50, 50), cfg.replace(window_sizes=(60,))) == [(0, 0, 50, 50)]
    slide = view_boxes((50, 90), cfg.replace(window_sizes=(60,)))
    assert slide == [(0, 0, 50, 90), (0, 0, 50, 60), (0, 30, 50, 60)]


def test_interp_matrix_rows_are_bilinear_weights() -> None:
    coords = pixel_centres(37, 50)
    m = interp_matrix(coords, 0, 50, 7)
    np.testing.assert_allclose(m.sum(1), 1.0)
    assert ((m > 0).sum(1) <= 2).all() and m.min() >= 0
    # the weighted cell centre is the point itself, except beyond the outer cell centres
    centres = (np.arange(7) + 0.5) * 50 / 7
    inside = (coords >= centres[0]) & (coords <= centres[-1])
    np.testing.assert_allclose((m @ centres)[inside], coords[inside])


# --------------------------------------------------------------------------- ground truth


@pytest.mark.parametrize("windows", [False, True])
def test_recovers_ground_truth(model: OVDiff, windows: bool) -> None:
    objects = [("cat", (8, 8, 40, 48)), ("sofa", (48, 64, 40, 56)), ("lamp", (56, 8, 32, 24))]
    image, index = scene((96, 128), objects)
    cfg = SegmentConfig(short_side=96, windows=windows, window_sizes=(48, 32), window_stride=16)
    seg = model.segment(image, config=cfg)
    check_contract(seg, image, 3)
    assert len(seg.views) == len(view_boxes((96, 128), cfg))
    assert (len(seg.views) > 1) == windows
    truth = truth_for(seg, index, [n for n, _ in objects])
    # Boxes lie on the 8-px feature grid: only bilinear blending at boundaries can err.
    assert accuracy(seg.labels, truth) >= 0.98
    for label in range(4):
        assert iou(seg.labels, truth, label) >= 0.9, seg.class_names[label]
    inner = interior(truth, 8)
    assert np.array_equal(seg.labels[inner], truth[inner])


@pytest.mark.parametrize(
    ("size", "objects", "cfg"),
    [
        # wide and tall: upscaled (short side 40 -> 64), windows slide along one axis
        (
            (40, 200),
            [("cat", (5, 10, 30, 50)), ("sofa", (5, 100, 30, 60))],
            SegmentConfig(short_side=64, window_sizes=(64, 48), window_stride=48),
        ),
        (
            (200, 40),
            [("cat", (10, 5, 50, 30)), ("lamp", (100, 5, 60, 30))],
            SegmentConfig(short_side=64, windows=False),
        ),
        # small: 24x32 upscaled to 64x85
        ((24, 32), [("cat", (4, 4, 16, 16))], SegmentConfig(short_side=64, windows=False)),
        # large: downscaled 300x420 -> 128x179, boxes off the feature grid
        (
            (300, 420),
            [
                ("cat", (30, 30, 120, 150)),
                ("sofa", (160, 200, 120, 180)),
                ("lamp", (40, 260, 80, 100)),
            ],
            SegmentConfig(short_side=128, window_sizes=(96, 64), window_stride=48),
        ),
    ],
    ids=["wide", "tall", "small", "large"],
)
def test_shapes_and_accuracy_across_sizes(
    model: OVDiff,
    size: tuple[int, int],
    objects: list[tuple[str, tuple[int, int, int, int]]],
    cfg: SegmentConfig,
) -> None:
    image, index = scene(size, objects)
    seg = model.segment(image, config=cfg)
    check_contract(seg, image, 3)
    assert seg.processed_size == processed_size(size, cfg.short_side)
    truth = truth_for(seg, index, [n for n, _ in objects])
    assert accuracy(seg.labels, truth) >= 0.93
    # one processed-image cell away from every boundary, in input pixels
    margin = int(np.ceil(8 * size[0] / seg.processed_size[0]))
    inner = interior(truth, margin)
    assert inner.sum() > 0.2 * truth.size
    assert accuracy(seg.labels[inner], truth[inner]) >= 0.995


def test_odd_sizes_and_minimum_image(model: OVDiff) -> None:
    for size in ((2, 2), (3, 17), (33, 5)):
        image = np.full((*size, 3), 40, dtype=np.uint8)
        seg = model.segment(image, config=SegmentConfig(short_side=16))
        check_contract(seg, image, 3)
        assert (seg.labels == 0).all(), "a flat background image is all background"


def test_score_floor_zeroes_low_cells(model: OVDiff) -> None:
    image, _ = scene((64, 64), [("cat", (16, 16, 32, 32))])
    seg = model.segment(image, config=SegmentConfig(short_side=64, windows=False, score_floor=0.5))
    values = seg.views[0].values
    assert bool(((values == 0) | (values > 0.5)).all())
    assert bool((values == 0).any()) and bool((values > 0.5).any())


# --------------------------------------------------------------------------- palette worlds

RED, GREEN, BLUE, GREY = (200, 0, 0), (0, 200, 0), (0, 0, 200), (128, 128, 128)


def two_part_world() -> tuple[PaletteExtractor, Category, Category]:
    """Class "flag" = a RED half (e1) and a GREEN half (e2), so its mean is between them.

    Its support backgrounds are BLUE = (2 e1 + e2 + e3) / sqrt 6: closer to the RED part
    (cos 0.82) than the class mean is (cos 0.71), but far below a RED part prototype (1.0).
    Target background GREY = e3 is closest to the support background (cos 0.41).
    """
    palette = {
        RED: unit(1, 0, 0),
        GREEN: unit(0, 1, 0),
        BLUE: unit(2, 1, 1),
        GREY: unit(0, 0, 1),
    }
    ex = PaletteExtractor(palette, stride=8)
    boxes = [(8, 8, 32, 32), (16, 24, 32, 32), (24, 8, 32, 48), (8, 16, 48, 32)]
    support = support_from_boxes("flag", (64, 64), BLUE, [[([RED, GREEN], b)] for b in boxes])
    full = make_category(support, [ex], PrototypeConfig(n_parts=4))
    mean_only = make_category(
        support, [ex], PrototypeConfig(n_parts=4, part_level=False, instance_level=False)
    )
    return ex, full, mean_only


def test_part_prototypes_segment_a_two_part_class_whole() -> None:
    ex, full, mean_only = two_part_world()
    assert mean_only.banks["pal"].kinds.tolist() == [0, 0]
    image, index = paint_scene((96, 160), GREY, [([RED, GREEN], (16, 16, 64, 128))], noise=0)
    cfg = SegmentConfig(short_side=96, windows=False)
    truth = (index > 0).astype(np.int64)
    seg_full = segment(image, [full], [ex], cfg)
    seg_mean = segment(image, [mean_only], [ex], cfg)
    iou_full, iou_mean = iou(seg_full.labels, truth, 1), iou(seg_mean.labels, truth, 1)
    # (the full model loses a ~2 px band along the RED boundary to blending: the support
    # background is close to RED, so background scores stay high across the boundary)
    assert iou_full >= 0.9
    assert iou_mean <= 0.6, "the class mean alone should lose the RED half to background"
    assert iou_full - iou_mean >= 0.35
    # inside the RED half (one cell from its edges) the two models disagree completely
    red = binary_erosion((index > 0) & (image[..., 0] == 200), np.ones((3, 3)), iterations=8)
    assert red.sum() > 500
    assert (seg_mean.labels[red] == 0).all()
    assert (seg_full.labels[red] == 1).all()
    green = binary_erosion((index > 0) & (image[..., 1] == 200), np.ones((3, 3)), iterations=8)
    assert (seg_mean.labels[green] == 1).all() and (seg_full.labels[green] == 1).all()


def background_world() -> tuple[PaletteExtractor, list[Category], np.ndarray, np.ndarray]:
    """Two classes (RED = e1, GREEN = e2); support and target backgrounds GREY are near no
    class: cos 0.28 to each, positive, so without background prototypes they get a class."""
    palette = {RED: unit(1, 0, 0), GREEN: unit(0, 1, 0), GREY: unit(0.3, 0.3, 1)}
    ex = PaletteExtractor(palette, stride=8)
    cats = []
    for name, col in (("red", RED), ("green", GREEN)):
        boxes = [(8, 8, 24, 24), (24, 32, 32, 24), (16, 16, 40, 32)]
        sup = support_from_boxes(name, (64, 64), GREY, [[([col], b)] for b in boxes], bg_margin=4)
        cats.append(make_category(sup, [ex], PrototypeConfig(n_parts=3)))
    image, index = paint_scene(
        (64, 128), GREY, [([RED], (8, 8, 40, 40)), ([GREEN], (16, 72, 40, 48))], noise=0
    )
    return ex, cats, image, index


def test_removing_background_prototypes_hurts() -> None:
    ex, cats, image, index = background_world()
    cfg = SegmentConfig(short_side=64, windows=False)
    with_bg = segment(image, cats, [ex], cfg)
    without = segment(image, cats, [ex], cfg.replace(background=False))
    truth = index  # 0 background, 1 red, 2 green (categories in that order)
    miou_with = np.mean([iou(with_bg.labels, truth, k) for k in range(3)])
    miou_without = np.mean([iou(without.labels, truth, k) for k in range(3)])
    assert miou_with >= 0.95
    assert miou_without <= 0.6
    assert accuracy(without.labels[truth == 0], truth[truth == 0]) < 0.05
    # without background prototypes channel 0 has none and scores 0 everywhere
    assert (without.scoring["pal"].channel != 0).all()
    assert bool((without.views[0].winners[0] == -1).all())
    assert (without.scores[0] == 0).all()


def test_background_is_the_union_of_kept_classes_background_prototypes() -> None:
    # Class "red" was generated on BLUE, class "green" on GREY. A target showing both
    # backgrounds is background everywhere, each area won by the other class's bg bank.
    palette = {
        RED: unit(1, 0, 0),
        GREEN: unit(0, 1, 0),
        BLUE: unit(0, 0, 1),
        GREY: unit(0, 0, 0, 1),
    }
    ex = PaletteExtractor(palette, stride=8)
    box = [[([RED], (16, 16, 32, 32))], [([RED], (8, 24, 24, 32))]]
    red = make_category(support_from_boxes("red", (64, 64), BLUE, box), [ex])
    box = [[([GREEN], (16, 16, 32, 32))], [([GREEN], (8, 24, 24, 32))]]
    green = make_category(support_from_boxes("green", (64, 64), GREY, box), [ex])
    image = np.zeros((32, 64, 3), dtype=np.uint8)
    image[:, :32] = BLUE
    image[:, 32:] = GREY
    seg = segment(image, [red, green], [ex], SegmentConfig(short_side=32, windows=False))
    assert (seg.labels == 0).all()
    sc = seg.scoring["pal"]
    win = seg.views[0].winners[0].long()  # (h, w) scoring-set index of the bg winner per cell
    src = sc.source[win]
    assert (src[:, :4] == 1).all(), "BLUE cells are explained by red's background"
    assert (src[:, 4:] == 2).all(), "GREY cells are explained by green's background"
    assert bool((sc.channel[win] == 0).all())
    np.testing.assert_allclose(seg.scores[0], 1.0, atol=1e-5)


def test_two_extractors_are_averaged(model: OVDiff) -> None:
    image, index = scene((64, 96), [("sofa", (16, 16, 32, 48))])
    ex_a = model.extractors[0]
    ex_b = ColorExtractor("coarse", stride=16, seed=3)
    cats = [
        Category(c.name, {**c.banks, **make_category(c.support, [ex_b]).banks}, c.support)
        for c in model.categories.values()
    ]
    cfg = SegmentConfig(short_side=64, windows=False)
    both = segment(image, cats, [ex_a, ex_b], cfg)
    a = segment(image, cats, [ex_a], cfg)
    b = segment(image, cats, [ex_b], cfg)
    np.testing.assert_allclose(both.scores, (a.scores + b.scores) / 2, atol=1e-6)
    assert both.extractors == [ex_a.name, "coarse"]
    assert {v.extractor for v in both.views} == {ex_a.name, "coarse"}
    assert accuracy(both.labels, truth_for(both, index, ["sofa"])) >= 0.95


# --------------------------------------------------------------------------- errors


class WrongDim:
    name = "color"
    stride = 8

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return torch.ones(1, 5, 2, 2)

    def spec(self) -> dict:
        return {}


class WrongBatch(WrongDim):
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return torch.ones(2, 64, 2, 2)


def test_bad_inputs(model: OVDiff) -> None:
    cats = list(model.categories.values())
    exs = model.extractors
    good = np.zeros((32, 32, 3), dtype=np.uint8)
    cases = [
        (good[..., 0], cats, exs, "image must be an"),
        (good.tolist(), cats, exs, "image must be an"),
        (good.astype(np.float32), cats, exs, "uint8"),
        (good[:1], cats, exs, "too small"),
        (good, [], exs, "no categories"),
        (good, [cats[0], cats[0]], exs, "distinct"),
        (good, cats, [], "at least one feature extractor"),
        (good, cats, [exs[0], exs[0]], "extractor names must be distinct"),
        (good, cats, [ColorExtractor("other")], "no prototype bank"),
        (good, cats, [WrongDim()], "5-d features"),
        (good, cats, [WrongBatch()], "expected \\(1, D, h, w\\)"),
    ]
    for image, c, e, match in cases:
        with pytest.raises(ValueError, match=match):
            segment(image, c, e, SegmentConfig(short_side=32))  # type: ignore[arg-type]
    mixed = Category(
        "odd", {"color": make_category(cats[0].support, [ColorExtractor(dim=32)]).banks["color"]}
    )
    with pytest.raises(ValueError, match="different dimensions"):
        segment(good, [*cats, mixed], exs)


def test_scoring_set_is_reused_only_for_the_same_banks(model: OVDiff) -> None:
    image, _ = scene((48, 64), [("cat", (8, 8, 32, 32))])
    cats = list(model.categories.values())
    cfg = SegmentConfig(short_side=48, windows=False)
    a = segment(image, cats, model.extractors, cfg)
    b = segment(image, cats, model.extractors, cfg)
    name = model.extractors[0].name
    assert b.scoring[name] is a.scoring[name]
    assert np.array_equal(a.scores, b.scores)
    # anything that changes the scoring set is a different entry
    c = segment(image, cats, model.extractors, cfg.replace(background=False))
    assert c.scoring[name] is not a.scoring[name] and (c.scoring[name].channel != 0).all()
    stuffy = [Category(k.name, k.banks, k.support, stuff=k.name == "lamp") for k in cats]
    d = segment(image, stuffy, model.extractors, cfg)
    assert d.scoring[name] is not a.scoring[name]
    assert (d.scoring[name].source[d.scoring[name].channel == 0] != 3).all()
    # equal values in new bank objects: packed again, same result
    copies = [
        Category(k.name, {e: PrototypeBank(**vars(bk)) for e, bk in k.banks.items()}, k.support)
        for k in cats
    ]
    e = segment(image, copies, model.extractors, cfg)
    assert e.scoring[name] is not a.scoring[name]
    assert np.array_equal(e.scores, a.scores)


def test_extremely_elongated_image_is_refused_with_a_clear_message() -> None:
    from ovdiff_core.segment import MAX_ASPECT

    world = ColorWorld.default()
    model = OVDiff(ColorGenerator(world), [ColorExtractor()])
    model.build(["cat"])
    ok = np.zeros((8, 8 * MAX_ASPECT, 3), dtype=np.uint8)  # exactly at the limit: accepted
    assert model.segment(ok).labels.shape == (8, 8 * MAX_ASPECT)
    too_long = np.zeros((8, 8 * MAX_ASPECT + 1, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="crop it"):
        model.segment(too_long)
