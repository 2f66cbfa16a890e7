"""Pictures and charts (demo/render.py) on hand-made arrays and colour-world banks."""

from __future__ import annotations

import numpy as np
import pytest

from demo import render
from ovdiff_core.colorworld import ColorExtractor, ColorGenerator, ColorWorld
from ovdiff_core.config import PrototypeConfig
from ovdiff_core.pipeline import extract_features
from ovdiff_core.prefilter import PrefilterResult
from ovdiff_core.prototypes import build_bank
from ovdiff_core.types import Category, PrototypeKind


@pytest.fixture(scope="module")
def cat_category() -> Category:
    world = ColorWorld.default()
    gen = ColorGenerator(world, n_images=4, batch_size=4, size=(64, 64))
    support = next(gen.generate("cat"))
    ex = ColorExtractor()
    bank = build_bank(support, extract_features(ex, support.images), ex.name, PrototypeConfig())
    return Category("cat", {ex.name: bank}, support)


def test_class_colors_are_distinct() -> None:
    colors = {render.class_color(i) for i in range(21)}
    assert len(colors) == 21
    assert render.class_color(0) == render.BACKGROUND_COLOR
    assert render.class_colors(3).shape == (3, 3) and render.class_colors(3).dtype == np.uint8


def test_overlay_tints_classes_and_draws_edges() -> None:
    image = np.full((20, 20, 3), 128, dtype=np.uint8)
    labels = np.zeros((20, 20), dtype=np.int64)
    labels[5:15, 5:15] = 1
    out = render.overlay_labels(image, labels, alpha=0.5)
    red = np.array(render.class_color(1), dtype=np.float64)
    np.testing.assert_allclose(out[10, 10], (128 + red) / 2, atol=1)
    assert out[0, 0].mean() < 128  # background darkened
    np.testing.assert_array_equal(out[5, 10], [255, 255, 255])  # boundary
    plain = render.overlay_labels(image, labels, edges=False)
    assert not (plain == 255).all(axis=2).any()


def test_colorize_is_magma_and_monotone_in_brightness() -> None:
    ramp = np.linspace(0, 1, 11)[None].repeat(2, 0)
    rgb = render.colorize(ramp)
    assert rgb.shape == (2, 11, 3) and rgb.dtype == np.uint8
    lum = rgb[0].astype(float) @ [0.299, 0.587, 0.114]
    assert np.all(np.diff(lum) > 0)
    assert rgb[0, 0].sum() < 30 and rgb[0, -1].sum() > 500  # near black to near white
    np.testing.assert_array_equal(render.colorize(np.array([[5.0, -5.0]]))[0], rgb[0, [-1, 0]])


def test_mark_point_touches_only_the_neighbourhood() -> None:
    image = np.zeros((100, 100, 3), dtype=np.uint8)
    out = render.mark_point(image, 30, 60)
    changed = np.argwhere(out.any(axis=2))
    assert len(changed) > 0
    assert np.abs(changed[:, 0] - 60).max() <= 12 and np.abs(changed[:, 1] - 30).max() <= 12
    assert not image.any()  # input untouched


def test_similarity_overlay_preview_scales_the_marker() -> None:
    image = np.zeros((400, 800, 3), dtype=np.uint8)
    sim = np.zeros((400, 800), dtype=np.float32)
    sim[:, 400:] = 1.0
    out = render.similarity_overlay(image, sim, point=(700, 100), max_side=200)
    assert out.shape == (100, 200, 3)
    assert out[50, 10].sum() < out[50, 120].sum()  # hot half brighter
    full = render.similarity_overlay(image, sim)
    assert full.shape == image.shape
    marked = np.argwhere((out == 255).all(axis=2))
    assert abs(marked[:, 1].mean() - 175) < 4 and abs(marked[:, 0].mean() - 25) < 4


def test_support_tile_has_four_panels(cat_category: Category) -> None:
    s = cat_category.support
    assert s is not None
    tile = render.support_tile(s.images[0], s.attributions[0], s.foreground[0], s.background[0])
    side = 64 * 3  # 64 px support images upscaled x3 to reach 160 px
    assert tile.shape == (2 * side + 4, 2 * side + 4, 3)
    np.testing.assert_array_equal(tile[:side:3, :side:3], s.images[0])  # top left: the photo
    masks, cutout = tile[side + 4 :, :side], tile[side + 4 :, side + 4 :]
    fg, bg = s.foreground[0], s.background[0]
    inner = fg & ~render._edges(fg)
    fy, fx = np.argwhere(inner)[0]
    by, bx = np.argwhere(bg)[0]
    fg_px = masks[fy * 3 + 1, fx * 3 + 1].astype(int)
    bg_px = masks[by * 3 + 1, bx * 3 + 1].astype(int)
    assert fg_px[1] > fg_px[2] and bg_px[2] > bg_px[0]  # green foreground, blue background
    np.testing.assert_array_equal(cutout[fy * 3, fx * 3], s.images[0][fy, fx])
    assert cutout[by * 3, bx * 3].sum() < s.images[0][by, bx].astype(int).sum()


