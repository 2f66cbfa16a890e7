"""Stage 2: class-, instance- and part-level prototypes from a support set's features."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ovdiff_core.config import ALGORITHM_VERSION, PrototypeConfig
from ovdiff_core.kmeans import kmeans
from ovdiff_core.types import PrototypeBank, PrototypeKind, SupportSet

__all__ = ["build_bank", "region_to_grid"]


def cell_edges(size: int, cells: int) -> np.ndarray:
    """(cells + 1,) pixel edges: cell i covers ``[edges[i], edges[i + 1])``."""
    return (np.arange(cells + 1) * size) // cells


def region_to_grid(mask: np.ndarray, grid_size: tuple[int, int]) -> np.ndarray:
    """Resize image-resolution masks to a feature grid; any overlap counts as inside.

    Args:
        mask: (N, H, W) bool, H >= gh and W >= gw.
        grid_size: (gh, gw).

    Returns:
        (N, gh, gw) bool; cell (r, c) is True if any pixel of its span (see
        :func:`cell_edges`) is True.
    """
    _, h, w = mask.shape
    gh, gw = grid_size
    if h < gh or w < gw:
        raise ValueError(f"region_to_grid: mask {h}x{w} is smaller than the grid {gh}x{gw}")
    rows = np.logical_or.reduceat(mask, cell_edges(h, gh)[:-1], axis=1)
    return np.logical_or.reduceat(rows, cell_edges(w, gw)[:-1], axis=2)


def _region_prototypes(
    feats: torch.Tensor, flat_cells: np.ndarray, n_cells_per_image: int, config: PrototypeConfig
) -> tuple[list[torch.Tensor], list[int], list[int], list[np.ndarray]]:
    """Prototypes of one region (fg or bg) as (vectors, kinds, image index, members)."""
    vecs: list[torch.Tensor] = []
    kinds: list[int] = []
    images: list[int] = []
    members: list[np.ndarray] = []
    if len(flat_cells) == 0:
        return vecs, kinds, images, members
    x = feats[torch.from_numpy(flat_cells)]
    if config.class_level:
        vecs.append(x.mean(0))
        kinds.append(PrototypeKind.CLASS)
        images.append(-1)
        members.append(flat_cells)
    if config.instance_level:
        img_of = flat_cells // n_cells_per_image
        for i in np.unique(img_of):
            sel = img_of == i
            vecs.append(x[torch.from_numpy(sel)].mean(0))
            kinds.append(PrototypeKind.INSTANCE)
            images.append(int(i))
            members.append(flat_cells[sel])
    if config.part_level and config.n_parts > 0:
        km = kmeans(
            x,
            config.n_parts,
            seed=config.seed,
            max_iter=config.kmeans_max_iter,
            tol=config.kmeans_tol,
        )
        labels = km.labels.numpy()
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
            :func:`cell_edges`).
        extractor: the extractor's name, recorded in the bank.
        config: prototype settings (K, seed, which levels).

    Returns:
        A :class:`PrototypeBank` with foreground prototypes first (class, instances,
        parts), then background ones in the same order. Empty regions give no prototypes.
        Vectors are L2-normalised; each is the exact mean of its member cells' features.
    """
    config = config or PrototypeConfig()
    if features.ndim != 4 or features.shape[0] != len(support):
        raise ValueError(
            f"build_bank: features must be (N={len(support)}, D, gh, gw), got "
            f"{tuple(features.shape)}"
        )
    _, d, gh, gw = features.shape
    flat_feats = features.detach().to(torch.float32).permute(0, 2, 3, 1).reshape(-1, d)
    all_vecs: list[torch.Tensor] = []
    fg_flags: list[bool] = []
    kinds: list[int] = []
    images: list[int] = []
    members: list[np.ndarray] = []
    for is_fg, mask in ((True, support.foreground), (False, support.background)):
        grid = region_to_grid(mask, (gh, gw))
        flat_cells = np.flatnonzero(grid.reshape(-1)).astype(np.int64)
        v, k, i, m = _region_prototypes(flat_feats, flat_cells, gh * gw, config)
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
    vectors = F.normalize(torch.stack(all_vecs), dim=1)
    offsets = np.zeros(len(members) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(m) for m in members])
    return PrototypeBank(
        category=support.category,
        extractor=extractor,
        vectors=vectors.contiguous(),
        foreground=torch.tensor(fg_flags, dtype=torch.bool),
        kinds=torch.tensor(kinds, dtype=torch.int8),
        image_index=torch.tensor(images, dtype=torch.int32),
        member_offsets=torch.from_numpy(offsets),
        member_cells=torch.from_numpy(np.concatenate(members)),
        grid_size=(gh, gw),
        image_size=support.image_size,
        settings={"prototypes": config.to_dict(), "algorithm_version": ALGORITHM_VERSION},
    )
