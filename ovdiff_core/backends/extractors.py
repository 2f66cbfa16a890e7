"""Dense feature extractors: Stable Diffusion UNet queries, DINO keys, CLIP keys.

All three implement :class:`ovdiff_core.protocols.FeatureExtractor`:

* input: (B, 3, H, W) float in [0, 1], RGB, any device (moved to the model's);
  H, W >= ``stride``. Each extractor resizes the batch to the nearest size its model
  accepts (a multiple of the patch size, or of 64 for SD 1.x), so the output grid always
  covers the whole input: cell (r, c) covers input rows ``[r * H / h, (r + 1) * H / h)``.
* output: (B, D, h, w) on the model's device (a CUDA model's features stay on the GPU:
  stage 2 and 3 run there; only what is stored, banks and segmentations, is moved to the
  CPU by its caller), in ``features_dtype`` (float32 by default, whatever the weights'
  dtype; float16 halves the memory of large SD features), not normalised.

Every extractor takes an already-built model in its constructor (tests pass tiny random
models of the same classes) and has a ``from_pretrained`` builder that resolves weights
offline-first through :mod:`ovdiff_core.backends.loading`.

The extractors are deterministic (no dropout, fixed noise seed) and a batch's features do
not depend on which other images are in the batch.
"""

from __future__ import annotations

import inspect
import re
import threading
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ovdiff_core.backends.loading import (
    ModelRef,
    best_device,
    best_dtype,
    default_model_id,
    ensure_model,
    load_sd_pipeline,
    shared,
    transformers_variant,
)

__all__ = [
    "ClipExtractor",
    "DinoExtractor",
    "SDFeatureExtractor",
    "paper_sd_layers",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the wanted activations are captured."""


def _check_images(images: torch.Tensor, stride: int, who: str) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images)
        raise ValueError(f"{who}: images must be a (B, 3, H, W) tensor, got {shape}")
    if not images.is_floating_point():
        raise ValueError(
            f"{who}: images must be float in [0, 1], got {images.dtype}; divide uint8 by 255"
        )
    if images.shape[0] == 0:
        raise ValueError(f"{who}: images is an empty batch; pass at least one image")
    h, w = images.shape[-2:]
    if h < stride or w < stride:
        raise ValueError(f"{who}: images must be at least {stride}x{stride} pixels, got {h}x{w}")


def _snap(size: int, multiple: int) -> int:
    """The multiple of ``multiple`` nearest to ``size`` (at least one multiple)."""
    return max(multiple, round(size / multiple) * multiple)


def _model_size(
    images: torch.Tensor, multiple: int, input_size: tuple[int, int] | None
) -> tuple[int, int]:
    """Size the model sees: ``input_size``, or the batch's (H, W) snapped to ``multiple``."""
    if input_size is not None:
        return input_size
    return _snap(int(images.shape[-2]), multiple), _snap(int(images.shape[-1]), multiple)


def _resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)


def _normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images - m) / s


def _param(module: nn.Module) -> torch.Tensor:
    return next(module.parameters())


FEATURE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _features_dtype(dtype: torch.dtype, who: str) -> torch.dtype:
    if dtype not in FEATURE_DTYPES:
        raise ValueError(
            f"{who}: features_dtype must be one of "
            f"{[str(d).replace('torch.', '') for d in FEATURE_DTYPES]}, got {dtype!r}"
        )
    return dtype


def _dtype_spec(dtype: torch.dtype) -> dict[str, Any]:
    """Spec entry of a non-default features dtype (float32 adds nothing: cache keys of
    float32 features are unchanged)."""
    return {} if dtype == torch.float32 else {"features_dtype": str(dtype).replace("torch.", "")}


def _as_size(value: int | Sequence[int] | None, who: str) -> tuple[int, int] | None:
    if value is None:
        return None
    size = (int(value), int(value)) if isinstance(value, int) else tuple(int(v) for v in value)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"{who}: input_size must be an int or (H, W) pair >= 1, got {value!r}")
    return size[0], size[1]


