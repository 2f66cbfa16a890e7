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
  prototypes can be traced back to the support cells that formed them);
* the points may be a :class:`Rows` source instead of a tensor: every pass then reads
  them chunk by chunk, so a caller can cluster rows gathered on the fly from a larger
  tensor (the prototypes' region cells) without holding an (n, D) copy;
* everything runs on the points' device (a CUDA tensor is clustered on the GPU and the
  result stays there), except the random draws: they come from a CPU generator (seed
  sampling, subsample, candidate centres), so a seed picks the same draws everywhere.
  Points on Apple's MPS are clustered on the CPU (MPS has no float64).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

__all__ = ["KMeansResult", "Rows", "kmeans"]

# The k-means++ seeding looks at a random subsample of at most this many points.
SEED_SAMPLE = 8192
# Elements per chunk of the float64 passes over the points (a float64 chunk fits in L2).
_CHUNK_ELEMENTS = 1 << 18
# Elements per chunk of a pass over a Rows source (float32: 8 MB).
_PASS_ELEMENTS = 1 << 21


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


@runtime_checkable
class Rows(Protocol):
    """n points of dimension D read in chunks (the protocol :func:`kmeans` accepts).

    ``shape`` is (n, D); ``chunks(rows)`` yields ``(offset, block)`` with ``block`` an
    (m, D) float32 tensor (any strides) of rows ``offset .. offset + m - 1``, m <= ``rows``,
    covering all rows in order; ``take(index)`` returns the (len(index), D) float32 rows
    ``index`` (int64, on the CPU or the rows' device). Blocks may live on any device
    (all on the same one); :func:`kmeans` computes there. An optional ``subset(index)``
    (ascending int64) returns a :class:`Rows` of those rows; with it, the seeding reads
    its subsample from the source at each step instead of holding a copy when that copy
    would exceed a chunk or the optional ``spare_elements`` attribute; an optional
    ``dots(c)`` returning the (n, t) products ``rows @ c.T`` then replaces the chunked
    distance pass.
    """

    @property
    def shape(self) -> tuple[int, int]: ...

    def chunks(self, rows: int) -> Iterator[tuple[int, torch.Tensor]]: ...

    def take(self, index: torch.Tensor) -> torch.Tensor: ...


