"""The whole app in headless Chromium: build, watch the gallery fill, segment, click, errors.

The tests run in order on one page (one visitor). Screenshots of every step go to
``test-artifacts/browser/``. With ``OVDIFF_SCREENSHOTS=<dir>`` the best ones are also
written there, compressed for the README (that is how ``docs/screenshots`` is made):

    OVDIFF_BROWSER_BACKEND=color OVDIFF_SCREENSHOTS=docs/screenshots \\
        python -m pytest tests/browser -q
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
from harness import (
    ROOT,
    RunningApp,
    click_image_pixel,
    segment_in_page,
    sim_src,
    wait_for_chart,
    wait_for_trace_change,
)
from PIL import Image

pytestmark = pytest.mark.browser

NAMES = {"tiny": "cat, grass", "color": "cat, sofa, lamp, grass"}
IMAGE = {"tiny": ROOT / "assets" / "cat.jpg", "color": ROOT / "assets" / "colour_scene.png"}
README_SHOTS = {  # artifact -> README screenshot
    "03-built.png": "build.png",
    "06-trace.png": "trace.png",
    "08-how-it-works.png": "how-it-works.png",
    "09-top-prototypes.png": "top-prototypes.png",
    "10-what-if.png": "what-if.png",
    "11-atlas.png": "atlas.png",
}
MAX_README_BYTES = 300_000


def _shot(page: Any, artifacts: Path, name: str) -> None:
    page.screenshot(path=str(artifacts / name), full_page=True)
    target = os.environ.get("OVDIFF_SCREENSHOTS")
    if target and name in README_SHOTS:
        _compact_png(artifacts / name, ROOT / target / README_SHOTS[name])


def _compact_png(src: Path, dst: Path) -> None:
    """Palette PNG, shrunk until it is under MAX_README_BYTES."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    im = Image.open(src).convert("RGB")
    width = min(im.width, 1200)
    while True:
        small = im.resize((width, round(im.height * width / im.width)), Image.Resampling.LANCZOS)
        small.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(dst, optimize=True)
        if dst.stat().st_size <= MAX_README_BYTES or width < 500:
            return
        width = int(width * 0.85)


def _gallery_count(page: Any) -> int:
    return int(page.evaluate("() => document.querySelectorAll('#support-gallery img').length"))


def _status(page: Any) -> str:
    return str(page.evaluate("() => document.querySelector('#build-status')?.innerText || ''"))


def _open_tab(page: Any, name: str) -> None:
    page.get_by_role("tab", name=name).click()


@pytest.fixture(scope="module")
def reference(server: RunningApp, backend: str) -> Any:
    """The segmentation the library computes for the test image (in this process, from the
    app's cache), to check that the browser names the label the library gives."""
    from demo.app import DemoApp, Session
    from demo.models import backend_info, make_model_factory
    from ovdiff_core.stuff import is_stuff

    info = backend_info(backend)
    app = DemoApp(make_model_factory(backend, str(server.cache_dir)), info)
    session = Session()
    stuff = [n.strip() for n in NAMES[backend].split(",") if is_stuff(n)]  # the page's default
    for _ in app.tab_build.build(NAMES[backend], stuff, "cpu", info.default_support, session):
        pass
    return app.tab_segment.segment(str(IMAGE[backend]), session).seg_state.current


def test_page_shows_the_mode_banner(page: Any, backend: str, artifacts: Path) -> None:
    banner = page.locator("#mode-banner").inner_text()
    expected = {"tiny": "tiny random-weight models", "color": "Colour-world mode"}[backend]
    assert expected in banner
    assert page.locator("#names textarea").is_visible()
    _shot(page, artifacts, "01-start.png")


def test_build_fills_the_gallery_batch_by_batch(page: Any, backend: str, artifacts: Path) -> None:
    page.fill("#names textarea", NAMES[backend])
    page.locator("#names textarea").blur()
    # Every gallery size the page shows, recorded in the page itself as the DOM changes
    # (polling from here misses short-lived states when the machine is busy).
    page.evaluate(
        """() => {
          const count = () => document.querySelectorAll('#support-gallery img').length;
          window.__ovdCounts = [count()];
          new MutationObserver(() => {
            const n = count(), seen = window.__ovdCounts;
            if (n !== seen[seen.length - 1]) seen.push(n);
          }).observe(document.body, {childList: true, subtree: true});
        }"""
    )
    page.click("#build")
    mid_shot = False
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        n = _gallery_count(page)
        if n > 0 and not mid_shot:
            _shot(page, artifacts, "02-building.png")
            mid_shot = True
        if "Ready:" in _status(page):
            break
        time.sleep(0.05)
    assert "Ready:" in _status(page), f"build did not finish: {_status(page)!r}"
    seen = [int(n) for n in page.evaluate("() => window.__ovdCounts")]
    n_names = len(NAMES[backend].split(","))
    final = _gallery_count(page)
    assert final >= 2 * n_names
    growing = [n for n in seen if 0 < n < final]
    assert len(set(growing)) >= 2, f"gallery did not fill progressively: counts seen {seen}"
    assert seen == sorted(seen)
    for name in (n.strip() for n in NAMES[backend].split(",")):
        assert name in _status(page)
    _shot(page, artifacts, "03-built.png")


