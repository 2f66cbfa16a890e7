"""K-means for part prototypes: greedy k-means++ seeding and Lloyd iterations in torch.

The part prototypes of a category are the centroids of K-means over all of its region
features (about 40k points of 768 to 7680 dimensions in the paper's setting). This is
written for that case:

* distances come from one matrix product per iteration (float32 GEMM, squared norms of
  the points computed once);
* the seeding is the greedy variant of k-means++ (a few candidate centres per step, keep
  the one that lowers the potential most), run on a random subsample of at most
  ``SEED_SAMPLE`` points: seeding is sequential and memory-bound (one pass over the
  points per centre), and a subsample of a few thousand points places the initial
  centres about as well, after which Lloyd's iterations run on all points;
* iterations stop as soon as the inertia improves by no more than ``tol`` (relative),
  rather than waiting for centres to stop moving;
* the result's centroids are recomputed as the exact means of their members (so part
  prototypes can be traced back to the support cells that formed them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["KMeansResult", "kmeans"]

# The k-means++ seeding looks at a random subsample of at most this many points.
SEED_SAMPLE = 8192
# Elements per chunk of the float64 passes over the points (a float64 chunk fits in L2).
_CHUNK_ELEMENTS = 1 << 18


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
    """Greedy k-means++: indices (into ``x``) of k initial centres, fewer if points run out."""
    n = x.shape[0]
    trials = 2 + int(math.log(k))
    first = int(torch.randint(n, (1,), generator=gen))
    chosen = [first]
    closest = _sq_dists(x, x_sq, x[first : first + 1])[:, 0]
    for _ in range(1, k):
        if float(closest.sum()) <= 0.0:  # every point coincides with a centre already
            break
        cand = torch.multinomial(closest, trials, replacement=True, generator=gen)
        d = _sq_dists(x, x_sq, x[cand])  # (n, trials)
        torch.minimum(d, closest[:, None], out=d)
        best = int(d.sum(0).argmin())
        chosen.append(int(cand[best]))
        closest = d[:, best].contiguous()
    return torch.tensor(chosen, dtype=torch.long)


def _means(x: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(k, D) means of the points of each label (zeros for empty labels), (k,) counts."""
    sums = torch.zeros(k, x.shape[1], dtype=x.dtype).index_add_(0, labels, x)
    counts = torch.bincount(labels, minlength=k)
    return sums / counts.clamp(min=1)[:, None].to(x.dtype), counts


def _chunks(x: torch.Tensor) -> range:
    """Row offsets of cache-sized chunks of ``x`` (float64 copies of them stay in L2)."""
    return range(0, x.shape[0], max(1, _CHUNK_ELEMENTS // max(1, x.shape[1])))


def _row_sq_norms64(x: torch.Tensor) -> torch.Tensor:
    """(n,) float64 squared row norms, accumulated in float64 chunk by chunk."""
    step = max(1, _CHUNK_ELEMENTS // max(1, x.shape[1]))
    out = torch.empty(x.shape[0], dtype=torch.float64)
    for lo in _chunks(x):
        out[lo : lo + step] = torch.linalg.vector_norm(x[lo : lo + step].double(), dim=1)
    return out.square_()


def _final_clusters(
    x: torch.Tensor, x_sq64: torch.Tensor, labels: torch.Tensor, k: int
) -> tuple[torch.Tensor, float]:
    """Exact cluster means (float64 sums, rounded to float32) and the inertia.

    The inertia uses ``sum over a cluster of |x - mean|^2 = sum |x|^2 - |sum x|^2 / n`` with
    float64 sums, so it needs no further pass over the points and stays accurate even
    when the points share a large offset.
    """
    step = max(1, _CHUNK_ELEMENTS // max(1, x.shape[1]))
    sums = torch.zeros(k, x.shape[1], dtype=torch.float64)
    for lo in _chunks(x):
        sums.index_add_(0, labels[lo : lo + step], x[lo : lo + step].double())
    counts = torch.bincount(labels, minlength=k).double()
    inertia = float(x_sq64.sum()) - float((sums.square().sum(1) / counts).sum())
    return (sums / counts[:, None]).to(torch.float32), max(inertia, 0.0)


def kmeans(
    x: torch.Tensor, k: int, seed: int = 0, max_iter: int = 100, tol: float = 1e-4
) -> KMeansResult:
    """Cluster the rows of ``x`` into at most ``k`` clusters.

    Args:
        x: (n, D) float tensor, n >= 1.
        k: requested number of clusters (>= 1). With n <= k every distinct point is its
            own cluster.
        seed: seed of the k-means++ sampling; equal inputs and seed give equal outputs.
        max_iter: maximum Lloyd iterations (>= 1).
        tol: stop when ``(previous - current) inertia <= tol * previous``.

    Returns:
        :class:`KMeansResult`; clusters are never empty.
    """
    if x.ndim != 2 or x.shape[0] < 1:
        raise ValueError(f"kmeans: x must be (n, D) with n >= 1, got {tuple(x.shape)}")
    if k < 1:
        raise ValueError(f"kmeans: k must be >= 1, got {k}")
    if max_iter < 1:
        raise ValueError(f"kmeans: max_iter must be >= 1, got {max_iter}")
    x = x.detach().to(torch.float32).contiguous()
    n = x.shape[0]
    gen = torch.Generator().manual_seed(seed)
    x_sq64 = _row_sq_norms64(x)
    x_sq = x_sq64.to(torch.float32)
    if not bool(torch.isfinite(x_sq).all()):  # NaN / inf anywhere in a row shows up here
        raise ValueError("kmeans: x contains NaN or infinite values; clean the features first")

    if n > SEED_SAMPLE:
        sample = torch.randperm(n, generator=gen)[:SEED_SAMPLE]
        start = sample[_seed(x[sample], x_sq[sample], min(k, n), gen)]
    else:
        start = _seed(x, x_sq, min(k, n), gen)
    centres = x[start].clone()

    prev = math.inf
    it = 0
    for it in range(1, max_iter + 1):
        mind, labels = _sq_dists(x, x_sq, centres).min(1)
        inertia = float(mind.sum(dtype=torch.float64))
        if math.isfinite(prev) and prev - inertia <= tol * prev:
            break  # centres and labels of this assignment are final
        prev = inertia
        if it == max_iter:
            break
        centres, counts = _means(x, labels, centres.shape[0])
        empty = torch.nonzero(counts == 0).flatten()
        if len(empty):
            # Move empty centres onto the points farthest from their centre; those points
            # are then at distance 0 from a centre, so the cluster is not empty next time.
            far = torch.topk(mind, len(empty)).indices
            centres[empty] = x[far]
            prev = math.inf

    # Centroids as the exact means of their members (provenance); drop empty clusters.
    used = torch.unique(labels)
    remap = torch.full((centres.shape[0],), -1, dtype=torch.long)
    remap[used] = torch.arange(len(used))
    labels = remap[labels]
    centres, inertia = _final_clusters(x, x_sq64, labels, len(used))
    return KMeansResult(centroids=centres, labels=labels, inertia=inertia, n_iter=it)