class _TensorRows:
    """:class:`Rows` over an (n, D) float32 tensor: chunks are views."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.x.shape[0]), int(self.x.shape[1]))

    def chunks(self, rows: int) -> Iterator[tuple[int, torch.Tensor]]:
        for lo in range(0, self.x.shape[0], max(1, rows)):
            yield lo, self.x[lo : lo + rows]

    def take(self, index: torch.Tensor) -> torch.Tensor:
        return self.x[index.to(self.x.device)]


def _sq_dists(x: torch.Tensor, x_sq: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """(n, k) squared Euclidean distances, clamped at 0 against rounding."""
    d = torch.addmm(c.square().sum(1)[None, :], x, c.T, alpha=-2.0)
    d += x_sq[:, None]
    return d.clamp_(min=0.0)


def _seed(x: torch.Tensor, x_sq: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """Greedy k-means++: indices (into ``x``) of k initial centres, fewer if points run out."""
    return _seed_with(
        lambda c: _sq_dists(x, x_sq, c), lambda i: x[i.to(x.device)], x.shape[0], k, gen
    )


def _seed_with(
    dists: Callable[[torch.Tensor], torch.Tensor],
    take: Callable[[torch.Tensor], torch.Tensor],
    n: int,
    k: int,
    gen: torch.Generator,
) -> torch.Tensor:
    """:func:`_seed` over points given by ``dists(centres) -> (n, t)`` squared distances
    and ``take(index) -> (len, D)`` rows."""
    trials = 2 + int(math.log(k))
    first = int(torch.randint(n, (1,), generator=gen, device="cpu"))
    chosen = [first]
    closest = dists(take(torch.tensor([first], device="cpu")))[:, 0]
    for _ in range(1, k):
        if float(closest.sum()) <= 0.0:  # every point coincides with a centre already
            break
        # Drawn on the CPU (the generator's device): the same draws on every device.
        weights = closest.to("cpu", torch.float32)
        cand = torch.multinomial(weights, trials, replacement=True, generator=gen)
        d = dists(take(cand))  # (n, trials)
        torch.minimum(d, closest[:, None], out=d)
        best = int(d.sum(0).argmin())
        chosen.append(int(cand[best]))
        closest = d[:, best].contiguous()
    return torch.tensor(chosen, dtype=torch.long, device="cpu")


def _seed_streamed(x: Rows, x_sq: torch.Tensor, sample: torch.Tensor, k: int, gen: torch.Generator):
    """:func:`_seed` on ``x``'s rows ``sample`` without holding them: each step reads
    them from ``x`` in ascending order (``x.subset``) and puts the distances back in
    ``sample`` order. Returns indices into ``sample``."""
    ascending, where = torch.sort(sample)
    rows = x.subset(ascending)  # type: ignore[attr-defined]
    dev = x_sq.device
    sq = x_sq[ascending.to(dev)]
    where = where.to(dev)

    def dists(c: torch.Tensor) -> torch.Tensor:
        out = torch.empty(len(sample), c.shape[0], dtype=torch.float32, device=dev)
        if hasattr(rows, "dots"):  # products computed in place by the source
            d = rows.dots(c).mul_(-2.0).add_(c.square().sum(1)[None, :])
            d += sq[:, None]
            out[where] = d.clamp_(min=0.0)
            return out
        for lo, block in rows.chunks(_pass_rows(rows)):
            hi = lo + block.shape[0]
            out[where[lo:hi]] = _sq_dists(block, sq[lo:hi], c)
        return out

    return _seed_with(dists, lambda i: x.take(sample[i]), len(sample), k, gen)


def _step(d: int) -> int:
    """Rows per cache-sized chunk (float64 copies of them stay in L2)."""
    return max(1, _CHUNK_ELEMENTS // max(1, d))


def _row_sq_norms64(x: Rows) -> torch.Tensor:
    """(n, ) float64 squared row norms, accumulated in float64 chunk by chunk."""
    n, d = x.shape
    step = _step(d)
    out: torch.Tensor | None = None
    for base, block in x.chunks(_pass_rows(x)):
        if out is None:
            out = torch.empty(n, dtype=torch.float64, device=block.device)
        for lo in range(0, block.shape[0], step):
            rows = block[lo : lo + step].double().contiguous()
            out[base + lo : base + lo + rows.shape[0]] = torch.linalg.vector_norm(rows, dim=1)
    assert out is not None  # n >= 1: at least one chunk
    return out.square_()


def _pass_rows(x: Rows) -> int:
    """Rows per chunk of a full pass: all of a tensor, else about 32 MB of float32."""
    n, d = x.shape
    return n if isinstance(x, _TensorRows) else max(1, _PASS_ELEMENTS // max(1, d))


def _assign(x: Rows, x_sq: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n,) squared distance of each point to its closest centre and that centre's index."""
    n = x.shape[0]
    mind = torch.empty(n, dtype=torch.float32, device=c.device)
    labels = torch.empty(n, dtype=torch.long, device=c.device)
    for lo, block in x.chunks(_pass_rows(x)):
        hi = lo + block.shape[0]
        torch.min(_sq_dists(block, x_sq[lo:hi], c), 1, out=(mind[lo:hi], labels[lo:hi]))
    return mind, labels


