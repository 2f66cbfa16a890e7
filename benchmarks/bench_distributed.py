"""Build time per class and eval throughput, 1 vs 2 processes, ``cpu`` preset, real sizes.

Each configuration runs in fresh processes on a fresh cache: one process without a
launcher (the plain ``ovdiff`` path) and two processes under ``torchrun --standalone``
(gloo), each process with ``cores / processes`` torch threads. Every process builds the
``cpu`` preset's object graph at real architecture sizes with random weights (SD-Turbo
architecture = SD 2.1 UNet + OpenCLIP-H text encoder, TAESD decoder, CLIP ViT-B/16 and
DINOv2-S/14 key extractors, the CLIP pre-filter; see ``bench_presets.py``), then runs the
same functions as ``ovdiff build`` / ``ovdiff eval``: :func:`ovdiff_core.cli.build_sharded`
over the classes (round-robin) and :func:`ovdiff_core.cli.evaluate_sharded` over a
synthetic VOC folder (160x224 images, strided), which sums the confusion matrices.

Reported: build wall time per class (classes / wall time of the whole build, the number
that matters for 150 classes), the mean of each class's own build time, eval images/s
(images / slowest rank's segmentation time) and peak RSS per process. Random weights make
the masks and mIoU meaningless; speed does not depend on weight values. Nothing is
downloaded. On a machine whose cores are shared, two processes split the same cores: expect
little gain there; on GPUs each process has its own device.

    python benchmarks/bench_distributed.py --quick     # 2 classes x 2 images, 4 eval images
    python benchmarks/bench_distributed.py             # 4 classes x 8 images, 16 eval images
    python benchmarks/bench_distributed.py --quick --procs 1 --threads 1   # thread effect
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CLASSES = ["cat", "dog", "sofa", "potted plant", "bus", "bird", "chair", "train"]


def _random_cpu_model(cache_dir: str, n_images: int):  # -> OVDiff
    """The ``cpu`` preset's OVDiff with real-size random-weight models (as bench_presets)."""
    import open_clip

    from ovdiff_core.backends.extractors import ClipExtractor, DinoExtractor
    from ovdiff_core.backends.generator import SDSupportGenerator
    from ovdiff_core.backends.presets import PRESETS
    from ovdiff_core.backends.proposer import make_proposer
    from ovdiff_core.backends.scorer import ClipScorer
    from ovdiff_core.backends.tiny_sd import random_sd_pipeline
    from ovdiff_core.backends.tiny_vision import random_vision_model
    from ovdiff_core.cache import Cache
    from ovdiff_core.pipeline import OVDiff

    preset = PRESETS["cpu"]
    cfg = preset.generation.replace(n_images=n_images)
    pipe = random_sd_pipeline("sd-turbo", decoder="tiny")
    clip_model = random_vision_model("clip-vitb16")
    dinov2 = random_vision_model("dinov2-small")
    extractors = {
        "clip": ClipExtractor(clip_model, model_id="random-clip-vitb16"),
        "dinov2": DinoExtractor(dinov2, model_id="random-dinov2-small", name="dinov2"),
    }
    assert [e.kind for e in preset.extractors] == list(extractors)
    proposer = make_proposer(cfg.masks, extractors[preset.proposer], cfg.proposer_input_size)
    generator = SDSupportGenerator(pipe, cfg, proposer=proposer, model_name="random-sd-turbo")
    scorer = ClipScorer(clip_model, open_clip.get_tokenizer("ViT-B-16"), model_id="random")
    return OVDiff(
        generator=generator,
        extractors=list(extractors.values()),
        scorer=scorer if preset.segment_config.prefilter else None,
        prototype_config=preset.prototype_config,
        segment_config=preset.segment_config,
        cache=Cache(cache_dir),
    )


