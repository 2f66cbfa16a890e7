"""Cross-attention capture: the category attribution map of a Stable Diffusion UNet.

OVDiff (following DAAM) attributes pixels to the category name with the cross-attention
probabilities of the name's tokens. During every UNet call, in every cross-attention layer
(``attn2`` of each transformer block), for the *conditional* half of classifier-free
guidance only:

1. probabilities ``softmax(q k^T * scale)`` over the 77 text tokens, per head;
2. keep the name's token columns and average them (multi-token names);
3. reshape to the layer's (h, w) grid, upsample to ``map_size`` (64x64) bicubic, clamp >= 0;
4. sum over heads and divide by the layer's head count, accumulate over layers and calls.

:meth:`AttributionRecorder.attribution` then min-max normalises each image's map and
upsamples it to the image size. For SD 1.x every layer has 8 heads, so step 4 equals the
spec's "sum over heads, accumulate, divide by the head count"; for SD 2.x (5-20 heads per
layer) dividing per layer keeps each layer's weight independent of its head count. Any
global constant cancels in the min-max normalisation anyway.

How it is done without changing the images: :func:`capture_cross_attention` wraps the
processor each ``attn2`` layer already has (``AttnProcessor2_0``, xformers, ...). The
wrapped processor computes the layer output exactly as before; the capture then
recomputes ``to_q`` for the conditional images and ``to_k`` for their 77 text tokens and
forms the probabilities itself. That costs one extra query projection for half of the
batch (a few percent of a UNet call, see ``benchmarks/bench_capture.py``) and keeps the
output bit-identical, whatever fused attention kernel the layer uses. Self-attention
layers (``attn1``) are not touched.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["AttributionRecorder", "capture_cross_attention", "cross_attention_layers"]

# One capture at a time per UNet: attention processors are per-module state.
_UNET_LOCKS: dict[int, threading.Lock] = {}
_UNET_LOCKS_GUARD = threading.Lock()


def unet_lock(unet: torch.nn.Module) -> threading.Lock:
    with _UNET_LOCKS_GUARD:
        return _UNET_LOCKS.setdefault(id(unet), threading.Lock())


class AttributionRecorder:
    """Accumulates the name's cross-attention into one map per image.

    Args:
        positions: token positions of the category name in the encoded prompt (start
            token = 0), e.g. from :func:`ovdiff_core.backends.tokens.locate_name_tokens`.
        n_images: number of images B in each UNet call. The UNet batch is either B (no
            guidance, every sample conditional) or 2B (classifier-free guidance in the
            diffusers order ``[unconditional, conditional]``: the second half is recorded).
        latent_size: (h, w) of the UNet input latent; used to recover each layer's grid.
        map_size: side of the square grid every layer's map is upsampled to (spec: 64).

    Attributes:
        total: (B, map_size, map_size) float32 CPU tensor, the accumulated maps (up to
            date after :meth:`maps`; the running sum stays on the UNet's device).
        n_records: number of (layer, call) maps accumulated so far.
        layers: names of the layers that contributed, in first-seen order.
    """

    def __init__(
        self,
        positions: Sequence[int],
        n_images: int,
        latent_size: tuple[int, int],
        map_size: int = 64,
    ) -> None:
        if not positions or any(int(p) < 0 for p in positions):
            raise ValueError(f"positions must be non-empty and >= 0, got {list(positions)}")
        if n_images < 1:
            raise ValueError(f"n_images must be >= 1, got {n_images}")
        if map_size < 1:
            raise ValueError(f"map_size must be >= 1, got {map_size}")
        self.positions = [int(p) for p in positions]
        self.n_images = int(n_images)
        self.latent_size = (int(latent_size[0]), int(latent_size[1]))
        self.map_size = int(map_size)
        self.enabled = True
        self.total = torch.zeros(self.n_images, self.map_size, self.map_size)
        self._device_total: torch.Tensor | None = None  # accumulator on the UNet's device
        self.n_records = 0
        self.layers: list[str] = []

    def reset(self) -> None:
        """Forget everything accumulated so far."""
        self.total.zero_()
        self._device_total = None
        self.n_records = 0
        self.layers.clear()

    def grid_of(self, n_queries: int) -> tuple[int, int]:
        """(h, w) grid of a layer with ``n_queries`` spatial positions.

        UNet levels halve the latent with ``ceil`` rounding (stride-2 convs, padding 1).
        """
        h, w = self.latent_size
        for _ in range(8):
            if h * w == n_queries:
                return h, w
            h, w = math.ceil(h / 2), math.ceil(w / 2)
        raise ValueError(
            f"cannot map {n_queries} attention queries onto the latent grid "
            f"{self.latent_size}; was latent_size set to the UNet input's (h, w)?"
        )

    def conditional_rows(self, batch: int) -> slice:
        """Rows of a UNet batch that are conditional samples to record."""
        if batch == self.n_images:
            return slice(0, batch)
        if batch == 2 * self.n_images:
            return slice(self.n_images, batch)
        raise ValueError(
            f"UNet batch of {batch} does not match n_images={self.n_images} "
            f"(expected {self.n_images} or {2 * self.n_images} with guidance)"
        )

    def add(self, layer: str, probs: torch.Tensor) -> None:
        """Accumulate one layer's name probabilities.

        Args:
            layer: module name (bookkeeping only).
            probs: (B, heads, h, w) float32, the name's attention probabilities (already
                averaged over the name's tokens), in [0, 1].
        """
        b, heads = probs.shape[:2]
        if b != self.n_images:
            raise ValueError(f"probs batch {b} != n_images {self.n_images}")
        up = F.interpolate(
            probs.float(), size=(self.map_size, self.map_size), mode="bicubic", align_corners=False
        )
        per_layer = up.clamp_(min=0.0).sum(dim=1) / heads
        if self._device_total is None or self._device_total.device != per_layer.device:
            self._flush()
            self._device_total = torch.zeros_like(per_layer)
        self._device_total += per_layer
        self.n_records += 1
        if layer not in self.layers:
            self.layers.append(layer)

    def _flush(self) -> None:
        """Move the on-device accumulator into :attr:`total` (one transfer)."""
        if self._device_total is not None:
            self.total += self._device_total.cpu()
            self._device_total = None

    def maps(self) -> torch.Tensor:
        """(B, map_size, map_size) float32 CPU tensor: the raw accumulated maps."""
        self._flush()
        return self.total

    def attribution(self, image_size: tuple[int, int]) -> np.ndarray:
        """The attribution maps, min-max normalised and resized to the images.

        Args:
            image_size: (H, W) of the generated images.

        Returns:
            (B, H, W) float32 in [0, 1] (bicubic upsampling, clamped). An image whose map
            is constant (nothing recorded) gets all zeros.
        """
        if self.n_records == 0:
            raise RuntimeError(
                "no cross-attention was recorded: run the UNet inside capture_cross_attention"
            )
        maps = self.maps().clone()
        flat = maps.view(self.n_images, -1)
        lo = flat.min(dim=1, keepdim=True).values
        hi = flat.max(dim=1, keepdim=True).values
        span = hi - lo
        flat.sub_(lo).div_(torch.where(span > 0, span, torch.ones_like(span)))
        out = F.interpolate(
            maps[:, None], size=tuple(image_size), mode="bicubic", align_corners=False
        )[:, 0]
        return out.clamp_(0.0, 1.0).numpy().astype(np.float32)


def name_probabilities(
    attn: Any,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    positions: Sequence[int],
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-attention probabilities of the name's tokens in one ``attn2`` layer.

    Args:
        attn: the diffusers ``Attention`` module.
        hidden_states: (B, N, C) image tokens entering the layer (or (B, C, h, w)).
        encoder_hidden_states: (B, T, C_text) text embeddings.
        positions: the name's token positions (< T).
        attention_mask: optional additive mask as diffusers passes it.

    Returns:
        (B, heads, N) float32: per head, the softmax probability (over all T tokens)
        averaged over ``positions``.
    """
    x = hidden_states
    if x.ndim == 4:
        x = x.flatten(2).transpose(1, 2)
    if getattr(attn, "group_norm", None) is not None:
        x = attn.group_norm(x.transpose(1, 2)).transpose(1, 2)
    ctx = encoder_hidden_states
    if getattr(attn, "norm_cross", None):
        ctx = attn.norm_encoder_hidden_states(ctx)
    q = attn.to_q(x)
    k = attn.to_k(ctx)
    b, n, inner = q.shape
    heads = attn.heads
    d = inner // heads
    q = q.view(b, n, heads, d).transpose(1, 2)
    k = k.view(b, -1, heads, d).transpose(1, 2)
    if getattr(attn, "norm_q", None) is not None:
        q = attn.norm_q(q)
    if getattr(attn, "norm_k", None) is not None:
        k = attn.norm_k(k)
    # float32 logits and softmax even for half-precision UNets (77 keys: cheap).
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * float(attn.scale)
    if attention_mask is not None:
        mask = attn.prepare_attention_mask(attention_mask, k.shape[2], b)
        logits = logits + mask.view(b, heads, -1, mask.shape[-1]).float()
    probs = logits.softmax(dim=-1)
    return probs[..., list(positions)].mean(dim=-1)


class _CaptureProcessor:
    """Wraps an ``attn2`` processor: same output, plus the name's probabilities."""

    def __init__(self, inner: Any, recorder: AttributionRecorder, layer: str) -> None:
        self.inner = inner
        self.recorder = recorder
        self.layer = layer

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        if temb is not None:
            kwargs["temb"] = temb
        # diffusers passes no extra positional arguments; forward whatever comes as is.
        out = self.inner(
            attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs
        )
        rec = self.recorder
        if rec.enabled and encoder_hidden_states is not None:
            rows = rec.conditional_rows(hidden_states.shape[0])
            mask = None if attention_mask is None else attention_mask[rows]
            with torch.no_grad():
                probs = name_probabilities(
                    attn,
                    hidden_states[rows],
                    encoder_hidden_states[rows],
                    rec.positions,
                    mask,
                )
            h, w = rec.grid_of(probs.shape[-1])
            rec.add(self.layer, probs.view(probs.shape[0], probs.shape[1], h, w))
        return out


def cross_attention_layers(unet: torch.nn.Module) -> dict[str, Any]:
    """``{module name: Attention}`` of every cross-attention (``attn2``) layer of a UNet."""
    from diffusers.models.attention_processor import Attention

    layers = {
        name: module
        for name, module in unet.named_modules()
        if isinstance(module, Attention) and getattr(module, "is_cross_attention", False)
    }
    if not layers:
        raise ValueError("the UNet has no cross-attention layers to capture")
    return layers


@contextmanager
def capture_cross_attention(
    unet: torch.nn.Module, recorder: AttributionRecorder
) -> Iterator[AttributionRecorder]:
    """Record the name's cross-attention of every UNet call inside the ``with`` block.

    Installs a capturing wrapper around each cross-attention layer's current processor
    and restores the original processors on exit (also on error). One capture per UNet at
    a time (a lock serialises concurrent users of a shared UNet).

    Example::

        rec = AttributionRecorder(positions, n_images=4, latent_size=(64, 64))
        with capture_cross_attention(pipe.unet, rec):
            images = pipe(prompt, num_images_per_prompt=4, output_type="np").images
        maps = rec.attribution((512, 512))   # (4, 512, 512) float32 in [0, 1]
    """
    lock = unet_lock(unet)
    with lock:
        layers = cross_attention_layers(unet)
        originals = {name: module.processor for name, module in layers.items()}
        try:
            for name, module in layers.items():
                module.set_processor(_CaptureProcessor(originals[name], recorder, name))
            yield recorder
        finally:
            for name, module in layers.items():
                module.set_processor(originals[name])