def _means(x: Rows, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(k, D) means of the points of each label (zeros for empty labels), (k,) counts."""
    sums = torch.zeros(k, x.shape[1], dtype=torch.float32, device=labels.device)
    for lo, block in x.chunks(_pass_rows(x)):
        sums.index_add_(0, labels[lo : lo + block.shape[0]], block)
    counts = torch.bincount(labels, minlength=k)
    return sums / counts.clamp(min=1)[:, None].to(sums.dtype), counts


def _final_clusters(
    x: Rows, x_sq64: torch.Tensor, labels: torch.Tensor, k: int
) -> tuple[torch.Tensor, float]:
    """Exact cluster means (float64 sums, rounded to float32) and the inertia.

    The inertia uses ``sum over a cluster of |x - mean|^2 = sum |x|^2 - |sum x|^2 / n`` with
    float64 sums, so it needs no further pass over the points and stays accurate even
    when the points share a large offset.
    """
    step = _step(x.shape[1])
    sums = torch.zeros(k, x.shape[1], dtype=torch.float64, device=labels.device)
    for base, block in x.chunks(_pass_rows(x)):
        for lo in range(0, block.shape[0], step):
            rows = block[lo : lo + step]
            sums.index_add_(0, labels[base + lo : base + lo + rows.shape[0]], rows.double())
    counts = torch.bincount(labels, minlength=k).double()
    inertia = float(x_sq64.sum()) - float((sums.square().sum(1) / counts).sum())
    return (sums / counts[:, None]).to(torch.float32), max(inertia, 0.0)


def kmeans(
    x: torch.Tensor | Rows, k: int, seed: int = 0, max_iter: int = 100, tol: float = 1e-4
) -> KMeansResult:
    """Cluster the rows of ``x`` into at most ``k`` clusters.

    Args:
        x: (n, D) float tensor, n >= 1, or a :class:`Rows` source of float32 rows (read
            in chunks of about 8 MB). Both give the same result for the same rows. Any
            device: the clustering runs there (MPS: on the CPU).
        k: requested number of clusters (>= 1). With n <= k every distinct point is its
            own cluster.
        seed: seed of the k-means++ sampling; equal inputs and seed give equal outputs.
        max_iter: maximum Lloyd iterations (>= 1).
        tol: stop when ``(previous - current) inertia <= tol * previous``.

    Returns:
        :class:`KMeansResult`, its tensors on the points' device (the CPU for MPS
        points); clusters are never empty.
    """
    if isinstance(x, torch.Tensor):
        if x.ndim != 2 or x.shape[0] < 1:
            raise ValueError(f"kmeans: x must be (n, D) with n >= 1, got {tuple(x.shape)}")
        x = x.detach()
        if x.device.type == "mps":  # no float64 on MPS
            x = x.to("cpu")
        x = _TensorRows(x.to(torch.float32).contiguous())
    elif not isinstance(x, Rows) or len(x.shape) != 2 or x.shape[0] < 1:
        raise ValueError("kmeans: x must be an (n, D) tensor or a Rows source with n >= 1")
    if k < 1:
        raise ValueError(f"kmeans: k must be >= 1, got {k}")
    if max_iter < 1:
        raise ValueError(f"kmeans: max_iter must be >= 1, got {max_iter}")
    n = x.shape[0]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x_sq64 = _row_sq_norms64(x)
    dev = x_sq64.device
    x_sq = x_sq64.to(torch.float32)
    if not bool(torch.isfinite(x_sq).all()):  # NaN / inf anywhere in a row shows up here
        raise ValueError("kmeans: x contains NaN or infinite values; clean the features first")

    # Indices drawn on the CPU (sample, start): ``take`` moves them to the points.
    sample = (
        torch.randperm(n, generator=gen, device="cpu")[:SEED_SAMPLE] if n > SEED_SAMPLE else None
    )
    if isinstance(x, _TensorRows):
        if sample is None:
            start = _seed(x.x, x_sq, min(k, n), gen)
        else:
            on_dev = sample.to(dev)
            start = sample[_seed(x.x[on_dev], x_sq[on_dev], min(k, n), gen)]
    else:
        # Read the (sub)sample from the source at every seeding step rather than hold it
        # when holding it would take more than a pass's chunk (no copy of the points).
        sample = torch.arange(n, device="cpu") if sample is None else sample
        spare = max(_PASS_ELEMENTS, int(getattr(x, "spare_elements", 0)))
        if len(sample) * x.shape[1] <= spare or not hasattr(x, "subset"):
            start = sample[_seed(x.take(sample), x_sq[sample.to(dev)], min(k, n), gen)]
        else:
            start = sample[_seed_streamed(x, x_sq, sample, min(k, n), gen)]
    centres = x.take(start).clone()

    prev = math.inf
    it = 0
    for it in range(1, max_iter + 1):
        mind, labels = _assign(x, x_sq, centres)
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
            centres[empty] = x.take(far)
            prev = math.inf

    # Centroids as the exact means of their members (provenance); drop empty clusters.
    used = torch.unique(labels)
    remap = torch.full((centres.shape[0],), -1, dtype=torch.long, device=dev)
    remap[used] = torch.arange(len(used), device=dev)
    labels = remap[labels]
    centres, inertia = _final_clusters(x, x_sq64, labels, len(used))
    return KMeansResult(centroids=centres, labels=labels, inertia=inertia, n_iter=it)
