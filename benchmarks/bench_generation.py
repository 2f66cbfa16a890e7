"""Time to make one class's support set on the CPU, with real-size random-weight models.

Two tables:

1. ``preset``: :data:`GENERATION_CPU` run end to end by :class:`SDSupportGenerator` on the
   SD-Turbo architecture (SD 2.1 UNet + OpenCLIP-H text encoder, random weights) with the
   TAESD decoder, masks from :class:`FeatureClusterProposer` over a real-size DINO ViT-B/8
   (random weights). Per stage: generation (text encoder, UNet steps with attention
   capture, decoding, attribution maps) and masks (proposer features, K-means, components,
   selection). Peak RSS of the process.
2. ``candidates``: what the alternatives cost per class: UNet and decoder FLOPs counted
   exactly on the meta device (no compute, independent of machine load), converted to
   seconds with the throughput measured by the yardstick. This is how the CPU preset was
   chosen.

A yardstick (one guided SD 1.5 step at 256 px, ~3 s on an idle 2-core machine per
docs/environment) is printed first: divide by it to compare runs on loaded machines.

    python benchmarks/bench_generation.py            # both tables, ~3-5 min on 2 idle cores
    python benchmarks/bench_generation.py --quick    # 4 images instead of 8
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

import ovdiff_core.backends.generator as generator_module
from ovdiff_core.backends.generator import GENERATION_CPU, SDSupportGenerator
from ovdiff_core.backends.proposer import FeatureClusterProposer
from ovdiff_core.backends.tiny_sd import random_sd_pipeline


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _time(fn: Callable[[], object], repeats: int = 1) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _unet_call(unet, size: int, batch: int) -> Callable[[], object]:
    lat = size // 8
    x = torch.randn(batch, 4, lat, lat)
    ctx = torch.randn(batch, 77, unet.config.cross_attention_dim)
    t = torch.tensor([500] * batch)
    return lambda: unet(x, t, encoder_hidden_states=ctx)


def real_size_dino():
    """DINO ViT-B/8 (86M) as DinoExtractor, random weights."""
    from transformers import ViTConfig, ViTModel

    from ovdiff_core.backends.extractors import DinoExtractor

    config = ViTConfig(
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        patch_size=8,
        image_size=224,
        qkv_bias=True,
        layer_norm_eps=1e-6,
    )
    torch.manual_seed(0)
    return DinoExtractor(ViTModel(config, add_pooling_layer=False), model_id="random-vitb8")


def yardstick() -> tuple[float, float]:
    """Seconds of one guided SD 1.5 UNet step at 256 px, and the GFLOP/s it achieved."""
    from torch.utils.flop_counter import FlopCounterMode

    pipe = random_sd_pipeline("sd15", decoder="tiny")
    call = _unet_call(pipe.unet, 256, 2)
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            call()
        t = _time(call, 2)
    del pipe
    gc.collect()
    return t, counter.get_total_flops() / 1e9 / t


def preset(n_images: int) -> None:
    cfg = GENERATION_CPU.replace(n_images=n_images)
    t0 = time.perf_counter()
    pipe = random_sd_pipeline("sd-turbo", decoder="tiny")
    proposer_ext = real_size_dino()
    build_s = time.perf_counter() - t0

    timings = {"masks": 0.0}

    class TimedProposer(FeatureClusterProposer):
        def __call__(self, images: np.ndarray) -> list[np.ndarray]:
            start = time.perf_counter()
            try:
                return super().__call__(images)
            finally:
                timings["masks"] += time.perf_counter() - start

    original_select = generator_module.select_masks_batch

    def timed_select(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original_select(*args, **kwargs)
        finally:
            timings["masks"] += time.perf_counter() - start

    generator_module.select_masks_batch = timed_select
    proposer = TimedProposer.from_config(proposer_ext, cfg.masks, cfg.proposer_input_size)
    gen = SDSupportGenerator(pipe, cfg, proposer=proposer, decoder=None, model_name="random")
    start = time.perf_counter()
    first = None
    sizes = []
    for batch in gen.generate("potted plant"):
        sizes.append(len(batch))
        if first is None:
            first = time.perf_counter() - start
    total = time.perf_counter() - start
    generator_module.select_masks_batch = original_select
    masks = timings["masks"]
    print(
        f"\nCPU preset: {cfg.model_id} architecture (random weights), {cfg.resolution} px, "
        f"{cfg.steps} steps, guidance {cfg.guidance_scale}, {sum(sizes)} images in batches "
        f"{sizes}, TAESD decoder; masks: DINO ViT-B/8 at {cfg.proposer_input_size} px, "
        f"K={cfg.masks.n_clusters}"
    )
    print("| stage | seconds | per image |")
    print("|---|---|---|")
    n = sum(sizes)
    print(
        f"| generation (UNet + capture + decode + maps) | {total - masks:.1f} | "
        f"{(total - masks) / n:.1f} |"
    )
    print(f"| masks (proposer + selection) | {masks:.1f} | {masks / n:.1f} |")
    print(f"| total | {total:.1f} | {total / n:.1f} |")
    print(f"| first batch ready after | {first:.1f} | |")
    print(f"| (model construction, not in total) | {build_s:.1f} | |")
    print(f"peak RSS {_rss_mb():.0f} MB")
    del gen, pipe, proposer_ext
    gc.collect()


def _meta_gflops(build: Callable[[], torch.nn.Module], run: Callable[[torch.nn.Module], object]):
    """GFLOPs of one forward, counted on the meta device (no compute, load-independent)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        module = build()
    with FlopCounterMode(display=False) as counter:
        run(module)
    return counter.get_total_flops() / 1e9


