"""The demo's explanation panels, handlers called directly (no browser): top prototypes
at a clicked pixel, what-if exclusions with restore, the prototype atlas."""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import numpy as np
import pytest

from demo import render
from demo.app import DemoApp, Session
from demo.models import backend_info, make_model_factory
from demo.panel_whatif import ATLAS_MAX_CARDS
from demo.state import Pick, SegState
from ovdiff_core.explain import atlas, top_prototypes, what_if

ROOT = Path(__file__).resolve().parent.parent
SCENE = ROOT / "assets" / "colour_scene.png"


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> DemoApp:
    cache = tmp_path_factory.mktemp("cache")
    return DemoApp(make_model_factory("color", str(cache)), backend_info("color"))


@pytest.fixture(scope="module")
def session(app: DemoApp) -> Session:
    s = Session()
    list(app.tab_build.build("cat, sofa, lamp, grass", ["grass"], "cpu", 4, s))
    return s


@pytest.fixture
def state(app: DemoApp, session: Session) -> SegState:
    return app.tab_segment.segment(str(SCENE), session).seg_state


def test_top_prototypes_panel_matches_the_library(app: DemoApp, state: SegState) -> None:
    seg = state.current
    top = app.tab_segment.top_panel(state, [50, 60])
    expected = top_prototypes(seg, 50, 60, 5)
    assert top.top_info.count("<tr data-rank=") == len(expected) == 5
    for rank, p in enumerate(expected, start=1):
        row = top.top_info.split(f'<tr data-rank="{rank}">')[1].split("</tr>")[0]
        assert f"<td>{render.esc(p.label_name)}</td>" in row
        assert f"#{p.prototype.index} ({p.prototype.extractor})" in row
        assert f"{100 * p.share:.0f}%" in row and f"<td>{render.esc(p.source)}</td>" in row
    # every tile points at a prototype of the table and a support image it was formed from
    refs = [p.prototype for p in expected]
    assert top.top_picks and len(top.top_picks) == len(top.top_regions)
    for pick in top.top_picks:
        assert pick.prototype in refs and pick.image_index is not None
        assert pick.category == pick.prototype.category


def test_what_if_excludes_and_restores(app: DemoApp, state: SegState) -> None:
    seg = state.original
    region = app.tab_segment.trace_panel(state, [50, 60]).region_picks[0]
    picked = app.whatif.select([region], 0)
    assert picked.pick == region and "support image" in picked.pick_info
    out = app.whatif.exclude_image(state, picked.pick)
    assert region.category is not None and region.image_index is not None
    expected = what_if(seg, exclude_images={region.category: [region.image_index]})
    np.testing.assert_array_equal(out.seg_state.current.labels, expected.segmentation.labels)
    changed = out.seg_state.changed
    assert changed is not None
    np.testing.assert_array_equal(changed, expected.changed)
    assert f"**{int(changed.sum())}** pixels changed" in out.whatif_status
    assert f"{len(expected.removed)} prototypes removed" in out.whatif_status
    # changed pixels magenta-tinted, the others exactly the plain overlay
    plain = render.overlay_labels(seg.image, out.seg_state.current.labels)
    np.testing.assert_array_equal(out.overlay[~changed], plain[~changed])
    assert changed.any()  # this support image matters at a few pixels of the scene
    assert (out.overlay[changed] != plain[changed]).any(axis=-1).all()  # every one marked
    assert out.region_picks == [] and out.pick is None  # stale references dropped
    # a prototype from a fresh click on the edited segmentation, on top of the image
    top = app.tab_segment.top_panel(out.seg_state, [160, 130])
    ref = top.top_picks[0].prototype
    assert ref is not None
    before = out.seg_state.current
    again = app.whatif.exclude_prototype(out.seg_state, top.top_picks[0])
    assert again.seg_state.excluded_prototypes == [ref]
    chained = what_if(before, exclude_prototypes=[ref]).segmentation
    np.testing.assert_array_equal(again.seg_state.current.labels, chained.labels)
    np.testing.assert_array_equal(again.seg_state.changed, chained.labels != seg.labels)
    restored = app.whatif.restore(again.seg_state)
    assert restored.seg_state.current is seg and not restored.seg_state.edited
    np.testing.assert_array_equal(restored.overlay, render.overlay_labels(seg.image, seg.labels))
    assert "Nothing excluded" in restored.whatif_status


def test_what_if_needs_a_segmentation_and_a_selection(app: DemoApp, state: SegState) -> None:
    with pytest.raises(gr.Error, match="Segment an image first"):
        app.whatif.exclude_image(None, Pick(None, "cat", 0, "x"))
    with pytest.raises(gr.Error, match="Select a support region"):
        app.whatif.exclude_prototype(state, None)
    with pytest.raises(gr.Error, match="Select a support region"):
        app.whatif.select([], 0)
    pick = Pick(None, "cat", 0, "cat #1")
    out = app.whatif.exclude_image(state, pick)
    with pytest.raises(gr.Error, match="already excluded"):
        app.whatif.exclude_image(out.seg_state, pick)


def test_atlas_cards_and_sorting(app: DemoApp, state: SegState) -> None:
    seg = state.current
    ex = seg.extractors[0]
    out = app.whatif.atlas(state, "cat", ex, "pixels won")
    cards = atlas(seg, "cat", ex, sort_by="pixels")
    bank = seg.categories[seg.class_names.index("cat") - 1].banks[ex]
    assert len(cards) == len(bank) == out.atlas_info.count("<tr data-index=")
    assert len(out.atlas_gallery) == len(out.atlas_picks) == min(len(cards), ATLAS_MAX_CARDS)
    assert [p.prototype for p in out.atlas_picks] == [c.prototype for c in cards][:ATLAS_MAX_CARDS]
    won = [int(v) for v in out.atlas_info.split('data-pixels="')[1:] for v in [v.split('"')[0]]]
    assert won == sorted(won, reverse=True) and won[0] > 0
    first = out.atlas_gallery[0]
    assert first[0].shape[0] == 128 and f"wins {cards[0].pixels_won} px" in first[1]
    by_members = app.whatif.atlas(state, "cat", ex, "member cells")
    members = [int(v.split('"')[0]) for v in by_members.atlas_info.split('data-members="')[1:]]
    assert members == sorted(members, reverse=True) and members != won
    with pytest.raises(gr.Error, match="Choose a category"):
        app.whatif.atlas(state, "teapot", ex, "pixels won")
    with pytest.raises(gr.Error, match="Sort by one of"):
        app.whatif.atlas(state, "cat", ex, "colour")


def test_hostile_names_in_the_panels_are_escaped(app: DemoApp) -> None:
    name = "<img src=x onerror=alert(1)>"
    s = Session()
    list(app.tab_build.build(f"{name}, cat", [name], "cpu", 2, s))
    state = app.tab_segment.segment(str(SCENE), s).seg_state
    seg = state.current
    ys, xs = np.nonzero(seg.labels == seg.class_names.index(name))
    top = app.tab_segment.top_panel(state, [int(xs[0]), int(ys[0])])
    assert "<img" not in top.top_info and "&lt;img src=x" in top.top_info
    out = app.whatif.atlas(state, name, seg.extractors[0], "bank order")
    assert "<img" not in out.atlas_info
    pick = app.whatif.select(out.atlas_picks, 0)
    assert "<img" not in pick.pick_info
    edited = app.whatif.exclude_image(state, Pick(None, name, 0, "x"))
    assert "<img" not in edited.whatif_status
