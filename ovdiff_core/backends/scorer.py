"""CLIP image-text scorer for the category pre-filter (open_clip)."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ovdiff_core.backends.extractors import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    load_open_clip,
    open_clip_name,
    open_clip_normalization,
)
from ovdiff_core.backends.loading import default_model_id

__all__ = ["ClipScorer"]


class ClipScorer:
    """Raw cosine similarity between an image and texts with an open_clip model.

    Implements :class:`ovdiff_core.protocols.ImageTextScorer`. The image is resized so its
    short side is the model's input size, centre-cropped (open_clip's evaluation
    transform) and embedded once: the last ``image_cache_size`` image embeddings are
    kept, keyed by the image bytes, since the pre-filter scores the same image twice
    (single-class prompts, then up to 1023 subset prompts). Text embeddings are cached
    per prompt (up to ``text_cache_size``) and new ones are encoded ``batch_size`` at a
    time.

    Args:
        model: an open_clip CLIP model (``encode_image`` / ``encode_text``), eval mode.
        tokenizer: open_clip tokenizer (callable: list of str -> (T, 77) int64).
        model_id: identity of the weights (for :meth:`spec`).
        mean, std: image normalisation (OpenAI CLIP's by default).
        batch_size: prompts encoded per text-tower call.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        model_id: str = "unknown",
        mean: Sequence[float] = OPENAI_CLIP_MEAN,
        std: Sequence[float] = OPENAI_CLIP_STD,
        batch_size: int = 256,
        image_cache_size: int = 4,
        text_cache_size: int = 20000,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"ClipScorer: batch_size must be >= 1, got {batch_size}")
        self.model: Any = model.eval()
        self.tokenizer = tokenizer
        self.model_id = model_id
        size = self.model.visual.image_size
        self.image_size = (int(size), int(size)) if isinstance(size, int) else tuple(size)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.batch_size = batch_size
        self.image_cache_size = image_cache_size
        self.text_cache_size = text_cache_size
        self._images: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._texts: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()
        self.text_encoder_calls = 0  # number of text-tower forward passes (diagnostics)
        self.image_encoder_calls = 0  # number of image-tower forward passes

    @classmethod
    def from_pretrained(
        cls,
        model_id: str | None = None,
        revision: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> ClipScorer:
        """The scorer over the shared open_clip model (``$OVDIFF_CLIP_MODEL`` or ViT-B-16
        OpenAI); the same model object as :meth:`ClipExtractor.from_pretrained`."""
        import open_clip

        mid = model_id or default_model_id("clip")
        model = load_open_clip(mid, revision, device, dtype)
        tokenizer = open_clip.get_tokenizer(open_clip_name(mid, revision))
        kwargs = {**open_clip_normalization(model), **kwargs}
        return cls(model, tokenizer, model_id=mid, **kwargs)

    def spec(self) -> dict[str, Any]:
        return {"type": "open_clip", "model_id": self.model_id, "image_size": list(self.image_size)}

    # ------------------------------------------------------------------ embeddings

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 -> (1, 3, S, S) normalised float32: short side to S, centre crop."""
        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
            shape = getattr(image, "shape", type(image))
            raise ValueError(f"ClipScorer: image must be an (H, W, 3) uint8 array, got {shape}")
        if image.dtype != np.uint8:
            raise ValueError(f"ClipScorer: image must be uint8, got {image.dtype}")
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255.0
        h, w = x.shape[-2:]
        th, tw = self.image_size
        scale = max(th / h, tw / w)
        rh, rw = max(th, round(h * scale)), max(tw, round(w * scale))
        x = F.interpolate(x, size=(rh, rw), mode="bicubic", align_corners=False, antialias=True)
        top, left = (rh - th) // 2, (rw - tw) // 2
        x = x[..., top : top + th, left : left + tw].clamp(0, 1)
        m = torch.tensor(self.mean).view(1, 3, 1, 1)
        s = torch.tensor(self.std).view(1, 3, 1, 1)
        return (x - m) / s

    def image_embedding(self, image: np.ndarray) -> torch.Tensor:
        """(E,) float32 L2-normalised embedding of a (H, W, 3) uint8 image (cached)."""
        key = hashlib.blake2b(
            np.ascontiguousarray(image).tobytes() + str(image.shape).encode(), digest_size=16
        ).hexdigest()
        with self._lock:
            if key in self._images:
                self._images.move_to_end(key)
                return self._images[key]
        x = self.preprocess(image)
        p = next(self.model.parameters())
        with torch.inference_mode():
            emb = self.model.encode_image(x.to(p.device, p.dtype))
        emb = F.normalize(emb.float(), dim=-1)[0].cpu()
        with self._lock:
            self.image_encoder_calls += 1
            self._images[key] = emb
            while len(self._images) > self.image_cache_size:
                self._images.popitem(last=False)
        return emb

    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """(T, E) float32 L2-normalised embeddings of ``texts`` (cached per text).

        New prompts are tokenized, sorted by token length and encoded ``batch_size`` at a
        time, each batch cut after its longest prompt's end token (exact for CLIP's
        causal text tower, and 2-4x cheaper than 77 tokens for short prompts).
        """
        with self._lock:
            missing = list(dict.fromkeys(t for t in texts if t not in self._texts))
        new: dict[str, torch.Tensor] = {}
        if missing:
            tokens = self.tokenizer(missing)
            lengths = _token_lengths(tokens)
            order = torch.argsort(lengths, stable=True)
            p = next(self.model.parameters())
            for i in range(0, len(missing), self.batch_size):
                idx = order[i : i + self.batch_size]
                chunk = tokens[idx].to(p.device)
                with torch.inference_mode():
                    emb = self._encode_text(chunk, int(lengths[idx].max()))
                emb = F.normalize(emb.float(), dim=-1).cpu()
                new.update(zip([missing[j] for j in idx.tolist()], emb, strict=True))
                with self._lock:
                    self.text_encoder_calls += 1
        with self._lock:
            if len(self._texts) + len(new) > self.text_cache_size:
                self._texts.clear()
            self._texts.update(new)
            table = {**self._texts, **new}
        return torch.stack([table[t] for t in texts])

    def _encode_text(self, tokens: torch.Tensor, length: int) -> torch.Tensor:
        """(T, 77) int64 -> (T, E) text embeddings, running only the first ``length``
        positions when the model is a standard CLIP text tower (causal mask, pooled at
        the end token), else the model's own ``encode_text``."""
        m: Any = self.model
        mask: Any = getattr(m, "attn_mask", None)
        standard = (
            mask is not None
            and getattr(m, "text_pool_type", "argmax") == "argmax"
            and all(hasattr(m, a) for a in ("token_embedding", "positional_embedding", "ln_final"))
        )
        if not standard or length >= tokens.shape[1]:
            return m.encode_text(tokens)
        cast = m.transformer.get_cast_dtype()
        x = m.token_embedding(tokens[:, :length]).to(cast)
        x = x + m.positional_embedding[:length].to(cast)
        x = m.transformer(x, attn_mask=mask[:length, :length])
        x = m.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), tokens[:, :length].argmax(dim=-1)]
        proj = m.text_projection
        if proj is None:
            return x
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj

    # ------------------------------------------------------------------ protocol

    def image_text_scores(self, image: np.ndarray, texts: Sequence[str]) -> np.ndarray:
        """Cosine similarity between ``image`` and each text.

        Args:
            image: (H, W, 3) uint8 RGB.
            texts: T >= 1 prompts.

        Returns:
            (T,) float32 raw cosines in [-1, 1] (no logit scale, no softmax).
        """
        if isinstance(texts, str) or len(texts) == 0:
            raise ValueError("ClipScorer: texts must be a non-empty sequence of strings")
        img = self.image_embedding(image)
        txt = self.text_embeddings(list(texts))
        return (txt @ img).clamp(-1, 1).numpy().astype(np.float32)


def _token_lengths(tokens: torch.Tensor) -> torch.Tensor:
    """(T,) number of positions up to and including each prompt's end token (the
    largest id in CLIP's vocabulary, so its position is the argmax)."""
    return tokens.argmax(dim=-1) + 1