def test_segment_shows_overlay_and_legend(page: Any, backend: str, artifacts: Path) -> None:
    segment_in_page(page, IMAGE[backend])
    size = page.evaluate(
        "() => { const i = document.querySelector('#overlay img');"
        " return [i.naturalWidth, i.naturalHeight]; }"
    )
    expected = Image.open(IMAGE[backend]).size
    assert tuple(size) == expected
    labels = page.locator("#legend .ovd-legend-item").all_inner_texts()
    assert labels[0].strip() == "background" and len(labels) >= 2
    assert "CLIP pre-filter" in page.locator("#legend").inner_text()
    _shot(page, artifacts, "04-segmented.png")


def test_clicking_pixels_traces_them(
    page: Any, backend: str, artifacts: Path, reference: Any
) -> None:
    names_in_legend = [
        t.split("(")[0].strip() for t in page.locator("#legend .ovd-legend-item").all_inner_texts()
    ]
    assert names_in_legend == reference.class_names
    w, h = Image.open(IMAGE[backend]).size
    infos = []
    for i, (fx, fy) in enumerate([(0.3, 0.4), (0.75, 0.8)]):
        old = sim_src(page)
        x, y = click_image_pixel(page, "#overlay", int(fx * w), int(fy * h))
        wait_for_trace_change(page, x, y, old)
        info = page.locator("#trace-info .ovd-trace")
        label = reference.class_names[int(reference.labels[y, x])]
        assert info.get_attribute("data-label") == label
        text = info.inner_text()
        assert f"Pixel (x={x}, y={y}) → {label}" in text
        assert "Winning prototype" in text
        assert page.locator("#trace-regions img").count() >= 1  # highlighted support regions
        wait_for_chart(page, x, y)
        bars = page.locator("#trace-plot g.point").count()
        assert bars == len(reference.class_names)
        heights = page.evaluate(
            "() => document.querySelector('#trace-plot .js-plotly-plot').data[0].y"
        )
        expected = reference.scores[:, y, x]
        assert heights == pytest.approx([float(v) for v in expected], rel=1e-5)
        assert page.locator("#overlay #ovd-marker").is_visible()
        infos.append((x, y, text, sim_src(page)))
        _shot(page, artifacts, f"0{5 + i}-trace.png" if i else "05-trace-first.png")
    assert infos[0][:2] != infos[1][:2] and infos[0][2] != infos[1][2]
    assert infos[0][3] != infos[1][3]  # a new similarity map


def _wait_text(page: Any, selector: str, text: str, timeout_ms: int = 30_000) -> str:
    page.wait_for_function(
        "([s, t]) => (document.querySelector(s)?.innerText || '').includes(t)",
        arg=[selector, text],
        timeout=timeout_ms,
    )
    return str(page.locator(selector).inner_text())


def _overlay_src(page: Any) -> str:
    return str(page.evaluate("() => document.querySelector('#overlay img')?.src || ''"))


def test_top_prototypes_at_the_clicked_pixel(
    page: Any, backend: str, artifacts: Path, reference: Any
) -> None:
    from ovdiff_core.explain import top_prototypes

    w, h = Image.open(IMAGE[backend]).size
    old = sim_src(page)
    x, y = click_image_pixel(page, "#overlay", int(0.3 * w), int(0.4 * h))
    wait_for_trace_change(page, x, y, old)
    page.wait_for_selector(f'#top-info .ovd-top[data-x="{x}"][data-y="{y}"]')
    expected = top_prototypes(reference, x, y, 5)
    rows = page.locator("#top-info tr[data-rank]")
    assert rows.count() == len(expected) == 5
    for i, p in enumerate(expected):
        cells = rows.nth(i).locator("td").all_inner_texts()
        assert cells[1] == p.label_name and cells[5] == p.source
        assert f"#{p.prototype.index} ({p.prototype.extractor})" in cells[2]
        assert cells[3] == f"{100 * p.share:.0f}%"
    page.wait_for_function("() => document.querySelectorAll('#top-regions img').length > 0")
    _shot(page, artifacts, "09-top-prototypes.png")


