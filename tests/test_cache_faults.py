"""Cache faults and bounds: full disk, read-only caches, stale temporary files, the disk
budget (LRU eviction), the honest "cached" flag and the bounded in-memory registry."""

from __future__ import annotations

import builtins
import errno
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import SafetensorError

import ovdiff_core.cache as cache_mod
from ovdiff_core.cache import DEFAULT_MAX_BYTES, Cache, CacheWriteError, default_max_bytes
from ovdiff_core.colorworld import ColorExtractor, ColorGenerator, ColorWorld, paint_scene
from ovdiff_core.config import SegmentConfig
from ovdiff_core.pipeline import DEFAULT_MAX_CATEGORIES, CacheWriteWarning, OVDiff

WORLD = ColorWorld.default()
CFG = SegmentConfig(short_side=48, windows=False)
HOUR = 3600.0


def key(tag: str) -> str:
    return Cache.key("test", {"tag": tag})


def blob(n: int, fill: float = 1.0) -> dict[str, torch.Tensor]:
    return {"x": torch.full((n,), fill)}


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(".tmp")]


def make_model(root: Path, **kw: Any) -> tuple[OVDiff, ColorGenerator, ColorExtractor]:
    gen, ex = ColorGenerator(WORLD, n_images=4, batch_size=2), ColorExtractor()
    return OVDiff(gen, [ex], cache=Cache(root), segment_config=CFG, **kw), gen, ex


def scene() -> np.ndarray:
    image, _ = paint_scene((48, 48), (40, 40, 40), [(WORLD.parts["cat"], (8, 8, 32, 32))])
    return image


# --------------------------------------------------------------------------- full disk

ENOSPC_RUST = (
    'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space '
    'left on device" })'
)


def failing_save_file(exc: BaseException) -> Callable[..., None]:
    """A safetensors ``save_file`` that dies like a full disk: it leaves what the real one
    would (its own ``.tmpXXXXXX`` next to the target, half written), then raises."""

    def save_file(tensors: Any, filename: str, metadata: Any = None) -> None:
        target = Path(filename)
        (target.parent / ".tmpAb12Cd").write_bytes(b"\0" * 100)  # the writer's temporary
        target.write_bytes(b"half")
        raise exc

    return save_file


FULL_DISK = [
    OSError(errno.ENOSPC, "No space left on device"),
    SafetensorError(ENOSPC_RUST),
]


@pytest.mark.parametrize("exc", FULL_DISK, ids=["OSError", "SafetensorError"])
def test_full_disk_is_one_clear_error_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exc: BaseException
) -> None:
    cache = Cache(tmp_path)
    good = cache.save("test", "old", key("old"), blob(10), {"v": 1})
    monkeypatch.setattr(cache_mod, "save_file", failing_save_file(exc))
    with pytest.raises(CacheWriteError) as info:
        cache.save("test", "new", key("new"), blob(10), {"v": 2})
    err = info.value
    assert isinstance(err, OSError) and err.errno == errno.ENOSPC
    msg = str(err)
    assert "disk is full" in msg and "OVDIFF_CACHE" in msg and "free disk space" in msg
    assert str(cache.path("test", "new", key("new"))) in msg
    assert temp_files(tmp_path) == [], "no temporary file is left behind"
    assert not cache.path("test", "new", key("new")).exists()
    assert cache.load("test", "old", key("old")) is not None and good.is_file()
    # a full disk is not sticky: once there is room again, writes work
    monkeypatch.undo()
    cache.save("test", "new", key("new"), blob(10), {"v": 2})
    assert cache.load("test", "new", key("new")) is not None


