"""Without Chromium the browser tests skip locally but fail when CI is set."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run_browser_tests(ci: bool) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["OVDIFF_CHROMIUM"] = "/nonexistent/chromium"
    if ci:
        env["CI"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "pytest", "tests/browser", "-q", "-p", "no:cacheprovider"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_browser_tests_fail_in_ci_without_chromium() -> None:
    result = _run_browser_tests(ci=True)
    assert result.returncode == 1, result.stdout[-2000:]
    assert "CI is set, so browser tests must run" in result.stdout
    assert "passed" not in result.stdout.splitlines()[-1]


def test_browser_tests_skip_locally_without_chromium() -> None:
    result = _run_browser_tests(ci=False)
    assert result.returncode == 0, result.stdout[-2000:]
    assert "skipped" in result.stdout.splitlines()[-1]
