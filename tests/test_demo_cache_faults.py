"""The demo's build handlers under cache faults, its "cached" label, and the bounded tile
folder (demo/app.py ``DemoApp._build``, ``create_category``, ``TileStore``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import pytest
from safetensors import SafetensorError

import ovdiff_core.cache as cache_mod
from demo.app import DemoApp, Session
from demo.models import backend_info, make_model_factory
from demo.state import TileStore
from ovdiff_core.colorworld import paint_scene


def app_on(cache: Path) -> DemoApp:
    return DemoApp(make_model_factory("color", str(cache)), backend_info("color"))


def build(app: DemoApp, names: str) -> list[tuple[Any, ...]]:
    return list(app.tab_build.build(names, [], "cpu", 4, Session()))


def full_disk(*_: Any, **__: Any) -> None:
    raise SafetensorError(
        'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No '
        'space left on device" })'
    )


@pytest.fixture
def warnings_shown(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    shown: list[str] = []
    monkeypatch.setattr(gr, "Warning", lambda message="", *a, **k: shown.append(message))
    return shown


def test_a_rebuilt_corrupted_entry_is_not_labelled_cached(tmp_path: Path) -> None:
    first = build(app_on(tmp_path), "cat, sofa")
    assert "(cached ✓)" not in first[-1].build_status
    support = next((tmp_path / "support").glob("cat-*.safetensors"))
    data = bytearray(support.read_bytes())
    data[-5] ^= 0xFF  # a flipped byte in the tensor data
    support.write_bytes(bytes(data))
    outs = build(app_on(tmp_path), "cat, sofa")  # a new process: nothing in memory
    lines = outs[-1].build_status.split("\n\n")
    cat_line = next(line for line in lines if line.startswith("**cat**"))
    sofa_line = next(line for line in lines if line.startswith("**sofa**"))
    assert "cached" not in cat_line, cat_line
    assert "(cached ✓)" in sofa_line, sofa_line
    # repaired by the rebuild: now it is cached
    outs = build(app_on(tmp_path), "cat")
    assert "(cached ✓)" in outs[-1].build_status


def test_build_with_a_full_disk_warns_once_and_keeps_the_categories(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, warnings_shown: list[str]
) -> None:
    monkeypatch.setattr(cache_mod, "save_file", full_disk)
    app = app_on(tmp_path)
    session = Session()
    outs = list(app.tab_build.build("cat, sofa", [], "cpu", 4, session))
    assert list(session.categories) == ["cat", "sofa"]
    status = outs[-1].build_status
    assert "Ready: 2 categories" in status
    assert status.count("(not saved to the cache)") == 2 and "cached ✓" not in status
    assert len(warnings_shown) == 1, "one warning per build, not one per file"
    assert "disk is full" in warnings_shown[0] and "OVDIFF_CACHE" in warnings_shown[0]
    assert [p for p in tmp_path.rglob("*") if p.name.startswith(".tmp")] == []
    seg = app.tab_segment.segment(np.zeros((40, 40, 3), np.uint8) + 40, session)
    seg = seg.seg_state.current
    assert seg.queried == ["cat", "sofa"], "both categories are usable"


def test_own_photo_category_with_a_full_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, warnings_shown: list[str]
) -> None:
    monkeypatch.setattr(cache_mod, "save_file", full_disk)
    app = app_on(tmp_path)
    session = Session(preset="cpu")
    photo, _ = paint_scene((80, 96), (40, 40, 40), [([(250, 20, 200)], (20, 20, 40, 40))])
    rgba = np.dstack([photo, np.full(photo.shape[:2], 255, np.uint8)])
    painted = np.zeros_like(rgba)
    painted[20:60, 20:60] = (34, 221, 85, 255)  # the foreground, painted by the visitor
    editor = {"background": rgba, "layers": [painted], "composite": rgba}
    app.tab_photos.add_photo(editor, session)
    status = app.tab_photos.create_category("teapot", False, "cpu", session).own_status
    assert "teapot" in session.categories
    assert "(not saved to the cache)" in status
    assert len(warnings_shown) == 1 and "disk is full" in warnings_shown[0]


def test_read_only_cache_failure_is_a_warning_not_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, warnings_shown: list[str]
) -> None:
    build(app_on(tmp_path), "cat")
    monkeypatch.setenv("OVDIFF_CACHE_READONLY", "1")
    outs = build(app_on(tmp_path), "cat, lamp")
    status = outs[-1].build_status
    assert "(cached ✓)" in status and "Ready: 2 categories" in status
    assert len(warnings_shown) == 1 and "read-only" in warnings_shown[0]
    assert not list((tmp_path / "support").glob("lamp-*"))


# --------------------------------------------------------------------------- tile folder


def tile(i: int) -> np.ndarray:
    rng = np.random.default_rng(i)
    return rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)


def test_tile_store_keeps_a_bounded_lru_folder(tmp_path: Path) -> None:
    store = TileStore(tmp_path, max_bytes=10**9, max_files=4, keep_latest=2)
    paths = [store.save(tile(i)) for i in range(4)]
    assert store.save(tile(0)) == paths[0]  # a use: tile 0 is now the newest
    paths.append(store.save(tile(4)))
    on_disk = {str(p) for p in tmp_path.iterdir()}
    assert len(on_disk) == 4
    assert paths[1] not in on_disk, "tile 1 was the least recently used"
    assert {paths[0], paths[2], paths[3], paths[4]} == on_disk
    # a byte budget: the newest keep_latest tiles always stay (a gallery shows them)
    size = Path(paths[4]).stat().st_size
    small = TileStore(tmp_path / "b", max_bytes=int(2.5 * size), max_files=100, keep_latest=1)
    kept = [small.save(tile(10 + i)) for i in range(6)]
    files = list((tmp_path / "b").iterdir())
    assert {str(p) for p in files} == set(kept[-2:]), "the two newest fit in the budget"
    assert small.size_bytes() == sum(p.stat().st_size for p in files) <= small.max_bytes
    # the defaults are bounded
    default = TileStore()
    assert default.max_files >= 2 * 240 and default.max_bytes <= 1024**3
    assert not [p for p in tmp_path.rglob("*.tmp.png")]


def test_build_tiles_stay_within_the_tile_budget(tmp_path: Path) -> None:
    app = app_on(tmp_path / "cache")
    app.tiles = TileStore(tmp_path / "tiles", max_bytes=1, max_files=1, keep_latest=10)
    outs = build(app, "cat, sofa, lamp")
    shown = [path for path, _ in outs[-1].support_gallery]
    assert len(shown) == 12 and sum(Path(p).is_file() for p in shown) == 10
    assert all(Path(p).is_file() for p in shown[-10:]), "the newest tiles are kept"
    assert len(list((tmp_path / "tiles").iterdir())) == 10