@pytest.mark.parametrize("exc", FULL_DISK, ids=["OSError", "SafetensorError"])
def test_build_keeps_what_it_built_when_the_disk_is_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exc: BaseException
) -> None:
    monkeypatch.setattr(cache_mod, "save_file", failing_save_file(exc))
    model, _, _ = make_model(tmp_path)
    events = list(model.build_iter("cat"))
    stages = [e.stage for e in events]
    assert stages == ["support", "support", "bank", "done"]
    warned = [e.warning for e in events if e.warning]
    assert len(warned) == 1 and events[2].warning is not None, "one event carries the news"
    assert "'cat' (support set) is ready but was not saved" in warned[0]
    assert "(bank of `color`)" in warned[0] and "disk is full" in warned[0]
    cat = events[-1].category_result
    assert cat is not None and not events[-1].cached
    assert model.categories["cat"] is cat and set(cat.banks) == {"color"}
    seg = model.segment(scene(), categories=["cat"])
    assert seg.class_names == ["background", "cat"] and (seg.labels == 1).any()
    assert temp_files(tmp_path) == []
    assert list(tmp_path.rglob("*.safetensors")) == []
    # the plain API warns (it cannot return the event)
    with pytest.warns(CacheWriteWarning, match="disk is full"):
        OVDiff(ColorGenerator(WORLD, n_images=2), [ColorExtractor()], cache=Cache(tmp_path)).build(
            ["sofa"]
        )
    # disk freed: the next build writes the cache
    monkeypatch.undo()
    model2, gen2, _ = make_model(tmp_path)
    assert [e.warning for e in model2.build_iter("cat")] == [None] * 4
    assert gen2.generated == 4 and model2.is_cached("cat")


def test_add_support_keeps_the_category_when_the_disk_is_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    support = next(iter(ColorGenerator(WORLD, n_images=3, batch_size=3).generate("teapot")))
    monkeypatch.setattr(
        cache_mod, "save_file", failing_save_file(OSError(errno.ENOSPC, "No space left"))
    )
    model = OVDiff(None, [ColorExtractor()], cache=Cache(tmp_path))
    with pytest.warns(CacheWriteWarning, match="bank of `color`.*disk is full"):
        cat = model.add_support(support)
    assert cat.name == "teapot" and model.categories["teapot"] is cat
    events = list(model.add_support_iter(support))  # reused from memory: nothing to write
    assert [e.warning for e in events] == [None, None]
    assert temp_files(tmp_path) == []


# --------------------------------------------------------------------------- read-only


