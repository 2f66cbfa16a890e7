"""Model loading progress in the demo: ModelPool.get and DemoApp.model forward the
loaders' (stage, fraction, message) events; missing models become one gr.Error."""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import pytest

from demo.app import DemoApp
from demo.models import ModelPool, backend_info, make_model_factory


def test_model_pool_forwards_progress_to_factories_that_take_it() -> None:
    events = []

    def factory(preset: str, size: int | None, progress=None):
        progress("load", 0.0, "Loading CLIP ViT-B/16 (1/2)...")
        progress("ready", 1.0, "2 models ready")
        return object()

    pool = ModelPool(factory)  # type: ignore[arg-type]
    pool.get("cpu", 4, progress=lambda *e: events.append(e))
    assert events == [
        ("load", 0.0, "Loading CLIP ViT-B/16 (1/2)..."),
        ("ready", 1.0, "2 models ready"),
    ]
    pool.get("cpu", 4, progress=lambda *e: events.append(e))  # loaded: nothing to report
    assert len(events) == 2
    plain = ModelPool(lambda preset, size: object())  # type: ignore[arg-type,return-value]
    plain.get("cpu", None, progress=lambda *e: events.append(e))  # old-style factory works
    assert len(events) == 2


def test_app_model_shows_load_progress_in_the_page(tmp_path: Path, monkeypatch) -> None:
    from ovdiff_core.backends import loading

    monkeypatch.setattr(loading, "_hub_reachable", lambda: pytest.fail("no hub lookups"))
    app = DemoApp(make_model_factory("tiny", str(tmp_path)), backend_info("tiny"))
    shown: list[tuple[float | None, str]] = []

    def page_progress(fraction, desc=None):  # the gr.Progress call signature
        shown.append((fraction, desc))

    model = app.model("cpu", 4, progress=page_progress)
    assert shown and shown[-1][0] == 1.0 and "ready" in shown[-1][1]
    assert app.model("cpu", 4) is model  # existing callers: no progress argument


def test_app_model_missing_models_become_one_clear_error(monkeypatch) -> None:
    from ovdiff_core.backends import loading

    monkeypatch.setattr(loading, "_hub_reachable", lambda: pytest.fail("no hub lookups"))
    monkeypatch.setenv("OVDIFF_CLIP_MODEL", "ovdiff-tests/no-clip")
    monkeypatch.setenv("OVDIFF_DINOV2_MODEL", "ovdiff-tests/no-dinov2")
    monkeypatch.setenv("OVDIFF_SD_MODEL", "ovdiff-tests/no-sd")
    monkeypatch.setenv("OVDIFF_TAESD_MODEL", "ovdiff-tests/no-taesd")
    app = DemoApp(make_model_factory("real"), backend_info("real"))
    shown: list = []
    with pytest.raises(gr.Error) as info:
        app.model("cpu", None, progress=lambda f, desc=None: shown.append(desc))
    msg = str(info.value)
    for repo in ("no-clip", "no-dinov2", "no-sd", "no-taesd"):
        assert f"hf download ovdiff-tests/{repo}" in msg
    assert shown == ["Checking the files of 4 models..."]
