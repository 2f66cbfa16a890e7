"""The one geometry between pixels and cells (ovdiff_core.geometry), against plain
reference implementations, and its users agreeing with it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ovdiff_core.config import PrototypeConfig
from ovdiff_core.geometry import (
    AxisTaps,
    GridTaps,
    blend,
    cell_edges,
    cells_to_pixels,
    pixel_centres,
)
from ovdiff_core.prototypes import build_bank
from ovdiff_core.segment import interp_matrix
from ovdiff_core.types import SupportSet

SHAPES = [  # (n, H, W, gh, gw): uneven cells, 8k-px-wide cells (the word path), 1 cell
    (3, 30, 22, 4, 3),
    (2, 64, 64, 8, 8),
    (4, 17, 50, 5, 9),
    (2, 64, 128, 4, 8),
    (3, 40, 48, 5, 2),
    (1, 9, 7, 1, 1),
]


def reference_expand(grids: np.ndarray, h: int, w: int) -> np.ndarray:
    """Cell by cell: every pixel of cell (r, c)'s edge span takes its value."""
    n, gh, gw = grids.shape
    rows, cols = cell_edges(h, gh), cell_edges(w, gw)
    out = np.zeros((n, h, w), dtype=bool)
    for r in range(gh):
        for c in range(gw):
            out[:, rows[r] : rows[r + 1], cols[c] : cols[c + 1]] = grids[:, r, c, None, None]
    return out


def test_cell_edges_tile_the_image() -> None:
    edges = cell_edges(17, 5)
    assert edges[0] == 0 and edges[-1] == 17 and np.all(np.diff(edges) >= 3)


@pytest.mark.parametrize(("n", "h", "w", "gh", "gw"), SHAPES)
def test_cells_to_pixels_matches_the_reference(n: int, h: int, w: int, gh: int, gw: int) -> None:
    grids = np.random.default_rng(h * w).random((n, gh, gw)) < 0.4
    got = cells_to_pixels(grids, (h, w))
    assert got.shape == (n, h, w) and got.dtype == np.bool_
    np.testing.assert_array_equal(got, reference_expand(grids, h, w))


def test_cells_to_pixels_rejects_a_grid_finer_than_the_image() -> None:
    with pytest.raises(ValueError, match="smaller than the grid"):
        cells_to_pixels(np.zeros((1, 8, 8), bool), (4, 16))


@pytest.mark.parametrize(("n", "h", "w", "gh", "gw"), SHAPES)
def test_member_masks_are_the_member_cells_expanded(
    n: int, h: int, w: int, gh: int, gw: int
) -> None:
    rng = np.random.default_rng(3)
    fg = rng.random((n, h, w)) < 0.1
    support = SupportSet("x", np.zeros((n, h, w, 3), np.uint8), fg.astype(np.float32), fg, ~fg)
    bank = build_bank(support, torch.randn(n, 4, gh, gw), "x", PrototypeConfig(n_parts=3))
    for p in range(len(bank)):
        images, row, col = bank.members(p)
        masks = bank.member_masks(p)
        assert list(masks) == sorted(set(images.tolist()))
        for i, mask in masks.items():
            grid = np.zeros((1, gh, gw), bool)
            grid[0, row[images == i], col[images == i]] = True
            np.testing.assert_array_equal(mask, reference_expand(grid, h, w)[0])


@pytest.mark.parametrize(("size", "processed", "cells"), [(37, 37, 5), (50, 24, 3), (9, 30, 7)])
def test_blend_is_the_interpolation_matrix(size: int, processed: int, cells: int) -> None:
    """blend() (numpy and torch) equals the dense bilinear matrices applied to the grid."""
    rng = np.random.default_rng(cells)
    grid = rng.standard_normal((2, cells, cells + 1)).astype(np.float32)
    ys = pixel_centres(size, processed)
    xs = pixel_centres(size + 3, processed + 2)
    rows = AxisTaps.build(ys, 0, processed, cells)
    cols = AxisTaps.build(xs, 0, processed + 2, cells + 1)
    mr = interp_matrix(ys, 0, processed, cells)
    mc = interp_matrix(xs, 0, processed + 2, cells + 1)
    want = np.einsum("ik,ckl,jl->cij", mr, grid.astype(np.float64), mc)
    got = blend(grid, rows, cols)
    assert got.shape == (2, size, size + 3) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-5)
    cpu = torch.device("cpu")
    on_torch = blend(torch.from_numpy(grid), rows.to(cpu), cols.to(cpu))
    np.testing.assert_array_equal(on_torch.numpy(), got)
    np.testing.assert_array_equal(GridTaps(rows, cols).apply(grid[1]), got[1])


def test_part_of_the_taps_is_a_crop() -> None:
    xs = pixel_centres(40, 40)
    grid = np.random.default_rng(0).standard_normal((1, 3, 8)).astype(np.float32)
    rows = AxisTaps.build(pixel_centres(12, 12), 0, 12, 3)
    cols = AxisTaps.build(xs, 0, 40, 8)
    whole = blend(grid, rows, cols)
    pts = slice(10, 25)
    first = int(cols.lo[pts][0])
    crop = blend(grid[:, :, first:], rows, cols.part(pts, first))
    np.testing.assert_array_equal(crop, whole[:, :, pts])