class ReadOnlyFS:
    """Makes every write under ``root`` fail with EROFS, as a read-only mount would (tests
    run as root, where ``chmod a-w`` stops nothing). ``attempts`` lists what was tried."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.root = str(root.resolve())
        self.attempts: list[str] = []
        mp = monkeypatch
        for name in ("mkdir", "unlink", "remove", "rmdir", "utime", "replace", "rename"):
            mp.setattr(os, name, self._guard(name, getattr(os, name)))
        real_open, real_os_open = builtins.open, os.open

        def fake_open(file: Any, mode: str = "r", *a: Any, **k: Any) -> Any:
            if any(c in mode for c in "wax+"):
                self._check("open", file)
            return real_open(file, mode, *a, **k)

        def fake_os_open(path: Any, flags: int, *a: Any, **k: Any) -> int:
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC):
                self._check("os.open", path)
            return real_os_open(path, flags, *a, **k)

        def fake_save_file(tensors: Any, filename: str, metadata: Any = None) -> None:
            self._check("save_file", filename)  # the Rust writer bypasses os.*
            raise AssertionError("unreachable: everything is under the read-only root")

        mp.setattr(builtins, "open", fake_open)
        mp.setattr(os, "open", fake_os_open)
        mp.setattr(cache_mod, "save_file", fake_save_file)

    def _check(self, what: str, path: Any) -> None:
        try:
            full = os.path.abspath(os.fspath(path))
        except TypeError:
            return
        if full.startswith(self.root):
            self.attempts.append(f"{what} {full}")
            raise OSError(errno.EROFS, "Read-only file system", full)

    def _guard(self, what: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(path: Any, *a: Any, **k: Any) -> Any:
            self._check(what, path)
            return fn(path, *a, **k)

        return wrapped


def prebuilt(root: Path, names: list[str]) -> None:
    make_model(root)[0].build(names)


def test_a_read_only_cache_serves_hits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    prebuilt(tmp_path, ["cat"])
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    fs = ReadOnlyFS(tmp_path, monkeypatch)
    model, gen, ex = make_model(tmp_path)  # read-only is found out, not declared
    events = list(model.build_iter("cat"))
    assert [e.stage for e in events] == ["support", "bank", "done"]
    assert all(e.cached for e in events) and all(e.warning is None for e in events)
    assert gen.generated == 0 and ex.calls == 0
    # a name that is not in the cache: built in memory, the write is refused clearly
    events = list(model.build_iter("lamp"))
    warned = [e.warning for e in events if e.warning]
    assert len(warned) == 1 and "the cache is read-only" in warned[0]
    assert "OVDIFF_CACHE" in warned[0]
    assert model.categories["lamp"].banks["color"] is not None and not events[-1].cached
    assert model.segment(scene(), categories=["cat", "lamp"]).class_names[1:] == ["cat", "lamp"]
    monkeypatch.undo()
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before
    assert fs.attempts, "the simulated file system did refuse writes"


def test_read_only_flag_never_touches_the_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prebuilt(tmp_path, ["cat", "sofa"])
    victim = next((tmp_path / "bank").glob("sofa-*.safetensors"))
    data = bytearray(victim.read_bytes())
    data[-5] ^= 0xFF
    victim.write_bytes(bytes(data))
    (tmp_path / "support" / ".tmp-stale").mkdir()
    os.utime(tmp_path / "support" / ".tmp-stale", (0, 0))
    fs = ReadOnlyFS(tmp_path, monkeypatch)
    cache = Cache(tmp_path, read_only=True)
    assert not cache.writable
    gen, ex = ColorGenerator(WORLD, n_images=4, batch_size=2), ColorExtractor()
    model = OVDiff(gen, [ex], cache=cache)
    assert model.build(["cat"])[0].name == "cat" and gen.generated == 0
    with pytest.warns(CacheWriteWarning, match="read-only"):
        sofa = model.build(["sofa"])[0]  # corrupted bank: rebuilt in memory, file kept
    assert ex.calls > 0 and sofa.banks["color"] is not None
    assert fs.attempts == [], "a read-only cache tries no write, lock, delete or touch"
    monkeypatch.undo()
    assert victim.is_file() and (tmp_path / "support" / ".tmp-stale").is_dir()
    with pytest.raises(CacheWriteError, match="read-only"):
        cache.save("test", "x", key("x"), blob(3), {})


def test_invalid_entries_in_a_read_only_folder_are_not_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = Cache(tmp_path)
    path = cache.save("test", "x", key("x"), blob(100), {})
    path.write_bytes(path.read_bytes()[:50])
    ReadOnlyFS(tmp_path, monkeypatch)
    assert Cache(tmp_path).load("test", "x", key("x")) is None
    monkeypatch.undo()
    assert path.is_file(), "could not be deleted, and that is fine"


def test_read_only_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OVDIFF_CACHE_READONLY", "1")
    assert Cache(tmp_path).read_only and not Cache(tmp_path, read_only=False).read_only
    monkeypatch.setenv("OVDIFF_CACHE_READONLY", "0")
    assert not Cache(tmp_path).read_only


# --------------------------------------------------------------------------- stale temps


def age(path: Path, seconds: float = 2 * HOUR) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_stale_temp_files_are_cleaned_on_open(tmp_path: Path) -> None:
    (tmp_path / "support").mkdir()
    (tmp_path / "bank").mkdir()
    ours_old = tmp_path / "support" / ".tmp-k2j3h4.safetensors"  # older versions' temp
    rust = tmp_path / "bank" / ".tmpXq9Zr1"  # safetensors' writer (Rust tempfile crate)
    folder = tmp_path / "bank" / ".tmp-abcd1234"  # today's: a folder per write
    for p in (ours_old, rust):
        p.write_bytes(b"x" * 1000)
    folder.mkdir()
    (folder / "entry.safetensors").write_bytes(b"x" * 1000)
    (folder / ".tmpQwErTy").write_bytes(b"x" * 1000)
    fresh = tmp_path / "bank" / ".tmpFresh1"
    fresh.write_bytes(b"x")
    for p in (ours_old, rust, folder):
        age(p)
    entry = Cache(tmp_path).save("bank", "cat", key("cat"), blob(4), {})
    age(entry, 10 * HOUR)

    Cache(tmp_path)
    assert not ours_old.exists() and not rust.exists() and not folder.exists()
    assert fresh.exists(), "younger than the grace period: a writer may be using it"
    assert entry.exists(), "entries are not temporary files"
    Cache(tmp_path, temp_grace_s=0)
    assert not fresh.exists()


LOCK_HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.readline()
"""


