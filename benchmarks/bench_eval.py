"""Throughput of ``ovdiff eval`` on a synthetic VOC folder (colour world scenes).

Writes a synthetic Pascal VOC 2012 folder (160x224 JPEGs, palette PNGs, val.txt), then for
each backend runs ``ovdiff eval voc`` in-process twice on a fresh cache: once cold (the 20
VOC classes are built) and once warm (every class from the cache). Reports the build time
per class and the evaluation throughput (images/s, segmentation + scoring only), as
``ovdiff eval`` prints it, plus the mIoU. ``color`` segments exactly (100 mIoU); ``tiny``
(tiny random networks) is meaningless in quality and only measures the plumbing.

    python benchmarks/bench_eval.py                        # color and tiny, 50 images
    python benchmarks/bench_eval.py --images 20 --backend tiny
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from pathlib import Path

from ovdiff_core.cli import main
from ovdiff_core.evaluation.datasets import class_names
from ovdiff_core.evaluation.synthetic import color_world, write_synthetic_voc


def _run(argv: list[str]) -> tuple[float, str]:
    out = io.StringIO()
    start = time.perf_counter()
    rc = main([*argv, "--quiet"], stdout=out)
    if rc != 0:
        raise SystemExit(f"ovdiff {' '.join(argv)} failed with status {rc}")
    return time.perf_counter() - start, out.getvalue()


def main_bench() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=50)
    ap.add_argument("--backend", action="append", choices=["color", "tiny"])
    ap.add_argument("--preset", default="cpu", choices=["cpu", "paper"])
    args = ap.parse_args()
    backends = args.backend or ["color", "tiny"]
    names = class_names("voc")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "voc"
        write_synthetic_voc(root, color_world(names), names, n_images=args.images, seed=0)
        print(f"synthetic VOC: {args.images} images of 160x224, preset {args.preset}")
        print("| backend | build, s per class (cold) | eval images/s (warm cache) | mIoU |")
        print("|---|---:|---:|---:|")
        for backend in backends:
            cache = str(Path(tmp) / f"cache-{backend}")
            build_s, _ = _run(["build", "voc", "--backend", backend, "--preset", args.preset,
                               "--cache", cache])  # fmt: skip
            res = Path(tmp) / f"res-{backend}"
            _run(["eval", "voc", "--root", str(root), "--backend", backend, "--preset",
                  args.preset, "--cache", cache, "--out", str(res)])  # fmt: skip
            data = json.loads((res / "voc21.json").read_text())
            print(
                f"| {backend} | {build_s / len(names):.3f} | {data['images_per_s']:.1f} "
                f"| {data['mIoU']:.2f} |"
            )


if __name__ == "__main__":
    main_bench()
