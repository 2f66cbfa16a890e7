"""Run the app in a subprocess and drive it with Playwright (browser tests, benchmarks).

Playwright is imported by the caller; this module only needs the standard library, so
importing it never fails. Chromium is Debian's (``apt-get install chromium``):
``playwright install`` cannot download browsers on machines without internet access.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "CHROMIUM",
    "CHROMIUM_ARGS",
    "ROOT",
    "RunningApp",
    "chromium_path",
    "click_image_pixel",
    "free_port",
    "run_app",
    "segment_in_page",
    "sim_src",
    "wait_for_chart",
    "wait_for_trace_change",
]

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]


def chromium_path() -> str | None:
    """Path of the Chromium binary, or None.

    ``$OVDIFF_CHROMIUM`` if set (and only that), else /usr/bin/chromium, else
    ``chromium`` on the PATH.
    """
    configured = os.environ.get("OVDIFF_CHROMIUM")
    candidates = [configured] if configured else [CHROMIUM, shutil.which("chromium")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RunningApp:
    """A running ``python app.py`` subprocess.

    Attributes:
        url: where it answers, e.g. ``http://127.0.0.1:51234/``.
        cache_dir: its ``OVDIFF_CACHE`` folder.
        log: path of its combined stdout/stderr.
        process: the app's process (its pid for memory readings).
    """

    url: str
    cache_dir: Path
    log: Path
    process: subprocess.Popen[bytes]


@contextlib.contextmanager
def run_app(
    backend: str = "tiny",
    cache_dir: str | os.PathLike[str] | None = None,
    timeout: float = 180.0,
    extra_args: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> Iterator[RunningApp]:
    """Start ``app.py`` on 127.0.0.1 and a free port; stop it on exit.

    Args:
        backend: ``--backend`` value.
        cache_dir: ``OVDIFF_CACHE`` for the app (default: a fresh temporary folder,
            removed afterwards).
        timeout: seconds to wait for the page to answer.
        extra_args: more command-line arguments for ``app.py``.
        env: more environment variables for the app (e.g. ``OVDIFF_*`` settings).
    """
    own = cache_dir is None
    cache = Path(tempfile.mkdtemp(prefix="ovdiff-cache-")) if own else Path(cache_dir)  # type: ignore[arg-type]
    port = free_port()
    log = cache.parent / f"ovdiff-app-{port}.log"
    app_env = {**os.environ, **(env or {})}
    app_env.update(
        OVDIFF_CACHE=str(cache),
        GRADIO_ANALYTICS_ENABLED="False",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )
    cmd = [
        sys.executable,
        str(ROOT / "app.py"),
        "--backend",
        backend,
        "--port",
        str(port),
        *extra_args,
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=app_env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"app.py exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
                )
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"app.py did not answer within {timeout:.0f} s:\n{log.read_text()[-3000:]}"
                )
            time.sleep(0.25)
        yield RunningApp(url, cache, log, proc)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
        if own:
            shutil.rmtree(cache, ignore_errors=True)


_CLICK_JS = """([sel, x, y]) => {
  const el = document.querySelector(sel + ' img');
  if (!el || !el.naturalWidth) return null;
  const b = el.getBoundingClientRect();
  const r = Math.min(b.width / el.naturalWidth, b.height / el.naturalHeight, 1);
  const ox = b.left + (b.width - el.naturalWidth * r) / 2;
  const oy = b.top + (b.height - el.naturalHeight * r) / 2;
  const cx = Math.round(ox + x * r), cy = Math.round(oy + y * r);
  return {cx: cx, cy: cy, x: Math.round((cx - ox) / r), y: Math.round((cy - oy) / r),
          width: el.naturalWidth, height: el.naturalHeight};
}"""


def click_image_pixel(page: Any, selector: str, x: int, y: int) -> tuple[int, int]:
    """Click image pixel (x = column, y = row) of the ``gr.Image`` at ``selector``.

    Gradio maps a click to ``round((clientX - left) / scale)`` of the image as displayed
    (scaled down to fit, never up); this clicks at integer client coordinates and returns
    the pixel Gradio will report (equal to (x, y) whenever the image is not scaled down).
    """
    # The image must be on screen and where it was measured: a panel still loading can
    # move it, and a click at stale coordinates would land beside it and be lost.
    page.locator(selector + " img").first.scroll_into_view_if_needed()
    page.wait_for_function(_STILL_JS, arg=selector, timeout=10_000)
    info = page.evaluate(_CLICK_JS, [selector, x, y])
    if info is None:
        raise RuntimeError(f"no loaded image in {selector}")
    page.mouse.click(info["cx"], info["cy"])
    return int(info["x"]), int(info["y"])


# True once the image's box has not moved for 5 animation frames (kept on the element).
_STILL_JS = """(sel) => {
  const el = document.querySelector(sel + ' img');
  if (!el || !el.complete || !el.naturalWidth) return false;
  const b = el.getBoundingClientRect();
  const key = [b.left, b.top, b.width, b.height].join(',');
  if (el.dataset.ovdBox !== key) { el.dataset.ovdBox = key; el.dataset.ovdStill = '0'; }
  else { el.dataset.ovdStill = String(Number(el.dataset.ovdStill || '0') + 1); }
  return Number(el.dataset.ovdStill) >= 5 && b.bottom <= innerHeight && b.right <= innerWidth;
}"""


_TRACE_DONE_JS = """([x, y, oldSim]) => {
  const t = document.querySelector('#trace-info .ovd-trace');
  if (!t || t.dataset.x !== String(x) || t.dataset.y !== String(y)) return false;
  const img = document.querySelector('#trace-sim img');
  if (!img || img.src === oldSim || !img.complete || !img.naturalWidth) return false;
  const regions = [...document.querySelectorAll('#trace-regions img')];
  return regions.length > 0 && regions.every(i => i.complete && i.naturalWidth > 0);
}"""

_CHART_DONE_JS = """([x, y]) => {
  const gd = document.querySelector('#trace-plot .js-plotly-plot');
  return !!(gd && gd.layout && gd.layout.meta === x + ',' + y && gd._fullLayout
            && gd.querySelector('g.point'));
}"""


def segment_in_page(page: Any, image: str | os.PathLike[str]) -> None:
    """Open tab 3, upload ``image``, press Segment and wait until the legend and the
    segmentation overlay have loaded."""
    page.get_by_role("tab", name="3 · Segment & trace").click()
    page.set_input_files("#upload input[type=file]", str(image))
    page.wait_for_selector("#upload img")
    page.click("#segment")
    page.wait_for_selector("#legend .ovd-legend", timeout=120_000)
    page.wait_for_function(
        "() => { const i = document.querySelector('#overlay img');"
        " return i && i.complete && i.naturalWidth > 0; }"
    )


def sim_src(page: Any) -> str:
    """``src`` of the trace similarity image (empty when none)."""
    return str(page.evaluate("() => document.querySelector('#trace-sim img')?.src || ''"))


def wait_for_trace_change(page: Any, x: int, y: int, old_sim: str, timeout_ms: int = 60000) -> None:
    """Wait until the trace panel shows pixel (x, y): its text, its new similarity image
    and its support-region images loaded. (The timeout is generous: this checks what is
    shown, not how fast; ``benchmarks/bench_click.py`` measures latency.)"""
    page.wait_for_function(_TRACE_DONE_JS, arg=[x, y, old_sim], timeout=timeout_ms)


def wait_for_chart(page: Any, x: int, y: int, timeout_ms: int = 60000) -> None:
    """Wait until the score bar chart is drawn for pixel (x, y)."""
    page.wait_for_function(_CHART_DONE_JS, arg=[x, y], timeout=timeout_ms)
