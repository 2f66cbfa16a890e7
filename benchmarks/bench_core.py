"""Speed of the core algorithm on realistic sizes, each compared side by side in one run.

    python benchmarks/bench_core.py            # full sizes, a few minutes on 2 CPU cores
    python benchmarks/bench_core.py --quick    # smaller sizes: a smoke run of the script

Three measurements, printed as one table at the end:

1. Part K-means (``ovdiff_core.kmeans.kmeans``) against
   ``sklearn.cluster.KMeans(n_clusters=32, n_init="auto", random_state=0)`` on the same
   float32 points: 32 support images x a 64x64 feature grid x 30% foreground = 39,321
   points, 768-d and 7680-d, drawn from a mixture of 50 Gaussian blobs of different
   spreads plus 5% uniform-ish noise points. Time ratio (sklearn / ours) and inertia ratio
   (ours / sklearn; < 1 means ours found the better clustering).
2. Scoring a 448x448 target against 20 classes x 130 prototypes (65 fg + 65 bg) x 3
   extractors (7680-d stride 8, 768-d stride 8, 768-d stride 16). The extractors return
   fixed random features computed before timing, so only scoring is timed. Ours is
   ``ovdiff_core.segment`` (pre-filter off), windows off and on; its first call with a set
   of banks also packs all their prototypes into one matrix, which later calls with the
   same banks reuse (both times are shown). The baseline is a
   straightforward per-class loop over the same views and features: per (extractor,
   view), normalise the features; per class, one product with its foreground prototypes
   and one with its background prototypes, max over prototypes; background = running
   max over classes; clamp at 0; one bilinear ``F.interpolate`` of the (C + 1) maps to the
   view; sum into the image and divide by the view count. It keeps no winners or
   similarity maps (ours does, for tracing). "GEMM floor" is the time of the bare
   (prototypes x features) float32 products of all views: the arithmetic both must do.
3. ``ovdiff_core.trace`` latency over 1,000 random clicks on a 480x640 target segmented
   with windows on (9 views x 3 extractors), 10 kept classes whose banks come from 32
   support images of 512x512 px (grids 64x64, 64x64, 32x32; every class, instance and
   part prototype has real member cells; part prototypes span all 32 images, the worst
   case for building the support masks). Trace latency does not depend on the feature
   dimension, so this segmentation uses 64-d features to save time.

Timings are wall-clock seconds on whatever machine runs this (K-means: one run each;
scoring: the faster of two runs each, alternating; trace: percentiles over all clicks);
ratios are measured in the same process, one right after the other. About 5 minutes on
an idle 2-core machine (sklearn's 7680-d K-means is most of it); more under load.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ovdiff_core.config import SegmentConfig
from ovdiff_core.kmeans import kmeans
from ovdiff_core.segment import segment, view_boxes
from ovdiff_core.standins import FixedExtractor, random_categories
from ovdiff_core.trace import trace
from ovdiff_core.types import Category

# the module, not the function the package exports under the same name
segment_module = importlib.import_module("ovdiff_core.segment")

Row = tuple[str, str, str, str]


def _timed(fn: Callable[[], object]) -> tuple[float, object]:
    """Wall time of one call, and its result."""
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


# --------------------------------------------------------------------------- K-means


def blobs(n: int, d: int, centres: int = 50, seed: int = 0) -> torch.Tensor:
    """(n, d) float32: a mixture of ``centres`` Gaussian blobs of varied spread + 5% noise."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(centres, d, generator=g)
    label = torch.randint(centres, (n,), generator=g)
    spread = 0.3 + 0.6 * torch.rand(centres, generator=g)
    x = mu[label] + torch.randn(n, d, generator=g) * spread[label, None]
    noise = torch.rand(n, generator=g) < 0.05
    x[noise] = 1.5 * torch.randn(int(noise.sum()), d, generator=g)
    return x