# --------------------------------------------------------------------------------------
# DINO / DINOv2 (transformers)
# --------------------------------------------------------------------------------------

# transformers 5 names the key projection "<layers|encoder.layer>.<i>.attention.k_proj";
# transformers 4 named it "encoder.layer.<i>.attention.attention.key".
_KEY_PROJ = re.compile(r"(?:^|\.)layers?\.(\d+)\.attention\.(?:attention\.)?(?:k_proj|key)$")


def _key_projections(model: nn.Module) -> list[Any]:
    found: dict[int, Any] = {}
    for name, module in model.named_modules():
        match = _KEY_PROJ.search(name)
        if match and isinstance(module, nn.Linear):
            found[int(match.group(1))] = module
    if not found or sorted(found) != list(range(len(found))):
        raise ValueError(
            f"{type(model).__name__}: could not find one key projection per block "
            "(expected modules named like 'layers.<i>.attention.k_proj'); is this a ViT?"
        )
    return [found[i] for i in range(len(found))]


class DinoExtractor:
    """Key facet of one transformer block of a DINO ViT (or DINOv2), CLS dropped.

    Paper setting: ``facebook/dino-vitb8``, last block, keys of all heads concatenated
    (768-d), stride 8. ``transformers.Dinov2Model`` (stride 14) works the same way.

    Args:
        model: a ``transformers.ViTModel`` or ``transformers.Dinov2Model`` in eval mode.
        model_id: identity of the weights, recorded in :meth:`spec` (cache keys).
        revision: hub revision of the weights, recorded in :meth:`spec`.
        layer: block index (negative counts from the end; -1 = last block).
        input_size: if given, (H, W) every batch is resized to (multiples of the patch
            size); by default each batch keeps its size, snapped to the patch grid.
        name: extractor name used by banks and segmentations.
        mean, std: per-channel normalisation applied to [0, 1] inputs.
        features_dtype: dtype of the returned features (float32, float16, bfloat16),
            independent of the weights' dtype.
    """

    def __init__(
        self,
        model: Any,
        model_id: str = "unknown",
        revision: str | None = None,
        layer: int = -1,
        input_size: int | Sequence[int] | None = None,
        name: str = "dino",
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        features_dtype: torch.dtype = torch.float32,
    ) -> None:
        self.model: Any = model.eval()
        self.model_id = model_id
        self.revision = revision
        config = self.model.config
        patch = config.patch_size
        self.patch_size = int(patch if isinstance(patch, int) else patch[0])
        self.stride = self.patch_size
        keys = _key_projections(model)
        if not -len(keys) <= layer < len(keys):
            raise ValueError(
                f"DinoExtractor: layer must be in [-{len(keys)}, {len(keys)}), got {layer}"
            )
        self.layer = layer % len(keys)
        self._key: Any = keys[self.layer]
        self.n_prefix = 1 + int(getattr(config, "num_register_tokens", 0) or 0)
        self.input_size = _as_size(input_size, "DinoExtractor")
        if self.input_size is not None and any(s % self.patch_size for s in self.input_size):
            raise ValueError(
                f"DinoExtractor: input_size {self.input_size} must be multiples of the patch "
                f"size {self.patch_size}"
            )
        self.name = name
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.dim = int(self._key.out_features)
        self.features_dtype = _features_dtype(features_dtype, "DinoExtractor")
        self._interp_kwarg = "interpolate_pos_encoding" in _forward_params(model)

    def spec(self) -> dict[str, Any]:
        return {
            "type": "dino",
            "class": type(self.model).__name__,
            "dtype": str(_param(self.model).dtype).replace("torch.", ""),
            "model_id": self.model_id,
            "revision": self.revision,
            "layer": self.layer,
            "facet": "key",
            "patch_size": self.patch_size,
            "input_size": list(self.input_size) if self.input_size else None,
            "mean": list(self.mean),
            "std": list(self.std),
            **_dtype_spec(self.features_dtype),
        }

    @property
    def device(self) -> torch.device:
        """The model's device: where inputs are moved and features are returned."""
        return _param(self.model).device

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float [0, 1], any device -> (B, D, h, w) keys in ``features_dtype``
        on the model's device, h = round(H / patch)."""
        _check_images(images, self.stride, "DinoExtractor")
        size = _model_size(images, self.patch_size, self.input_size)
        p = _param(self.model)
        x = _normalize(_resize(images.to(p.device, torch.float32), size), self.mean, self.std)
        captured: list[torch.Tensor] = []
        owner = threading.get_ident()

        def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
            if threading.get_ident() == owner:
                captured.append(output)
                raise _Stop

        handle = self._key.register_forward_hook(hook)
        kwargs = {"interpolate_pos_encoding": True} if self._interp_kwarg else {}
        try:
            with torch.inference_mode():
                self.model(pixel_values=x.to(p.dtype), **kwargs)
        except _Stop:
            pass
        finally:
            handle.remove()
        if not captured:
            raise RuntimeError("DinoExtractor: the key projection was never called")
        gh, gw = size[0] // self.patch_size, size[1] // self.patch_size
        keys = captured[0][:, self.n_prefix :, :]
        if keys.shape[1] != gh * gw:
            raise RuntimeError(
                f"DinoExtractor: expected {gh * gw} patch tokens, got {keys.shape[1]}"
            )
        return keys.reshape(keys.shape[0], gh, gw, -1).permute(0, 3, 1, 2).to(self.features_dtype)

    @classmethod
    def from_pretrained(
        cls,
        model_id: str | None = None,
        revision: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        kind: str = "dino",
        **kwargs: Any,
    ) -> DinoExtractor:
        """Load a DINO (``model_type`` "vit") or DINOv2 checkpoint and wrap it.

        Args:
            model_id: hub id or local directory; None = the default of ``kind``:
                ``facebook/dino-vitb8`` (``$OVDIFF_DINO_MODEL``) for "dino",
                ``facebook/dinov2-small`` (``$OVDIFF_DINOV2_MODEL``) for "dinov2".
            revision, device, dtype: see :func:`~ovdiff_core.backends.loading.resolve_model`,
                ``best_device``, ``best_dtype``. In float16 a folder's
                ``model.fp16.safetensors`` is read when it has one (``variant="fp16"``);
                else the float32 weights are converted.
            kind: "dino" or "dinov2": picks the default id and the environment variable
                named in errors (the architecture itself is read from the checkpoint).
            kwargs: constructor arguments (``layer``, ``input_size``, ``name``...).

        The model is shared per process (see ``loading.shared``).
        """
        if kind not in ("dino", "dinov2"):
            raise ValueError(
                f"DinoExtractor.from_pretrained: kind must be 'dino' or 'dinov2', got {kind!r}"
            )
        mid = model_id or default_model_id(kind)
        dev = torch.device(device) if device is not None else best_device()
        dt = dtype or best_dtype(dev)
        path = ensure_model(ModelRef(kind, mid, revision, fp16=dt == torch.float16))
        variant: dict[str, Any] = {"variant": v} if (v := transformers_variant(path, dt)) else {}

        def build() -> nn.Module:
            from transformers import AutoConfig, Dinov2Model, ViTModel

            config = AutoConfig.from_pretrained(path)
            model: Any
            if config.model_type == "dinov2":
                model = Dinov2Model.from_pretrained(path, dtype=dt, **variant)
            elif config.model_type == "vit":
                model = ViTModel.from_pretrained(path, add_pooling_layer=False, dtype=dt, **variant)
            else:
                raise ValueError(
                    f"DinoExtractor.from_pretrained: {mid!r} is a {config.model_type!r} model; "
                    "expected a 'vit' (DINO) or 'dinov2' checkpoint"
                )
            return model.to(dev).eval()

        model = shared(("dino", mid, revision, str(dev), str(dt)), build)
        if "name" not in kwargs and getattr(model.config, "model_type", "") == "dinov2":
            kwargs["name"] = "dinov2"
        return cls(model, model_id=mid, revision=revision, **kwargs)


