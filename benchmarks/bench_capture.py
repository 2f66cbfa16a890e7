"""Cost of cross-attention capture: the same pipeline call with and without it.

For each model (the tiny test UNet and real-size SD architectures with random weights) the
pipeline is called alternately without and with :func:`capture_cross_attention`
(interleaved, so machine load drifts hit both alike), and the medians of wall-clock and of
process CPU time are compared (CPU time is less sensitive to other processes on a shared
machine); the extra matmul FLOPs of capture per UNet call are also counted exactly on the
meta device (load-independent). The denoising loop is what capture touches, so calls stop
at latents (no VAE decode). Outputs are checked to be bit-identical with and without
capture.

    python benchmarks/bench_capture.py            # ~4-7 min on 2 CPU cores
    python benchmarks/bench_capture.py --quick    # tiny model + SD 1.5, 1 repeat
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from ovdiff_core.backends.attention import (
    AttributionRecorder,
    capture_cross_attention,
)
from ovdiff_core.backends.tiny_sd import random_sd_pipeline, tiny_sd_pipeline
from ovdiff_core.backends.tokens import locate_name_tokens


def _call(pipe, prompt: str, size: int, steps: int, guidance: float, n: int) -> torch.Tensor:
    out = pipe(
        prompt=prompt,
        negative_prompt="blurry" if guidance > 1 else None,
        num_images_per_prompt=n,
        num_inference_steps=steps,
        guidance_scale=guidance,
        height=size,
        width=size,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    )
    return out.images


def flop_overhead(pipe, size: int, guidance: float, n: int, positions) -> float:
    """Extra matmul FLOPs of capture in one UNet call, counted on the meta device."""
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(pipe.unet.config)
    batch = 2 * n if guidance > 1 else n
    lat = size // pipe.vae_scale_factor
    x = torch.zeros(batch, 4, lat, lat, device="meta")
    ctx = torch.zeros(batch, 77, unet.config.cross_attention_dim, device="meta")
    t = torch.full((batch,), 500, device="meta")
    counts = []
    for capture in (False, True):
        rec = AttributionRecorder(positions, n, (lat, lat))
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            if capture:
                with capture_cross_attention(unet, rec):
                    unet(x, t, encoder_hidden_states=ctx)
            else:
                unet(x, t, encoder_hidden_states=ctx)
        counts.append(counter.get_total_flops())
    return counts[1] / counts[0] - 1.0


def measure(name: str, pipe, size: int, steps: int, guidance: float, n: int, repeats: int):
    found = locate_name_tokens(pipe.tokenizer, "A good picture of a {}", "potted plant")
    latent = size // pipe.vae_scale_factor

    def plain() -> torch.Tensor:
        return _call(pipe, found.prompt, size, steps, guidance, n)

    def captured() -> torch.Tensor:
        rec = AttributionRecorder(found.positions, n, (latent, latent))
        with capture_cross_attention(pipe.unet, rec):
            out = _call(pipe, found.prompt, size, steps, guidance, n)
        rec.attribution((size, size))
        return out

    with torch.no_grad():
        a, b = plain(), captured()  # warm-up, and the equality check
        identical = torch.equal(a, b)
        wall: dict[str, list[float]] = {"plain": [], "capture": []}
        cpu: dict[str, list[float]] = {"plain": [], "capture": []}
        for _ in range(repeats):
            for key, fn in (("plain", plain), ("capture", captured)):
                w0, c0 = time.perf_counter(), time.process_time()
                fn()
                wall[key].append(time.perf_counter() - w0)
                cpu[key].append(time.process_time() - c0)
    wp, wc = statistics.median(wall["plain"]), statistics.median(wall["capture"])
    cp, cc = statistics.median(cpu["plain"]), statistics.median(cpu["capture"])
    cfg = "yes" if guidance > 1 else "no"
    flops = flop_overhead(pipe, size, guidance, n, found.positions)
    print(
        f"| {name} | {size} | {steps} | {n} | {cfg} | {wp:.2f} | {wc:.2f} | "
        f"{100 * (wc / wp - 1):+.1f}% | {cp:.2f} | {cc:.2f} | {100 * (cc / cp - 1):+.1f}% | "
        f"{100 * flops:+.2f}% | {identical} |",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer models and repeats")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(
        "| model | px | steps | images | CFG | plain wall s | capture wall s | wall overhead "
        "| plain CPU s | capture CPU s | CPU overhead | FLOP overhead | identical |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    measure("tiny (test UNet)", tiny_sd_pipeline(0), 64, 4, 8.0, 2, 3 if args.quick else 10)
    runs = [("sd15", 256, 2, 8.0, 1)]
    if not args.quick:
        runs.append(("sd-turbo", 256, 2, 0.0, 1))
    for arch, size, steps, guidance, n in runs:
        pipe = random_sd_pipeline(arch, decoder="tiny")
        label = f"{arch} (real size, random)"
        measure(label, pipe, size, steps, guidance, n, 1 if args.quick else 4)
        del pipe
        gc.collect()


if __name__ == "__main__":
    main()
