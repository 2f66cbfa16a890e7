"""The on-disk cache: bit-exact round trips, corruption detection, hostile names,
concurrent writers, and the pipeline's use of it (hits, rebuilds, streaming)."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import concurrent_cache_worker

from ovdiff_core.cache import Cache, default_cache_dir, tensor_checksum
from ovdiff_core.colorworld import ColorExtractor, ColorGenerator, ColorWorld
from ovdiff_core.config import PrototypeConfig
from ovdiff_core.pipeline import OVDiff, clean_category_name, extract_features
from ovdiff_core.prototypes import build_bank
from ovdiff_core.types import PrototypeBank, SupportSet

WORLD = ColorWorld.default()


@pytest.fixture(scope="module")
def support() -> SupportSet:
    gen = ColorGenerator(WORLD, n_images=3, batch_size=3, size=(48, 40))
    return next(iter(gen.generate("sofa")))


@pytest.fixture(scope="module")
def bank(support: SupportSet) -> PrototypeBank:
    feats = extract_features(ColorExtractor(), support.images)
    return build_bank(support, feats, "color", PrototypeConfig(n_parts=4))


def key(tag: str) -> str:
    return Cache.key("test", {"tag": tag})


def assert_same_support(a: SupportSet, b: SupportSet) -> None:
    assert a.category == b.category and a.settings == b.settings
    for name in ("images", "attributions", "foreground", "background"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and np.array_equal(x, y), name


def assert_same_bank(a: PrototypeBank, b: PrototypeBank) -> None:
    for name, t in a.tensors().items():
        u = b.tensors()[name]
        assert t.dtype == u.dtype and torch.equal(t, u), name
    assert a.meta() == b.meta()


# --------------------------------------------------------------------------- round trips


def test_support_round_trip_is_bit_exact(tmp_path: Path, support: SupportSet) -> None:
    cache = Cache(tmp_path)
    path = cache.save_support(key("s"), support)
    assert path.is_file() and path.parent == tmp_path / "support"
    loaded = cache.load_support(key("s"), "sofa")
    assert loaded is not None
    assert_same_support(support, loaded)
    assert cache.load_support(key("s"), "cat") is None, "another category's name misses"
    assert cache.load_support(key("other"), "sofa") is None


def test_bank_round_trip_is_bit_exact(tmp_path: Path, bank: PrototypeBank) -> None:
    cache = Cache(tmp_path)
    cache.save_bank(key("b"), bank)
    loaded = cache.load_bank(key("b"), "sofa")
    assert loaded is not None
    assert_same_bank(bank, loaded)
    assert loaded.grid_size == bank.grid_size and loaded.image_size == bank.image_size
    # provenance survives too
    for p in range(len(bank)):
        for i, m in bank.member_masks(p).items():
            assert np.array_equal(loaded.member_masks(p)[i], m)


def test_keys_depend_on_kind_and_spec() -> None:
    spec = {"a": 1, "b": [1, 2]}
    assert Cache.key("bank", spec) == Cache.key("bank", {"b": [1, 2], "a": 1})
    assert Cache.key("bank", spec) != Cache.key("support", spec)
    assert Cache.key("bank", spec) != Cache.key("bank", {"a": 1, "b": [2, 1]})
    assert len(Cache.key("bank", spec)) == 64


def test_default_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("OVDIFF_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("OVDIFF_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "x" / "ovdiff"
    assert Cache().root == tmp_path / "x" / "ovdiff"


# --------------------------------------------------------------------------- corruption


def corrupt_truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def corrupt_flip_last(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # tensor data
    path.write_bytes(bytes(data))


def corrupt_flip_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    i = data.index(b"ovdiff_meta") + 20  # inside the JSON header
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


def corrupt_empty(path: Path) -> None:
    path.write_bytes(b"")


def corrupt_junk(path: Path) -> None:
    path.write_bytes(os.urandom(4096))


CORRUPTIONS = [
    corrupt_truncate,
    corrupt_flip_last,
    corrupt_flip_header,
    corrupt_empty,
    corrupt_junk,
]


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__)
def test_corrupted_entries_are_detected_and_removed(
    tmp_path: Path, bank: PrototypeBank, corrupt
) -> None:  # type: ignore[no-untyped-def]
    cache = Cache(tmp_path)
    path = cache.save_bank(key("b"), bank)
    corrupt(path)
    assert cache.load_bank(key("b"), "sofa") is None
    assert not path.exists(), "an invalid entry is deleted so that it gets rebuilt"
    cache.save_bank(key("b"), bank)
    loaded = cache.load_bank(key("b"), "sofa")
    assert loaded is not None
    assert_same_bank(bank, loaded)


def test_entry_under_the_wrong_key_is_rejected(tmp_path: Path, bank: PrototypeBank) -> None:
    cache = Cache(tmp_path)
    good = cache.save_bank(key("b1"), bank)
    moved = cache.path("bank", "sofa", key("b2"))
    moved.write_bytes(good.read_bytes())
    assert cache.load_bank(key("b2"), "sofa") is None
    assert not moved.exists()
    assert cache.load_bank(key("b1"), "sofa") is not None


def test_pipeline_rebuilds_corrupted_entries(tmp_path: Path) -> None:
    def fresh() -> tuple[OVDiff, ColorGenerator, ColorExtractor]:
        gen, ex = ColorGenerator(WORLD, n_images=4), ColorExtractor()
        return OVDiff(gen, [ex], cache=Cache(tmp_path)), gen, ex

    model, gen, ex = fresh()
    original = model.build(["lamp"])[0]
    skey = model.support_key("lamp")
    bank_path = model.cache.path("bank", "lamp", model.bank_key(skey, ex))  # type: ignore[union-attr]
    support_path = model.cache.path("support", "lamp", skey)  # type: ignore[union-attr]

    corrupt_flip_last(bank_path)
    model, gen, ex = fresh()
    rebuilt = model.build(["lamp"])[0]
    assert gen.generated == 0, "the support set was intact"
    assert ex.calls > 0, "the bank was rebuilt"
    assert_same_bank(original.banks["color"], rebuilt.banks["color"])

    corrupt_truncate(support_path)
    model, gen, ex = fresh()
    again = model.build(["lamp"])[0]
    assert gen.generated == 4, "the support set was regenerated"
    assert again.support is not None and original.support is not None
    assert_same_support(original.support, again.support)
    assert_same_bank(original.banks["color"], again.banks["color"])


# --------------------------------------------------------------------------- hostile names

HOSTILE = [
    "../../etc",
    "../../../../../../tmp/evil",
    "a/b",
    "/abs/path",
    "C:\\windows\\system32",
    "a\x00b",
    "..",
    ".",
    "",
    "   ",
    "x" * 10_000,
    "猫/../../😀",
    "naïve café",
    "\u202eexe.txt",
    "con",
]


def test_hostile_names_never_escape_the_root(tmp_path: Path, support: SupportSet) -> None:
    root = tmp_path / "cache"
    cache = Cache(root)
    for name in HOSTILE:
        for kind in ("support", "bank"):
            p = cache.path(kind, name, key(name))
            assert p.parent == root / kind
            assert p.resolve().is_relative_to(root.resolve())
            assert p.name.isascii() and len(p.name) < 100
            assert "/" not in p.name and "\x00" not in p.name and not p.name.startswith(".")
        # a real write and read with that category name
        s = SupportSet(
            name,
            support.images,
            support.attributions,
            support.foreground,
            support.background,
            support.settings,
        )
        cache.save_support(key(name), s)
        loaded = cache.load_support(key(name), name)
        assert loaded is not None and loaded.category == name
    # nothing was written anywhere but inside the root
    outside = [p for p in tmp_path.rglob("*") if not p.is_relative_to(root)]
    assert outside == []
    files = list((root / "support").iterdir())
    assert len(files) == len(HOSTILE)


def test_bad_kind_and_key_are_rejected(tmp_path: Path) -> None:
    cache = Cache(tmp_path)
    for kind in ("../x", "Bank", "", "a" * 40, "a/b"):
        with pytest.raises(ValueError, match="kind"):
            cache.path(kind, "cat", key("k"))
    for bad in ("abc", "../" + "0" * 61, key("k").upper(), key("k") + "0"):
        with pytest.raises(ValueError, match="key"):
            cache.path("bank", "cat", bad)


def test_clean_category_name_guards_the_pipeline(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="control characters"):
        clean_category_name("a\x00b")
    with pytest.raises(ValueError, match="at most 100"):
        clean_category_name("x" * 10_000)
    root = tmp_path / "cache"
    model = OVDiff(ColorGenerator(WORLD, n_images=2), [ColorExtractor()], cache=Cache(root))
    names = ["../../etc", "a/b", "猫 cat", "/abs"]
    built = model.build(names)
    assert [c.name for c in built] == names
    assert all(p.is_relative_to(root) for p in tmp_path.rglob("*"))
    assert len(list((root / "support").glob("*.safetensors"))) == len(names)
    assert len(list((root / "bank").glob("*.safetensors"))) == len(names)
    with pytest.raises(ValueError, match="control characters"):
        model.build(["a\x00b"])


# --------------------------------------------------------------------------- concurrency


@pytest.mark.slow
def test_concurrent_writers_leave_a_valid_entry(tmp_path: Path) -> None:
    n = 3
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(n)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=concurrent_cache_worker, args=(str(tmp_path), barrier, results, 10))
        for _ in range(n)
    ]
    for p in procs:
        p.start()
    outs = [results.get(timeout=300) for _ in range(n)]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    # every writer saw a valid entry every time, and all agree on the bank
    assert all(o["bad_loads"] == 0 for o in outs)
    assert len({o["bank"] for o in outs}) == 1
    # the build lock made exactly one process generate and extract; the others loaded
    assert sum(o["generated"] for o in outs) == 6
    assert sum(1 for o in outs if o["calls"] > 0) == 1
    # what is on disk is valid, and no temporary files are left behind
    cache = Cache(tmp_path)
    model = OVDiff(ColorGenerator(WORLD, n_images=6, batch_size=2), [ColorExtractor()], cache=cache)
    assert model.is_cached("cat")
    cat = model.build(["cat"])[0]
    assert tensor_checksum(cat.banks["color"].tensors()) == outs[0]["bank"]
    blob = cache.load("blob", "shared", Cache.key("blob", {"shared": True}))
    assert blob is not None and torch.equal(blob[0]["x"], torch.arange(200_000).float())
    assert [p.name for p in tmp_path.rglob(".tmp-*")] == []


# --------------------------------------------------------------------------- pipeline hits


def test_second_build_is_a_cache_hit(tmp_path: Path) -> None:
    gen, ex = ColorGenerator(WORLD, n_images=4, batch_size=2), ColorExtractor()
    model = OVDiff(gen, [ex], cache=Cache(tmp_path))
    assert not model.is_cached("cat")
    first = model.build(["cat"])[0]
    assert model.is_cached("cat")
    generated, calls = gen.generated, ex.calls
    assert generated == 4 and calls > 0
    again = model.build(["cat"])[0]
    assert gen.generated == generated and ex.calls == calls
    assert_same_bank(first.banks["color"], again.banks["color"])
    # a new process (fresh objects, same folder) hits the cache too
    gen2, ex2 = ColorGenerator(WORLD, n_images=4, batch_size=2), ColorExtractor()
    other = OVDiff(gen2, [ex2], cache=Cache(tmp_path))
    events = list(other.build_iter("cat"))
    assert gen2.generated == 0 and ex2.calls == 0
    assert [e.stage for e in events] == ["support", "bank", "done"]
    assert all(e.cached for e in events[:2])
    assert events[0].done == 4 and events[0].batch is not None and len(events[0].batch) == 4
    # a change in anything that determines the bytes is a miss
    gen3 = ColorGenerator(WORLD, n_images=4, batch_size=2, seed=1)
    OVDiff(gen3, [ColorExtractor()], cache=Cache(tmp_path)).build(["cat"])
    assert gen3.generated == 4
    ex4 = ColorExtractor(seed=5)
    OVDiff(ColorGenerator(WORLD, n_images=4), [ex4], cache=Cache(tmp_path)).build(["cat"])
    assert ex4.calls > 0
    ex5 = ColorExtractor()
    OVDiff(
        ColorGenerator(WORLD, n_images=4),
        [ex5],
        prototype_config=PrototypeConfig(n_parts=3),
        cache=Cache(tmp_path),
    ).build(["cat"])
    assert ex5.calls > 0


def test_build_iter_streams_one_event_per_batch(tmp_path: Path) -> None:
    gen = ColorGenerator(WORLD, n_images=6, batch_size=2)
    extractors = [ColorExtractor("a"), ColorExtractor("b", stride=16)]
    model = OVDiff(gen, extractors, cache=Cache(tmp_path))
    events = model.build_iter("sofa")
    first = next(events)
    assert first.stage == "support" and first.done == 2 and first.total == 6
    assert gen.generated == 2, "later batches are not generated before the first is shown"
    assert first.batch is not None and len(first.batch) == 2 and not first.cached
    rest = list(events)
    stages = [e.stage for e in [first, *rest]]
    assert stages == ["support", "support", "support", "bank", "bank", "done"]
    assert [e.done for e in [first, *rest][:3]] == [2, 4, 6]
    assert [e.extractor for e in rest[2:4]] == ["a", "b"]
    done = rest[-1].category_result
    assert done is not None and done.name == "sofa" and set(done.banks) == {"a", "b"}
    assert model.categories["sofa"] is done
    # batches concatenate to the stored support set
    batches = [e.batch for e in [first, *rest][:3]]
    assert done.support is not None
    assert np.array_equal(np.concatenate([b.images for b in batches]), done.support.images)  # type: ignore[union-attr]