def test_highlight_region_dims_outside() -> None:
    image = np.full((32, 32, 3), 200, dtype=np.uint8)
    mask = np.zeros((32, 32), dtype=bool)
    mask[8:24, 8:24] = True
    out = render.highlight_region(image, mask, min_side=64)
    assert out.shape == (64, 64, 3)
    assert out[2, 2].mean() < 80 and out[32, 32].mean() > 150


def test_part_clusters_paint_member_cells(cat_category: Category) -> None:
    s = cat_category.support
    bank = cat_category.banks["color"]
    assert s is not None
    pic, present = render.part_clusters(s, bank, 0, min_side=64)
    assert pic.shape == (64, 64, 3)
    parts_on_image = sum(
        1
        for p in range(len(bank))
        if int(bank.kinds[p]) == PrototypeKind.PART and (bank.members(p)[0] == 0).any()
    )
    assert present == parts_on_image > 0
    assert not np.array_equal(pic, s.images[0])


def test_legend_lists_labels_and_prefilter_escaped() -> None:
    pre = PrefilterResult(
        kept=["cat"], dropped=["<b>sofa</b>"], probabilities={"<b>sofa</b>": 0.1}, candidates=[]
    )
    html = render.legend_html(["background", "cat", "sky"], pre, stuff={"sky": True})
    assert html.count('class="ovd-swatch"') == 3
    assert "#282828" in html and "(stuff)" in html
    assert "&lt;b&gt;sofa&lt;/b&gt; (p=0.10)" in html and "<b>sofa</b>" not in html
    assert 'class="ovd-kept">cat<' in html
    off = render.legend_html(["background", "cat"], None, queried=["cat"])
    assert "Pre-filter off" in off


def test_scores_figure_matches_scores() -> None:
    fig = render.scores_figure(
        {"background": 0.2, "cat": 0.9, "sofa": 0.4}, ["background", "cat", "sofa"], winner="cat"
    )
    bar = fig.data[0]
    assert list(bar.x) == ["background", "cat", "sofa"]
    np.testing.assert_allclose(bar.y, [0.2, 0.9, 0.4])
    assert list(bar.marker.line.width) == [0, 3, 0]
    assert render.empty_scores_figure().data == ()


def test_prototype_scatter_has_every_prototype(cat_category: Category) -> None:
    fig = render.prototype_scatter([cat_category], "color")
    n_points = sum(len(t.x) for t in fig.data)
    assert n_points == len(cat_category.banks["color"])
    names = {t.name for t in fig.data}
    assert "cat · fg · class" in names and "cat · bg · part" in names
    assert render.prototype_scatter([cat_category], "missing").data == ()


HOSTILE = ("<img src=x onerror=alert(1)>", '"><script>alert(1)</script>')


def test_esc_and_md_make_names_literal_text() -> None:
    assert render.esc(HOSTILE[0]) == "&lt;img src=x onerror=alert(1)&gt;"
    assert render.esc(HOSTILE[1]) == "&quot;&gt;&lt;script&gt;alert(1)&lt;/script&gt;"
    assert render.esc("it's") == "it&#x27;s"  # safe in single-quoted attributes too
    # Markdown: punctuation backslash-escaped (layout, links, LaTeX), then HTML-escaped
    assert render.md("**bold** [x](javascript:y) $$z$$ #h") == (
        r"\*\*bold\*\* \[x\]\(javascript:y\) \$\$z\$\$ \#h"
    )
    assert render.md(HOSTILE[0]) == r"&lt;img src=x onerror=alert\(1\)&gt;"
    assert render.md("a & b") == "a &amp; b"


def test_html_builders_escape_hostile_names(cat_category: Category) -> None:
    names = ["background", *HOSTILE]
    prefilter = PrefilterResult(
        kept=[HOSTILE[0]],
        dropped=[HOSTILE[1]],
        probabilities={HOSTILE[1]: 0.1},
        candidates=[HOSTILE[0]],
        subset_scores={},
    )
    outputs = [
        render.legend_html(names, prefilter, names[1:], {HOSTILE[0]: True}),
        render.legend_html(names, None, names[1:]),
    ]
    for out in outputs:
        assert "<img" not in out and "<script" not in out
        assert "&lt;img src=x onerror=alert(1)&gt;" in out
    hostile = Category(HOSTILE[1], cat_category.banks, cat_category.support)
    fig = render.prototype_scatter([hostile], "color")
    for trace in fig.data:
        assert "<script" not in trace.name and "<script" not in trace.hovertemplate
    fig = render.prototype_scatter([hostile], HOSTILE[0])  # an extractor name in the title
    assert "<img" not in fig.layout.title.text
