"""K-means for part prototypes: determinism, degenerate inputs, exact means, quality."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ovdiff_core.kmeans as kmeans_module
from ovdiff_core.kmeans import kmeans


def blobs(n: int, d: int, centers: int, std: float, seed: int) -> np.ndarray:
    from sklearn.datasets import make_blobs

    x, _ = make_blobs(n, d, centers=centers, cluster_std=std, random_state=seed)
    return x.astype(np.float32)


def check_invariants(x: torch.Tensor, res: kmeans_module.KMeansResult) -> None:
    """Labels in range, no empty cluster, centroids are member means, inertia is exact."""
    k = res.centroids.shape[0]
    assert res.labels.dtype == torch.int64 and res.labels.shape == (x.shape[0],)
    assert res.centroids.dtype == torch.float32 and res.centroids.shape[1] == x.shape[1]
    counts = torch.bincount(res.labels, minlength=k)
    assert counts.shape == (k,) and bool((counts > 0).all()), "a cluster is empty"
    xd = x.double()
    for j in range(k):
        mean = xd[res.labels == j].mean(0)
        torch.testing.assert_close(res.centroids[j].double(), mean, rtol=1e-5, atol=1e-5)
    inertia = float((xd - res.centroids.double()[res.labels]).square().sum())
    assert res.inertia == pytest.approx(inertia, rel=1e-5, abs=1e-6)


def test_same_seed_same_result_and_invariants() -> None:
    x = torch.from_numpy(blobs(600, 12, centers=10, std=2.0, seed=0))
    a = kmeans(x, 6, seed=3)
    b = kmeans(x.clone(), 6, seed=3)
    assert torch.equal(a.centroids, b.centroids)
    assert torch.equal(a.labels, b.labels)
    assert a.inertia == b.inertia and a.n_iter == b.n_iter
    assert a.centroids.shape == (6, 12)
    check_invariants(x, a)


def test_seed_sampling_on_large_inputs_is_deterministic_and_valid() -> None:
    # More points than the seeding subsample: the subsample itself must be seeded.
    n = kmeans_module.SEED_SAMPLE + 500
    x = torch.from_numpy(blobs(n, 4, centers=12, std=1.0, seed=1))
    a, b = kmeans(x, 12, seed=0), kmeans(x, 12, seed=0)
    assert torch.equal(a.labels, b.labels)
    check_invariants(x, a)


def test_fewer_points_than_clusters() -> None:
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 5.0], [3.0, 3.0], [-2.0, 1.0]])
    res = kmeans(x, 8)
    assert res.centroids.shape == (5, 2)
    assert res.inertia == pytest.approx(0.0, abs=1e-9)
    # every point is its own cluster, and the centroids are exactly the points
    assert sorted(res.labels.tolist()) == [0, 1, 2, 3, 4]
    assert torch.equal(res.centroids[res.labels], x)


def test_duplicate_points_give_one_cluster_per_distinct_value() -> None:
    values = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.0, 4.0], [7.0, 7.0, 7.0]])
    x = values[torch.tensor([0, 1, 2, 0, 0, 1, 2, 2, 2, 1, 0])]
    res = kmeans(x, 5)
    assert res.centroids.shape == (3, 3)
    assert res.inertia == pytest.approx(0.0, abs=1e-9)
    assert torch.equal(res.centroids[res.labels], x)
    check_invariants(x, res)

    same = torch.ones(7, 4)
    one = kmeans(same, 4)
    assert one.centroids.shape == (1, 4) and bool((one.labels == 0).all())
    assert one.inertia == pytest.approx(0.0, abs=1e-9)

    single = kmeans(torch.tensor([[2.0, -1.0]]), 3)
    assert single.centroids.tolist() == [[2.0, -1.0]] and single.labels.tolist() == [0]


def test_empty_clusters_are_refilled(monkeypatch: pytest.MonkeyPatch) -> None:
    # Three far-apart blobs; force a seeding with two identical centres so that one
    # centre loses every point in the first assignment. The result must still have
    # three non-empty clusters, one per blob.
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0]])
    x = torch.from_numpy((centres.repeat(20, 0) + rng.normal(0, 1, (60, 2))).astype(np.float32))
    monkeypatch.setattr(kmeans_module, "_seed", lambda *a, **k: torch.tensor([0, 0, 20]))
    res = kmeans(x, 3)
    check_invariants(x, res)
    assert res.centroids.shape == (3, 2)
    blob = np.repeat(np.arange(3), 20)
    # each blob is exactly one cluster
    for b in range(3):
        assert len(set(res.labels[blob == b].tolist())) == 1
    assert len(set(res.labels.tolist())) == 3


def test_runs_lloyd_to_a_fixed_point() -> None:
    # With tol=0 the iterations only stop when the inertia stops decreasing: every point
    # is then assigned to its nearest centroid.
    x = torch.from_numpy(blobs(800, 6, centers=15, std=2.5, seed=2))
    res = kmeans(x, 10, tol=0.0, max_iter=300)
    assert res.n_iter >= 2
    nearest = torch.cdist(x.double(), res.centroids.double()).argmin(1)
    assert torch.equal(nearest, res.labels)
    check_invariants(x, res)


def test_max_iter_bounds_the_iterations() -> None:
    x = torch.from_numpy(blobs(500, 5, centers=20, std=3.0, seed=3))
    res = kmeans(x, 10, max_iter=1)
    assert res.n_iter == 1
    check_invariants(x, res)


def test_separated_blobs_recovered_like_sklearn() -> None:
    from sklearn.cluster import KMeans
    from sklearn.datasets import make_blobs
    from sklearn.metrics import adjusted_rand_score

    x, truth = make_blobs(1500, 16, centers=6, cluster_std=0.5, random_state=4)
    x = x.astype(np.float32)
    res = kmeans(torch.from_numpy(x), 6)
    sk = KMeans(6, n_init="auto", random_state=0).fit(x)
    assert adjusted_rand_score(truth, res.labels.numpy()) == 1.0
    assert res.inertia == pytest.approx(float(sk.inertia_), rel=1e-4)


def test_inertia_within_one_percent_of_sklearn_on_blobs() -> None:
    # Overlapping blobs, fewer clusters than blobs: local optima differ run to run, so
    # compare the median ratio over several data sets (single runs vary by a few %).
    from sklearn.cluster import KMeans

    ratios = []
    for seed in range(5):
        x = blobs(2000, 16, centers=20, std=1.5, seed=seed)
        ours = kmeans(torch.from_numpy(x), 8, seed=0).inertia
        theirs = float(KMeans(8, n_init="auto", random_state=0).fit(x).inertia_)
        ratios.append(ours / theirs)
    assert float(np.median(ratios)) <= 1.01, ratios


@pytest.mark.parametrize(
    ("x", "k", "kwargs", "match"),
    [
        (torch.zeros(5), 2, {}, "x must be"),
        (torch.zeros(0, 3), 2, {}, "x must be"),
        (torch.zeros(4, 3), 0, {}, "k must be"),
        (torch.zeros(4, 3), 2, {"max_iter": 0}, "max_iter"),
        (torch.tensor([[0.0, 1.0], [float("nan"), 0.0]]), 2, {}, "NaN"),
        (torch.tensor([[0.0, 1.0], [float("inf"), 0.0]]), 2, {}, "NaN or infinite"),
    ],
)
def test_bad_input(x: torch.Tensor, k: int, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        kmeans(x, k, **kwargs)


def test_accepts_float64_and_returns_float32() -> None:
    x = torch.from_numpy(blobs(200, 3, centers=4, std=0.5, seed=5)).double()
    res = kmeans(x, 4)
    assert res.centroids.dtype == torch.float32
    check_invariants(x.float(), res)


def test_inertia_and_means_stay_exact_with_a_large_common_offset() -> None:
    # Features often share a big mean component; |x|^2 is then ~10^4 x the inertia.
    rng = np.random.default_rng(0)
    x = torch.from_numpy((rng.normal(size=(3000, 64)) * 0.05 + 10).astype(np.float32))
    res = kmeans(x, 8)
    check_invariants(x, res)
    direct = float((x.double() - res.centroids.double()[res.labels]).square().sum())
    assert res.inertia == pytest.approx(direct, rel=1e-7)


class ChunkedRows:
    """A :class:`~ovdiff_core.kmeans.Rows` source that hands out copies in small chunks."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x
        self.reads = 0

    @property
    def shape(self) -> tuple[int, int]:
        return (self.x.shape[0], self.x.shape[1])

    def chunks(self, rows: int):
        for lo in range(0, self.x.shape[0], 97):  # deliberately not the requested size
            self.reads += 1
            yield lo, self.x[lo : lo + 97].clone()

    def take(self, index: torch.Tensor) -> torch.Tensor:
        return self.x[index].clone()


@pytest.mark.parametrize("n", [500, 9000])  # without and with the seeding subsample
def test_a_chunked_rows_source_gives_the_tensor_result(n: int) -> None:
    x = torch.from_numpy(blobs(n, 24, 6, 2.0, seed=3))
    ref = kmeans(x, 8, seed=2)
    rows = ChunkedRows(x)
    res = kmeans(rows, 8, seed=2)
    assert rows.reads > 0
    assert torch.equal(res.labels, ref.labels) and res.n_iter == ref.n_iter
    torch.testing.assert_close(res.centroids, ref.centroids, rtol=0, atol=1e-6)
    assert res.inertia == pytest.approx(ref.inertia, rel=1e-9)
    check_invariants(x, res)
