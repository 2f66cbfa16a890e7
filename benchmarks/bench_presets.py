"""Per-stage CPU time of one class bank for each preset, real-size random-weight models.

For each preset, in its own subprocess (so that peak RSS is per preset):

* ``cpu``: measured end to end through the real object graph - ``SDSupportGenerator`` on
  the SD-Turbo architecture (SD 2.1 UNet + OpenCLIP-H text encoder) with the TAESD
  decoder, feature-cluster masks over DINOv2-S/14 at 224 px, then ``extract_features``
  and ``build_bank`` for CLIP ViT-B/16 keys and DINOv2-S/14 keys on the generated support
  set. Plus, not part of the bank: segmenting one 451x300 photo with the preset's
  one-view setting and the CLIP pre-filter.
* ``paper``: measured *per unit* and extrapolated to 32 images x 30 steps (a full run is
  about 7 h on 2 cores): one guided SD 1.5 UNet step at 512 px with attention capture
  (batch 2: conditional + unconditional), one full-VAE decode, the proposer on one
  512 px image (DINO ViT-B/8), each extractor (SD 1.5 queries, DINO ViT-B/8 keys, CLIP
  ViT-B/16 keys) on one 512 px image, and ``build_bank`` on N synthetic support images
  with the real feature shapes (scaled by 32 / N: K-means cost is linear in the number of
  pixels). Text encoding and attribution-map bookkeeping are left out (< 1%).

Every model is a real-size architecture built from a config in this repository
(``ovdiff_core.backends.tiny_sd.SD_ARCHITECTURES``,
``ovdiff_core.backends.tiny_vision.REAL_SIZE_VISION``) with random weights; speed does
not depend on weight values. Nothing is downloaded.

The machine's speed is printed first as a matmul yardstick (GFLOP/s of float32 2048^3
products) with the load average: compare runs only through it.

    python benchmarks/bench_presets.py                 # both presets (~15 min, 2 idle cores)
    python benchmarks/bench_presets.py --quick         # cpu with 4 images; paper units
    python benchmarks/bench_presets.py --preset cpu
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

CPU_GOAL_S = 180.0  # the CPU preset's goal: one class in at most 3 minutes on 2 cores


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _timed(fn: Callable[[], object]) -> tuple[object, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def yardstick() -> float:
    """Float32 matmul throughput of this process right now, GFLOP/s (median of 5)."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    times = []
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * 2048**3 / float(np.median(times)) / 1e9


class _TimedProposer:
    """Wraps a segment proposer and accumulates its time."""

    def __init__(self, inner, timings: dict[str, float]) -> None:
        self.inner, self.timings = inner, timings

    def __call__(self, images):
        out, dt = _timed(lambda: self.inner(images))
        self.timings["masks"] += dt
        return out

    def spec(self):
        return self.inner.spec()


def _patch_mask_selection(timings: dict[str, float]) -> Callable[[], None]:
    import ovdiff_core.backends.generator as generator_module

    original = generator_module.select_masks_batch

    def timed(*args, **kwargs):
        out, dt = _timed(lambda: original(*args, **kwargs))
        timings["masks"] += dt
        return out

    generator_module.select_masks_batch = timed

    def restore() -> None:
        generator_module.select_masks_batch = original

    return restore


# --------------------------------------------------------------------------------------
# cpu preset: measured end to end
# --------------------------------------------------------------------------------------


