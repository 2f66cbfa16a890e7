"""The one geometry between pixels and feature cells, shared by every stage.

Two mappings, each written once here:

* **cells -> pixels, as areas** (:func:`cell_edges`, :func:`cells_to_pixels`): cell
  ``(r, c)`` of a ``gh x gw`` grid over an ``H x W`` image covers rows
  ``edges_h[r]:edges_h[r + 1]`` and columns ``edges_w[c]:edges_w[c + 1]``. Masks go to
  grids this way (stage 2, :func:`ovdiff_core.prototypes.region_to_grid`) and member
  cells come back to support-image masks (:meth:`ovdiff_core.types.PrototypeBank.
  member_masks`, traces, the atlas).
* **cells -> pixels, as values** (:func:`pixel_centres`, :func:`bilinear_taps`,
  :class:`AxisTaps`, :func:`blend`): a pixel's value is the bilinear blend of the two
  nearest cell centres along each axis (edge-clamped). Scores, traces, similarity maps
  and atlas fire maps are all made with it, so they agree to the last bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = [
    "AxisTaps",
    "GridTaps",
    "bilinear_taps",
    "blend",
    "cell_edges",
    "cells_to_pixels",
    "pixel_centres",
]

# --------------------------------------------------------------------------- areas


def cell_edges(size: int, cells: int) -> np.ndarray:
    """(cells + 1,) int64 pixel edges: cell i covers pixels ``[edges[i], edges[i + 1])``."""
    return (np.arange(cells + 1) * size) // cells


def cells_to_pixels(grids: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """Expand cell grids to pixel masks, each cell over its :func:`cell_edges` span.

    Args:
        grids: (N, gh, gw) bool.
        image_size: (H, W), H >= gh and W >= gw.

    Returns:
        (N, H, W) bool.
    """
    n, gh, gw = grids.shape
    h, w = image_size
    if h < gh or w < gw:
        raise ValueError(f"cells_to_pixels: image {h}x{w} is smaller than the grid {gh}x{gw}")
    grids = np.ascontiguousarray(grids, dtype=np.bool_)
    if w % gw == 0 and (w // gw) % 8 == 0:
        # Cells 8k px wide: write each cell's row span as k 8-byte words of 0x01 bytes.
        words = grids.astype(np.uint64) * np.uint64(0x0101010101010101)
        k = w // gw // 8
        cols = np.broadcast_to(words[..., None], (*words.shape, k)).reshape(n, gh, -1)
        wide = cols.view(np.bool_)  # (N, gh, W)
    else:
        wide = np.repeat(grids, np.diff(cell_edges(w, gw)), axis=2)
    return np.repeat(wide, np.diff(cell_edges(h, gh)), axis=1)  # whole rows: contiguous


# --------------------------------------------------------------------------- values


def pixel_centres(n_input: int, n_processed: int) -> np.ndarray:
    """(n_input,) float64 processed-image coordinates of the input pixels' centres."""
    return (np.arange(n_input, dtype=np.float64) + 0.5) * (n_processed / n_input)


def bilinear_taps(
    coords: np.ndarray, start: int, length: int, cells: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The two cells each point blends, along one axis of a view.

    Args:
        coords: (n,) processed-image coordinates of the points.
        start, length: the view's extent on this axis, processed pixels.
        cells: the view's feature grid size on this axis.

    Returns:
        lo, hi (n,) int64 cells and frac (n,) float64: a point takes ``1 - frac`` of cell
        ``lo`` and ``frac`` of cell ``hi`` (cell centres at
        ``start + (i + 0.5) * length / cells``, clamped at the edges, so ``hi == lo`` and
        ``frac == 0`` beyond the outer centres).
    """
    u = np.clip((coords - start) * (cells / length) - 0.5, 0.0, cells - 1)
    lo = np.floor(u).astype(np.int64)
    return lo, np.minimum(lo + 1, cells - 1), u - lo


@dataclass(frozen=True)
class AxisTaps:
    """:func:`bilinear_taps` of points along one axis, as blending weights: point i is
    ``w0[i] * cell lo[i] + w1[i] * cell hi[i]``. numpy arrays (CPU) or tensors (any
    device), all of length n; weights float32."""

    lo: Any  # (n,) int64
    hi: Any  # (n,) int64
    w0: Any  # (n,) float32
    w1: Any  # (n,) float32

    @staticmethod
    def build(coords: np.ndarray, start: int, length: int, cells: int) -> AxisTaps:
        """Taps of ``coords`` into a view's grid (see :func:`bilinear_taps`), numpy."""
        lo, hi, frac = bilinear_taps(coords, start, length, cells)
        return AxisTaps(lo, hi, (1.0 - frac).astype(np.float32), frac.astype(np.float32))

    def __len__(self) -> int:
        return len(self.lo)

    def to(self, device: torch.device) -> AxisTaps:
        """The same taps as tensors on ``device``."""
        lo, hi, w0, w1 = (
            torch.as_tensor(x).to(device) for x in (self.lo, self.hi, self.w0, self.w1)
        )
        return AxisTaps(lo, hi, w0, w1)

    def part(self, points: slice, first_cell: int = 0) -> AxisTaps:
        """Taps of ``points`` only, into a grid cropped to start at ``first_cell``."""
        return AxisTaps(
            self.lo[points] - first_cell,
            self.hi[points] - first_cell,
            self.w0[points],
            self.w1[points],
        )


def take(x: Any, index: Any, axis: int) -> Any:
    """``x`` gathered at ``index`` along ``axis``: numpy's ``take`` (much faster than
    torch's ``index_select`` on the CPU), ``index_select`` on tensors."""
    if isinstance(x, np.ndarray):
        return np.take(x, index, axis=axis)
    return x.index_select(axis, index)


def blend(grid: Any, rows: AxisTaps, cols: AxisTaps) -> Any:
    """Bilinear resampling of cell maps onto points: (k, h, w) -> (k, len(rows), len(cols)).

    ``grid`` is float32, numpy (with numpy taps) or a tensor (with tensor taps on its
    device). Columns are blended first, on the small (k, h, columns) grid, then whole
    rows; plain numpy on the CPU (no BLAS or thread pool to wake for small maps). Every
    score and map of a segmentation comes from these operations in this order.
    """
    t = take(grid, cols.lo, 2)
    t *= cols.w0
    right = take(grid, cols.hi, 2)
    right *= cols.w1
    t += right
    up = take(t, rows.lo, 1)
    up *= rows.w0[:, None]
    down = take(t, rows.hi, 1)
    down *= rows.w1[:, None]
    up += down
    return up


@dataclass(frozen=True)
class GridTaps:
    """Row and column taps of a whole grid onto a pixel raster (see :func:`blend`)."""

    rows: AxisTaps
    cols: AxisTaps

    def apply(self, grid: np.ndarray) -> np.ndarray:
        """(gh, gw) float32 -> (len(rows), len(cols)) float32."""
        return np.asarray(blend(grid[None], self.rows, self.cols)[0])
