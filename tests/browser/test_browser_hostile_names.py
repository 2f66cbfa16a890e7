"""A visitor types HTML as a category name: it must show as text and never run.

Runs on its own page and app (module-scoped fixtures), with the backend the other
browser tests use (tiny by default; the colour world takes any name too).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from harness import (
    ROOT,
    click_image_pixel,
    segment_in_page,
    sim_src,
    wait_for_trace_change,
)

pytestmark = pytest.mark.browser

HOSTILE = "<img src=x onerror=alert(1)>"
IMAGE = {"tiny": ROOT / "assets" / "cat.jpg", "color": ROOT / "assets" / "colour_scene.png"}


def test_hostile_category_name_shows_as_text_and_runs_nothing(
    page: Any, backend: str, artifacts: Path
) -> None:
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.fill("#names textarea", f"{HOSTILE}, cat")
    page.locator("#names textarea").blur()
    # stuff: the pre-filter keeps it, so the name reaches the trace panel's score table
    box = page.locator("#stuff label").filter(has_text="onerror")
    box.wait_for()
    box.click()
    page.click("#build")
    deadline = time.monotonic() + 240
    status = page.locator("#build-status")
    while time.monotonic() < deadline and "Ready:" not in status.inner_text():
        time.sleep(0.1)
    assert "Ready:" in status.inner_text()
    built = status.inner_text()

    segment_in_page(page, IMAGE[backend])
    assert HOSTILE in page.locator("#legend").inner_text()
    old = sim_src(page)
    x, y = click_image_pixel(page, "#overlay", 40, 40)
    wait_for_trace_change(page, x, y, old)
    page.wait_for_timeout(500)  # an onerror fires as soon as its broken image is parsed
    assert dialogs == [], f"script in a category name ran: {dialogs}"
    assert HOSTILE in built  # literal text in the build status (Markdown)
    panel = page.locator("#trace-info")
    assert HOSTILE in panel.inner_text()  # in the table of every label's score
    assert panel.locator("img").count() == 0 and page.locator("#legend img").count() == 0

    # an error that echoes the name: the pop-up shows it as text too
    page.get_by_role("tab", name="1 · Categories").click()
    page.fill("#names textarea", f"{HOSTILE}, {HOSTILE.upper()}")
    page.click("#build")
    toast = page.get_by_text("is listed twice")
    toast.wait_for(timeout=30_000)
    assert HOSTILE.upper() in toast.inner_text()
    page.wait_for_timeout(500)  # an onerror fires as soon as its broken image is parsed
    page.screenshot(path=str(artifacts / "hostile-name.png"), full_page=True)
    assert dialogs == [], f"script in a category name ran: {dialogs}"