def test_what_if_excluding_a_support_image_then_restoring(
    page: Any, artifacts: Path, reference: Any
) -> None:
    import re

    from ovdiff_core.explain import what_if

    original = _overlay_src(page)
    page.locator("#trace-regions img").first.click()
    picked = _wait_text(page, "#pick-info", "Selected:")
    found = re.search(r".*support image (.+?) #(\d+)\s*$", picked.strip())
    assert found, picked
    category, number = found.group(1), int(found.group(2))
    page.keyboard.press("Escape")  # close the gallery preview
    page.click("#exclude-image")
    status = _wait_text(page, "#whatif-status", "pixels changed label", 60_000)
    expected = what_if(reference, exclude_images={category: [number - 1]})
    assert f"{int(expected.changed.sum())} pixels changed label" in status
    assert f"{len(expected.removed)} prototypes removed" in status
    if expected.changed.any():  # a new overlay, changed pixels marked (same pixels: same file)
        page.wait_for_function(
            "(old) => document.querySelector('#overlay img')?.src !== old", arg=original
        )
    assert page.locator("#trace-regions img").count() == 0  # stale explanations cleared
    _shot(page, artifacts, "10-what-if.png")
    page.click("#restore")
    _wait_text(page, "#whatif-status", "Nothing excluded")
    assert "Click any pixel" in page.locator("#trace-info").inner_text()


def test_atlas_sorts_and_excludes_a_prototype(page: Any, artifacts: Path, reference: Any) -> None:
    from ovdiff_core.explain import atlas

    category = reference.class_names[1]
    extractor = reference.extractors[0]
    page.click("#atlas-show")
    page.wait_for_selector("#atlas-info tr[data-index]")
    cards = atlas(reference, category, extractor, sort_by="pixels")
    rows = page.locator("#atlas-info tr[data-index]")
    assert rows.count() == len(cards)
    won = [int(rows.nth(i).get_attribute("data-pixels")) for i in range(rows.count())]
    assert won == [c.pixels_won for c in cards] and won == sorted(won, reverse=True)
    page.wait_for_function("() => document.querySelectorAll('#atlas-gallery img').length > 0")
    _shot(page, artifacts, "11-atlas.png")
    page.locator("#atlas-sort input").click()
    page.get_by_role("option", name="member cells").click()
    page.wait_for_function(
        """() => { const r = [...document.querySelectorAll('#atlas-info tr[data-members]')]
            .map(t => +t.dataset.members);
          return r.length > 1 && r.every((v, i) => i === 0 || r[i - 1] >= v); }"""
    )
    first = page.locator("#atlas-info tr[data-index]").first.get_attribute("data-index")
    page.locator("#atlas-gallery img").first.click()
    picked = _wait_text(page, "#pick-info", "prototype")
    assert f"#{first} " in picked and category in picked
    page.keyboard.press("Escape")
    page.click("#exclude-prototype")
    status = _wait_text(page, "#whatif-status", "pixels changed label", 60_000)
    assert "1 prototypes removed" in status
    page.click("#restore")
    _wait_text(page, "#whatif-status", "Nothing excluded")


def test_how_it_works_tab(page: Any, artifacts: Path, reference: Any) -> None:
    _open_tab(page, "4 · How it works")
    page.click("#how-explain")
    for part in ("how-photo", "how-attribution", "how-masks", "how-parts", "how-argmax"):
        page.wait_for_function(
            f"() => {{ const i = document.querySelector('#{part} img');"
            " return i && i.complete && i.naturalWidth > 0; }"
        )
    page.wait_for_selector("#how-scatter .js-plotly-plot")
    page.wait_for_selector("#how-scatter .scatterlayer .point")
    assert page.locator("#how-scatter .scatterlayer .point").count() > 10
    assert page.locator("#how-maps img").count() == len(reference.class_names)
    assert "Prompt:" in page.locator("#how-settings").inner_text()
    _shot(page, artifacts, "08-how-it-works.png")


def test_bad_input_shows_an_error(page: Any, artifacts: Path) -> None:
    _open_tab(page, "1 · Categories")
    page.fill("#names textarea", "cat, , sofa")
    page.click("#build")
    toast = page.get_by_text("Category 2 is empty")
    toast.wait_for(timeout=30_000)
    assert toast.is_visible()
    _shot(page, artifacts, "07-error.png")
    page.wait_for_function("() => !document.querySelector('#build').disabled")
    assert "Ready:" in _status(page)  # the last build's report is still there
    # nothing is lost: the segmentation of tab 3 is still there
    _open_tab(page, "3 · Segment & trace")
    assert page.locator("#legend .ovd-legend").is_visible()