def run_cpu(quick: bool) -> dict:
    import open_clip
    import skimage.data

    from ovdiff_core.backends.extractors import ClipExtractor, DinoExtractor
    from ovdiff_core.backends.generator import SDSupportGenerator
    from ovdiff_core.backends.presets import PRESETS
    from ovdiff_core.backends.proposer import make_proposer
    from ovdiff_core.backends.scorer import ClipScorer
    from ovdiff_core.backends.tiny_sd import random_sd_pipeline
    from ovdiff_core.backends.tiny_vision import random_vision_model
    from ovdiff_core.pipeline import concat_supports, extract_features
    from ovdiff_core.prototypes import build_bank
    from ovdiff_core.segment import segment
    from ovdiff_core.types import Category

    preset = PRESETS["cpu"]
    cfg = preset.generation.replace(n_images=4) if quick else preset.generation
    (pipe, clip_model, dinov2), build_s = _timed(
        lambda: (
            random_sd_pipeline("sd-turbo", decoder="tiny"),
            random_vision_model("clip-vitb16"),
            random_vision_model("dinov2-small"),
        )
    )
    extractors = {
        "clip": ClipExtractor(clip_model, model_id="random-clip-vitb16"),
        "dinov2": DinoExtractor(dinov2, model_id="random-dinov2-small", name="dinov2"),
    }
    assert [e.kind for e in preset.extractors] == list(extractors)
    timings = {"masks": 0.0}
    proposer = _TimedProposer(
        make_proposer(cfg.masks, extractors[preset.proposer], cfg.proposer_input_size), timings
    )
    restore = _patch_mask_selection(timings)
    gen = SDSupportGenerator(pipe, cfg, proposer=proposer, model_name="random-sd-turbo")
    rows: list[tuple[str, float, str]] = []
    parts = []
    start = time.perf_counter()
    first = None
    for batch in gen.generate("potted plant"):
        parts.append(batch)
        first = first if first is not None else time.perf_counter() - start
    total_gen = time.perf_counter() - start
    restore()
    support = concat_supports(parts)
    n = len(support)
    rows.append(
        (
            f"generation: SD-Turbo arch, {cfg.steps} steps, {cfg.resolution} px, TAESD",
            total_gen - timings["masks"],
            "measured",
        )
    )
    rows.append(
        (
            f"masks: feature clusters, DINOv2-S/14 at {cfg.proposer_input_size} px",
            timings["masks"],
            "measured",
        )
    )
    banks = {}
    for name, ex in extractors.items():
        feats, dt = _timed(lambda ex=ex: extract_features(ex, support.images))
        rows.append((f"features: {name} ({tuple(feats.shape[1:])} per image)", dt, "measured"))
        bank, dt = _timed(
            lambda f=feats, name=name: build_bank(support, f, name, preset.prototype_config)
        )
        banks[name] = bank
        rows.append((f"prototypes: {name} ({len(bank)} prototypes)", dt, "measured"))
    total = sum(r[1] for r in rows)

    image = skimage.data.chelsea()
    scorer = ClipScorer(clip_model, open_clip.get_tokenizer("ViT-B-16"), model_id="random")
    category = Category("potted plant", banks, support)
    other = Category("cat", banks, support)  # a second class so the pre-filter has work
    _, seg_s = _timed(
        lambda: segment(
            image, [category, other], list(extractors.values()), preset.segment_config, scorer
        )
    )
    return {
        "preset": "cpu",
        "images": n,
        "rows": rows,
        "total": total,
        "first_batch": first,
        "extras": [
            (
                f"segment one {image.shape[1]}x{image.shape[0]} photo "
                f"(short side {preset.segment_config.short_side}, one view, pre-filter)",
                seg_s,
            ),
            ("model construction (random init; not in total)", build_s),
        ],
        "rss_mb": _rss_mb(),
    }


# --------------------------------------------------------------------------------------
# paper preset: per unit, extrapolated
# --------------------------------------------------------------------------------------


