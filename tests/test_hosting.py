"""Hosting settings and ZeroGPU sizing (demo/hosting.py) and how the app uses them."""

from __future__ import annotations

import sys
import types

import pytest

from demo import hosting
from demo.app import DemoApp, Session
from demo.hosting import HostingConfig, build_seconds, max_support_for, segment_seconds
from demo.models import backend_info, make_model_factory
from ovdiff_core.backends.generator import GenerationConfig


def test_defaults_off_spaces_offer_everything(tmp_path):
    cfg = HostingConfig.from_env({}, zero_gpu=False, cuda=False, data_dir=tmp_path / "none")
    assert cfg.presets == ("cpu", "paper") and cfg.max_support == 64
    assert cfg.cache_dir is None and cfg.prebuild == () and not cfg.space


def test_cpu_space_hides_paper_caps_support_and_uses_persistent_storage(tmp_path):
    env = {"SPACE_ID": "someone/ovdiff"}
    cfg = HostingConfig.from_env(env, zero_gpu=False, cuda=False, data_dir=tmp_path)
    assert cfg.presets == ("cpu",) and cfg.max_support == 16 and cfg.space
    assert cfg.cache_dir == str(tmp_path / "ovdiff-cache")
    zero = HostingConfig.from_env(env, zero_gpu=True, cuda=False, data_dir=tmp_path)
    assert zero.presets == ("cpu", "paper") and zero.max_support == 64


def test_owner_settings_and_their_errors(tmp_path):
    env = {
        "OVDIFF_PRESETS": "paper",
        "OVDIFF_MAX_SUPPORT": "8",
        "OVDIFF_CACHE": str(tmp_path / "c"),
        "OVDIFF_PREBUILD": "cat, dog ,",
        "OVDIFF_SESSION_TTL": "600",
        "OVDIFF_MAX_SESSIONS": "5",
    }
    cfg = HostingConfig.from_env(env, zero_gpu=False, cuda=False, data_dir=tmp_path)
    assert cfg.presets == ("paper",) and cfg.max_support == 8
    assert cfg.cache_dir == str(tmp_path / "c") and cfg.prebuild == ("cat", "dog")
    assert cfg.session_ttl == 600 and cfg.max_sessions == 5
    for bad, match in (
        ({"OVDIFF_PRESETS": "turbo"}, "OVDIFF_PRESETS"),
        ({"OVDIFF_MAX_SUPPORT": "nan"}, "OVDIFF_MAX_SUPPORT must be a whole number"),
        ({"OVDIFF_MAX_SUPPORT": "1000"}, r"OVDIFF_MAX_SUPPORT must be in 2\.\.64"),
        ({"OVDIFF_SESSION_TTL": "-1"}, "OVDIFF_SESSION_TTL"),
    ):
        with pytest.raises(ValueError, match=match):
            HostingConfig.from_env(bad, zero_gpu=False, cuda=False, data_dir=tmp_path)


def test_gpu_seconds_follow_the_work():
    paper = GenerationConfig()  # 30 guided steps at 512 px
    turbo = GenerationConfig(steps=1, guidance_scale=0.0)
    assert build_seconds(paper, 32) > 60 > build_seconds(turbo, 8)  # 60 s would abort it
    assert build_seconds(paper, 64) > build_seconds(paper, 32) > build_seconds(paper, 8)
    assert build_seconds(paper, 32, cached=True) == 15
    fits = max_support_for(paper, 120)
    assert build_seconds(paper, fits) <= 120 < build_seconds(paper, fits + 1)
    assert segment_seconds(19, 3) > segment_seconds(1, 2) >= 10


def _fake_spaces(monkeypatch) -> list[tuple[object, tuple]]:
    """A stand-in ``spaces`` package whose GPU records each call and its duration."""
    calls: list[tuple[object, tuple]] = []

    def GPU(duration):
        def wrap(fn):
            def run(*args):
                seconds = duration(*args) if callable(duration) else duration
                calls.append((seconds, args))
                return fn(*args)

            return run

        return wrap

    monkeypatch.setitem(sys.modules, "spaces", types.SimpleNamespace(GPU=GPU))
    monkeypatch.setattr(hosting, "on_zero_gpu", lambda: True)
    return calls


def test_zero_gpu_build_is_one_sized_gpu_call_per_generated_category(monkeypatch, tmp_path):
    calls = _fake_spaces(monkeypatch)
    app = DemoApp(make_model_factory("color", str(tmp_path)), backend_info("color"))
    session = Session()
    list(app.tab_build.build("cat, sofa", [], "cpu", 4, session))
    assert [args[2] for _, args in calls] == ["cat", "sofa"]
    first = calls[0][0]
    assert isinstance(first, int) and 15 < first <= app.hosting.gpu_max_seconds
    calls.clear()
    list(app.tab_build.build("cat", [], "cpu", 4, Session()))  # cached now: a short call
    assert [(s, a[2]) for s, a in calls] == [(15, "cat")]
    scene = str(__import__("pathlib").Path(__file__).parent.parent / "assets" / "colour_scene.png")
    assert app.segment_seconds(scene, session) >= 10


def test_prebuild_fills_the_cache_so_the_first_visitor_waits_for_nothing(tmp_path):
    factory = make_model_factory("color", str(tmp_path))
    app = DemoApp(factory, backend_info("color"), HostingConfig(prebuild=("cat", "teal")))
    thread = app.start(preload=True)
    assert thread is not None
    thread.join(timeout=60)
    model = app.pool.get("cpu", None)
    assert model.is_cached("cat") and model.is_cached("teal")
    assert DemoApp(factory, backend_info("color")).start() is None  # nothing to prebuild


def test_zero_gpu_caps_the_support_size_so_one_category_fits_one_call(tmp_path):
    zero = HostingConfig(zero_gpu=True, gpu_max_seconds=120)
    app = DemoApp(make_model_factory("color", str(tmp_path)), backend_info("color"), zero)
    paper = app.support_limit("paper")
    assert 2 <= paper < 64 and app.support_limit("cpu") == 64
    plain = DemoApp(make_model_factory("color", str(tmp_path)), backend_info("color"))
    assert plain.support_limit("paper") == 64


def test_sessions_expire_and_a_closed_page_leaves_nothing(tmp_path):
    import gradio as gr
    from gradio.state_holder import StateHolder

    from demo.app import build_demo

    cfg = HostingConfig(session_ttl=600, max_sessions=3)
    demo = build_demo(make_model_factory("color", str(tmp_path)), "color", hosting=cfg)
    states = [b for b in demo.blocks.values() if isinstance(b, gr.State)]
    assert states and all(s.time_to_live == 600 for s in states)
    holder = StateHolder()
    demo.state_session_capacity = cfg.max_sessions
    holder.set_blocks(demo)
    for key in ("a", "b"):
        session = holder[key]
        session[states[0]._id] = Session()  # a visitor's data
    app = demo.ovdiff_app
    app.forget_session(types.SimpleNamespace(session_hash="a"))  # page closed
    assert "a" not in holder.session_data and "b" in holder.session_data
    for key in ("c", "d", "e"):
        holder[key]
    assert len(holder.session_data) == 3  # least recently used beyond the cap dropped


def test_malloc_arena_cap_is_skipped_when_the_environment_sets_it(monkeypatch):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert hosting.limit_malloc_arenas() is False
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    assert hosting.limit_malloc_arenas() is True  # glibc: mallopt accepted the cap
