"""Stage 3 (``segment``) against the code before issue 8, side by side: time, size of the
result, peak memory and cost over the bare prototype products, for 1 to 150 classes.

    python benchmarks/bench_stage3.py                 # paper dims, 1..150 classes, 448 + 1024 px
    python benchmarks/bench_stage3.py --quick         # 1, 5, 20 classes at 448 px: a smoke run
    python benchmarks/bench_stage3.py --dims cpu      # the cpu preset's extractors and views

Setup (no model runs; only stage 3 is measured):

* Extractors: the ``paper`` preset's shapes, SD 7680-d stride 8, DINO 768-d stride 8 and
  CLIP 768-d stride 16, with the paper's windows (448 and 336 px, stride 224: 9 views, 27
  passes at 448x597); or (``--dims cpu``) the ``cpu`` preset's, CLIP 768-d stride 16 and
  DINOv2 384-d stride 14, one whole-image view at short side 320. Features come from
  :class:`ovdiff_core.standins.CodedExtractor` (a class's prototype plus noise in each
  region of a coded scene, so the labels look like a photo's: 12 rectangles of random
  classes) and are made once, before timing, then served from a cache. They are
  channels-last views of (h, w, D) cells, the layout the real DINO, CLIP and SD
  extractors return.
* Banks: :func:`ovdiff_core.standins.random_categories`, 32 support images and K = 32
  (the paper's: 65 foreground + 65 background prototypes per class and extractor).
* Images: 448x597 and 1024x1365 (short sides 448 and 1024, 3:4; both are processed at
  448x597).

Each (code, classes, size) runs in a fresh subprocess: one untimed warm-up call, then
``--repeats`` rounds (default 5 up to 20 classes, else 1) of the bare products followed
by a timed ``segment`` call; medians are reported. The first timed call has the
resident-set high-water mark reset just before it (``/proc/self/clear_refs``); "peak" is
``VmHWM`` after minus ``VmRSS`` before. "products" is the time of the bare float32 (all
prototypes) x (view features) products of every pass, on the features as the extractor
returned them, measured in the same process; "x products" is segment time / products
time (goal: 1.25 or less). "size" is the bytes the result holds (image, labels, score maps,
per-cell records, similarity maps; for the old code its dense score maps included). The
scores of both codes at 2,000 random pixels are compared (all channels), and the labels
everywhere (differences must be ties within 1e-5).
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ovdiff_core.config import FAST_SEGMENT, PAPER_SEGMENT, SegmentConfig
from ovdiff_core.segment import cell_matrix, processed_size, view_boxes
from ovdiff_core.standins import CodedExtractor, coded_scene, random_categories

DIMS = {
    "paper": [("sd", 7680, 8), ("dino", 768, 8), ("clip", 768, 16)],
    "cpu": [("clip", 768, 16), ("dinov2", 384, 14)],
}
CONFIGS = {"paper": PAPER_SEGMENT, "cpu": FAST_SEGMENT}


class Cached:
    """An extractor whose features for each distinct crop are made once, then reused."""

    def __init__(self, inner: CodedExtractor) -> None:
        self.inner, self.name, self.stride = inner, inner.name, inner.stride
        self.cache: dict[tuple, torch.Tensor] = {}

    def spec(self) -> dict[str, object]:
        return self.inner.spec()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        # a cheap fingerprint (a strided sample): the harness's cost stays out of the timing
        key = (*images.shape, round(float(images[:, :, ::8, ::8].sum()), 3))
        if key not in self.cache:
            self.cache[key] = self.inner(images)
        return self.cache[key]


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def old_nbytes(seg: Any) -> int:
    total = seg.image.nbytes + seg.labels.nbytes + seg.scores.nbytes
    total += sum(v.values.nbytes + v.winners.nbytes for v in seg.views)
    return total + sum(t.numel() * t.element_size() for t in seg.whole_view_sims.values())


def child(variant: str, n_classes: int, short: int, dims: str, out: str, repeats: int) -> None:
    """One measurement (median of ``repeats`` timed calls); writes a JSON summary and the
    sampled scores to ``out``."""
    torch.manual_seed(0)
    extractors = [Cached(CodedExtractor(n, d, s, i)) for i, (n, d, s) in enumerate(DIMS[dims])]
    cats = random_categories([e.inner for e in extractors], n_classes, 32, 64, 32)
    for e in extractors:
        e.inner.categories = cats
    size = (short, round(short * 4 / 3))
    image = coded_scene(size, n_classes, 12, seed=1)
    cfg: SegmentConfig = CONFIGS[dims].replace(prefilter=False)
    if variant == "old":
        segment = importlib.import_module("benchmarks.legacy.segment_v1").segment
    else:
        segment = importlib.import_module("ovdiff_core.segment").segment
    segment(image, cats, extractors, cfg)  # warm-up: features, packing, thread pools
    # bare products of every pass, on the same features
    hp, wp = processed_size(size, cfg.short_side)
    work = []
    for e in extractors:
        protos = torch.cat([c.banks[e.name].vectors for c in cats]).contiguous()
        for feats in e.cache.values():
            if (
                feats.shape[2] * e.stride <= hp + e.stride
                and feats.shape[3] * e.stride <= wp + e.stride
            ):
                mat, cells_major = cell_matrix(feats[0])  # the layout the extractor gave
                work.append((protos, mat.T if cells_major else mat))
    n_pass = len(view_boxes((hp, wp), cfg)) * len(extractors)
    work = work[-n_pass:]
    # interleaved repeats (medians): products, then segment; the first segment call
    # also gives the peak
    times: list[float] = []
    products_times: list[float] = []
    peak = 0
    for r in range(repeats):
        t = time.perf_counter()
        for p, f in work:
            torch.mm(p, f)
        products_times.append(time.perf_counter() - t)
        base = _status("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")
        t = time.perf_counter()
        seg = segment(image, cats, extractors, cfg)
        times.append(time.perf_counter() - t)
        if r == 0:
            peak = _status("VmHWM") - base
    seconds, products = float(np.median(times)), float(np.median(products_times))
    nbytes = old_nbytes(seg) if variant == "old" else seg.nbytes
    rng = np.random.default_rng(0)
    ys, xs = rng.integers(0, size[0], 2000), rng.integers(0, size[1], 2000)
    if variant == "old":
        sampled = seg.scores[:, ys, xs].T
    else:
        sampled = np.stack([seg.scores_at(int(x), int(y)) for y, x in zip(ys, xs, strict=True)])
    np.savez(out + ".npz", labels=seg.labels, sampled=sampled)
    summary = {
        "seconds": seconds,
        "products": products,
        "passes": len(work),
        "bytes": nbytes,
        "peak": peak,
    }
    Path(out + ".json").write_text(json.dumps(summary))


def run(variant: str, n: int, short: int, dims: str, tmp: Path, repeats: int) -> tuple[dict, Any]:
    out = str(tmp / f"{variant}-{n}-{short}")
    cmd = [sys.executable, __file__, "--child", variant, str(n), str(short), dims, out]
    cmd.append(str(repeats))
    subprocess.run(cmd, check=True, cwd=Path(__file__).resolve().parents[1])
    return json.loads(Path(out + ".json").read_text()), np.load(out + ".npz")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--dims", choices=list(DIMS), default="paper")
    parser.add_argument("--classes", default=None, help="comma-separated, e.g. 1,5,20,80,150")
    parser.add_argument("--sizes", default=None, help="short sides, e.g. 448,1024")
    parser.add_argument("--no-prefilter", action="store_true", help="skip the pre-filter row")
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed calls per row, medians reported (default: 5 up to 20 classes, else 1)",
    )
    parser.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        v, n, s, d, out, r = args.child
        child(v, int(n), int(s), d, out, int(r))
        return
    classes = [1, 5, 20] if args.quick else [1, 5, 20, 80, 150]
    sizes = [448] if args.quick else [448, 1024]
    if args.classes:
        classes = [int(c) for c in args.classes.split(",")]
    if args.sizes:
        sizes = [int(s) for s in args.sizes.split(",")]
    header = (
        "| classes | image | old s | new s | products s | old x products | new x products "
        "| old MB | new MB | old peak MB | new peak MB | labels equal | max score diff |"
    )
    rows = [header, "|" + "---|" * 13]
    with tempfile.TemporaryDirectory() as tmp:
        for short in sizes:
            for n in classes:
                reps = args.repeats or (5 if n <= 20 else 1)
                old, old_arrays = run("old", n, short, args.dims, Path(tmp), reps)
                new, new_arrays = run("new", n, short, args.dims, Path(tmp), reps)
                diff = float(np.abs(old_arrays["sampled"] - new_arrays["sampled"]).max())
                same = float((old_arrays["labels"] == new_arrays["labels"]).mean())
                products = min(old["products"], new["products"])
                row = (
                    f"| {n} | {short}x{round(short * 4 / 3)} | {old['seconds']:.2f} | "
                    f"{new['seconds']:.2f} | {products:.2f} | "
                    f"{old['seconds'] / products:.2f} | {new['seconds'] / products:.2f} | "
                    f"{old['bytes'] / 1e6:.0f} | {new['bytes'] / 1e6:.1f} | "
                    f"{old['peak'] / 1e6:.0f} | {new['peak'] / 1e6:.0f} | {same:.6f} | {diff:.1e} |"
                )
                rows.append(row)
                print(row, flush=True)
    print(f"\nstage 3, {args.dims} dims ({len(DIMS[args.dims])} extractors):\n")
    print("\n".join(rows))
    if not args.no_prefilter:
        prefilter = importlib.import_module("benchmarks.bench_stage2_prefilter")
        print("\npre-filter (cpu preset scorer, 10 candidates):", prefilter.bench_prefilter())


if __name__ == "__main__":
    main()
