"""Device check: one class built and one image segmented, every stage's tensors on the device.

Run on a CUDA machine (no downloads: random weights)::

    python scripts/gpu_check.py                      # cuda, float16: tiny, then paper-size
    python scripts/gpu_check.py --device cpu         # tiny models only, float32 (a minute)
    python scripts/gpu_check.py --sizes real --images 8 --dtype float32

Two model sets, both with the ``paper`` preset's structure (SD generator with attention
attribution and feature-cluster masks, SD + DINO + CLIP features, CLIP pre-filter, sliding
windows):

* ``tiny``: the tiny backend of :func:`ovdiff_core.backends.presets.build_ovdiff`;
* ``real``: the paper's architectures at full size with random weights (SD v1.5 UNet,
  VAE and text encoder, DINO ViT-B/8, open_clip ViT-B/16), 512 px support images
  (``--images`` of them, 32 in the paper).

For each it prints the seconds of stage 1 (support generation), stage 2 per extractor
(features and prototype bank) and stage 3 (segmentation), and asserts where tensors
were: every extractor output and every K-means input on the device, banks on the CPU,
weights in the requested dtype. Exit status 0 when every check passed.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))

import ovdiff_core.prototypes as prototypes_module
from ovdiff_core.backends.loading import best_dtype, dtype_by_name
from ovdiff_core.backends.presets import PRESETS, build_ovdiff


@dataclass
class Record:
    """Devices seen while a model set runs."""

    extractor_outputs: dict[str, set[str]] = field(default_factory=dict)
    kmeans_inputs: set[str] = field(default_factory=set)


class Recording:
    """A feature extractor that records the device of every output (same interface)."""

    def __init__(self, inner: Any, record: Record) -> None:
        self.inner, self.record = inner, record
        self.name, self.stride = inner.name, inner.stride

    def spec(self) -> dict[str, Any]:
        return dict(self.inner.spec())

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        out = self.inner(images)
        self.record.extractor_outputs.setdefault(self.name, set()).add(str(out.device))
        return out


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def real_size_paper(dev: torch.device, dt: torch.dtype, n_images: int) -> Any:
    """The paper preset's object graph with full-size random-weight models on ``dev``."""
    import open_clip

    from ovdiff_core.backends.extractors import ClipExtractor, DinoExtractor, SDFeatureExtractor
    from ovdiff_core.backends.generator import SDSupportGenerator
    from ovdiff_core.backends.proposer import make_proposer
    from ovdiff_core.backends.scorer import ClipScorer
    from ovdiff_core.backends.tiny_sd import random_sd_pipeline
    from ovdiff_core.backends.tiny_vision import random_vision_model
    from ovdiff_core.pipeline import OVDiff

    p = PRESETS["paper"]
    generation = p.generation.replace(n_images=n_images, batch_size=min(8, n_images))
    pipe = random_sd_pipeline("sd15", decoder="kl").to(dev, dt)
    dino = DinoExtractor(random_vision_model("dino-vitb8").to(dev, dt), model_id="random:dino")
    clip_model = random_vision_model("clip-vitb16").to(dev, dt)
    extractors = [
        SDFeatureExtractor.from_pipeline(pipe, model_id="random:sd"),
        dino,
        ClipExtractor(clip_model, model_id="random:clip"),
    ]
    proposer = make_proposer(generation.masks, dino, generation.proposer_input_size)
    generator = SDSupportGenerator(pipe, generation, proposer, model_name="random:sd")
    scorer = ClipScorer(clip_model, open_clip.get_tokenizer("ViT-B-16"), model_id="random:clip")
    return OVDiff(
        generator=generator,
        extractors=extractors,
        scorer=scorer,
        prototype_config=p.prototype_config,
        segment_config=p.segment_config,
        cache=None,
    )