def test_temp_files_locked_by_a_live_writer_are_kept(tmp_path: Path) -> None:
    fcntl = pytest.importorskip("fcntl")
    (tmp_path / "support").mkdir()
    other = tmp_path / "support" / ".tmp-other-process"
    other.mkdir()
    (other / "entry.safetensors").write_bytes(b"x" * 100)
    mine = tmp_path / "support" / ".tmp-same-process.safetensors"
    mine.write_bytes(b"x" * 100)
    age(other)
    age(mine)
    proc = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(other)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        with open(mine, "rb") as held:
            fcntl.flock(held.fileno(), fcntl.LOCK_EX)
            cache = Cache(tmp_path, temp_grace_s=0)  # cleans on opening
            assert cache.clean_temp_files() == []
            assert (other / "entry.safetensors").exists() and mine.exists()
    finally:
        assert proc.stdin is not None
        proc.stdin.write("\n")
        proc.stdin.close()
        proc.wait(timeout=60)
        if proc.stdout is not None:
            proc.stdout.close()
    # the writers are gone: now they are stale, and opening the cache removes them
    Cache(tmp_path, temp_grace_s=0)
    assert not other.exists() and not mine.exists()
    assert temp_files(tmp_path) == []


def test_a_cleaner_never_removes_the_temp_of_a_write_in_progress(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = cache_mod.save_file
    seen: list[list[Path]] = []

    def save_file_while_another_process_cleans(tensors: Any, filename: str, **kw: Any) -> None:
        real(tensors, filename, **kw)
        temps = temp_files(tmp_path)
        for p in temps:
            age(p, 10 * HOUR)  # even if it looked ancient
        Cache(tmp_path, temp_grace_s=0)  # another process opening the cache
        seen.append(temps)
        assert Path(filename).exists(), "the cleaner removed a live writer's file"

    monkeypatch.setattr(cache_mod, "save_file", save_file_while_another_process_cleans)
    cache = Cache(tmp_path)
    cache.save("test", "x", key("x"), blob(1000), {"ok": True})
    assert seen and seen[0], "the write went through a temporary"
    got = cache.load("test", "x", key("x"))
    assert got is not None and got[1] == {"ok": True}
    assert temp_files(tmp_path) == []


# --------------------------------------------------------------------------- disk budget


def set_times(paths: list[Path]) -> None:
    """Give ``paths`` well separated use times, oldest first (all in the past)."""
    now = time.time()
    for i, p in enumerate(paths):
        t = now - 1000 + 100 * i
        os.utime(p, (t, t))


def test_disk_budget_evicts_the_least_recently_used(tmp_path: Path) -> None:
    probe = Cache(tmp_path / "probe", max_bytes=None)
    size = probe.save("test", "p", key("p"), blob(10_000), {}).stat().st_size
    cache = Cache(tmp_path / "c", max_bytes=int(3.5 * size))
    a, b, c = (cache.save("test", n, key(n), blob(10_000), {}) for n in "abc")
    assert cache.size_bytes() == 3 * size
    set_times([a, b, c])
    assert cache.load("test", "a", key("a")) is not None  # a use: a is now the newest
    d = cache.save("test", "d", key("d"), blob(10_000), {})
    assert not b.exists(), "b was the least recently used"
    assert a.exists() and c.exists() and d.exists()
    assert cache.size_bytes() <= cache.max_bytes  # type: ignore[operator]
    # an entry whose build lock is held is never evicted, even when it is the oldest
    set_times([c, a, d])
    with cache.lock("test", key("c")):
        e = cache.save("test", "e", key("e"), blob(10_000), {})
    assert c.exists() and not a.exists() and d.exists() and e.exists()
    assert cache.size_bytes() <= cache.max_bytes  # type: ignore[operator]
    # evicted entries just miss (and are rebuilt by the caller)
    assert cache.load("test", "b", key("b")) is None


def test_pipeline_within_a_disk_budget(tmp_path: Path) -> None:
    model, _, _ = make_model(tmp_path)
    model.build(["cat"])
    one = Cache(tmp_path, max_bytes=None).size_bytes()
    budget = int(2.5 * one)
    gen, ex = ColorGenerator(WORLD, n_images=4, batch_size=2), ColorExtractor()
    model = OVDiff(gen, [ex], cache=Cache(tmp_path, max_bytes=budget))
    for name in ["sofa", "lamp", "grass", "cat", "tree"]:
        model.build([name])
        assert model.cache is not None and model.cache.size_bytes() <= budget
    assert model.is_cached("tree") and model.is_cached("cat") and not model.is_cached("sofa")


def test_no_budget_never_evicts(tmp_path: Path) -> None:
    cache = Cache(tmp_path, max_bytes=None)
    paths = [cache.save("test", n, key(n), blob(5000), {}) for n in "abcdef"]
    assert all(p.exists() for p in paths)


def test_budget_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("OVDIFF_CACHE_MAX_BYTES", raising=False)
    assert default_max_bytes() == DEFAULT_MAX_BYTES == 10 * 1024**3
    assert Cache(tmp_path).max_bytes == DEFAULT_MAX_BYTES
    for raw, want in [("1M", 1024**2), ("2GiB", 2 * 1024**3), ("12345", 12345), ("none", None)]:
        monkeypatch.setenv("OVDIFF_CACHE_MAX_BYTES", raw)
        assert Cache(tmp_path).max_bytes == want
    monkeypatch.setenv("OVDIFF_CACHE_MAX_BYTES", "lots")
    with pytest.raises(ValueError, match=r"OVDIFF_CACHE_MAX_BYTES='lots'.*500M"):
        Cache(tmp_path)
    with pytest.raises(ValueError, match="max_bytes"):
        Cache(tmp_path, max_bytes=-1)


# --------------------------------------------------------------------------- "cached"


def flip_last(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["support", "bank"])
@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_done_is_cached_only_if_nothing_was_rebuilt(tmp_path: Path, damage: str, how: str) -> None:
    prebuilt(tmp_path, ["cat"])
    path = next((tmp_path / damage).glob("cat-*.safetensors"))
    if how == "truncate":
        path.write_bytes(path.read_bytes()[:100])
    else:
        flip_last(path)
    model, gen, ex = make_model(tmp_path)
    assert model.is_cached("cat"), "the files are there (but one is damaged)"
    done = list(model.build_iter("cat"))[-1]
    assert done.stage == "done" and done.cached is False
    assert (gen.generated > 0) == (damage == "support")
    assert (ex.calls > 0) == (damage == "bank"), "an intact bank of the same key is reused"
    again = list(make_model(tmp_path)[0].build_iter("cat"))[-1]
    assert again.cached is True, "repaired: the next build is all from the cache"


def test_reuse_from_memory_counts_as_cached() -> None:
    model = OVDiff(ColorGenerator(WORLD, n_images=2), [ColorExtractor()])
    assert list(model.build_iter("cat"))[-1].cached is False
    assert list(model.build_iter("cat"))[-1].cached is True


# --------------------------------------------------------------------------- registry


def names_of(model: OVDiff) -> set[str]:
    return set(model.categories)


def test_registry_is_a_bounded_lru(tmp_path: Path) -> None:
    model, _, _ = make_model(tmp_path, max_categories=2)
    assert OVDiff(ColorGenerator(WORLD), [ColorExtractor()]).max_categories == 64
    assert DEFAULT_MAX_CATEGORIES == 64
    kept = model.build(["cat"])[0]
    model.build(["sofa", "lamp"])
    assert names_of(model) == {"sofa", "lamp"}, "cat was the least recently used"
    assert kept.banks["color"] is not None, "a category someone holds stays valid"
    model.segment(scene(), categories=["sofa"])  # a use
    model.build(["grass"])
    assert names_of(model) == {"sofa", "grass"}, "lamp was older than the used sofa"
    list(model.build_iter("sofa"))  # reuse from memory is a use too
    model.build(["tree"])
    assert names_of(model) == {"sofa", "tree"}


def test_segment_reloads_an_evicted_name_from_the_cache(tmp_path: Path) -> None:
    model, gen, _ = make_model(tmp_path, max_categories=1)
    list(model.build_iter("grass", stuff=False))  # flag differs from the built-in table
    model.build(["cat"])
    assert names_of(model) == {"cat"}
    generated = gen.generated
    seg = model.segment(scene(), categories=["grass", "cat"])
    assert seg.class_names == ["background", "grass", "cat"]
    assert gen.generated == generated, "reloaded from the cache, nothing generated"
    assert len(model.categories) == 1
    assert [c.stuff for c in seg.categories] == [False, False], "the build's flag is kept"


def test_segment_on_an_evicted_name_without_cache_says_what_to_do() -> None:
    model = OVDiff(ColorGenerator(WORLD, n_images=2), [ColorExtractor()], max_categories=1)
    model.build(["cat", "sofa"])
    with pytest.raises(ValueError, match=r"\['cat'\].*dropped from memory.*max_categories"):
        model.segment(scene(), categories=["cat"])
    with pytest.raises(ValueError, match="max_categories"):
        OVDiff(None, [ColorExtractor()], max_categories=0)


def test_registry_keeps_build_order_for_segment(tmp_path: Path) -> None:
    model, _, _ = make_model(tmp_path, max_categories=3)
    model.build(["cat", "sofa", "lamp"])
    model.build(["cat"])  # a use, not a move in build order
    assert list(model.categories) == ["cat", "sofa", "lamp"]
    model.build(["grass"])
    assert list(model.categories) == ["cat", "lamp", "grass"]


def test_no_lock_file_means_no_lock_not_a_failed_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = builtins.open

    def open_without_lock_files(file: Any, mode: str = "r", *a: Any, **k: Any) -> Any:
        if str(file).endswith(".lock"):
            raise OSError(errno.ENOSPC, "No space left on device", str(file))
        return real_open(file, mode, *a, **k)

    monkeypatch.setattr(builtins, "open", open_without_lock_files)
    model, gen, _ = make_model(tmp_path)
    assert model.build(["cat"])[0].name == "cat" and gen.generated == 4
    assert model.is_cached("cat") and model.cache is not None and model.cache.writable


def test_write_error_messages_say_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "support" / "cat.safetensors"
    denied = CacheWriteError(path, OSError(errno.EACCES, "Permission denied"))
    assert denied.errno == errno.EACCES and "permission denied" in str(denied)
    assert "writable" in str(denied) and str(path) in str(denied)
    ro = CacheWriteError(path, SafetensorError("IoError(Os { code: 30, kind: ReadOnlyFilesystem"))
    assert ro.errno == errno.EROFS and "read-only" in str(ro) and not str(ro).startswith("[")