def run_paper(quick: bool) -> dict:
    from ovdiff_core.backends.attention import AttributionRecorder, capture_cross_attention
    from ovdiff_core.backends.extractors import ClipExtractor, DinoExtractor, SDFeatureExtractor
    from ovdiff_core.backends.presets import PRESETS
    from ovdiff_core.backends.proposer import make_proposer
    from ovdiff_core.backends.tiny_sd import random_sd_pipeline
    from ovdiff_core.backends.tiny_vision import random_vision_model
    from ovdiff_core.masks import select_masks_batch
    from ovdiff_core.prototypes import build_bank
    from ovdiff_core.types import SupportSet

    preset = PRESETS["paper"]
    cfg = preset.generation
    n_images, steps, res = cfg.n_images, cfg.steps, cfg.resolution
    (pipe, vitb8, clip_model), build_s = _timed(
        lambda: (
            random_sd_pipeline("sd15", decoder="kl"),
            random_vision_model("dino-vitb8"),
            random_vision_model("clip-vitb16"),
        )
    )
    extractors = {
        "sd": SDFeatureExtractor.from_pipeline(pipe, model_id="random-sd15"),
        "dino": DinoExtractor(vitb8, model_id="random-dino-vitb8"),
        "clip": ClipExtractor(clip_model, model_id="random-clip-vitb16"),
    }
    rows: list[tuple[str, float, str]] = []
    lat = res // 8

    # One guided UNet step (conditional + unconditional) with attention capture.
    unet = pipe.unet
    x = torch.randn(2, 4, lat, lat)
    ctx = torch.randn(2, 77, unet.config.cross_attention_dim)
    t = torch.tensor([500, 500])
    recorder = AttributionRecorder((5,), 1, (lat, lat), cfg.map_size)

    def step(x=x):
        with torch.no_grad(), capture_cross_attention(unet, recorder):
            unet(x, t, encoder_hidden_states=ctx)

    # Warm-ups at a small size (first calls allocate and pick kernels), then the unit.
    step(torch.randn(2, 4, 16, 16))
    _, step_s = _timed(step)
    with torch.no_grad():
        _, plain_s = _timed(lambda: unet(x, t, encoder_hidden_states=ctx))
    rows.append(
        (
            f"generation: UNet, {n_images} img x {steps} guided steps x {step_s:.1f} s",
            n_images * steps * step_s,
            "1 step x 960",
        )
    )
    z = torch.randn(1, 4, lat, lat)
    with torch.no_grad():
        pipe.vae.decode(torch.randn(1, 4, 16, 16))
        _, dec_s = _timed(lambda: pipe.vae.decode(z / pipe.vae.config.scaling_factor))
    rows.append(
        (f"generation: VAE decode, {n_images} x {dec_s:.1f} s", n_images * dec_s, "1 image x 32")
    )

    # Masks on one image.
    img = np.random.default_rng(0).integers(0, 256, (1, res, res, 3), dtype=np.uint8)
    attr = np.random.default_rng(1).random((1, res, res)).astype(np.float32)
    proposer = make_proposer(cfg.masks, extractors[preset.proposer], cfg.proposer_input_size)
    proposer(img[:, :128, :128])  # warm-up
    segments, prop_s = _timed(lambda: proposer(img))
    _, sel_s = _timed(lambda: select_masks_batch(attr, segments, cfg.masks))
    rows.append(
        (
            f"masks: feature clusters, DINO ViT-B/8 at {res} px, {n_images} x "
            f"{prop_s + sel_s:.1f} s",
            n_images * (prop_s + sel_s),
            "1 image x 32",
        )
    )

    # Features per image, then prototypes on N synthetic images of the real shapes.
    n_proto = 2 if quick else 8
    one = torch.rand(1, 3, res, res)
    rng = np.random.default_rng(2)
    yy, xx = np.mgrid[:res, :res]
    fg = np.stack(
        [
            (yy - res / 2) ** 2 + (xx - res / 2 - 20 * i) ** 2 < (res / 3) ** 2
            for i in range(n_proto)
        ]
    )
    support = SupportSet(
        category="potted plant",
        images=rng.integers(0, 256, (n_proto, res, res, 3), dtype=np.uint8),
        attributions=rng.random((n_proto, res, res)).astype(np.float32),
        foreground=fg,
        background=~fg,
    )
    for name, ex in extractors.items():
        ex(torch.rand(1, 3, 128, 128))  # warm-up
        feats, dt = _timed(lambda ex=ex: ex(one))
        rows.append(
            (
                f"features: {name} ({tuple(feats.shape[1:])}), {n_images} x {dt:.1f} s",
                n_images * dt,
                "1 image x 32",
            )
        )
        synthetic = torch.randn(n_proto, *feats.shape[1:])
        del feats
        bank, dt = _timed(
            lambda f=synthetic, name=name: build_bank(support, f, name, preset.prototype_config)
        )
        rows.append(
            (
                f"prototypes: {name} ({len(bank)} prototypes at N={n_proto}), "
                f"x {n_images}/{n_proto}",
                dt * n_images / n_proto,
                f"N={n_proto} x {n_images / n_proto:g}",
            )
        )
        del synthetic
    return {
        "preset": "paper",
        "images": n_images,
        "rows": rows,
        "total": sum(r[1] for r in rows),
        "first_batch": None,
        "extras": [
            ("one guided UNet step without attention capture (reference)", plain_s),
            ("model construction (random init; not in total)", build_s),
        ],
        "rss_mb": _rss_mb(),
    }


# --------------------------------------------------------------------------------------


def _child(preset: str, quick: bool) -> None:
    torch.set_grad_enabled(False)
    gflops_start = yardstick()
    result = run_cpu(quick) if preset == "cpu" else run_paper(quick)
    result["gflops"] = (gflops_start, yardstick())
    print("RESULT " + json.dumps(result), flush=True)


def _print(result: dict) -> None:
    name = result["preset"]
    print(f"\n### preset `{name}`: one class, {result['images']} support images")
    print("| stage | seconds | how |")
    print("|---|---:|---|")
    for label, seconds, how in result["rows"]:
        print(f"| {label} | {seconds:.1f} | {how} |")
    total = result["total"]
    print(f"| **total per class** | **{total:.0f}** ({total / 60:.1f} min) | |")
    if result["first_batch"] is not None:
        print(f"| first support batch on screen after | {result['first_batch']:.1f} | measured |")
    for label, seconds in result["extras"]:
        print(f"| {label} | {seconds:.1f} | measured |")
    rss, (g0, g1) = result["rss_mb"], result["gflops"]
    print(f"peak RSS {rss:.0f} MB; yardstick {g0:.0f} GFLOP/s before, {g1:.0f} after")
    if name == "cpu":
        verdict = "meets" if total <= CPU_GOAL_S else "MISSES"
        print(f"CPU goal <= {CPU_GOAL_S:.0f} s per class: {verdict} ({total:.0f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="cpu: 4 images; paper: N=2 banks")
    parser.add_argument("--preset", choices=("all", "cpu", "paper"), default="all")
    parser.add_argument("--child", choices=("cpu", "paper"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.quick)
        return
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()}"
    )
    print(f"yardstick: {yardstick():.0f} GFLOP/s float32 matmul (this process, now)")
    presets = ("cpu", "paper") if args.preset == "all" else (args.preset,)
    for preset in presets:
        cmd = [sys.executable, __file__, "--child", preset] + (["--quick"] if args.quick else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(f"\npreset {preset} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
            continue
        _print(json.loads(lines[-1][len("RESULT ") :]))
    print(f"\nload average at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
