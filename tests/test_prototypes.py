"""Prototype banks: structure, exact means, and provenance down to support pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ovdiff_core.colorworld import ColorExtractor, ColorGenerator, ColorWorld
from ovdiff_core.config import PrototypeConfig
from ovdiff_core.kmeans import kmeans
from ovdiff_core.pipeline import extract_features
from ovdiff_core.prototypes import build_bank, cell_edges, region_to_grid
from ovdiff_core.types import PrototypeBank, PrototypeKind, SupportSet

K = PrototypeKind


@pytest.fixture(scope="module")
def cat_support() -> SupportSet:
    gen = ColorGenerator(ColorWorld.default(), n_images=5, batch_size=5, size=(64, 48))
    return next(iter(gen.generate("cat")))


@pytest.fixture(scope="module")
def cat_features(cat_support: SupportSet) -> torch.Tensor:
    return extract_features(ColorExtractor(stride=8), cat_support.images)


@pytest.fixture(scope="module")
def cat_bank(cat_support: SupportSet, cat_features: torch.Tensor) -> PrototypeBank:
    return build_bank(cat_support, cat_features, "color", PrototypeConfig(n_parts=6))


def flat_features(features: torch.Tensor) -> torch.Tensor:
    n, d, gh, gw = features.shape
    return features.permute(0, 2, 3, 1).reshape(n * gh * gw, d)


def region_cells(support: SupportSet, grid: tuple[int, int], fg: bool) -> np.ndarray:
    mask = support.foreground if fg else support.background
    return np.flatnonzero(region_to_grid(mask, grid, PrototypeConfig().mask_rule).reshape(-1))


def test_region_to_grid_any_overlap_counts() -> None:
    mask = np.zeros((2, 10, 7), dtype=bool)
    mask[0, 9, 6] = True  # last pixel -> last cell
    mask[1, 3, 2] = True
    grid = region_to_grid(mask, (3, 2))
    # rows split at 0, 3, 6, 10; cols at 0, 3, 7
    assert cell_edges(10, 3).tolist() == [0, 3, 6, 10]
    assert cell_edges(7, 2).tolist() == [0, 3, 7]
    expected = np.zeros((2, 3, 2), dtype=bool)
    expected[0, 2, 1] = True
    expected[1, 1, 0] = True
    assert np.array_equal(grid, expected)
    with pytest.raises(ValueError, match="smaller than the grid"):
        region_to_grid(np.zeros((1, 2, 2), dtype=bool), (3, 3))


def test_bank_layout(cat_support: SupportSet, cat_bank: PrototypeBank) -> None:
    n = len(cat_support)
    fg = cat_bank.foreground.numpy()
    kinds = cat_bank.kinds.numpy()
    # foreground block first, then background; each block: class, instances, parts
    n_fg = int(fg.sum())
    assert fg[:n_fg].all() and not fg[n_fg:].any()
    for block in (kinds[:n_fg], kinds[n_fg:]):
        assert block[0] == K.CLASS
        assert (block[1 : 1 + n] == K.INSTANCE).all()
        assert (block[1 + n :] == K.PART).all()
        assert len(block) == 1 + n + 6
    assert cat_bank.vectors.dtype == torch.float32
    torch.testing.assert_close(cat_bank.vectors.norm(dim=1), torch.ones(len(cat_bank)))
    assert cat_bank.grid_size == (8, 6) and cat_bank.image_size == (64, 48)
    assert cat_bank.category == "cat" and cat_bank.extractor == "color"
    offs = cat_bank.member_offsets
    assert offs[0] == 0 and offs[-1] == len(cat_bank.member_cells)
    assert bool((offs[1:] > offs[:-1]).all()), "every prototype has members"


def test_every_vector_is_the_normalised_mean_of_its_members(
    cat_bank: PrototypeBank, cat_features: torch.Tensor
) -> None:
    flat = flat_features(cat_features).double()
    for p in range(len(cat_bank)):
        lo, hi = int(cat_bank.member_offsets[p]), int(cat_bank.member_offsets[p + 1])
        mean = flat[cat_bank.member_cells[lo:hi]].mean(0)
        torch.testing.assert_close(
            cat_bank.vectors[p].double(), F.normalize(mean, dim=0), rtol=0, atol=1e-5
        )


def test_class_and_instance_members(cat_support: SupportSet, cat_bank: PrototypeBank) -> None:
    gh, gw = cat_bank.grid_size
    kinds, fg_flags = cat_bank.kinds.numpy(), cat_bank.foreground.numpy()
    images = cat_bank.image_index.numpy()
    for fg in (True, False):
        cells = region_cells(cat_support, (gh, gw), fg)
        sel = np.flatnonzero((fg_flags == fg) & (kinds == K.CLASS))
        assert len(sel) == 1
        n, row, col = cat_bank.members(int(sel[0]))
        assert np.array_equal(np.sort(n * gh * gw + row * gw + col), cells)
        for p in np.flatnonzero((fg_flags == fg) & (kinds == K.INSTANCE)):
            i = int(images[p])
            n, row, col = cat_bank.members(int(p))
            assert (n == i).all(), "an instance prototype's members are all in its image"
            own = cells[cells // (gh * gw) == i]
            assert np.array_equal(np.sort(n * gh * gw + row * gw + col), own)
    assert (images[kinds != K.INSTANCE] == -1).all()


def test_part_members_are_exactly_the_kmeans_clusters(
    cat_support: SupportSet, cat_features: torch.Tensor, cat_bank: PrototypeBank
) -> None:
    gh, gw = cat_bank.grid_size
    flat = flat_features(cat_features)
    kinds, fg_flags = cat_bank.kinds.numpy(), cat_bank.foreground.numpy()
    for fg in (True, False):
        cells = region_cells(cat_support, (gh, gw), fg)
        km = kmeans(flat[torch.from_numpy(cells)], 6, seed=0)
        parts = np.flatnonzero((fg_flags == fg) & (kinds == K.PART))
        assert len(parts) == km.centroids.shape[0]
        for j, p in enumerate(parts):
            lo, hi = int(cat_bank.member_offsets[p]), int(cat_bank.member_offsets[p + 1])
            members = cat_bank.member_cells[lo:hi].numpy()
            assert np.array_equal(members, cells[km.labels.numpy() == j])
            torch.testing.assert_close(
                cat_bank.vectors[p], F.normalize(km.centroids[j], dim=0), rtol=0, atol=1e-5
            )
        # the parts partition the region
        all_members = np.concatenate(
            [
                cat_bank.member_cells[
                    int(cat_bank.member_offsets[p]) : int(cat_bank.member_offsets[p + 1])
                ].numpy()
                for p in parts
            ]
        )
        assert np.array_equal(np.sort(all_members), cells)


def test_member_masks_cover_exactly_the_member_cells() -> None:
    # Image size not divisible by the grid: cells have uneven pixel spans.
    rng = np.random.default_rng(0)
    n, h, w, gh, gw = 3, 30, 22, 4, 3
    fg = rng.random((n, h, w)) < 0.05
    fg[1] = False  # image 1 has no foreground at all
    support = SupportSet(
        "thing",
        rng.integers(0, 255, (n, h, w, 3), dtype=np.uint8),
        fg.astype(np.float32),
        fg,
        ~fg,
    )
    feats = torch.randn(n, 5, gh, gw)
    bank = build_bank(support, feats, "x", PrototypeConfig(n_parts=3, mask_rule="any"))
    grid = region_to_grid(fg, (gh, gw))
    rows, cols = cell_edges(h, gh), cell_edges(w, gw)
    cls = 0  # the foreground class prototype
    masks = bank.member_masks(cls)
    assert sorted(masks) == [0, 2], "only images with member cells appear"
    for i, mask in masks.items():
        assert mask.shape == (h, w) and mask.dtype == bool
        expected = np.zeros((h, w), dtype=bool)
        for r, c in zip(*np.nonzero(grid[i]), strict=True):
            expected[rows[r] : rows[r + 1], cols[c] : cols[c + 1]] = True
        assert np.array_equal(mask, expected)
        assert not (fg[i] & ~mask).any(), "every foreground pixel lies in a member cell"
    # instance prototypes: only their image; no instance prototype for the empty image
    inst = np.flatnonzero((bank.kinds.numpy() == K.INSTANCE) & bank.foreground.numpy())
    assert bank.image_index[inst].tolist() == [0, 2]
    for p in inst:
        assert list(bank.member_masks(int(p))) == [int(bank.image_index[p])]


def test_levels_can_be_switched_off(cat_support: SupportSet, cat_features: torch.Tensor) -> None:
    n = len(cat_support)
    only_class = build_bank(
        cat_support, cat_features, "c", PrototypeConfig(part_level=False, instance_level=False)
    )
    assert only_class.kinds.tolist() == [K.CLASS, K.CLASS]
    assert only_class.foreground.tolist() == [True, False]
    no_class = build_bank(cat_support, cat_features, "c", PrototypeConfig(class_level=False))
    assert K.CLASS not in no_class.kinds.tolist()
    parts0 = build_bank(cat_support, cat_features, "c", PrototypeConfig(n_parts=0))
    assert K.PART not in parts0.kinds.tolist() and len(parts0) == 2 * (1 + n)


def test_deterministic(cat_support: SupportSet, cat_features: torch.Tensor) -> None:
    a = build_bank(cat_support, cat_features, "c", PrototypeConfig(n_parts=5, seed=1))
    b = build_bank(cat_support, cat_features.clone(), "c", PrototypeConfig(n_parts=5, seed=1))
    for name, t in a.tensors().items():
        assert torch.equal(t, b.tensors()[name]), name
    assert a.settings == b.settings and a.settings["prototypes"]["n_parts"] == 5


def test_empty_regions(cat_support: SupportSet, cat_features: torch.Tensor) -> None:
    no_bg = SupportSet(
        "cat",
        cat_support.images,
        cat_support.attributions,
        cat_support.foreground,
        np.zeros_like(cat_support.background),
    )
    bank = build_bank(no_bg, cat_features, "c", PrototypeConfig(n_parts=4))
    assert bool(bank.foreground.all())
    nothing = SupportSet(
        "cat",
        cat_support.images,
        cat_support.attributions,
        np.zeros_like(cat_support.foreground),
        np.zeros_like(cat_support.background),
    )
    with pytest.raises(ValueError, match="empty foreground and background"):
        build_bank(nothing, cat_features, "c")


def test_bad_feature_shape(cat_support: SupportSet, cat_features: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="features must be"):
        build_bank(cat_support, cat_features[:2], "c")
    with pytest.raises(ValueError, match="features must be"):
        build_bank(cat_support, cat_features[:, :, 0], "c")


# --------------------------------------------------------------------------- streaming


def reference_bank_vectors(
    support: SupportSet, features: torch.Tensor, config: PrototypeConfig
) -> tuple[torch.Tensor, np.ndarray]:
    """The bank's vectors and member cells as build_bank computed them before it read
    the features in place: one (cells, D) copy of all features, region gathers."""
    _, d, gh, gw = features.shape
    flat = features.to(torch.float32).permute(0, 2, 3, 1).reshape(-1, d)
    vecs: list[torch.Tensor] = []
    members: list[np.ndarray] = []
    for mask in (support.foreground, support.background):
        grid = region_to_grid(mask, (gh, gw), config.mask_rule)
        cells = np.flatnonzero(grid.reshape(-1)).astype(np.int64)
        if len(cells) == 0:
            continue
        x = flat[torch.from_numpy(cells)]
        vecs.append(x.mean(0))
        members.append(cells)
        img_of = cells // (gh * gw)
        for i in np.unique(img_of):
            vecs.append(x[torch.from_numpy(img_of == i)].mean(0))
            members.append(cells[img_of == i])
        km = kmeans(x, config.n_parts, seed=config.seed)
        labels = km.labels.numpy()
        for j in range(km.centroids.shape[0]):
            vecs.append(km.centroids[j])
            members.append(cells[labels == j])
    return F.normalize(torch.stack(vecs), dim=1), np.concatenate(members)


def blob_support(n: int, size: tuple[int, int], seed: int) -> SupportSet:
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[:h, :w]
    fg = np.stack(
        [
            (yy - rng.uniform(0, h)) ** 2 + (xx - rng.uniform(0, w)) ** 2 < (0.3 * h) ** 2
            for _ in range(n)
        ]
    )
    fg[1] = False  # an image without foreground
    images = rng.integers(0, 255, (n, h, w, 3), dtype=np.uint8)
    return SupportSet("thing", images, fg.astype(np.float32), fg, ~fg)


@pytest.mark.parametrize(
    ("n", "d", "grid", "dtype"),
    [
        (4, 12, (16, 16), torch.float32),
        (3, 8, (64, 64), torch.float32),  # > 8192 cells: the seeding subsample
        (3, 6, (20, 24), torch.float16),
    ],
)
def test_banks_equal_the_copying_reference(
    n: int, d: int, grid: tuple[int, int], dtype: torch.dtype
) -> None:
    support = blob_support(n, (grid[0] * 2, grid[1] * 2), seed=n)
    g = torch.Generator().manual_seed(d)
    feats = (torch.randn(n, d, *grid, generator=g) + torch.arange(d)[:, None, None]).to(dtype)
    # "any": the regions these cases were written for (other rules give other cell sets,
    # on which float rounding may flip a near-tie in K-means between the two ways)
    config = PrototypeConfig(n_parts=7, mask_rule="any")
    bank = build_bank(support, feats, "x", config)
    vectors, members = reference_bank_vectors(support, feats, config)
    torch.testing.assert_close(bank.vectors, vectors, rtol=0, atol=1e-6)
    assert np.array_equal(bank.member_cells.numpy(), members)
    # a non-contiguous features tensor gives the same bank
    strided = feats.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)
    assert not strided.is_contiguous()
    again = build_bank(support, strided, "x", config)
    assert torch.equal(again.vectors, bank.vectors)


def test_streamed_seeding_gives_the_same_bank(monkeypatch: pytest.MonkeyPatch) -> None:
    """With chunks of a few rows the K-means seeding reads its subsample from the features
    at every step (as it does for real sizes); the bank is unchanged."""
    import ovdiff_core.kmeans as kmeans_module

    support = blob_support(3, (128, 128), seed=5)
    feats = torch.randn(3, 8, 64, 64, generator=torch.Generator().manual_seed(1))
    config = PrototypeConfig(n_parts=5, mask_rule="any")  # see the test above
    vectors, members = reference_bank_vectors(support, feats, config)
    monkeypatch.setattr(kmeans_module, "_PASS_ELEMENTS", 8 * 100)
    calls: list[int] = []
    streamed = kmeans_module._seed_streamed

    def spy(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        return streamed(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(kmeans_module, "_seed_streamed", spy)
    bank = build_bank(support, feats, "x", config)
    assert len(calls) == 2, "both regions seeded from the features"
    torch.testing.assert_close(bank.vectors, vectors, rtol=0, atol=1e-6)
    assert np.array_equal(bank.member_cells.numpy(), members)


_PEAK_SCRIPT = """
import re, numpy as np, torch
from ovdiff_core.config import PrototypeConfig
from ovdiff_core.prototypes import build_bank
from ovdiff_core.types import SupportSet

