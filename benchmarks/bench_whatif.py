"""What-if edits (``ovdiff_core.explain.what_if``) against a from-scratch ``segment``.

    python benchmarks/bench_whatif.py               # cpu preset, 20 classes, 448x597 px
    python benchmarks/bench_whatif.py --classes 5 --repeat 3

Setup (no model runs): the ``cpu`` preset's extractors, CLIP 768-d stride 16 and DINOv2
384-d stride 14, one whole-image view at short side 320 (``FAST_SEGMENT``); features from
:class:`ovdiff_core.standins.CodedExtractor` on a coded scene of 12 rectangles; banks from
:func:`ovdiff_core.standins.random_categories` (32 support images, K = 32: 65 foreground +
65 background prototypes per class and extractor). The image is 448x597 (short side 448).

Rows: "segment" is ``segment(..., keep_features=True)`` (the stand-in extractors cost
about nothing, so this is stage 3 alone; a real extractor adds seconds); each what-if row
is one ``what_if`` call on that segmentation: excluding the top prototype of a pixel,
excluding one support image of one class (its instance, class and part prototypes), and
excluding three images of each of two classes. Times are the median of ``--repeat`` runs
after one warm-up. "changed" counts relabelled pixels; "max |d score|" compares the
edited scores with a from-scratch ``segment`` on the edited banks (all channels, every
pixel).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ovdiff_core.config import FAST_SEGMENT
from ovdiff_core.explain import edited_categories, top_prototypes, what_if
from ovdiff_core.segment import segment
from ovdiff_core.standins import CodedExtractor, coded_scene, random_categories


def median_time(fn, repeat: int) -> float:  # type: ignore[no-untyped-def]
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--classes", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--size", type=int, nargs=2, default=(448, 597), metavar=("H", "W"))
    args = ap.parse_args()
    torch.manual_seed(0)
    extractors = [CodedExtractor("clip", 768, 16, 0), CodedExtractor("dinov2", 384, 14, 1)]
    cats = random_categories(extractors, args.classes)
    for ex in extractors:
        ex.categories = cats
    image = coded_scene(tuple(args.size), args.classes, 12, seed=0)
    config = FAST_SEGMENT.replace(prefilter=False)

    def run_segment():  # type: ignore[no-untyped-def]
        return segment(image, cats, extractors, config, keep_features=True)

    seg = run_segment()
    assert seg.features is not None
    h, w = seg.size
    top = top_prototypes(seg, w // 2, h // 2, k=1)[0].prototype
    edits = {
        "exclude top prototype at centre": {"exclude_prototypes": [top]},
        "exclude 1 support image of 1 class": {"exclude_images": {cats[0].name: [0]}},
        "exclude 3 images of 2 classes": {
            "exclude_images": {cats[0].name: [0, 1, 2], cats[1].name: [3, 4, 5]}
        },
    }
    feat_mb = sum(f.numel() * f.element_size() for f in seg.features) / 2**20
    print(
        f"{args.classes} classes, {w}x{h} px -> {seg.processed_size[1]}x{seg.processed_size[0]}"
        f" processed, {len(seg.views)} passes, kept features {feat_mb:.2f} MB, "
        f"torch threads {torch.get_num_threads()}"
    )
    print(f"{'row':<38} {'seconds':>8} {'removed':>8} {'changed':>8} {'max |d score|':>14}")
    t = median_time(run_segment, args.repeat)
    print(f"{'segment (keep_features=True)':<38} {t:>8.3f} {'-':>8} {'-':>8} {'-':>14}")
    for name, kw in edits.items():
        t = median_time(lambda kw=kw: what_if(seg, **kw), args.repeat)
        result = what_if(seg, **kw)
        edited_cats, _ = edited_categories(seg.categories, **kw)
        fresh = segment(image, edited_cats, extractors, config)
        diff = float(np.abs(result.segmentation.scores - fresh.scores).max())
        print(
            f"{name:<38} {t:>8.3f} {len(result.removed):>8} {int(result.changed.sum()):>8} "
            f"{diff:>14.2e}"
        )


if __name__ == "__main__":
    main()