def bench_kmeans(quick: bool) -> list[Row]:
    from sklearn.cluster import KMeans

    n = 4096 if quick else 32 * 64 * 64 * 30 // 100  # 39,321 points
    rows: list[Row] = []
    for d in (256, 2048) if quick else (768, 7680):
        x = blobs(n, d)
        kmeans(x[:2000], 32)  # warm up torch kernels
        t_ours, res = _timed(lambda x=x: kmeans(x, 32, seed=0))
        ours = res.inertia  # type: ignore[attr-defined]
        xn = x.numpy()
        t_sk, sk = _timed(lambda xn=xn: KMeans(32, n_init="auto", random_state=0).fit(xn))
        theirs = float(sk.inertia_)  # type: ignore[attr-defined]
        it_o, it_s = res.n_iter, sk.n_iter_  # type: ignore[attr-defined]
        rows.append(
            (
                f"K-means {n:,} x {d}, K=32",
                f"ours {t_ours:.2f} s ({it_o} it)",
                f"sklearn {t_sk:.2f} s ({it_s} it)",
                f"{t_sk / t_ours:.1f}x faster; inertia ratio {ours / theirs:.4f}",
            )
        )
        print(rows[-1], flush=True)
        del x, xn
    return rows


# --------------------------------------------------------------------------- scoring


def baseline_segment(
    image: np.ndarray,
    categories: list[Category],
    extractors: list[FixedExtractor],
    config: SegmentConfig,
) -> tuple[np.ndarray, np.ndarray]:
    """Straightforward per-class scoring (see module docstring); input must be processed-size."""
    h, w = image.shape[:2]
    assert min(h, w) == config.short_side, "baseline assumes no resizing"
    tensor = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0
    n_ch = len(categories) + 1
    acc = torch.zeros(n_ch, h, w)
    count = torch.zeros(h, w)
    with torch.inference_mode():
        for ex in extractors:
            for top, left, vh, vw in view_boxes((h, w), config):
                feats = ex(tensor[:, :, top : top + vh, left : left + vw])[0]
                d, gh, gw = feats.shape
                f = F.normalize(feats.reshape(d, gh * gw), dim=0)
                maps = []
                background = None
                for cat in categories:
                    bank = cat.banks[ex.name]
                    maps.append((bank.vectors[bank.foreground] @ f).amax(0))
                    bg = (bank.vectors[~bank.foreground] @ f).amax(0)
                    background = bg if background is None else torch.maximum(background, bg)
                assert background is not None
                stack = torch.stack([background, *maps]).clamp(min=0).reshape(n_ch, gh, gw)
                up = F.interpolate(stack[None], size=(vh, vw), mode="bilinear", align_corners=False)
                acc[:, top : top + vh, left : left + vw] += up[0]
                count[top : top + vh, left : left + vw] += 1
    scores = acc / count
    return scores.argmax(0).numpy(), scores.numpy()


def gemm_floor(
    image: np.ndarray,
    categories: list[Category],
    extractors: list[FixedExtractor],
    config: SegmentConfig,
) -> float:
    """Seconds of the bare float32 (all prototypes) x (view features) products."""
    h, w = image.shape[:2]
    work = []
    for ex in extractors:
        protos = torch.cat([c.banks[ex.name].vectors for c in categories]).contiguous()
        for _, _, vh, vw in view_boxes((h, w), config):
            feats = ex(torch.zeros(1, 3, vh, vw))[0]
            work.append((protos, feats.reshape(feats.shape[0], -1).contiguous()))
    t = time.perf_counter()
    for protos, f in work:
        torch.mm(protos, f)
    return time.perf_counter() - t


