"""K-means for part prototypes: greedy k-means++ seeding and Lloyd iterations in torch.

The part prototypes of a category are the centroids of K-means over all of its region
features (about 40k points of 768 to 7680 dimensions in the paper's setting). This is
written for that case: distances come from one matrix product per iteration, the seeding
is the greedy variant of k-means++ (a few candidate centres per step, keep the one that
lowers the potential most), and iterations stop as soon as the inertia stops improving
by more than ``tol`` (relative) rather than waiting for centres to stop moving.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["KMeansResult", "kmeans"]


@dataclass
class KMeansResult:
    """Result of :func:`kmeans`.

    Attributes:
        centroids: (k', D) float32; k' <= k (fewer when there are fewer distinct points).
            Each centroid is exactly the mean of the points labelled with it.
        labels: (n,) int64 in [0, k').
        inertia: sum of squared distances of points to their centroid.
        n_iter: Lloyd iterations run.
    """

    centroids: torch.Tensor
    labels: torch.Tensor
    inertia: float
    n_iter: int


def _sq_dists(x: torch.Tensor, x_sq: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """(n, k) squared Euclidean distances, clamped at 0 against rounding."""
    d = torch.addmm(c.square().sum(1)[None, :], x, c.T, alpha=-2.0)
    d += x_sq[:, None]
    return d.clamp_(min=0.0)


def _seed(x: torch.Tensor, x_sq: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """Greedy k-means++: indices of k initial centres (fewer if points run out)."""
    n = x.shape[0]
    trials = 2 + int(math.log(k))
    first = int(torch.randint(n, (1,), generator=gen))
    chosen = [first]
    closest = _sq_dists(x, x_sq, x[first : first + 1])[:, 0]
    for _ in range(1, k):
        potential = float(closest.sum())
        if potential <= 0.0:  # every point coincides with a centre already
            break
        cand = torch.multinomial(closest, trials, replacement=True, generator=gen)
        d = _sq_dists(x, x_sq, x[cand])  # (n, trials)
        new_closest = torch.minimum(closest[:, None], d)
        best = int(new_closest.sum(0).argmin())
        chosen.append(int(cand[best]))
        closest = new_closest[:, best].contiguous()
    return torch.tensor(chosen, dtype=torch.long)


def _means(x: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    sums = torch.zeros(k, x.shape[1], dtype=x.dtype).index_add_(0, labels, x)
    counts = torch.bincount(labels, minlength=k)
    return sums / counts.clamp(min=1)[:, None].to(x.dtype), counts


def kmeans(
    x: torch.Tensor, k: int, seed: int = 0, max_iter: int = 100, tol: float = 1e-4
) -> KMeansResult:
    """Cluster the rows of ``x`` into at most ``k`` clusters.

    Args:
        x: (n, D) float tensor, n >= 1.
        k: requested number of clusters (>= 1). With n <= k every distinct point is its
            own cluster.
        seed: seed of the k-means++ sampling; equal inputs and seed give equal outputs.
        max_iter: maximum Lloyd iterations.
        tol: stop when ``(previous - current) inertia <= tol * previous``.

    Returns:
        :class:`KMeansResult`; clusters are never empty.
    """
    if x.ndim != 2 or x.shape[0] < 1:
        raise ValueError(f"kmeans: x must be (n, D) with n >= 1, got {tuple(x.shape)}")
    if k < 1:
        raise ValueError(f"kmeans: k must be >= 1, got {k}")
    x = x.detach().to(torch.float32).contiguous()
    n = x.shape[0]
    gen = torch.Generator().manual_seed(seed)
    x_sq = x.square().sum(1)
    centres = x[_seed(x, x_sq, min(k, n), gen)].clone()

    prev = math.inf
    it = 0
    labels = torch.zeros(n, dtype=torch.long)
    for it in range(1, max_iter + 1):  # noqa: B007 - n_iter is reported
        d = _sq_dists(x, x_sq, centres)
        mind, labels = d.min(1)
        inertia = float(mind.sum())
        centres, counts = _means(x, labels, centres.shape[0])
        empty = torch.nonzero(counts == 0).flatten()
        if len(empty):  # move empty centres onto the points farthest from their centre
            far = torch.topk(mind, len(empty)).indices
            centres[empty] = x[far]
            prev = math.inf
            continue
        if prev - inertia <= tol * prev:
            break
        prev = inertia

    # Final assignment, then centroids as exact means of their members (provenance).
    d = _sq_dists(x, x_sq, centres)
    mind, labels = d.min(1)
    used = torch.unique(labels)
    remap = torch.full((centres.shape[0],), -1, dtype=torch.long)
    remap[used] = torch.arange(len(used))
    labels = remap[labels]
    centres, _ = _means(x, labels, len(used))
    inertia = float((x - centres[labels]).square().sum())
    return KMeansResult(centroids=centres, labels=labels, inertia=inertia, n_iter=it)
