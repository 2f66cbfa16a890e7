"""Shared pieces of the core tests: hand-built feature worlds with known answers.

A *palette world* maps exact RGB colours to chosen feature vectors, so a test decides
every cosine similarity in advance. :class:`PaletteExtractor` gives each pixel the vector
of its nearest palette colour and averages pixels per feature cell; images are painted
with :func:`ovdiff_core.colorworld.paint_scene` (``noise=0`` keeps colours exact).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ovdiff_core.config import PrototypeConfig
from ovdiff_core.pipeline import extract_features
from ovdiff_core.prototypes import build_bank
from ovdiff_core.types import Category, SupportSet

Color = tuple[int, int, int]


def unit(*components: float, dim: int = 8) -> np.ndarray:
    """A unit vector of length ``dim`` whose first components are given (then normalised)."""
    v = np.zeros(dim, dtype=np.float64)
    v[: len(components)] = components
    return v / np.linalg.norm(v)


class PaletteExtractor:
    """Feature extractor of a palette world (satisfies ``FeatureExtractor``).

    Args:
        palette: ``{RGB colour: feature vector}``; every pixel takes the vector of the
            nearest palette colour.
        stride: pixels per feature cell; the grid is ``ceil(H / stride) x ceil(W / stride)``
            and each cell is the mean of its pixels' vectors (adaptive average pooling).
    """

    def __init__(self, palette: Mapping[Color, np.ndarray], stride: int = 8, name: str = "pal"):
        self.name = name
        self.stride = stride
        self.colors = torch.tensor([list(c) for c in palette], dtype=torch.float32) / 255.0
        self.vectors = torch.tensor(np.stack([np.asarray(v) for v in palette.values()])).float()
        self.calls = 0

    def spec(self) -> dict[str, Any]:
        return {"type": "palette", "name": self.name, "stride": self.stride}

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        b, _, h, w = images.shape
        px = images.permute(0, 2, 3, 1).reshape(-1, 3)
        nearest = torch.cdist(px, self.colors).argmin(1)
        feats = self.vectors[nearest].reshape(b, h, w, -1).permute(0, 3, 1, 2)
        grid = (max(1, -(-h // self.stride)), max(1, -(-w // self.stride)))
        return F.adaptive_avg_pool2d(feats, grid)


def support_from_boxes(
    category: str,
    size: tuple[int, int],
    background: Color | list[Color],
    objects: Sequence[Sequence[tuple[Sequence[Color], tuple[int, int, int, int]]]],
    bg_margin: int = 0,
) -> SupportSet:
    """A support set painted without noise: image i shows ``objects[i]`` (stripes of colours
    in boxes, as in ``paint_scene``) on ``background`` (one colour, or a list: one per image).

    Foreground = the objects' boxes; background = every pixel more than ``bg_margin`` px
    (Chebyshev) away from every box.
    """
    from scipy.ndimage import binary_dilation

    from ovdiff_core.colorworld import paint_scene

    images, fgs, bgs = [], [], []
    for i, objs in enumerate(objects):
        bg_col = background[i] if isinstance(background, list) else background
        img, index = paint_scene(size, bg_col, objs, noise=0.0)
        fg = index > 0
        grown = binary_dilation(fg, np.ones((3, 3)), iterations=bg_margin) if bg_margin else fg
        images.append(img)
        fgs.append(fg)
        bgs.append(~grown)
    return SupportSet(
        category=category,
        images=np.stack(images),
        attributions=np.stack(fgs).astype(np.float32),
        foreground=np.stack(fgs),
        background=np.stack(bgs),
        settings={"test": category, "n": len(objects), "size": list(size)},
    )


def make_category(
    support: SupportSet,
    extractors: Sequence[Any],
    config: PrototypeConfig | None = None,
    stuff: bool = False,
) -> Category:
    """Category with one bank per extractor, built like the pipeline does."""
    banks = {
        ex.name: build_bank(support, extract_features(ex, support.images), ex.name, config)
        for ex in extractors
    }
    return Category(name=support.category, banks=banks, support=support, stuff=stuff)


def accuracy(pred: np.ndarray, truth: np.ndarray) -> float:
    return float((pred == truth).mean())


def iou(pred: np.ndarray, truth: np.ndarray, label: int) -> float:
    p, t = pred == label, truth == label
    union = (p | t).sum()
    return float((p & t).sum() / union) if union else 1.0


def truth_labels(index: np.ndarray, object_labels: Sequence[int]) -> np.ndarray:
    """Map paint_scene's object-index map to label ids (0 stays background)."""
    lut = np.array([0, *object_labels], dtype=np.int64)
    return lut[index]