def _child(args: argparse.Namespace) -> None:
    import numpy as np
    import torch

    from ovdiff_core.cli import build_sharded, build_vocabulary, evaluate_sharded
    from ovdiff_core.distributed import distributed
    from ovdiff_core.evaluation.datasets import VOCSegmentation

    torch.set_grad_enabled(False)
    names = CLASSES[: args.classes]
    with distributed() as ctx:
        start = time.perf_counter()
        model = _random_cpu_model(args.cache, args.support)
        construct_s = time.perf_counter() - start
        ctx.barrier()
        start = time.perf_counter()
        rows = build_sharded(model, names, quiet=True)
        build_wall = time.perf_counter() - start
        build_vocabulary(model, names, quiet=True)  # the other ranks' classes, from the cache
        ds = VOCSegmentation(args.root, "val", background=True, limit=args.images)
        ctx.barrier()
        result = evaluate_sharded(model, ds, background=True, quiet=True, names=names)
        rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        peak = float(ctx.all_reduce(np.array([rss_mb]), op="max")[0])
        if ctx.is_main:
            record = {
                "processes": ctx.world_size,
                "threads": torch.get_num_threads(),
                "classes": len(names),
                "support": args.support,
                "build_wall": build_wall,
                "class_mean": sum(r.seconds for r in rows) / len(rows),
                "built": sum(not r.cached for r in rows),
                "images": result.metrics.n_images,
                "images_per_s": result.images_per_s,
                "construct_s": construct_s,
                "rss_mb": peak,
            }
            print("RESULT " + json.dumps(record), flush=True)


def _launch(procs: int, threads: int | None, child_args: list[str], timeout: float) -> dict | str:
    cores = os.cpu_count() or 1
    env = {**os.environ, "OMP_NUM_THREADS": str(threads or max(1, cores // procs))}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(var, None)
    script = [str(Path(__file__).resolve()), "--child", *child_args]
    if procs == 1:
        cmd = [sys.executable, *script]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", str(procs), *script]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout:.0f} s"
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return f"exit {proc.returncode}: {proc.stderr[-2000:]}"
    return json.loads(lines[-1][len("RESULT ") :])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 classes x 2 images, 4 images")
    ap.add_argument("--classes", type=int, default=None, help=f"at most {len(CLASSES)}")
    ap.add_argument("--support", type=int, default=None, help="support images per class")
    ap.add_argument("--images", type=int, default=None, help="eval images")
    ap.add_argument("--procs", default="1,2", help="process counts to compare")
    ap.add_argument("--threads", type=int, default=None, help="per process (cores / procs)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per configuration")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args)
        return
    classes = args.classes or (2 if args.quick else 4)
    support = args.support or (2 if args.quick else 8)
    images = args.images or (4 if args.quick else 16)
    if not 1 <= classes <= len(CLASSES):
        ap.error(f"--classes must be in 1..{len(CLASSES)}")
    import torch

    from ovdiff_core.evaluation.datasets import class_names
    from ovdiff_core.evaluation.synthetic import color_world, write_synthetic_voc

    print(
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average "
        f"{tuple(round(x, 2) for x in os.getloadavg())}; cpu preset, real-size random weights"
    )
    print(
        f"{classes} classes x {support} support images; eval on {images} synthetic VOC "
        "images of 160x224 with those classes\n"
    )
    print("| processes | threads each | build s per class (wall) | mean s per class "
          "| eval images/s | peak RSS per process, MB |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|")
    voc_names = class_names("voc")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "voc"
        write_synthetic_voc(root, color_world(voc_names), voc_names, n_images=images, seed=0)
        for procs in (int(p) for p in args.procs.split(",")):
            child = ["--root", str(root), "--cache", str(Path(tmp) / f"cache-{procs}"),
                     "--classes", str(classes), "--support", str(support),
                     "--images", str(images)]  # fmt: skip
            r = _launch(procs, args.threads, child, args.timeout)
            if isinstance(r, str):
                print(f"| {procs} | failed: {r.splitlines()[-1] if r else ''} | | | | |")
                continue
            assert r["built"] == classes and r["images"] == images
            print(
                f"| {procs} | {r['threads']} | {r['build_wall'] / classes:.1f} "
                f"| {r['class_mean']:.1f} | {r['images_per_s']:.2f} | {r['rss_mb']:.0f} |"
            )
    print(f"\nload average at the end {tuple(round(x, 2) for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
