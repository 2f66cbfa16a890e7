"""Browser-test fixtures: the app in a subprocess, headless Chromium through Playwright.

The backend is ``tiny`` (tiny random-weight models) unless ``OVDIFF_BROWSER_BACKEND``
says otherwise (``color`` makes the screenshots for the README meaningful). Without
Chromium or Playwright these tests are skipped locally but FAIL when ``CI`` is set, so
CI cannot pass without running them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import CHROMIUM_ARGS, ROOT, RunningApp, chromium_path, run_app

ARTIFACTS = ROOT / "test-artifacts" / "browser"


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI is set, so browser tests must run (apt-get install chromium)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def backend() -> str:
    return os.environ.get("OVDIFF_BROWSER_BACKEND", "tiny")


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def chromium() -> str:
    """Chromium's path; checked before any app is started."""
    exe = chromium_path()
    if exe is None:
        _unavailable("Chromium not found at /usr/bin/chromium (or $OVDIFF_CHROMIUM)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _unavailable("Playwright for Python is not installed (pip install playwright)")
    assert exe is not None
    return exe


@pytest.fixture(scope="module")
def server(
    chromium: str, backend: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningApp]:
    cache = tmp_path_factory.mktemp("browser-cache")
    with run_app(backend, cache_dir=cache) as app:
        yield app


@pytest.fixture(scope="module")
def page(chromium: str, server: RunningApp) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        pg = context.new_page()
        pg.set_default_timeout(60_000)
        pg.goto(server.url)
        pg.wait_for_selector("#build")
        yield pg
        context.close()
        browser.close()