def run(label: str, ov: Any, dev: torch.device, dt: torch.dtype) -> list[str]:
    """Build one class and segment one image; print stage seconds; return failures."""
    record = Record()
    ov.extractors = [Recording(e, record) for e in ov.extractors]
    real_kmeans = prototypes_module.kmeans

    def recording_kmeans(x: Any, *args: Any, **kwargs: Any) -> Any:
        record.kmeans_inputs.add(str(getattr(x, "device", "?")))
        return real_kmeans(x, *args, **kwargs)

    prototypes_module.kmeans = recording_kmeans  # type: ignore[assignment]
    rows: list[tuple[str, float]] = []
    failures: list[str] = []
    try:
        _sync(dev)
        t = time.perf_counter()
        for event in ov.build_iter("cat"):
            if event.stage in ("support", "bank"):
                _sync(dev)
                now = time.perf_counter()
                what = (
                    "stage 1: support set"
                    if event.stage == "support"
                    else (f"stage 2: features + bank ({event.extractor})")
                )
                if event.stage == "support" and event.done < event.total:
                    continue  # a batch; the stage ends with the last one
                rows.append((what, now - t))
                t = now
        category = ov.categories["cat"]
        image = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
        _sync(dev)
        t = time.perf_counter()
        seg = ov.segment(image, ["cat"])
        _sync(dev)
        rows.append(("stage 3: segment one 640x480 image", time.perf_counter() - t))
    except Exception as err:  # report, then the checks below say what was reached
        failures.append(f"{label}: {type(err).__name__}: {err}")
        category, seg = None, None
    finally:
        prototypes_module.kmeans = real_kmeans  # type: ignore[assignment]

    print(f"\n{label} on {dev} ({str(dt).removeprefix('torch.')} weights)")
    print("| stage | seconds |\n|---|---|")
    for what, secs in rows:
        print(f"| {what} | {secs:.2f} |")

    want = str(dev) if dev.index is not None or dev.type == "cpu" else None
    for name, devices in sorted(record.extractor_outputs.items()):
        ok = all(torch.device(d).type == dev.type for d in devices) and (
            want is None or devices == {want}
        )
        if not ok:
            failures.append(f"{label}: extractor {name} returned tensors on {sorted(devices)}")
    if not record.kmeans_inputs or any(
        torch.device(d).type != dev.type for d in record.kmeans_inputs if d != "?"
    ):
        failures.append(f"{label}: K-means ran on {sorted(record.kmeans_inputs) or 'nothing'}")
    if category is not None:
        for name, bank in category.banks.items():
            if bank.vectors.device.type != "cpu":
                failures.append(f"{label}: bank {name} is on {bank.vectors.device}, not the CPU")
    for ex in ov.extractors:
        got = ex.spec().get("dtype")
        if got != str(dt).removeprefix("torch."):
            failures.append(f"{label}: extractor {ex.name} weights are {got}, not {dt}")
    if seg is not None and not isinstance(seg.labels, np.ndarray):
        failures.append(f"{label}: segmentation labels are {type(seg.labels)}, not numpy")
    print("device checks:", "passed" if not failures else "FAILED")
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="torch device (default cuda)")
    parser.add_argument("--dtype", default=None, help="weights dtype (default: the device's)")
    parser.add_argument(
        "--sizes",
        choices=("tiny", "real", "both"),
        default=None,
        help="model sets (default: both on CUDA, tiny elsewhere)",
    )
    parser.add_argument("--images", type=int, default=32, help="support images (real size)")
    args = parser.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available here; run with --device cpu", file=sys.stderr)
        return 2
    dt = dtype_by_name(args.dtype) if args.dtype else best_dtype(dev)
    sizes = args.sizes or ("both" if dev.type == "cuda" else "tiny")
    failures: list[str] = []
    if sizes in ("tiny", "both"):
        ov = build_ovdiff("paper", backend="tiny", device=dev, dtype=dt, use_cache=False)
        failures += run("tiny backend, paper preset", ov, dev, dt)
    if sizes in ("real", "both"):
        ov = real_size_paper(dev, dt, args.images)
        failures += run(f"paper-size random weights, {args.images} images", ov, dev, dt)
    for f in failures:
        print("FAIL", f)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