def status(key):
    text = open("/proc/self/status").read()
    return int(re.search(key + r":\\s+(\\d+)", text).group(1)) * 1024

n, d, g = 4, 4096, 64
fg = np.zeros((n, 2 * g, 2 * g), dtype=bool)
fg[:, 20:90, 30:100] = True
support = SupportSet("x", np.zeros((n, 2 * g, 2 * g, 3), np.uint8), fg.astype(np.float32), fg, ~fg)
config = PrototypeConfig(n_parts=4, kmeans_max_iter=2)
small = torch.randn(n, d, 8, 8)  # first use of every kernel, at a negligible size
build_bank(SupportSet("x", support.images[:, :16, :16], support.attributions[:, :16, :16],
           fg[:, :16, :16], ~fg[:, :16, :16]), small, "warm-up", config)
feats = torch.randn(n, d, g, g)
open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS: earlier peaks do not count
base = status("VmRSS")
build_bank(support, feats, "x", config)
print((status("VmHWM") - base) / (feats.numel() * 4))
"""


def test_build_bank_does_not_copy_the_features() -> None:
    """Peak memory of build_bank beyond its 256 MB of features (VmHWM in a fresh process;
    torch allocations are invisible to tracemalloc): well under one copy of them (it was
    about 1.7 copies: a permuted copy of all features plus the region's rows; now about
    0.2-0.45, chunks and allocator slack, which weigh more at this small size)."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT], capture_output=True, text=True, check=True
    )
    extra = float(out.stdout.strip().splitlines()[-1])
    assert extra < 0.8, f"build_bank used {extra:.2f}x its features on top of them"
