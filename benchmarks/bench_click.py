"""Click-to-trace latency of the demo in a real browser (headless Chromium).

Starts ``app.py`` (tiny random-weight models by default), builds categories, segments an
example photo, then clicks N pixels of the segmentation (0.2 s apart). For each click it
measures, from the mouse click:

* *trace panel rendered*: the panel names the clicked pixel and its label, its new
  similarity-map image and all support-region images have loaded;
* *score chart drawn too*: additionally the plotly bar chart of that pixel is drawn (it
  comes from a second call made in parallel; see the wiring in ``demo/tab_segment.py``);
* *top prototypes shown*: the top-prototypes table of that pixel (a third parallel call)
  and its support-region images have loaded.

For comparison it also times the same handlers (:meth:`demo.tab_segment.SegmentTab.trace_at`:
``ovdiff_core.trace`` plus rendering) in-process, without browser or network.

Usage::

    python benchmarks/bench_click.py [--backend tiny|color] [--clicks 20] [--image PATH]

Needs Playwright for Python and Debian's Chromium (``apt-get install chromium``).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # tests/harness.py
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from harness import (  # noqa: E402
    CHROMIUM_ARGS,
    chromium_path,
    click_image_pixel,
    run_app,
    sim_src,
    wait_for_chart,
    wait_for_trace_change,
)

WARMUP = 2  # clicks before the measured ones
_TOP_DONE_JS = """([x, y]) => {
  if (!document.querySelector(`#top-info .ovd-top[data-x="${x}"][data-y="${y}"]`)) return false;
  const imgs = [...document.querySelectorAll('#top-regions img')];
  return imgs.every(i => i.complete && i.naturalWidth > 0);
}"""
DEFAULT_NAMES = {"tiny": "cat, sofa, grass", "color": "cat, sofa, lamp, grass"}
DEFAULT_IMAGE = {"tiny": "assets/cat.jpg", "color": "assets/colour_scene.png"}


def _percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100])."""
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(q / 100.0 * len(s)) - 1))
    return s[k]


def _points(width: int, height: int, n: int) -> list[tuple[int, int]]:
    """n distinct pixels spread over the image (a coarse grid, row by row)."""
    cols = max(2, int(n**0.5) + 1)
    rows = max(2, -(-n // cols))
    pts = []
    for r in range(rows):
        for c in range(cols):
            pts.append((int((c + 0.5) * width / cols), int((r + 0.5) * height / rows)))
    return pts[:n]


def browser_latencies(
    backend: str, names: str, image: Path, clicks: int
) -> tuple[list[float], list[float], list[float], float]:
    """(click -> trace panel rendered, -> score chart drawn, -> top prototypes shown:
    seconds per click; build seconds)."""
    from playwright.sync_api import sync_playwright

    exe = chromium_path()
    if exe is None:
        raise SystemExit("Chromium not found: apt-get install chromium")
    out: list[float] = []
    charts: list[float] = []
    tops: list[float] = []
    warm: list[float] = []
    with run_app(backend) as app, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.goto(app.url)
        page.wait_for_selector("#build", timeout=60000)
        page.fill("#names textarea", names)
        t0 = time.perf_counter()
        page.click("#build")
        page.wait_for_function(
            "() => document.querySelector('#build-status')?.innerText.includes('Ready')",
            timeout=600000,
        )
        build_s = time.perf_counter() - t0
        page.get_by_role("tab", name="3 · Segment & trace").click()
        page.set_input_files("#upload input[type=file]", str(image))
        page.wait_for_selector("#upload img", timeout=30000)
        page.click("#segment")
        page.wait_for_selector("#legend .ovd-legend", timeout=300000)
        page.wait_for_function("() => document.querySelector('#overlay img')?.complete")
        size = page.evaluate(
            "() => {const i = document.querySelector('#overlay img');"
            " return [i.naturalWidth, i.naturalHeight];}"
        )
        # WARMUP clicks first (first plotly draw, lazy chunks), timed but not counted
        pts = _points(size[0], size[1], clicks + WARMUP)
        for i, (x, y) in enumerate(pts):
            old = sim_src(page)
            t = time.perf_counter()
            gx, gy = click_image_pixel(page, "#overlay", x, y)
            wait_for_trace_change(page, gx, gy, old)
            panel = time.perf_counter() - t
            wait_for_chart(page, gx, gy)
            chart = time.perf_counter() - t
            page.wait_for_function(_TOP_DONE_JS, arg=[gx, gy], timeout=20000)
            top = time.perf_counter() - t
            if i >= WARMUP:
                out.append(panel)
                charts.append(chart)
                tops.append(top)
            else:
                warm.append(chart)
            time.sleep(0.2)  # a person does not click twice within a frame
        browser.close()
    print("warm-up clicks (not counted), ms:", [round(v * 1000) for v in warm])
    return out, charts, tops, build_s


def handler_latencies(backend: str, names: str, image: Path, clicks: int) -> list[float]:
    """Seconds of ``SegmentTab.trace_at`` per click, in-process (no browser, no network)."""
    from demo.app import DemoApp, Session
    from demo.models import backend_info, make_model_factory

    with tempfile.TemporaryDirectory() as cache:
        app = DemoApp(make_model_factory(backend, cache), backend_info(backend))
        session = Session()
        for _ in app.tab_build.build(
            names, [], "cpu", backend_info(backend).default_support, session
        ):
            pass
        seg = app.tab_segment.segment(str(image), session).seg_state
        h, w = seg.current.size
        pts = _points(w, h, clicks + WARMUP)
        out = []
        for i, (x, y) in enumerate(pts):
            t = time.perf_counter()
            app.tab_segment.trace_at(seg, [x, y])
            if i >= WARMUP:
                out.append(time.perf_counter() - t)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="tiny", choices=["tiny", "color"])
    parser.add_argument("--clicks", type=int, default=20)
    parser.add_argument("--names", default=None)
    parser.add_argument("--image", default=None)
    args = parser.parse_args()
    names = args.names or DEFAULT_NAMES[args.backend]
    image = ROOT / (args.image or DEFAULT_IMAGE[args.backend])

    browser, charts, tops, build_s = browser_latencies(args.backend, names, image, args.clicks)
    handler = handler_latencies(args.backend, names, image, args.clicks)
    print(
        f"backend={args.backend} categories='{names}' image={image.name} clicks={args.clicks} "
        f"(build in browser: {build_s:.1f} s)"
    )
    print()
    print("| measurement | p50 ms | p95 ms | min ms | max ms |")
    print("|---|---|---|---|---|")
    for label, vals in (
        ("click -> trace panel rendered (browser)", browser),
        ("click -> score chart drawn too (browser)", charts),
        ("click -> top prototypes shown too (browser)", tops),
        ("trace handlers only (in-process)", handler),
    ):
        ms = [v * 1000 for v in vals]
        print(
            f"| {label} | {statistics.median(ms):.0f} | {_percentile(ms, 95):.0f} | "
            f"{min(ms):.0f} | {max(ms):.0f} |"
        )
    ratio = statistics.median(browser) / max(statistics.median(handler), 1e-9)
    print()
    print(f"browser p50 / handler p50 = {ratio:.1f}x (the rest is transport, encoding, drawing)")
    load = " / ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"machine: {os.cpu_count()} CPUs, load average (1, 5, 15 min) {load}")
    for label, vals in (
        ("trace panel", browser),
        ("score chart", charts),
        ("top prototypes", tops),
    ):
        verdict = "met" if _percentile(vals, 95) < 0.3 else "NOT met"
        print(f"goal p95 < 300 ms, {label}: {verdict}")


if __name__ == "__main__":
    main()
