"""The CLIP pre-filter and stage 2's ``build_bank``, today's code against the previous one,
side by side in one run (issue 8).

    python benchmarks/bench_stage2_prefilter.py           # full sizes, about 2 minutes
    python benchmarks/bench_stage2_prefilter.py --quick   # smaller bank: a smoke run

1. Pre-filter on the ``cpu`` preset's scorer: a real-size open_clip ViT-B/16 with random
   weights (``open_clip.create_model("ViT-B-16", pretrained=None)``, speed does not
   depend on the weights), a 480x640 photo-sized random image, 10 COCO thing classes
   that all pass the probability step (the single-class cosines are replaced by equal
   values), so the subset search scores all 1,023 subset prompts. "cold": a fresh
   scorer, the whole ``prefilter()`` call (image embedding, 10 single prompts, 1,023
   subset prompts); "subsets": the 1,023 subset prompts alone, fresh text cache; "warm":
   the same call again (cached embeddings). Previous code = ``ClipScorer(
   share_prefixes=False, batch_size=256)``: its former algorithm, prompts sorted by
   token length and each batch cut after its longest prompt. Both keep the same set.
2. ``build_bank`` peak memory: 8 support images x 7680-d x 64x64 float32 features (1 GB,
   the stand-in for SD features), foreground a disc of about 30% of each image, the
   paper's K = 32. Each variant runs in a fresh subprocess (after a one-image warm-up
   call at the same D and grid); the peak is ``VmHWM`` of
   ``/proc/self/status`` after the call minus ``VmRSS`` just before it, with the
   high-water mark reset just before the call (``echo 5 > /proc/self/clear_refs``, so the
   features' own construction does not count; torch's allocations are invisible to
   tracemalloc), printed as a multiple of the feature
   bytes, plus the total (features included) and the wall time. Previous code = the
   former ``build_bank``, kept below as ``previous_build_bank`` (a permuted copy of all
   features, then a copy of each region's rows). The banks are compared (max abs diff).
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ovdiff_core.config import PrototypeConfig
from ovdiff_core.kmeans import kmeans
from ovdiff_core.prototypes import build_bank, region_to_grid
from ovdiff_core.types import SupportSet

NAMES = ["person", "bicycle", "car", "motorcycle", "airplane"]
NAMES += ["bus", "train", "truck", "boat", "traffic light"]


# --------------------------------------------------------------------------- pre-filter


class AllPass:
    """Equal single-class cosines (every class passes), the real scorer for the rest."""

    def __init__(self, inner: object) -> None:
        self.inner = inner
        self.singles = [f"a {n}" for n in NAMES]

    def image_text_scores(self, image: np.ndarray, texts: list[str]) -> np.ndarray:
        out = self.inner.image_text_scores(image, texts)  # type: ignore[attr-defined]
        return np.zeros_like(out) if list(texts) == self.singles else out


def bench_prefilter() -> dict[str, dict[str, float]]:
    import open_clip

    from ovdiff_core.backends.scorer import ClipScorer
    from ovdiff_core.prefilter import prefilter, subset_prompt

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16", pretrained=None).eval()
    tokenizer = open_clip.get_tokenizer("ViT-B-16")
    image = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    subsets = [
        subset_prompt(list(g)) for r in range(1, 11) for g in itertools.combinations(NAMES, r)
    ]
    variants = {
        "previous": {"share_prefixes": False, "batch_size": 256},
        "new": {},
    }
    rows: dict[str, dict[str, float]] = {}
    kept: dict[str, list[str]] = {}
    for name, kwargs in variants.items():
        scorer = ClipScorer(model, tokenizer, **kwargs)
        t0 = time.perf_counter()
        res = prefilter(image, NAMES, AllPass(scorer))
        cold = time.perf_counter() - t0
        assert len(res.subset_scores) == 1023
        t0 = time.perf_counter()
        prefilter(image, NAMES, AllPass(scorer))
        warm = time.perf_counter() - t0
        fresh = ClipScorer(model, tokenizer, **kwargs)
        fresh.image_embedding(image)
        t0 = time.perf_counter()
        fresh.image_text_scores(image, subsets)
        only = time.perf_counter() - t0
        kept[name] = res.kept
        rows[name] = {
            "cold_s": cold,
            "subsets_s": only,
            "warm_s": warm,
            "positions": float(fresh.text_positions),
        }
        print(f"  pre-filter {name}: {rows[name]}  kept {res.kept}", flush=True)
    assert kept["previous"] == kept["new"], kept
    return rows


# --------------------------------------------------------------------------- build_bank


def previous_build_bank(
    support: SupportSet, features: torch.Tensor, config: PrototypeConfig
) -> torch.Tensor:
    """The former build_bank's arithmetic (vectors only): one permuted (cells, D) copy of
    all features, then each region's rows gathered into another copy."""
    _, d, gh, gw = features.shape
    flat = features.detach().to(torch.float32).permute(0, 2, 3, 1).reshape(-1, d)
    vecs: list[torch.Tensor] = []
    for mask in (support.foreground, support.background):
        grid = region_to_grid(mask, (gh, gw), config.mask_rule)
        cells = np.flatnonzero(grid.reshape(-1)).astype(np.int64)
        x = flat[torch.from_numpy(cells)]
        vecs.append(x.mean(0))
        img_of = cells // (gh * gw)
        for i in np.unique(img_of):
            vecs.append(x[torch.from_numpy(img_of == i)].mean(0))
        km = kmeans(x, config.n_parts, seed=config.seed)
        vecs += list(km.centroids)
        del x
    return F.normalize(torch.stack(vecs), dim=1)