def _forward_params(model: nn.Module) -> set[str]:
    return set(inspect.signature(model.forward).parameters)


# --------------------------------------------------------------------------------------
# CLIP (open_clip)
# --------------------------------------------------------------------------------------


class ClipExtractor:
    """Key facet of one block of an open_clip ViT image tower, CLS dropped.

    Paper setting: open_clip ``ViT-B-16`` with OpenAI weights, second-to-last block
    (``layer=-2``), keys of all heads concatenated (768-d), stride 16, positional
    embeddings bicubically interpolated to the input's patch grid (448 px -> 28x28).

    Args:
        model: an ``open_clip`` CLIP model (or its ``.visual`` VisionTransformer), eval.
        model_id, revision: identity of the weights, recorded in :meth:`spec`.
        layer: block index (negative counts from the end).
        input_size: fixed (H, W) to resize to (multiples of 16); default: snap each batch.
        name: extractor name.
        mean, std: normalisation of [0, 1] inputs (OpenAI CLIP's by default).
        features_dtype: dtype of the returned features (float32, float16, bfloat16).
    """

    def __init__(
        self,
        model: Any,
        model_id: str = "unknown",
        revision: str | None = None,
        layer: int = -2,
        input_size: int | Sequence[int] | None = None,
        name: str = "clip",
        mean: Sequence[float] = OPENAI_CLIP_MEAN,
        std: Sequence[float] = OPENAI_CLIP_STD,
        features_dtype: torch.dtype = torch.float32,
    ) -> None:
        visual: Any = getattr(model, "visual", model)
        for attr in ("conv1", "class_embedding", "positional_embedding", "transformer"):
            if not hasattr(visual, attr):
                raise ValueError(
                    f"ClipExtractor: model has no '{attr}'; pass an open_clip ViT model "
                    "(timm or ModifiedResNet towers are not supported)"
                )
        self.visual = visual.eval()
        self.model_id = model_id
        self.revision = revision
        blocks = visual.transformer.resblocks
        if not -len(blocks) <= layer < len(blocks):
            raise ValueError(
                f"ClipExtractor: layer must be in [-{len(blocks)}, {len(blocks)}), got {layer}"
            )
        self.layer = layer % len(blocks)
        attn = blocks[self.layer].attn
        if not isinstance(attn, nn.MultiheadAttention) or attn.in_proj_weight is None:
            raise ValueError("ClipExtractor: blocks must use nn.MultiheadAttention (packed qkv)")
        self.dim = int(attn.embed_dim)
        patch = visual.conv1.kernel_size
        self.patch_size = int(patch[0])
        self.stride = self.patch_size
        grid = visual.grid_size
        self.native_grid = (int(grid[0]), int(grid[1]))
        self.input_size = _as_size(input_size, "ClipExtractor")
        if self.input_size is not None and any(s % self.patch_size for s in self.input_size):
            raise ValueError(
                f"ClipExtractor: input_size {self.input_size} must be multiples of "
                f"{self.patch_size}"
            )
        self.name = name
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.features_dtype = _features_dtype(features_dtype, "ClipExtractor")
        self._pos_cache: dict[tuple[int, int, str, str], torch.Tensor] = {}
        self._lock = threading.Lock()

    def spec(self) -> dict[str, Any]:
        return {
            "type": "clip",
            "model_id": self.model_id,
            "dtype": str(_param(self.visual).dtype).replace("torch.", ""),
            "revision": self.revision,
            "layer": self.layer,
            "n_blocks": len(self.visual.transformer.resblocks),
            "facet": "key",
            "patch_size": self.patch_size,
            "input_size": list(self.input_size) if self.input_size else None,
            "mean": list(self.mean),
            "std": list(self.std),
            **_dtype_spec(self.features_dtype),
        }

    @property
    def device(self) -> torch.device:
        """The model's device: where inputs are moved and features are returned."""
        return _param(self.visual).device

    def positional_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        """(1 + gh * gw, D) positional embedding for a (gh, gw) patch grid: the class
        position unchanged, the patch grid resampled bicubically (antialiased), exactly as
        open_clip resizes a checkpoint for another image size."""
        pos = self.visual.positional_embedding.detach()
        # Keyed by device and dtype too: a model moved after a call gets its own entry.
        key = (int(grid[0]), int(grid[1]), str(pos.device), str(pos.dtype))
        with self._lock:
            if key not in self._pos_cache:
                if tuple(grid) == self.native_grid:
                    self._pos_cache[key] = pos
                else:
                    cls_pos, patch_pos = pos[:1], pos[1:]
                    d = patch_pos.shape[-1]
                    g0, g1 = self.native_grid
                    patch_pos = patch_pos.float().reshape(1, g0, g1, d).permute(0, 3, 1, 2)
                    # Same resampling as open_clip's checkpoint resizing (resize_pos_embed).
                    patch_pos = F.interpolate(
                        patch_pos, size=grid, mode="bicubic", align_corners=False, antialias=True
                    )
                    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(-1, d).to(pos.dtype)
                    self._pos_cache[key] = torch.cat([cls_pos, patch_pos])
            return self._pos_cache[key]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float [0, 1], any device -> (B, D, h, w) keys in ``features_dtype``
        on the model's device, h = round(H / 16)."""
        _check_images(images, self.stride, "ClipExtractor")
        size = _model_size(images, self.patch_size, self.input_size)
        v: Any = self.visual
        p = _param(v)
        x = _normalize(_resize(images.to(p.device, torch.float32), size), self.mean, self.std)
        gh, gw = size[0] // self.patch_size, size[1] // self.patch_size
        with torch.inference_mode():
            x = v.conv1(x.to(p.dtype))  # (B, width, gh, gw)
            x = x.flatten(2).transpose(1, 2)  # (B, gh * gw, width)
            cls = v.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], 1, -1)
            x = torch.cat([cls, x], dim=1) + self.positional_embedding((gh, gw)).to(x.dtype)
            x = v.ln_pre(x)
            batch_first = getattr(v.transformer, "batch_first", True)
            if not batch_first:
                x = x.transpose(0, 1)
            blocks = v.transformer.resblocks
            for block in blocks[: self.layer]:
                x = block(x)
            if not batch_first:
                x = x.transpose(0, 1)
            block = blocks[self.layer]
            d = self.dim
            w_k = block.attn.in_proj_weight[d : 2 * d]
            b_k = (
                block.attn.in_proj_bias[d : 2 * d] if block.attn.in_proj_bias is not None else None
            )
            keys = F.linear(block.ln_1(x), w_k, b_k)[:, 1:, :]
        return keys.reshape(keys.shape[0], gh, gw, d).permute(0, 3, 1, 2).to(self.features_dtype)

    @classmethod
    def from_pretrained(
        cls,
        model_id: str | None = None,
        revision: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> ClipExtractor:
        """Load an open_clip model (``timm/vit_base_patch16_clip_224.openai`` = ViT-B-16
        OpenAI by default, or ``$OVDIFF_CLIP_MODEL``: a hub repo or local directory with
        ``open_clip_config.json``) and wrap it. Shared with :class:`ClipScorer`.
        """
        model = load_open_clip(model_id, revision, device, dtype)
        kwargs = {**open_clip_normalization(model), **kwargs}
        mid = model_id or default_model_id("clip")
        return cls(model, model_id=mid, revision=revision, **kwargs)


def open_clip_name(model_id: str | None = None, revision: str | None = None) -> str:
    """The open_clip model name for a model id: ``local-dir:<path>`` of the verified local
    directory or hub-cache snapshot (downloaded first when online and missing or
    incomplete; see :func:`~ovdiff_core.backends.loading.ensure_model`)."""
    mid = model_id or default_model_id("clip")
    return f"local-dir:{ensure_model(ModelRef('clip', mid, revision))}"


def load_open_clip(
    model_id: str | None = None,
    revision: str | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """The shared open_clip model for ``model_id`` (hub repo or local directory with
    ``open_clip_config.json`` and weights), in eval mode, on ``device`` in ``dtype``.

    Raises:
        ModelNotAvailableError: the config or weights are missing or incomplete.
        ValueError: the weights do not fit the config (missing or unexpected keys):
            never a model with random weights.
    """
    mid = model_id or default_model_id("clip")
    dev = torch.device(device) if device is not None else best_device()
    dt = dtype or best_dtype(dev)
    name = open_clip_name(mid, revision)

    def build() -> nn.Module:
        import open_clip

        try:
            # require_pretrained: no weights file means an error, not random weights.
            model = open_clip.create_model(name, device=dev, require_pretrained=True)
        except RuntimeError as err:  # load_state_dict(strict=True): key mismatch
            raise ValueError(
                f"the CLIP weights in {name.removeprefix('local-dir:')} do not match its "
                f"open_clip_config.json ({err}); download the model again"
            ) from err
        return model.to(dtype=dt).eval()

    return shared(("open_clip", mid, revision, str(dev), str(dt)), build)


def open_clip_normalization(model: nn.Module) -> dict[str, tuple[float, ...]]:
    """``{"mean": ..., "std": ...}`` from the model's preprocessing config (OpenAI's
    constants when it has none)."""
    visual = getattr(model, "visual", model)
    mean = getattr(visual, "image_mean", None) or OPENAI_CLIP_MEAN
    std = getattr(visual, "image_std", None) or OPENAI_CLIP_STD
    return {"mean": tuple(float(v) for v in mean), "std": tuple(float(v) for v in std)}


# --------------------------------------------------------------------------------------
# Stable Diffusion UNet
# --------------------------------------------------------------------------------------


def _cross_attn_blocks(blocks: nn.ModuleList) -> list[int]:
    return [i for i, b in enumerate(blocks) if getattr(b, "attentions", None)]


def paper_sd_layers(unet: Any) -> list[str]:
    """The paper's layer choice, generalised to any SD-1.x-like UNet.

    SD 1.5: ``down_blocks.0.attentions.0`` (first layer of the first cross-attention
    down block), every ``mid_block`` attention, all attentions of ``up_blocks.1`` and
    ``up_blocks.2``, and the last of ``up_blocks.3``. In general: the first layer of the
    first cross-attention down block, the mid block, all layers of every cross-attention
    up block but the last, and the last layer of the last one.

    Returns:
        Names of ``Transformer2DModel`` modules of ``unet``, in forward order.
    """
    down = _cross_attn_blocks(unet.down_blocks)
    up = _cross_attn_blocks(unet.up_blocks)
    if not down or not up:
        raise ValueError("paper_sd_layers: the UNet has no cross-attention down/up blocks")
    layers = [f"down_blocks.{down[0]}.attentions.0"]
    mid = getattr(unet, "mid_block", None)
    for j in range(len(getattr(mid, "attentions", None) or [])):
        layers.append(f"mid_block.attentions.{j}")
    for i in up[:-1]:
        n = len(unet.up_blocks[i].attentions)
        layers += [f"up_blocks.{i}.attentions.{j}" for j in range(n)]
    last = up[-1]
    layers.append(f"up_blocks.{last}.attentions.{len(unet.up_blocks[last].attentions) - 1}")
    return layers


class SDFeatureExtractor:
    """Cross-attention *query* features of a Stable Diffusion UNet (OVDiff's SD features).

    Per batch: VAE-encode (posterior mean, times the scaling factor), noise to timestep
    ``timestep`` with fixed-seed noise (the same noise for every image, so features do not
    depend on batching), one UNet pass with the empty prompt; the ``attn2.to_q`` outputs
    of the chosen cross-attention layers are reshaped to their spatial grids, resized
    (bilinear) to the latent grid (input / 8) and concatenated along channels. SD 1.5
    with the paper's layers gives 320 + 1280 + 3 * 1280 + 3 * 640 + 320 = 7680 channels.

    Args:
        unet, vae, text_encoder, tokenizer: SD components (share them with the generator
            by passing the same objects, e.g. via :meth:`from_pipeline`).
        alphas_cumprod: (T,) cumulative noise schedule (``scheduler.alphas_cumprod``).
        model_id, revision: identity of the weights, recorded in :meth:`spec`.
        layers: names of ``Transformer2DModel`` modules of the UNet; default
            :func:`paper_sd_layers`.
        timestep: diffusion timestep of the noised input (paper: 200).
        seed: noise seed.
        input_size: fixed (H, W) to resize to; default: snap each batch to a multiple of
            ``vae_scale * 2 ** (n_down_blocks - 1)`` (64 for SD 1.x).
        name: extractor name.
        features_dtype: dtype of the returned features (float32, float16, bfloat16);
            float16 halves the 7680-channel maps (about 1 GB per 8 images at 512 px in
            float32).
    """

    def __init__(
        self,
        unet: Any,
        vae: Any,
        text_encoder: Any,
        tokenizer: Any,
        alphas_cumprod: torch.Tensor,
        model_id: str = "unknown",
        revision: str | None = None,
        layers: Sequence[str] | None = None,
        timestep: int = 200,
        seed: int = 0,
        input_size: int | Sequence[int] | None = None,
        name: str = "sd",
        features_dtype: torch.dtype = torch.float32,
    ) -> None:
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.alphas_cumprod = alphas_cumprod.detach().float().cpu()
        if not 0 <= timestep < len(self.alphas_cumprod):
            raise ValueError(
                f"SDFeatureExtractor: timestep must be in [0, {len(self.alphas_cumprod)}), "
                f"got {timestep}"
            )
        self.model_id, self.revision = model_id, revision
        self.timestep, self.seed, self.name = int(timestep), int(seed), name
        self.layers = list(layers) if layers is not None else paper_sd_layers(unet)
        if not self.layers:
            raise ValueError("SDFeatureExtractor: layers is empty; name at least one attention")
        modules = dict(unet.named_modules())
        self._queries: list[tuple[nn.Module, list[Any]]] = []
        for layer in self.layers:
            block = modules.get(layer)
            to_q = [
                m
                for n, m in (block.named_modules() if block is not None else [])
                if n.endswith("attn2.to_q")
            ]
            if block is None or not to_q:
                raise ValueError(
                    f"SDFeatureExtractor: layer {layer!r} is not a cross-attention module of "
                    f"the UNet; choose from e.g. {paper_sd_layers(unet)}"
                )
            self._queries.append((block, to_q))
        self.dim = sum(int(q.out_features) for _, qs in self._queries for q in qs)
        self.vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
        self.stride = self.vae_scale
        self.multiple = self.vae_scale * 2 ** (len(unet.down_blocks) - 1)
        self.input_size = _as_size(input_size, "SDFeatureExtractor")
        if self.input_size is not None and any(s % self.multiple for s in self.input_size):
            raise ValueError(
                f"SDFeatureExtractor: input_size {self.input_size} must be multiples of "
                f"{self.multiple}"
            )
        self.features_dtype = _features_dtype(features_dtype, "SDFeatureExtractor")
        self._empty: torch.Tensor | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_pipeline(
        cls, pipe: Any, model_id: str | None = None, **kwargs: Any
    ) -> SDFeatureExtractor:
        """Wrap the components of an existing pipeline (shared, not copied)."""
        mid = model_id or str(getattr(pipe, "name_or_path", None) or "unknown")
        return cls(
            pipe.unet,
            pipe.vae,
            pipe.text_encoder,
            pipe.tokenizer,
            pipe.scheduler.alphas_cumprod,
            model_id=mid,
            **kwargs,
        )

    @classmethod
    def from_pretrained(
        cls,
        model_id: str | None = None,
        revision: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> SDFeatureExtractor:
        """Load (or reuse) the shared SD pipeline (``$OVDIFF_SD_MODEL`` or SD v1.5)."""
        mid = model_id or default_model_id("sd")
        pipe = load_sd_pipeline(mid, revision=revision, device=device, dtype=dtype)
        return cls.from_pipeline(pipe, model_id=mid, revision=revision, **kwargs)

    def spec(self) -> dict[str, Any]:
        return {
            "type": "sd",
            "model_id": self.model_id,
            "dtype": str(_param(self.unet).dtype).replace("torch.", ""),
            "revision": self.revision,
            "layers": list(self.layers),
            "facet": "query",
            "timestep": self.timestep,
            "seed": self.seed,
            "prompt": "",
            "input_size": list(self.input_size) if self.input_size else None,
            **_dtype_spec(self.features_dtype),
        }

    @property
    def device(self) -> torch.device:
        """The UNet's device: where inputs are moved and features are returned."""
        return _param(self.unet).device

    def _empty_embedding(self) -> torch.Tensor:
        with self._lock:
            if self._empty is None:
                tok = self.tokenizer(
                    [""],
                    padding="max_length",
                    max_length=self.tokenizer.model_max_length,
                    truncation=True,
                    return_tensors="pt",
                )
                p = _param(self.text_encoder)
                with torch.inference_mode():
                    out = self.text_encoder(tok.input_ids.to(p.device))
                self._empty = out[0].detach()
            return self._empty

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float [0, 1], any device -> (B, D, H' / 8, W' / 8) query features in
        ``features_dtype`` on the UNet's device, where (H', W') is the input snapped to a
        multiple of 64 (SD 1.x)."""
        _check_images(images, self.stride, "SDFeatureExtractor")
        size = _model_size(images, self.multiple, self.input_size)
        p = _param(self.unet)
        b = images.shape[0]
        x = _resize(images.to(p.device, torch.float32), size) * 2 - 1
        empty = self._empty_embedding()
        owner = threading.get_ident()
        grids: dict[int, tuple[int, int]] = {}
        queries: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(self._queries))}
        n_wanted = sum(len(qs) for _, qs in self._queries)
        handles = []

        def grid_hook(i: int):
            def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
                if threading.get_ident() == owner:
                    hidden = args[0] if args else kwargs["hidden_states"]
                    grids[i] = (int(hidden.shape[-2]), int(hidden.shape[-1]))

            return hook

        def query_hook(i: int):
            def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
                if threading.get_ident() == owner:
                    queries[i].append(output)
                    if sum(len(v) for v in queries.values()) == n_wanted:
                        raise _Stop

            return hook

        for i, (block, to_q) in enumerate(self._queries):
            handles.append(block.register_forward_pre_hook(grid_hook(i), with_kwargs=True))
            handles.extend(q.register_forward_hook(query_hook(i)) for q in to_q)
        # Serialise with support generation on a shared UNet: its attention capture swaps
        # the UNet's processors while it runs (ovdiff_core.backends.attention).
        from ovdiff_core.backends.attention import unet_lock

        try:
            with unet_lock(self.unet), torch.inference_mode():
                vae_dtype = _param(self.vae).dtype
                posterior = self.vae.encode(x.to(vae_dtype)).latent_dist
                latents = posterior.mean.float() * float(self.vae.config.scaling_factor)
                gen = torch.Generator(device="cpu").manual_seed(self.seed)
                noise = torch.randn((1, *latents.shape[1:]), generator=gen, device="cpu")
                noise = noise.to(latents.device)
                a = self.alphas_cumprod[self.timestep].item()
                noisy = a**0.5 * latents + (1 - a) ** 0.5 * noise
                t = torch.full((b,), self.timestep, device=p.device, dtype=torch.long)
                cond = empty.to(p.device, p.dtype).expand(b, -1, -1)
                self.unet(noisy.to(p.dtype), t, encoder_hidden_states=cond)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        lh, lw = size[0] // self.vae_scale, size[1] // self.vae_scale
        maps = []
        for i, layer in enumerate(self.layers):
            if i not in grids or len(queries[i]) != len(self._queries[i][1]):
                raise RuntimeError(f"SDFeatureExtractor: layer {layer!r} did not run")
            gh, gw = grids[i]
            for q in queries[i]:
                q = q.float().reshape(b, gh, gw, -1).permute(0, 3, 1, 2)
                if (gh, gw) != (lh, lw):
                    q = F.interpolate(q, size=(lh, lw), mode="bilinear", align_corners=False)
                maps.append(q.to(self.features_dtype))
        return torch.cat(maps, dim=1)
