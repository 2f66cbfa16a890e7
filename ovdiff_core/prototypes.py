"""Stage 2: class-, instance- and part-level prototypes from a support set's features."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ovdiff_core.config import ALGORITHM_VERSION, MASK_RULES, PrototypeConfig
from ovdiff_core.geometry import cell_edges
from ovdiff_core.kmeans import kmeans
from ovdiff_core.types import PrototypeBank, PrototypeKind, SupportSet

__all__ = ["build_bank", "region_coverage", "region_to_grid"]


def region_coverage(mask: np.ndarray, grid_size: tuple[int, int]) -> np.ndarray:
    """Fraction of each feature-grid cell's pixels that lie inside the mask.

    Args:
        mask: (N, H, W) bool, H >= gh and W >= gw.
        grid_size: (gh, gw).

    Returns:
        (N, gh, gw) float64 in [0, 1]; cell (r, c) spans the pixels of
        :func:`cell_edges` (rows ``edges_h[r]:edges_h[r + 1]``, likewise columns).
    """
    _, h, w = mask.shape
    gh, gw = grid_size
    if h < gh or w < gw:
        raise ValueError(f"region_to_grid: mask {h}x{w} is smaller than the grid {gh}x{gw}")
    rows, cols = cell_edges(h, gh), cell_edges(w, gw)
    counts = np.add.reduceat(mask.astype(np.int32), rows[:-1], axis=1)
    counts = np.add.reduceat(counts, cols[:-1], axis=2)
    areas = np.diff(rows)[:, None] * np.diff(cols)[None, :]
    return counts / areas[None]


def region_to_grid(mask: np.ndarray, grid_size: tuple[int, int], rule: str = "any") -> np.ndarray:
    """Resize image-resolution masks to a feature grid.

    Args:
        mask: (N, H, W) bool, H >= gh and W >= gw.
        grid_size: (gh, gw).
        rule: when a cell (r, c) (its pixel span is given by :func:`cell_edges`) is inside:
            ``"any"``: any of its pixels is True (the paper's rule); ``"majority"``: more
            than half of them are; ``"eroded"``: all of them are. With "majority" and
            "eroded", an image whose mask has pixels but no cell that passes the rule
            keeps its best-covered cells (all cells of the highest coverage), so that
            thin or small regions still give features.

    Returns:
        (N, gh, gw) bool.
    """
    if rule not in MASK_RULES:
        raise ValueError(f"region_to_grid: rule must be one of {MASK_RULES}, got {rule!r}")
    if rule == "any":
        _, h, w = mask.shape
        gh, gw = grid_size
        if h < gh or w < gw:
            raise ValueError(f"region_to_grid: mask {h}x{w} is smaller than the grid {gh}x{gw}")
        rows = np.logical_or.reduceat(mask, cell_edges(h, gh)[:-1], axis=1)
        return np.logical_or.reduceat(rows, cell_edges(w, gw)[:-1], axis=2)
    cover = region_coverage(mask, grid_size)
    grid = cover > 0.5 if rule == "majority" else cover >= 1.0
    best = cover.reshape(len(cover), -1).max(axis=1)
    lost = ~grid.reshape(len(grid), -1).any(axis=1) & (best > 0)
    if lost.any():
        grid[lost] = cover[lost] == best[lost, None, None]
    return grid


class _RegionRows:
    """The features of a region's cells as :class:`~ovdiff_core.kmeans.Rows`, read from
    the (N, D, gh, gw) feature tensor without a (cells, D) copy.

    Row j is the float32 feature vector of flat cell ``cells[j]`` (index into
    ``N * gh * gw``, image-major, ascending). Chunks stay within one image and cover a
    contiguous run of its cells, so a pass reads each feature once; they are transposed
    views of (D, m) blocks (strides (1, m)). Chunks live on the features' device; cell
    bounds are read from a CPU copy of ``cells`` (no device round trip per chunk).
    """

    def __init__(self, feats: torch.Tensor, cells: np.ndarray) -> None:
        n, d, gh, gw = feats.shape
        self.source = feats
        self.device = feats.device
        # K-means may hold a copy of its seeding subsample up to this size (elements).
        self.spare_elements = feats.numel() // 10
        self._buffer: torch.Tensor | None = None
        self.feats = feats.reshape(n, d, gh * gw)  # a view for contiguous features
        self.hw = gh * gw
        self.cells_np = cells
        self.cells = torch.from_numpy(cells).to(self.device)
        img = cells // self.hw
        # [start, end) of each image's cells in ``cells``
        self.bounds = np.searchsorted(img, np.arange(n + 1)).tolist()

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.cells.shape[0]), int(self.feats.shape[1]))

    def image_chunks(self, i: int, rows: int) -> Iterator[tuple[int, torch.Tensor]]:
        """Chunks of image ``i``'s cells: (offset into the rows, (m, D) float32)."""
        lo_i, hi_i = self.bounds[i], self.bounds[i + 1]
        for lo in range(lo_i, hi_i, max(1, rows)):
            hi = min(hi_i, lo + rows)
            first = int(self.cells_np[lo]) - i * self.hw
            last = int(self.cells_np[hi - 1]) - i * self.hw
            pos = self.cells[lo:hi] - (i * self.hw + first)
            span = self.feats[i, :, first : last + 1]  # (D, span) view
            m, d = hi - lo, span.shape[0]
            if self._buffer is None or self._buffer.numel() < d * rows:
                self._buffer = torch.empty(d * max(1, rows), dtype=span.dtype, device=self.device)
            block = self._buffer[: d * m].view(d, m)  # reused: no allocator churn
            torch.index_select(span, 1, pos, out=block)
            # (m, D) as a transposed view of the gathered (D, m) columns: no transpose
            # copy; matrix products and row sums read it as it is. Valid until the next.
            yield lo, block.to(torch.float32).T

    def chunks(self, rows: int) -> Iterator[tuple[int, torch.Tensor]]:
        for i in range(len(self.bounds) - 1):
            yield from self.image_chunks(i, rows)

    def dots(self, c: torch.Tensor) -> torch.Tensor:
        """(n, t) products of every row with the t rows of ``c`` (t, D), computed on each
        image's span of cells in place (no gather: reads the features once)."""
        out = torch.empty(self.shape[0], c.shape[0], dtype=torch.float32, device=self.device)
        for i in range(len(self.bounds) - 1):
            lo, hi = self.bounds[i], self.bounds[i + 1]
            if hi == lo:
                continue
            first = int(self.cells_np[lo]) - i * self.hw
            last = int(self.cells_np[hi - 1]) - i * self.hw
            pos = self.cells[lo:hi] - (i * self.hw + first)
            span = self.feats[i, :, first : last + 1]
            if span.dtype != torch.float32:
                span = span.to(torch.float32)
            out[lo:hi] = torch.mm(c, span).index_select(1, pos).T
        return out

    def subset(self, index: torch.Tensor) -> _RegionRows:
        """The rows ``index`` (ascending) as a source of their own."""
        return _RegionRows(self.source, self.cells_np[index.cpu().numpy()])

    def take(self, index: torch.Tensor) -> torch.Tensor:
        cells = self.cells[index.to(self.device)]
        return self.feats[cells // self.hw, :, cells % self.hw].to(torch.float32).contiguous()


# Elements per chunk when averaging a region (float32: 8 MB).
_MEAN_ELEMENTS = 1 << 21


def _mean(blocks: Iterator[tuple[int, torch.Tensor]], d: int, device: torch.device) -> torch.Tensor:
    """(D,) float32 mean of the rows of ``blocks`` (float64 sums on ``device``)."""
    total = torch.zeros(d, dtype=torch.float64, device=device)
    count = 0
    for _, block in blocks:
        total += block.sum(0, dtype=torch.float64)
        count += block.shape[0]
    return (total / count).to(torch.float32)


def _region_prototypes(
    feats: torch.Tensor, flat_cells: np.ndarray, config: PrototypeConfig
) -> tuple[list[torch.Tensor], list[int], list[int], list[np.ndarray]]:
    """Prototypes of one region (fg or bg) as (vectors, kinds, image index, members).

    Reads the region's features in chunks from ``feats`` (N, D, gh, gw): no copy of the
    region's (cells, D) features is made, so memory stays near the features' own size.
    """
    vecs: list[torch.Tensor] = []
    kinds: list[int] = []
    images: list[int] = []
    members: list[np.ndarray] = []
    if len(flat_cells) == 0:
        return vecs, kinds, images, members
    rows = _RegionRows(feats, flat_cells)
    n_img, d = feats.shape[0], feats.shape[1]
    step = max(1, _MEAN_ELEMENTS // d)
    if config.class_level:
        vecs.append(_mean(rows.chunks(step), d, feats.device))
        kinds.append(PrototypeKind.CLASS)
        images.append(-1)
        members.append(flat_cells)
    if config.instance_level:
        for i in range(n_img):
            lo, hi = rows.bounds[i], rows.bounds[i + 1]
            if hi == lo:
                continue
            vecs.append(_mean(rows.image_chunks(i, step), d, feats.device))
            kinds.append(PrototypeKind.INSTANCE)
            images.append(i)
            members.append(flat_cells[lo:hi])
    if config.part_level and config.n_parts > 0:
        km = kmeans(
            rows,
            config.n_parts,
            seed=config.seed,
            max_iter=config.kmeans_max_iter,
            tol=config.kmeans_tol,
        )
        labels = km.labels.cpu().numpy()
        for j in range(km.centroids.shape[0]):
            vecs.append(km.centroids[j])
            kinds.append(PrototypeKind.PART)
            images.append(-1)
            members.append(flat_cells[labels == j])
    return vecs, kinds, images, members


def build_bank(
    support: SupportSet,
    features: torch.Tensor,
    extractor: str,
    config: PrototypeConfig | None = None,
) -> PrototypeBank:
    """Build the prototype bank of one category for one feature extractor.

    Args:
        support: the category's support set with N images of size (H, W).
        features: (N, D, gh, gw) float features of the support images from the extractor
            named ``extractor`` (grid cell (r, c) covers the pixel span of
            :func:`cell_edges`), on any device: means and K-means run on the features'
            device (a GPU's features stay there; MPS features are moved to the CPU,
            which has the float64 sums MPS lacks).
        extractor: the extractor's name, recorded in the bank.
        config: prototype settings (K, seed, which levels, and the rule that resizes the
            support masks to the feature grid, ``mask_rule``: see :func:`region_to_grid`).

    Returns:
        A :class:`PrototypeBank` with foreground prototypes first (class, instances,
        parts), then background ones in the same order. Empty regions give no prototypes.
        Vectors are L2-normalised; each is the exact mean of its member cells' features.
        Every tensor of the bank is on the CPU, whatever the features' device (banks are
        cached to disk and shared between extractors' devices).

    Memory: the features are read in place, chunk by chunk (class and instance means,
    every K-means pass), so the extra memory is a few chunks of about 8 MB plus the
    K-means seeding subsample (at most 8192 cells) when that is under a tenth of the
    features (else the seeding reads it from the features at each step), not a copy of
    the features. A non-contiguous ``features`` is copied once into (N, D, gh * gw)
    layout; float16 is converted chunk by chunk.
    """
    config = config or PrototypeConfig()
    if features.ndim != 4 or features.shape[0] != len(support):
        raise ValueError(
            f"build_bank: features must be (N={len(support)}, D, gh, gw), got "
            f"{tuple(features.shape)}"
        )
    _, _, gh, gw = features.shape
    feats = features.detach()
    if feats.device.type == "mps":  # no float64 on MPS
        feats = feats.to("cpu")
    all_vecs: list[torch.Tensor] = []
    fg_flags: list[bool] = []
    kinds: list[int] = []
    images: list[int] = []
    members: list[np.ndarray] = []
    for is_fg, mask in ((True, support.foreground), (False, support.background)):
        grid = region_to_grid(mask, (gh, gw), config.mask_rule)
        flat_cells = np.flatnonzero(grid.reshape(-1)).astype(np.int64)
        v, k, i, m = _region_prototypes(feats, flat_cells, config)
        all_vecs += v
        kinds += k
        images += i
        members += m
        fg_flags += [is_fg] * len(v)
    if not all_vecs:
        raise ValueError(
            f"build_bank: support set of {support.category!r} has empty foreground and "
            "background masks; regenerate it or supply masks"
        )
    vectors = F.normalize(torch.stack(all_vecs), dim=1).to("cpu")
    offsets = np.zeros(len(members) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(m) for m in members])
    return PrototypeBank(
        category=support.category,
        extractor=extractor,
        vectors=vectors.contiguous(),
        foreground=torch.tensor(fg_flags, dtype=torch.bool, device="cpu"),
        kinds=torch.tensor(kinds, dtype=torch.int8, device="cpu"),
        image_index=torch.tensor(images, dtype=torch.int32, device="cpu"),
        member_offsets=torch.from_numpy(offsets),
        member_cells=torch.from_numpy(np.concatenate(members)),
        grid_size=(gh, gw),
        image_size=support.image_size,
        settings={"prototypes": config.to_dict(), "algorithm_version": ALGORITHM_VERSION},
    )
