"""The demo's handlers (demo/app.py DemoApp), called directly: no browser, no server.

Most tests run on the colour world (no neural networks, meaningful answers); one runs
the tiny random-weight backend end to end, own photos included.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from PIL import Image

from demo.app import DemoApp, Session, build_demo
from demo.models import ModelPool, backend_info, make_model_factory
from demo.state import SIMILARITY_SIDE
from ovdiff_core.colorworld import ColorWorld, paint_scene
from ovdiff_core.trace import trace

ROOT = Path(__file__).resolve().parent.parent
SCENE = ROOT / "assets" / "colour_scene.png"
NAMES = "cat, sofa, lamp, grass"


def _run_build(app: DemoApp, session: Session, names: str = NAMES, stuff=("grass",), **kw):
    outs = list(
        app.tab_build.build(names, list(stuff), kw.get("preset", "cpu"), kw.get("size", 4), session)
    )
    return outs


@pytest.fixture(scope="module")
def color_app(tmp_path_factory: pytest.TempPathFactory) -> DemoApp:
    cache = tmp_path_factory.mktemp("cache")
    return DemoApp(make_model_factory("color", str(cache)), backend_info("color"))


@pytest.fixture(scope="module")
def built(color_app: DemoApp) -> tuple[Session, list[tuple]]:
    session = Session()
    outs = _run_build(color_app, session)
    return session, outs


@pytest.fixture(scope="module")
def segmented(color_app: DemoApp, built: tuple[Session, list[tuple]]):
    session, _ = built
    return color_app.tab_segment.segment(str(SCENE), session)


# --------------------------------------------------------------------------- building


def test_build_streams_support_images_batch_by_batch(built: tuple[Session, list[tuple]]) -> None:
    session, outs = built
    counts = [len(o.support_gallery) for o in outs]
    assert counts == sorted(counts) and counts[-1] == 4 * 4  # 4 classes x 4 images
    assert len(set(counts)) >= 9  # grew batch by batch (2 images a batch), not at once
    assert "Ready: 4 categories" in outs[-1].build_status
    assert list(session.categories) == ["cat", "sofa", "lamp", "grass"]
    assert session.categories["grass"].stuff and not session.categories["cat"].stuff
    path, caption = outs[-1].support_gallery[0]
    assert Path(path).is_file() and caption.startswith("cat #1 · fg ")
    assert "cached" not in caption
    update = outs[-1].how_cat
    assert update["choices"] == ["cat", "sofa", "lamp", "grass"]


def test_second_build_is_served_from_the_cache(color_app: DemoApp, built) -> None:
    session = Session()
    outs = _run_build(color_app, session, names="cat, lamp")
    assert all(c.endswith("· cached") for _, c in outs[-1].support_gallery)
    assert "(cached ✓)" in outs[-1].build_status
    assert len(outs[-1].support_gallery) == 8


def test_stuff_flag_is_per_visitor(color_app: DemoApp, built) -> None:
    session = Session()
    _run_build(color_app, session, names="grass", stuff=())
    assert session.categories["grass"].stuff is False
    assert built[0].categories["grass"].stuff is True


@pytest.mark.parametrize(
    ("names", "message"),
    [
        ("", "No categories"),
        ("cat, , sofa", "Category 2 is empty"),
        ("cat, sofa, CAT", "listed twice"),
        (", ".join(f"c{i}" for i in range(21)), "at most 20"),
        ("z" * 150, "at most 100"),
    ],
)
def test_build_rejects_bad_names(color_app: DemoApp, names: str, message: str) -> None:
    with pytest.raises(gr.Error, match=message):
        next(color_app.tab_build.build(names, [], "cpu", 4, Session()))


def test_quick_checks_match_the_handlers(color_app: DemoApp, built) -> None:
    color_app.tab_build.check_build("cat, sofa", "cpu", 4)  # no error, no side effect
    with pytest.raises(gr.Error, match="Category 2 is empty"):
        color_app.tab_build.check_build("cat,,sofa", "cpu", 4)
    with pytest.raises(gr.Error, match="Choose a preset"):
        color_app.tab_build.check_build("cat", "", 4)
    color_app.tab_segment.check_segment(str(SCENE), built[0])
    with pytest.raises(gr.Error, match="No categories yet"):
        color_app.tab_segment.check_segment(str(SCENE), Session())
    with pytest.raises(gr.Error, match="No image"):
        color_app.tab_segment.check_segment(None, built[0])


def test_build_rejects_bad_size_and_preset(color_app: DemoApp) -> None:
    with pytest.raises(gr.Error, match=r"Support-set size must be 2\.\.64"):
        next(color_app.tab_build.build("cat", [], "cpu", 500, Session()))
    with pytest.raises(gr.Error, match="Choose a preset"):
        next(color_app.tab_build.build("cat", [], "turbo", 4, Session()))


def _statuses(outs: list[tuple]) -> str:
    return "\n".join(str(o.build_status) for o in outs)


def test_cached_builds_never_wait_for_another_visitors_generation(color_app: DemoApp, built):
    first = color_app.tab_build.build("plum", [], "cpu", 4, Session())
    next(first)  # checking the cache
    next(first)  # generating: holds the generation turn
    assert color_app.generation.locked()
    # Another visitor whose categories are cached gets them while the generation runs.
    session = Session()
    outs = list(color_app.tab_build.build("cat, sofa", [], "cpu", 4, session))
    assert list(session.categories) == ["cat", "sofa"] and "waiting" not in _statuses(outs)
    # A visitor who needs generation waits for the turn, with a status line, not an error.
    waiting = color_app.tab_build.build("teal", [], "cpu", 4, Session())
    outs = [next(waiting) for _ in range(3)]
    assert "waiting for another visitor's build" in str(outs[-1].build_status)
    first.close()  # abandoning a build (the visitor left) releases the turn
    assert not color_app.generation.locked()
    session = Session()
    rest = list(waiting)
    assert "Ready: 1 category" in str(rest[-1].build_status) and not color_app.generation.locked()


def test_preset_change_drops_old_categories_with_a_warning(color_app: DemoApp) -> None:
    session = Session()
    _run_build(color_app, session, names="cat, sofa")
    with pytest.warns(UserWarning, match="removed sofa"):
        _run_build(color_app, session, names="cat", preset="paper")
    assert list(session.categories) == ["cat"] and session.preset == "paper"


def test_ready_sets_and_stuff_toggle(color_app: DemoApp) -> None:
    assert color_app.tab_build.ready_set("Colour world (4)") == "cat, sofa, lamp, grass"
    assert "aeroplane" in color_app.tab_build.ready_set("VOC (20 classes)")
    assert color_app.tab_build.ready_set("nope") == ""
    r = color_app.tab_build.stuff_choices("cat, sky, grass", [], [])
    names = r.typed_names
    assert names == ["cat", "sky", "grass"] and r.stuff_box["value"] == ["sky", "grass"]
    # the visitor unticked "sky": it stays unticked; a newly typed stuff name is prefilled
    r = color_app.tab_build.stuff_choices("cat, sky, grass, water", ["grass"], names)
    assert r.stuff_box["value"] == ["grass", "water"]
    r = color_app.tab_build.stuff_choices("cat, ,", ["grass"], names)
    assert r.stuff_box["choices"] == ["cat"] and r.stuff_box["value"] == []


# --------------------------------------------------------------------------- segmenting


def test_segment_outputs(segmented) -> None:
    r = segmented
    overlay, legend, seg, hint = r.overlay, r.legend, r.seg_state.current, r.trace_info
    fig, sim, regions, maps = r.trace_plot, r.trace_sim, r.trace_regions, r.maps_gallery
    assert seg is r.seg_state.original and seg.features is not None  # kept for what-if
    assert overlay.shape == seg.image.shape == (192, 256, 3)
    assert seg.class_names[0] == "background" and "cat" in seg.class_names
    assert 'class="ovd-legend"' in legend and "CLIP pre-filter" in legend
    for name in seg.class_names:
        assert f"{name}</span>" in legend or f"{name} <small>" in legend
    assert "Click any pixel" in hint and sim is None and regions == [] and maps == []
    assert fig.data == ()


def test_segment_finds_the_colour_objects(segmented) -> None:
    seg = segmented.seg_state.current
    world = ColorWorld.default()
    names = seg.class_names
    # assets/colour_scene.png: cat at rows 24..104, cols 16..88; sofa rows 96..168,
    # cols 112..232 (see assets/make_assets.py)
    assert names[int(np.bincount(seg.labels[40:90, 25:80].ravel()).argmax())] == "cat"
    assert names[int(np.bincount(seg.labels[110:160, 125:220].ravel()).argmax())] == "sofa"
    assert world.parts["cat"]  # the world the asset was painted from


def test_segment_needs_categories_and_an_image(color_app: DemoApp, built) -> None:
    with pytest.raises(gr.Error, match="No categories yet"):
        color_app.tab_segment.segment(str(SCENE), Session())
    with pytest.raises(gr.Error, match="No image"):
        color_app.tab_segment.segment(None, built[0])


def test_segment_rejects_corrupt_uploads(color_app: DemoApp, built, tmp_path: Path) -> None:
    bad = tmp_path / "photo.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.raises(gr.Error, match="corrupt or truncated"):
        color_app.tab_segment.segment(str(bad), built[0])
    text = tmp_path / "photo.txt"
    text.write_text("hello")
    with pytest.raises(gr.Error, match="not an image"):
        color_app.tab_segment.segment(str(text), built[0])


@pytest.mark.parametrize("kind", ["gray", "rgba", "16bit", "palette", "huge"])
def test_segment_converts_odd_images_with_a_warning(
    color_app: DemoApp, built, tmp_path: Path, kind: str
) -> None:
    rgb = np.asarray(Image.open(SCENE).convert("RGB"))
    if kind == "gray":
        im, note = Image.fromarray(rgb).convert("L"), "Grayscale"
    elif kind == "rgba":
        rgba = np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)])
        im, note = Image.fromarray(rgba, "RGBA"), "Transparent"
    elif kind == "16bit":
        im, note = Image.fromarray(rgb[..., 0].astype(np.uint16) * 257), "16-bit"
    elif kind == "palette":
        im, note = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE), "Palette"
    else:
        big = np.asarray(Image.fromarray(rgb).resize((2400, 1800), Image.Resampling.NEAREST))
        im, note = Image.fromarray(big), "downscaled from 2400x1800 to 1024x768"
    path = tmp_path / f"{kind}.png"
    im.save(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = color_app.tab_segment.segment(str(path), built[0])
        overlay, seg = r.overlay, r.seg_state.current
    shown = [str(w.message) for w in caught]
    assert any(note in m for m in shown), shown  # the conversion is reported, not silent
    expected = (768, 1024) if kind == "huge" else (192, 256)
    assert seg.size == expected and overlay.shape == (*expected, 3)
    if kind == "huge":
        assert seg.class_names[int(seg.labels[250, 200])] == "cat"


# --------------------------------------------------------------------------- tracing


def test_trace_names_the_clicked_label_and_its_support(segmented, color_app: DemoApp) -> None:
    seg = segmented.seg_state.current
    for x, y in [(50, 60), (160, 130), (5, 5)]:
        panel, chart = color_app.tab_segment.trace_at(seg, [x, y])
        html, fig, sim, regions = (
            panel.trace_info,
            chart.trace_plot,
            panel.trace_sim,
            panel.trace_regions,
        )
        expected = trace(seg, x, y)
        label = seg.class_names[int(seg.labels[y, x])]
        assert expected.label_name == label
        assert f'data-x="{x}" data-y="{y}" data-label="{label}"' in html
        assert f"Pixel (x={x}, y={y}) → {label}" in html
        np.testing.assert_allclose(fig.data[0].y, seg.scores[:, y, x], rtol=1e-6)
        assert list(fig.data[0].x) == seg.class_names
        assert max(sim.shape[:2]) <= SIMILARITY_SIDE
        assert len(regions) == min(len(expected.regions), 12) >= 1
        first = expected.regions[0]
        assert regions[0][1].endswith(f"support #{first.image_index + 1}")
        assert regions[0][0].shape[0] >= 128
    html_cat = color_app.tab_segment.trace_at(seg, [50, 60])[0].trace_info
    assert "→ cat" in html_cat
    # the two click handlers (run in parallel): panel, and chart == trace's class scores
    panel = color_app.tab_segment.trace_panel(seg, [50, 60])
    assert panel.trace_info == html_cat and len(panel.trace_regions) >= 1
    fig = color_app.tab_segment.trace_chart(seg, [50, 60]).trace_plot
    assert fig.layout.meta == "50,60"
    assert list(fig.data[0].y) == [trace(seg, 50, 60).class_scores[n] for n in seg.class_names]
    assert list(fig.data[0].marker.line.width) == [3 if n == "cat" else 0 for n in seg.class_names]
    with pytest.raises(gr.Error, match="segment an image first"):
        color_app.tab_segment.trace_chart(None, [1, 1])


def test_trace_before_segmenting_or_outside(color_app: DemoApp, segmented) -> None:
    with pytest.raises(gr.Error, match="segment an image first"):
        color_app.tab_segment.trace_at(None, [1, 1])
    with pytest.raises(gr.Error, match="outside the 256x192 image"):
        color_app.tab_segment.trace_at(segmented.seg_state.current, [300, 10])
    with pytest.raises(gr.Error, match="Click on the segmented image"):
        color_app.tab_segment.trace_at(segmented.seg_state.current, None)


def test_score_maps(color_app: DemoApp, segmented) -> None:
    seg = segmented.seg_state.current
    maps = color_app.tab_segment.score_maps(seg)
    assert [c.split(":")[0] for _, c in maps] == seg.class_names
    assert maps[0][0].shape == (*seg.size, 3)
    with pytest.raises(gr.Error, match="Segment an image first"):
        color_app.tab_segment.score_maps(None)


def test_explain_shows_real_intermediate_data(color_app: DemoApp, built, segmented) -> None:
    session = built[0]
    out = color_app.tab_how.explain(session, segmented.seg_state, "sofa", 2)
    settings, photo, attribution, masks = (
        out.how_settings,
        out.how_photo,
        out.how_attr,
        out.how_masks,
    )
    parts, caption, fig, maps = out.how_parts, out.how_parts_caption, out.how_scatter, out.how_maps
    argmax, slider = out.how_argmax, out.how_img
    support = session.categories["sofa"].support
    assert support is not None
    f = photo.shape[0] // support.images.shape[1]  # nearest-neighbour upscale factor
    assert f >= 2 and photo.shape[0] >= 192
    np.testing.assert_array_equal(photo[::f, ::f], support.images[2])
    assert attribution.shape == masks.shape == photo.shape
    assert parts.shape[2] == 3 and "support image #3" in caption
    n_protos = sum(len(c.banks["color"]) for c in session.categories.values())
    assert sum(len(t.x) for t in fig.data) == n_protos
    assert len(maps) == len(segmented.seg_state.current.class_names) and argmax.shape == (
        192,
        256,
        3,
    )
    assert slider["maximum"] == len(support) - 1 and slider["value"] == 2
    assert "Prompt:" in settings
    with pytest.raises(gr.Error, match="Build at least one category"):
        color_app.tab_how.explain(Session(), None, None, 0)
    unsegmented = color_app.tab_how.explain(session, None, "cat", 99)
    assert unsegmented.how_maps == [] and unsegmented.how_argmax is None
    assert unsegmented.how_img["value"] == 3


# --------------------------------------------------------------------------- own photos


def _editor(photo: np.ndarray, box: tuple[int, int, int, int] | None) -> dict:
    layer = np.zeros((*photo.shape[:2], 4), dtype=np.uint8)
    if box is not None:
        top, left, h, w = box
        layer[top : top + h, left : left + w] = (34, 221, 85, 255)
    rgba = np.dstack([photo, np.full(photo.shape[:2], 255, np.uint8)])
    return {"background": rgba, "layers": [layer], "composite": rgba}


def test_own_photos_become_a_category(color_app: DemoApp, built, tmp_path: Path) -> None:
    session = Session(preset="cpu", categories=dict(built[0].categories))
    world = ColorWorld.default()
    teapot = [(250, 20, 200)]  # a colour no category uses
    for seed in range(2):
        photo, index = paint_scene(
            (80, 96), (40, 40, 40), [(teapot, (20, 20 + 10 * seed, 40, 40))], seed=seed
        )
        ys, xs = np.nonzero(index)
        box = (ys.min(), xs.min(), ys.max() - ys.min() + 1, xs.max() - xs.min() + 1)
        added = color_app.tab_photos.add_photo(_editor(photo, box), session)
    assert len(added.own_gallery) == 2
    assert "2 photo(s) queued, 2 with a painted foreground" in added.own_status
    made = color_app.tab_photos.create_category("teapot", False, "cpu", session)
    assert "teapot" in session.categories and made.own_gallery == [] and session.photos == []
    assert "from your photos" in made.own_status and "teapot" in made.how_cat["choices"]
    scene, index = paint_scene(
        (96, 128),
        (200, 200, 200),
        [(teapot, (10, 10, 40, 40)), (world.parts["sofa"], (50, 60, 40, 60))],
    )
    path = tmp_path / "teapot_scene.png"
    Image.fromarray(scene).save(path)
    seg = color_app.tab_segment.segment(str(path), session).seg_state.current
    # the colour world's CLIP stand-in only knows its own four categories, so the
    # pre-filter drops a thing it cannot see; as stuff the category bypasses the filter
    assert seg.prefilter is not None and "teapot" in seg.prefilter.dropped
    session.categories["teapot"].stuff = True
    seg = color_app.tab_segment.segment(str(path), session).seg_state.current
    assert seg.class_names[int(seg.labels[30, 30])] == "teapot"
    assert seg.class_names[int(seg.labels[70, 90])] == "sofa"


def test_own_photo_errors(color_app: DemoApp, built) -> None:
    session = Session(preset="cpu")
    with pytest.raises(gr.Error, match="Upload a photo into the editor first"):
        color_app.tab_photos.add_photo(None, session)
    with pytest.raises(gr.Error, match="Upload a photo"):
        color_app.tab_photos.add_photo({"background": None, "layers": []}, session)
    with pytest.raises(gr.Error, match="No photos queued"):
        color_app.tab_photos.create_category("teapot", False, "cpu", session)
    photo = np.zeros((32, 32, 3), dtype=np.uint8)
    color_app.tab_photos.add_photo(_editor(photo, None), session)
    with pytest.raises(gr.Error, match=r"Paint the object on photo\(s\) \[1\]"):
        color_app.tab_photos.create_category("teapot", False, "cpu", session)
    with pytest.raises(gr.Error, match="empty"):
        color_app.tab_photos.create_category("   ", False, "cpu", session)
    cleared = color_app.tab_photos.clear_photos(session)
    assert cleared.own_gallery == [] and session.photos == []
    assert cleared.own_status == "No photos queued."


# --------------------------------------------------------------------------- app assembly


def test_build_demo_shows_the_mode_banner() -> None:
    for backend, words in (("color", "Colour-world mode"), ("tiny", "tiny random-weight")):
        demo = build_demo(make_model_factory(backend), backend=backend)
        texts = [str(b.value) for b in demo.blocks.values() if hasattr(b, "value")]
        assert any(words in t for t in texts), backend
        assert isinstance(demo.ovdiff_app, DemoApp)
    demo = build_demo(make_model_factory("color"), backend="real", info=backend_info("real"))
    assert not any(getattr(b, "elem_id", None) == "mode-banner" for b in demo.blocks.values())


def test_model_pool_loads_once_per_setting() -> None:
    calls = []

    def factory(preset: str, size: int | None):
        calls.append((preset, size))
        return object()

    pool = ModelPool(factory)  # type: ignore[arg-type]
    a = pool.get("cpu", 4)
    assert pool.get("cpu", 4) is a and pool.get("cpu", 8) is not a
    assert calls == [("cpu", 4), ("cpu", 8)]


def test_root_app_launches_locally_without_sharing(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict = {}
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: seen.update(kw))
    monkeypatch.setenv("OVDIFF_BACKEND", "color")
    monkeypatch.setattr(sys, "argv", ["app.py", "--port", "7999"])
    sys.path.insert(0, str(ROOT))
    import importlib

    root_app = importlib.import_module("app")
    root_app.main()
    assert seen["server_name"] == "127.0.0.1" and seen["server_port"] == 7999
    assert seen["share"] is False and ".ovd-legend" in seen["css"] and "ovd-marker" in seen["js"]
    monkeypatch.setenv("OVDIFF_BACKEND", "bogus")
    monkeypatch.setattr(sys, "argv", ["app.py"])
    with pytest.raises(SystemExit):
        root_app.main()


# --------------------------------------------------------------------------- tiny backend


@pytest.fixture(scope="module")
def tiny_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoApp]:
    cache = tmp_path_factory.mktemp("tiny-cache")
    yield DemoApp(make_model_factory("tiny", str(cache)), backend_info("tiny"))


@pytest.mark.slow
def test_tiny_backend_end_to_end(tiny_app: DemoApp) -> None:
    session = Session()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outs = list(tiny_app.tab_build.build("cat, grass", ["grass"], "cpu", 2, session))
    assert len(outs[-1].support_gallery) == 4 and session.categories["grass"].stuff
    r = tiny_app.tab_segment.segment(str(ROOT / "assets" / "cat.jpg"), session)
    overlay, legend, seg = r.overlay, r.legend, r.seg_state.current
    assert overlay.shape == (300, 451, 3) and seg.size == (300, 451)
    assert all(f"{n}</span>" in legend or f"{n} <small>" in legend for n in seg.class_names)
    panel, chart = tiny_app.tab_segment.trace_at(seg, [200, 100])
    html, fig, sim, regions = (
        panel.trace_info,
        chart.trace_plot,
        panel.trace_sim,
        panel.trace_regions,
    )
    assert sim.shape == (255, 384, 3) and len(regions) >= 1
    label = seg.class_names[int(seg.labels[100, 200])]
    assert f"→ {label}" in html
    np.testing.assert_allclose(fig.data[0].y, seg.scores[:, 100, 200], rtol=1e-6)
    # own photos through InContextSupport: automatic masks for unpainted photos
    photo = np.asarray(Image.open(ROOT / "assets" / "coffee.jpg").convert("RGB"))
    tiny_app.tab_photos.add_photo(_editor(photo, None), session)
    added = tiny_app.tab_photos.add_photo(_editor(photo[::-1].copy(), (40, 40, 100, 120)), session)
    assert "2 photo(s) queued, 1 with a painted foreground" in added.own_status
    tiny_app.tab_photos.create_category("cup", False, "cpu", session)
    cup = session.categories["cup"]
    assert cup.support is not None and len(cup.support) == 2
    assert cup.support.settings.get("type") == "incontext_support"
    seg2 = tiny_app.tab_segment.segment(str(ROOT / "assets" / "coffee.jpg"), session)
    seg2 = seg2.seg_state.current
    assert "cup" in seg2.queried


def test_real_backend_without_weights_says_how_to_get_them(tmp_path: Path) -> None:
    app = DemoApp(make_model_factory("real", str(tmp_path)), backend_info("real"))
    with pytest.raises(gr.Error, match=r"The models could not be loaded: .* download"):
        next(app.tab_build.build("cat", [], "cpu", 8, Session()))


# --------------------------------------------------------------------------- hostile input

HOSTILE = ("<img src=x onerror=alert(1)>", '"><script>alert(1)</script>')


def _no_raw_html(*texts: object) -> None:
    for text in texts:
        low = str(text).lower()
        assert "<img" not in low and "<script" not in low, text


@pytest.fixture(scope="module")
def hostile(color_app: DemoApp) -> tuple[Session, list[tuple], tuple]:
    """A visitor who named categories with HTML; stuff, so the pre-filter keeps them."""
    session = Session()
    names = ", ".join([*HOSTILE, "cat"])
    outs = list(color_app.tab_build.build(names, list(HOSTILE), "cpu", 2, session))
    return session, outs, color_app.tab_segment.segment(str(SCENE), session)


def test_hostile_names_are_escaped_in_every_html_the_app_builds(
    color_app: DemoApp, hostile
) -> None:
    session, outs, segmented = hostile
    legend, seg = segmented.legend, segmented.seg_state.current
    assert list(session.categories)[:2] == list(HOSTILE)
    assert set(HOSTILE) <= set(seg.class_names)  # kept, so they reach every builder
    _no_raw_html(*(o.build_status for o in outs))  # build status Markdown
    assert "&lt;img src=x onerror=alert\\(1\\)&gt;" in outs[-1].build_status  # shown as text
    _no_raw_html(legend)
    assert "&lt;img src=x onerror=alert(1)&gt;" in legend
    labels = {int(v) for v in np.unique(seg.labels)}
    for k in labels:
        ys, xs = np.nonzero(seg.labels == k)
        html = color_app.tab_segment.trace_panel(seg, [int(xs[0]), int(ys[0])]).trace_info
        _no_raw_html(html)
    html = color_app.tab_segment.trace_panel(seg, [5, 5]).trace_info
    assert "&quot;&gt;&lt;script&gt;" in html  # in the table of every label's score
    for name in HOSTILE:
        how = color_app.tab_how.explain(session, seg, name, 0)
        _no_raw_html(how.how_settings, how.how_parts_caption)
    # own photos: the status Markdown of create_category
    photo = np.zeros((32, 32, 3), dtype=np.uint8)
    own = Session(preset="cpu")
    color_app.tab_photos.add_photo(_editor(photo, (4, 4, 20, 20)), own)
    made = color_app.tab_photos.create_category(HOSTILE[0], False, "cpu", own)
    _no_raw_html(made.own_status)


@pytest.mark.parametrize("name", HOSTILE)
def test_error_pop_ups_escape_the_names_they_echo(color_app: DemoApp, name: str) -> None:
    with pytest.raises(gr.Error) as err:
        color_app.tab_build.check_build(f"{name}, {name.upper()}", "cpu", 4)
    assert "listed twice" in err.value.message
    _no_raw_html(err.value.message)


def test_upload_is_decoded_once_for_check_and_segment(
    color_app: DemoApp, built, tmp_path: Path, decoded_uploads: list[str]
) -> None:
    calls = decoded_uploads
    path = tmp_path / "scene.png"
    Image.open(SCENE).save(path)
    color_app.tab_segment.check_segment(str(path), built[0])
    overlay = color_app.tab_segment.segment(str(path), built[0]).overlay
    assert calls == [str(path)] and overlay.shape == (192, 256, 3)
    # a new upload at the same path (another file) is decoded again
    Image.open(SCENE).transpose(Image.Transpose.ROTATE_90).save(path)
    color_app.tab_segment.check_segment(str(path), built[0])
    assert color_app.tab_segment.segment(str(path), built[0]).overlay.shape == (256, 192, 3)
    assert len(calls) == 2


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), 1e309, "nan", 1e300])
def test_non_finite_support_size_is_a_clear_error(color_app: DemoApp, bad) -> None:
    with pytest.raises(gr.Error, match=r"Support-set size must be 2\.\.64, got .*whole number"):
        color_app.tab_build.check_build("cat", "cpu", bad)
    with pytest.raises(gr.Error, match=r"Support-set size must be 2\.\.64"):
        next(color_app.tab_build.build("cat", [], "cpu", bad, Session()))


def test_non_finite_click_is_a_clear_error(color_app: DemoApp, segmented) -> None:
    seg = segmented.seg_state.current
    for index in ([float("nan"), 5], [5, float("inf")], [float("-inf"), 1], [1e309, 2]):
        for handler in (color_app.tab_segment.trace_panel, color_app.tab_segment.trace_chart):
            with pytest.raises(gr.Error, match="Click on the segmented image itself"):
                handler(seg, index)
    with pytest.raises(gr.Error, match="outside the 256x192 image"):
        color_app.tab_segment.trace_panel(seg, [1e300, 3])  # huge but finite: outside


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), "abc"])
def test_non_finite_slider_is_a_clear_error(color_app: DemoApp, built, bad) -> None:
    with pytest.raises(gr.Error, match="Support image index must be a whole number from 0 to 3"):
        color_app.tab_how.explain(built[0], None, "cat", bad)
    assert (
        color_app.tab_how.explain(built[0], None, "cat", 2.6).how_img["value"] == 3
    )  # finite: rounded


def test_category_limit_holds_per_visitor_not_per_build(color_app: DemoApp) -> None:
    session = Session()
    first = [f"thing {i}" for i in range(12)]
    list(color_app.tab_build.build(", ".join(first), [], "cpu", 2, session))
    second = ", ".join(f"other {i}" for i in range(12))
    with pytest.raises(gr.Error, match="12 categories already and this adds 12 new ones"):
        color_app.tab_build.check_build(second, "cpu", 2, session)
    with pytest.raises(gr.Error, match=r"limit of 20 per visitor.*reload the page"):
        next(color_app.tab_build.build(second, [], "cpu", 2, session))
    assert len(session.categories) == 12
    # rebuilding names the visitor has does not count twice: 12 + 8 new = 20 is fine
    again = ", ".join(first + [f"other {i}" for i in range(8)])
    color_app.tab_build.check_build(again, "cpu", 2, session)
    list(color_app.tab_build.build(again, [], "cpu", 2, session))
    assert len(session.categories) == 20
    # own photos count too
    session.photos = [(np.zeros((32, 32, 3), dtype=np.uint8), None)]
    with pytest.raises(gr.Error, match="20 categories already and this adds 1 new"):
        color_app.tab_photos.create_category("teapot", False, "cpu", session)
    # a preset change starts the visitor afresh (the old categories are dropped)
    color_app.tab_build.check_build(second, "paper", 2, session)


def test_trace_panel_without_a_kept_similarity_map(
    color_app: DemoApp, segmented, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over the maps' budget a click still explains the pixel and says the map is not kept."""
    seg = segmented.seg_state.current
    for maps in seg.whole_view_sims.values():
        monkeypatch.setattr(maps, "_row", {})  # as if the budget kept none
    panel = color_app.tab_segment.trace_panel(seg, [50, 60])
    assert trace(seg, 50, 60).similarity_map is None
    assert "Its similarity map was not kept" in panel.trace_info
    assert "→ cat" in panel.trace_info and panel.trace_sim.ndim == 3
    assert len(panel.trace_regions) >= 1
