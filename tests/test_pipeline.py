"""The OVDiff object: names, build order, segmenting subsets, user support sets."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import PaletteExtractor, accuracy, support_from_boxes, unit

from ovdiff_core import OVDiff, PrototypeConfig, SegmentConfig, trace
from ovdiff_core.colorworld import (
    ColorExtractor,
    ColorGenerator,
    ColorScorer,
    ColorWorld,
    paint_scene,
)
from ovdiff_core.pipeline import MAX_NAME_LENGTH, clean_category_name

WORLD = ColorWorld.default()
CFG = SegmentConfig(short_side=48, windows=False)


@pytest.fixture(scope="module")
def model() -> OVDiff:
    m = OVDiff(
        ColorGenerator(WORLD, n_images=3),
        [ColorExtractor()],
        prototype_config=PrototypeConfig(n_parts=8),
        segment_config=CFG,
    )
    m.build(["cat", "sofa", "lamp"])
    return m


@pytest.mark.parametrize(
    ("raw", "clean"),
    [("cat", "cat"), ("  potted   plant ", "potted plant"), ("Ünïcode 猫", "Ünïcode 猫")],
)
def test_clean_category_name_normalises(raw: str, clean: str) -> None:
    assert clean_category_name(raw) == clean


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("a\nb", "control characters"),
        ("tea\tcup", "control characters"),
        ("a\x7fb", "control characters"),
        ("x" * (MAX_NAME_LENGTH + 1), "at most"),
        ("background", "reserved"),
        (" Background ", "reserved"),
        (42, "must be a string"),
        (None, "must be a string"),
    ],
)
def test_clean_category_name_errors(name: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        clean_category_name(name)  # type: ignore[arg-type]
    assert clean_category_name("y" * MAX_NAME_LENGTH) == "y" * MAX_NAME_LENGTH


def test_needs_an_extractor() -> None:
    with pytest.raises(ValueError, match="at least one feature extractor"):
        OVDiff(ColorGenerator(WORLD), [])


def test_segment_before_build_errors() -> None:
    m = OVDiff(ColorGenerator(WORLD, n_images=2), [ColorExtractor()])
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="no categories are built"):
        m.segment(image)
    with pytest.raises(ValueError, match="not built"):
        m.segment(image, categories=["cat"])


def test_build_returns_categories_in_order(model: OVDiff) -> None:
    assert list(model.categories) == ["cat", "sofa", "lamp"]
    built = model.build(["lamp", "  cat "])
    assert [c.name for c in built] == ["lamp", "cat"]
    assert built[1] is model.categories["cat"]
    for c in built:
        assert set(c.banks) == {"color"} and c.support is not None and len(c.support) == 3


def test_segment_names_subset(model: OVDiff) -> None:
    image, index = paint_scene(
        (48, 96),
        (40, 40, 40),
        [(WORLD.parts["cat"], (8, 8, 32, 32)), (WORLD.parts["sofa"], (8, 56, 32, 32))],
    )
    everything = model.segment(image)
    assert everything.class_names == ["background", "cat", "sofa", "lamp"]
    only_cat = model.segment(image, categories=["cat"])
    assert only_cat.class_names == ["background", "cat"]
    assert only_cat.queried == ["cat"]
    # the sofa is not a candidate any more: its pixels are background (or cat), never sofa
    assert (only_cat.labels[index == 1] == 1).mean() > 0.8
    assert (only_cat.labels[index == 2] != 1).mean() > 0.8
    with pytest.raises(ValueError, match=r"\['tree'\] are not built"):
        model.segment(image, categories=["cat", "tree"])
    # a per-call config overrides the model's
    windows = model.segment(image, config=CFG.replace(windows=True, window_sizes=(32,)))
    assert len(windows.views) > 1 and len(everything.views) == 1


def test_segment_takes_category_objects(model: OVDiff) -> None:
    """A visitor's own categories (built by another model of the same extractors) are
    segmented as given, mixed with registry names, and never enter the registry."""
    image, index = paint_scene(
        (48, 96),
        (40, 40, 40),
        [(WORLD.parts["cat"], (8, 8, 32, 32)), (WORLD.parts["grass"], (8, 56, 32, 32))],
        noise=0.0,
    )
    other = OVDiff(ColorGenerator(WORLD, n_images=3), [ColorExtractor()], segment_config=CFG)
    (grass,) = other.build(["grass"])
    before = list(model.categories)
    seg = model.segment(image, categories=["cat", grass], keep_features=True)
    assert seg.class_names == ["background", "cat", "grass"]
    assert seg.categories[0] is model.categories["cat"] and seg.categories[1] is grass
    assert (seg.labels[index == 2] == 2).mean() > 0.8
    assert (seg.labels[index == 1] == 1).mean() > 0.8
    assert seg.features is not None  # keep_features reaches segment()
    assert model.segment(image, categories=["cat"]).features is None
    assert list(model.categories) == before  # "grass" was not registered
    # Category objects alone need no registry at all
    empty = OVDiff(None, [ColorExtractor()], segment_config=CFG)
    alone = empty.segment(image, categories=[model.categories["cat"], grass])
    np.testing.assert_array_equal(alone.labels, seg.labels)


def test_segment_category_errors(model: OVDiff) -> None:
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    cat = model.categories["cat"]
    with pytest.raises(ValueError, match="wrap it in a list"):
        model.segment(image, categories="cat")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="wrap it in a list"):
        model.segment(image, categories=cat)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="names \\(str\\) or Category objects, got int"):
        model.segment(image, categories=["cat", 3])  # type: ignore[list-item]
    other = OVDiff(ColorGenerator(WORLD, n_images=2), [ColorExtractor()])
    (cat2,) = other.build(["cat"])
    with pytest.raises(ValueError, match="two different categories are named 'cat'"):
        model.segment(image, categories=[cat, cat2])
    # the same object twice, or a name and its own registry object, count once
    assert model.segment(image, categories=[cat, cat, "sofa", "sofa"]).class_names == [
        "background",
        "cat",
        "sofa",
    ]
    wrong = OVDiff(ColorGenerator(WORLD, n_images=2), [ColorExtractor("other")])
    (foreign,) = wrong.build(["grass"])
    with pytest.raises(ValueError, match="no prototype bank for extractor"):
        model.segment(image, categories=["cat", foreign])


def test_scorer_is_used_for_the_prefilter() -> None:
    m = OVDiff(ColorGenerator(WORLD, n_images=2), [ColorExtractor()], ColorScorer(WORLD))
    m.build(["cat", "sofa", "lamp"])
    image, _ = paint_scene((48, 48), (40, 40, 40), [(WORLD.parts["lamp"], (8, 8, 32, 32))])
    seg = m.segment(image, config=CFG)
    assert seg.prefilter is not None and seg.prefilter.kept == ["lamp"]
    assert seg.class_names == ["background", "lamp"]


def test_remove() -> None:
    m = OVDiff(ColorGenerator(WORLD, n_images=2), [ColorExtractor()])
    m.build(["cat", "sofa"])
    m.remove("cat")
    m.remove("not there")
    assert list(m.categories) == ["sofa"]


WIDGET, BG = (255, 0, 255), (0, 128, 128)


def widget_support(name: str = "widget"):  # type: ignore[no-untyped-def]
    boxes = [(8, 8, 24, 24), (16, 24, 32, 16), (32, 8, 16, 40)]
    return support_from_boxes(name, (64, 64), BG, [[([WIDGET], b)] for b in boxes], bg_margin=2)


def test_add_support_with_a_user_support_set() -> None:
    ex = PaletteExtractor({WIDGET: unit(1, 0), BG: unit(0, 1)}, stride=8)
    m = OVDiff(None, [ex], prototype_config=PrototypeConfig(n_parts=4), segment_config=CFG)
    with pytest.raises(ValueError, match="no generator"):
        m.build(["cat"])
    cat = m.add_support(widget_support("  my   widget "))
    assert cat.name == "my widget" and m.categories["my widget"] is cat
    assert cat.support is not None and cat.support.category == "my widget"
    assert not cat.stuff and set(cat.banks) == {"pal"}
    image, index = paint_scene((48, 64), BG, [([WIDGET], (8, 16, 32, 32))], noise=0)
    seg = m.segment(image)
    assert seg.class_names == ["background", "my widget"]
    assert accuracy(seg.labels, (index > 0).astype(np.int64)) >= 0.97
    tr = trace(seg, 32, 24)
    assert tr.label_name == "my widget" and tr.winner is not None
    assert all(0 <= r.image_index < 3 for r in tr.regions)
    stuff = m.add_support(widget_support("goo"), stuff=True)
    assert stuff.stuff


def test_add_support_is_cached_by_content(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from ovdiff_core import Cache

    ex = PaletteExtractor({WIDGET: unit(1, 0), BG: unit(0, 1)}, stride=8)
    cache = Cache(tmp_path)
    OVDiff(None, [ex], cache=cache).add_support(widget_support())
    calls = ex.calls
    assert calls > 0
    OVDiff(None, [ex], cache=cache).add_support(widget_support())
    assert ex.calls == calls, "the same images and masks hit the cache"
    changed = widget_support()
    changed.foreground[0, 0, 0] = True
    OVDiff(None, [ex], cache=cache).add_support(changed)
    assert ex.calls > calls, "different masks are a different entry"


def test_rebuilding_a_category_in_memory_runs_no_generator_or_extractor_again() -> None:
    world = ColorWorld.default()
    gen, ex = ColorGenerator(world, n_images=4), ColorExtractor()
    model = OVDiff(gen, [ex])  # no cache: only the in-memory category can be reused
    first = model.build(["cat"])[0]
    generated, calls = gen.generated, ex.calls
    events = list(model.build_iter("cat"))
    assert (gen.generated, ex.calls) == (generated, calls)
    assert [e.cached for e in events if e.stage in ("support", "bank")] == [True, True]
    assert events[-1].category_result is not None
    assert events[-1].category_result.banks["color"] is first.banks["color"]
    # A different prototype setting must rebuild the banks (from the same support set).
    model.prototype_config = PrototypeConfig(n_parts=2)
    model.build(["cat"])
    assert gen.generated == generated and ex.calls > calls
