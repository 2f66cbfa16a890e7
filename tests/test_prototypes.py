"""Prototype banks: structure, exact means, and provenance down to support pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ovdiff_core.config import PrototypeConfig
from ovdiff_core.kmeans import kmeans
from ovdiff_core.pipeline import extract_features
from ovdiff_core.prototypes import build_bank, cell_edges, region_to_grid
from ovdiff_core.testing import ColorExtractor, ColorGenerator, ColorWorld
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
    return np.flatnonzero(region_to_grid(mask, grid).reshape(-1))


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
    bank = build_bank(support, feats, "x", PrototypeConfig(n_parts=3))
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
