"""Cell/pixel geometry costs: support masks of a prototype and one pixel trace.

``PrototypeBank.member_masks`` (cells -> support-image masks) and ``trace`` (bilinear
taps, similarity map) on a colour-world model; prints a table of median times.
Only public API, so the same script times older checkouts (``PYTHONPATH=<old tree>``).

Usage::

    python benchmarks/bench_geometry.py [--repeats 30]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from ovdiff_core import OVDiff, PrototypeConfig, SegmentConfig, trace
from ovdiff_core.colorworld import ColorExtractor, ColorGenerator, ColorWorld, paint_scene


def timed(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    world = ColorWorld.default()
    model = OVDiff(
        ColorGenerator(world, n_images=16, size=(256, 256), align=8),
        [ColorExtractor(stride=8)],
        prototype_config=PrototypeConfig(n_parts=8),
        segment_config=SegmentConfig(short_side=448, windows=False),
    )
    (cat,) = model.build(["cat"])
    model.build(["sofa", "lamp"])
    bank = cat.banks["color"]
    image, _ = paint_scene(
        (480, 640), (40, 40, 40), [(world.parts["cat"], (64, 64, 256, 256))], seed=1
    )
    seg = model.segment(image)
    trace(seg, 10, 10)  # lookup tables built once per segmentation
    rng = np.random.default_rng(0)
    points = [(int(rng.integers(640)), int(rng.integers(480))) for _ in range(args.repeats)]
    it = iter(points * 2)
    rows = [
        ("member_masks, every prototype (16 images 256 px)",
         timed(lambda: [bank.member_masks(p) for p in range(len(bank))], args.repeats)),
        ("trace(seg, x, y), 640x480 image", timed(lambda: trace(seg, *next(it)), args.repeats)),
    ]  # fmt: skip
    print(f"{'what':<52} {'median ms':>10}")
    for name, ms in rows:
        print(f"{name:<52} {ms:>10.2f}")


if __name__ == "__main__":
    main()