def bench_scoring(quick: bool) -> list[Row]:
    n_classes = 5 if quick else 20
    extractors = [
        FixedExtractor("sd", 7680, 8, 0),
        FixedExtractor("dino", 768, 8, 1),
        FixedExtractor("clip", 768, 16, 2),
    ]
    # 20 classes x (1 + 32 + 32) fg + as many bg = 130 prototypes per class and extractor
    cats = random_categories(extractors, n_classes, n_images=32, image_px=64, n_parts=32)
    image = np.random.default_rng(0).integers(0, 256, (448, 448, 3), dtype=np.uint8)
    rows: list[Row] = []
    for windows in (False, True):
        cfg = SegmentConfig(windows=windows, prefilter=False)
        for ex in extractors:  # make the fixed features now, outside the timings
            for _, _, vh, vw in view_boxes((448, 448), cfg):
                ex(torch.zeros(1, 3, vh, vw))
        # Two timed runs each, alternating, keeping the faster (the first of each also
        # provides the outputs compared below). Our first call with a set of banks also
        # packs their prototypes into one matrix (cached for later calls): reported apart.
        segment_module._PACK_CACHE.clear()
        t_cold, seg = _timed(lambda cfg=cfg: segment(image, cats, extractors, cfg))
        t_base, base = _timed(lambda cfg=cfg: baseline_segment(image, cats, extractors, cfg))
        t_ours = _timed(lambda cfg=cfg: segment(image, cats, extractors, cfg))[0]
        t_base = min(
            t_base, _timed(lambda cfg=cfg: baseline_segment(image, cats, extractors, cfg))[0]
        )
        t_ours = min(t_ours, _timed(lambda cfg=cfg: segment(image, cats, extractors, cfg))[0])
        base_labels, base_scores = base  # type: ignore[misc]
        agree = float((seg.labels == base_labels).mean())  # type: ignore[attr-defined]
        err = float(np.abs(seg.scores - base_scores).max())  # type: ignore[attr-defined]
        t_gemm = min(gemm_floor(image, cats, extractors, cfg) for _ in range(2))
        n_views = len(view_boxes((448, 448), cfg))
        rows.append(
            (
                f"score 448x448, {n_classes} cls x 130 protos x 3 ex, "
                f"windows {'on' if windows else 'off'} ({n_views} views)",
                f"ours {t_ours:.2f} s (first call {t_cold:.2f} s)",
                f"per-class loop {t_base:.2f} s; GEMM floor {t_gemm:.2f} s",
                f"{t_base / t_ours:.2f}x faster; ours = {t_ours / t_gemm:.2f}x floor; "
                f"labels agree {agree:.4f}, max |score diff| {err:.1e}",
            )
        )
        print(rows[-1], flush=True)
    return rows


# --------------------------------------------------------------------------- trace


def bench_trace(quick: bool) -> list[Row]:
    extractors = [
        FixedExtractor("sd", 64, 8, 0),
        FixedExtractor("dino", 64, 8, 1),
        FixedExtractor("clip", 64, 16, 2),
    ]
    n_images = 8 if quick else 32
    cats = random_categories(extractors, 10, n_images=n_images, image_px=512, n_parts=32)
    image = np.random.default_rng(1).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    seg = segment(image, cats, extractors, SegmentConfig(windows=True, prefilter=False))
    rng = np.random.default_rng(2)
    clicks = 200 if quick else 1000
    latencies = []
    regions = []
    for _ in range(clicks):
        x, y = int(rng.integers(640)), int(rng.integers(480))
        t = time.perf_counter()
        tr = trace(seg, x, y)
        latencies.append(time.perf_counter() - t)
        regions.append(len(tr.regions))
    ms = np.array(latencies) * 1e3
    p50, p95, pmax = np.percentile(ms, [50, 95, 100])
    return [
        (
            f"trace, 480x640, {len(seg.views)} passes, 10 cls, {n_images} support imgs 512px",
            f"p50 {p50:.2f} ms, p95 {p95:.2f} ms",
            f"first click {ms[0]:.2f} ms, max {pmax:.2f} ms",
            f"{clicks} clicks; mean {np.mean(regions):.1f} support masks per trace",
        )
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run)")
    parser.add_argument(
        "--only", choices=("kmeans", "scoring", "trace"), action="append", help="run a subset"
    )
    args = parser.parse_args()
    parts = args.only or ["kmeans", "scoring", "trace"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    start = time.perf_counter()
    rows: list[Row] = []
    if "kmeans" in parts:
        rows += bench_kmeans(args.quick)
    if "scoring" in parts:
        rows += bench_scoring(args.quick)
    if "trace" in parts:
        rows += bench_trace(args.quick)
    print()
    print("| benchmark | ours | baseline | result |")
    print("|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