# --------------------------------------------------------------------------- processes


def concurrent_cache_worker(root: str, barrier: Any, results: Any, rounds: int) -> None:
    """Run in a separate process: build "cat" into the shared cache, then hammer one raw
    entry with saves and loads. Puts a dict of observations on ``results``."""
    from ovdiff_core.cache import Cache, tensor_checksum
    from ovdiff_core.colorworld import ColorExtractor, ColorGenerator, ColorWorld
    from ovdiff_core.pipeline import OVDiff

    cache = Cache(root)
    gen = ColorGenerator(ColorWorld.default(), n_images=6, batch_size=2)
    ex = ColorExtractor()
    model = OVDiff(gen, [ex], cache=cache)
    barrier.wait()
    cat = model.build(["cat"])[0]
    bank_sum = tensor_checksum(cat.banks["color"].tensors())

    key = Cache.key("blob", {"shared": True})
    payload = {"x": torch.arange(200_000, dtype=torch.float32)}
    bad_loads = 0
    for _ in range(rounds):
        cache.save("blob", "shared", key, payload, {"who": "any"})
        got = cache.load("blob", "shared", key)
        if got is None or not torch.equal(got[0]["x"], payload["x"]):
            bad_loads += 1
    results.put(
        {"generated": gen.generated, "calls": ex.calls, "bank": bank_sum, "bad_loads": bad_loads}
    )


def save_tiny_model_repos(root: Any) -> None:
    """The tiny models saved under ``root`` like their hub repos (``sd``, ``taesd``,
    ``dinov2``, ``clip`` folders), so that the real loaders can read them offline."""
    import json

    from diffusers import AutoencoderTiny
    from safetensors.torch import save_file

    from ovdiff_core.backends.tiny_sd import tiny_sd_pipeline
    from ovdiff_core.backends.tiny_vision import TINY_CLIP_CONFIG, tiny_dinov2, tiny_open_clip

    tiny_sd_pipeline(seed=0).save_pretrained(root / "sd")
    torch.manual_seed(0)
    AutoencoderTiny(
        encoder_block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
    ).save_pretrained(root / "taesd")
    tiny_dinov2(seed=0).save_pretrained(root / "dinov2")
    (root / "clip").mkdir()
    config = {"model_cfg": TINY_CLIP_CONFIG, "preprocess_cfg": {}}
    (root / "clip" / "open_clip_config.json").write_text(json.dumps(config))
    state = {k: v.contiguous() for k, v in tiny_open_clip(seed=0).state_dict().items()}
    save_file(state, root / "clip" / "open_clip_model.safetensors")


def loop_miou(pairs: Sequence[tuple[np.ndarray, np.ndarray]], num_classes: int) -> float:
    """TP/FP/FN per class with explicit loops over pixels; mIoU over classes present."""
    tp, fp, fn = np.zeros(num_classes), np.zeros(num_classes), np.zeros(num_classes)
    for pred, gt in pairs:
        for p, g in zip(pred.ravel().tolist(), gt.ravel().tolist(), strict=True):
            if g == 255:
                continue
            if p == g:
                tp[g] += 1
            else:
                fn[g] += 1
                if 0 <= p < num_classes:
                    fp[p] += 1
    ious = [tp[c] / (tp[c] + fp[c] + fn[c]) for c in range(num_classes) if tp[c] + fp[c] + fn[c]]
    return sum(ious) / len(ious)
