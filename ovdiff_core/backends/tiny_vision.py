"""Tiny random vision models of the real classes, for tests and the offline ``tiny`` backend.

Each builder returns the same class the real checkpoint loads into, with a tiny config
and deterministic random weights (the global torch RNG is left untouched):

* :func:`tiny_dino` - ``transformers.ViTModel`` (DINO ViT-B/8's class), patch 8.
* :func:`tiny_dinov2` - ``transformers.Dinov2Model``, patch 14.
* :func:`tiny_open_clip` - ``open_clip.model.CLIP`` with a ViT image tower (patch 16,
  three blocks so "second-to-last" is a real choice) and a text tower using CLIP's own
  49,408-token BPE tokenizer (bundled with open_clip, no download).

All are in eval mode, float32, on the CPU.

For benchmarks, :func:`random_vision_model` builds the *real-size* architectures (DINO
ViT-B/8, DINOv2-S/14 and -B/14, open_clip ViT-B/16) from configs written here, with random
weights: speed does not depend on weight values, and nothing is downloaded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from open_clip.model import CLIP
    from transformers import Dinov2Model, ViTModel

__all__ = ["REAL_SIZE_VISION", "random_vision_model", "tiny_dino", "tiny_dinov2", "tiny_open_clip"]


def tiny_dino(seed: int = 0, patch_size: int = 8) -> ViTModel:
    """A 2-block, 32-wide, 4-head ``ViTModel`` with DINO's layout (no pooler).

    ``image_size`` in the config is 32 (a 4x4 patch grid); other sizes work through
    position-embedding interpolation, as with the real DINO.
    """
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        patch_size=patch_size,
        image_size=4 * patch_size,
        qkv_bias=True,
        layer_norm_eps=1e-6,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ViTModel(config, add_pooling_layer=False)
    return model.eval()


def tiny_dinov2(seed: int = 0) -> Dinov2Model:
    """A 2-block, 32-wide, 4-head ``Dinov2Model`` (patch 14, 4x4 grid at 56 px)."""
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        mlp_ratio=2,
        patch_size=14,
        image_size=56,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Dinov2Model(config)
    return model.eval()


TINY_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 32,
    "quick_gelu": True,  # like OpenAI's CLIP weights
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 32, "head_width": 8, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
}


def tiny_open_clip(seed: int = 0) -> CLIP:
    """A tiny ``open_clip.model.CLIP``: ViT image tower (3 blocks, width 32, 4 heads,
    patch 16, 32 px native) and text tower (2 layers, width 32, 77 tokens, CLIP's
    vocabulary). Its tokenizer is ``open_clip.get_tokenizer("ViT-B-16")`` (offline).
    """
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    cfg = TINY_CLIP_CONFIG
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIP(
            embed_dim=cfg["embed_dim"],
            vision_cfg=CLIPVisionCfg(**cfg["vision_cfg"]),
            text_cfg=CLIPTextCfg(**cfg["text_cfg"]),
            quick_gelu=cfg["quick_gelu"],
        )
    return model.eval()


# Real-size architectures (the published checkpoints' configs), for random-weight timing.
REAL_SIZE_VISION: dict[str, dict[str, Any]] = {
    # facebook/dino-vitb8: ViT-B/8, 86M parameters, 224 px native (28x28 grid).
    "dino-vitb8": {
        "class": "vit",
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
        "patch_size": 8,
        "image_size": 224,
        "qkv_bias": True,
        "layer_norm_eps": 1e-6,
    },
    # facebook/dinov2-small: ViT-S/14, 22M parameters, 518 px native (37x37 grid).
    "dinov2-small": {
        "class": "dinov2",
        "hidden_size": 384,
        "num_hidden_layers": 12,
        "num_attention_heads": 6,
        "mlp_ratio": 4,
        "patch_size": 14,
        "image_size": 518,
    },
    # facebook/dinov2-base: ViT-B/14, 86M parameters.
    "dinov2-base": {
        "class": "dinov2",
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "mlp_ratio": 4,
        "patch_size": 14,
        "image_size": 518,
    },
    # open_clip ViT-B-16 (OpenAI weights' architecture): 150M parameters, 224 px native.
    "clip-vitb16": {
        "class": "open_clip",
        "embed_dim": 512,
        "quick_gelu": True,
        "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 16},
        "text_cfg": {
            "context_length": 77,
            "vocab_size": 49408,
            "width": 512,
            "heads": 8,
            "layers": 12,
        },
    },
}


def random_vision_model(arch: str, seed: int = 0) -> Any:
    """A real-size vision model of :data:`REAL_SIZE_VISION` with random weights (CPU, eval).

    Returns a ``transformers.ViTModel`` (no pooler), ``transformers.Dinov2Model`` or
    ``open_clip.model.CLIP``: the classes the real checkpoints load into.
    """
    if arch not in REAL_SIZE_VISION:
        raise ValueError(f"arch must be one of {sorted(REAL_SIZE_VISION)}, got {arch!r}")
    spec = dict(REAL_SIZE_VISION[arch])
    kind = spec.pop("class")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "vit":
            from transformers import ViTConfig, ViTModel

            model: Any = ViTModel(ViTConfig(**spec), add_pooling_layer=False)
        elif kind == "dinov2":
            from transformers import Dinov2Config, Dinov2Model

            model = Dinov2Model(Dinov2Config(**spec))
        else:
            from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

            model = CLIP(
                embed_dim=spec["embed_dim"],
                vision_cfg=CLIPVisionCfg(**spec["vision_cfg"]),
                text_cfg=CLIPTextCfg(**spec["text_cfg"]),
                quick_gelu=spec["quick_gelu"],
            )
    return model.eval()