def _status(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    match = re.search(key + r":\s+(\d+)", text)
    assert match is not None
    return int(match.group(1)) * 1024


def _bank_inputs(n: int, d: int, g: int) -> tuple[SupportSet, torch.Tensor]:
    size = 8 * g
    yy, xx = np.mgrid[:size, :size]
    rng = np.random.default_rng(0)
    fg = np.stack(
        [
            (yy - rng.uniform(0.3, 0.7) * size) ** 2 + (xx - rng.uniform(0.3, 0.7) * size) ** 2
            < (0.3 * size) ** 2
            for _ in range(n)
        ]
    )
    images = np.zeros((n, size, size, 3), dtype=np.uint8)
    support = SupportSet("thing", images, fg.astype(np.float32), fg, ~fg)
    gen = torch.Generator().manual_seed(0)
    # Clustered features (16 random directions plus noise), like real features.
    centres = torch.randn(16, d, generator=gen) * 2
    which = torch.randint(16, (n, g, g), generator=gen)
    feats = torch.empty(n, d, g, g)
    for i in range(n):
        feats[i] = (centres[which[i]] + torch.randn(g, g, d, generator=gen)).permute(2, 0, 1)
    return support, feats


def peak_child(variant: str, n: int, d: int, g: int, out: str) -> None:
    """Run one build_bank variant and write its peak memory, time and vectors."""
    support, feats = _bank_inputs(n, d, g)
    config = PrototypeConfig()
    # First use of every kernel at full size (one image), so that the libraries' code
    # pages they fault in (part of VmRSS) are in place before the measured call.
    small_support, small_feats = _bank_inputs(1, d, g)
    (previous_build_bank if variant == "previous" else _new_vectors)(
        small_support, small_feats, config
    )
    del small_feats
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (earlier peaks out)
    base = _status("VmRSS")
    t0 = time.perf_counter()
    vectors = (previous_build_bank if variant == "previous" else _new_vectors)(
        support, feats, config
    )
    seconds = time.perf_counter() - t0
    peak = _status("VmHWM") - base
    torch.save(vectors, out + ".pt")
    feat_bytes = feats.numel() * 4
    Path(out).write_text(
        json.dumps({"extra_x": peak / feat_bytes, "total_x": 1 + peak / feat_bytes, "s": seconds})
    )


def _new_vectors(support: SupportSet, feats: torch.Tensor, config: PrototypeConfig):
    return build_bank(support, feats, "x", config).vectors


def bench_bank(n: int, d: int, g: int, tmp: Path) -> dict[str, dict[str, float]]:
    rows: dict[str, dict[str, float]] = {}
    vectors = {}
    for variant in ("previous", "new"):
        out = str(tmp / f"peak-{variant}.json")
        cmd = [sys.executable, __file__, "--peak", variant, str(n), str(d), str(g), out]
        subprocess.run(cmd, check=True)
        rows[variant] = json.loads(Path(out).read_text())
        vectors[variant] = torch.load(out + ".pt")
        print(f"  build_bank {variant}: {rows[variant]}", flush=True)
    diff = float((vectors["previous"] - vectors["new"]).abs().max())
    rows["new"]["max_abs_diff"] = diff
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller bank (1 x 7680 x 32x32)")
    parser.add_argument("--peak", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak:
        variant, n, d, g, out = args.peak
        peak_child(variant, int(n), int(d), int(g), out)
        return
    import tempfile

    n, d, g = (2, 7680, 32) if args.quick else (8, 7680, 64)
    print(f"build_bank: {n} images x {d}-d x {g}x{g} ({n * d * g * g * 4 / 2**30:.2f} GiB)")
    with tempfile.TemporaryDirectory() as tmp:
        bank = bench_bank(n, d, g, Path(tmp))
    print("pre-filter: ViT-B/16 (random weights), 10 candidates, 1,023 subset prompts")
    pre = bench_prefilter()
    print()
    print("| measure | previous | new | ratio |")
    print("|---|---|---|---|")
    for key, label in (("cold_s", "pre-filter cold (s)"), ("subsets_s", "1,023 subsets (s)")):
        a, b = pre["previous"][key], pre["new"][key]
        print(f"| {label} | {a:.2f} | {b:.2f} | {a / b:.1f}x |")
    a, b = pre["previous"]["warm_s"], pre["new"]["warm_s"]
    print(f"| pre-filter warm (s) | {a:.3f} | {b:.3f} | |")
    a, b = pre["previous"]["positions"], pre["new"]["positions"]
    print(f"| text-tower positions | {a:.0f} | {b:.0f} | {a / b:.1f}x |")
    a, b = bank["previous"]["total_x"], bank["new"]["total_x"]
    print(f"| build_bank peak (x features, incl. them) | {a:.2f} | {b:.2f} | |")
    a, b = bank["previous"]["s"], bank["new"]["s"]
    print(f"| build_bank time (s) | {a:.1f} | {b:.1f} | |")
    print(f"| bank vectors max abs diff | | {bank['new']['max_abs_diff']:.1e} | |")


if __name__ == "__main__":
    main()