def candidates(throughput: float) -> None:
    """GFLOPs per class of each candidate setting, and seconds at the measured throughput."""
    from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel

    from ovdiff_core.backends.tiny_sd import SD_ARCHITECTURES

    def unet_gflops(arch: str, size: int, batch: int) -> float:
        cfg = SD_ARCHITECTURES[arch]["unet"]

        def run(unet: torch.nn.Module) -> object:
            lat = size // 8
            x = torch.zeros(batch, 4, lat, lat, device="meta")
            ctx = torch.zeros(batch, 77, cfg["cross_attention_dim"], device="meta")
            t = torch.full((batch,), 500, device="meta")
            return unet(x, t, encoder_hidden_states=ctx)

        return _meta_gflops(lambda: UNet2DConditionModel(**cfg), run)

    def decoder_gflops(kind: str, size: int) -> float:
        def build() -> torch.nn.Module:
            if kind == "tiny":
                return AutoencoderTiny()
            return AutoencoderKL(
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4,
                block_out_channels=(128, 256, 512, 512),
                layers_per_block=2,
                latent_channels=4,
            )

        def run(vae: Any) -> object:
            return vae.decode(torch.zeros(1, 4, size // 8, size // 8, device="meta"))

        return _meta_gflops(build, run)

    options = [
        ("paper: SD 1.5, 512 px, CFG, 30 steps, 32 img, VAE", "sd15", 512, True, 30, 32, "kl"),
        ("SD 1.5, 256 px, CFG, 10 steps, 8 img, TAESD", "sd15", 256, True, 10, 8, "tiny"),
        (
            "BK-SDM-Tiny, 256 px, CFG, 10 steps, 8 img, TAESD",
            "bk-sdm-tiny",
            256,
            True,
            10,
            8,
            "tiny",
        ),
        (
            "BK-SDM-Tiny, 512 px, CFG, 20 steps, 8 img, TAESD",
            "bk-sdm-tiny",
            512,
            True,
            20,
            8,
            "tiny",
        ),
        ("SD-Turbo, 384 px, 2 steps, 8 img, TAESD", "sd21", 384, False, 2, 8, "tiny"),
        ("SD-Turbo, 512 px, 1 step, 8 img, TAESD (CPU preset)", "sd21", 512, False, 1, 8, "tiny"),
        ("SD-Turbo, 512 px, 1 step, 8 img, full VAE", "sd21", 512, False, 1, 8, "kl"),
        ("SD-Turbo, 512 px, 4 steps, 8 img, TAESD", "sd21", 512, False, 4, 8, "tiny"),
    ]
    print(
        "| candidate | UNet GFLOP/image-step | decoder GFLOP/image | GFLOP/class | est. s/class |"
    )
    print("|---|---|---|---|---|")
    for label, arch, size, cfg, steps, n, decoder in options:
        unet = unet_gflops(arch, size, 2 if cfg else 1)
        dec = decoder_gflops(decoder, size)
        total = n * (steps * unet + dec)
        print(f"| {label} | {unet:.0f} | {dec:.0f} | {total:.0f} | {total / throughput:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 support images instead of 8")
    parser.add_argument("--part", choices=("all", "preset", "candidates"), default="all")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    load = os.getloadavg()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {load}")
    y, throughput = yardstick()
    print(
        f"yardstick: one guided SD 1.5 step at 256 px = {y:.1f} s (idle reference ~3 s), "
        f"{throughput:.0f} GFLOP/s"
    )
    if args.part in ("all", "preset"):
        preset(4 if args.quick else GENERATION_CPU.n_images)
    if args.part in ("all", "candidates"):
        print("\nCandidates: FLOPs counted on the meta device; seconds = FLOPs / the yardstick's")
        print("throughput (text encoder, capture and masks excluded: equal across candidates):")
        candidates(throughput)
    print(f"\npeak RSS {_rss_mb():.0f} MB; load average at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
