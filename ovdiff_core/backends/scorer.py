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

# Tree attention gathers at most this many (node, ancestor) key/value rows at once.
_GATHER_KEYS = 1 << 14


class ClipScorer:
    """Raw cosine similarity between an image and texts with an open_clip model.

    Implements :class:`ovdiff_core.protocols.ImageTextScorer`. The image is resized so its
    short side is the model's input size, centre-cropped (open_clip's evaluation
    transform) and embedded once: the last ``image_cache_size`` image embeddings are
    kept, keyed by the image bytes, since the pre-filter scores the same image twice
    (single-class prompts, then up to 1023 subset prompts). Text embeddings are cached
    per prompt (the ``text_cache_size`` most recently used) and new ones are encoded
    ``batch_size`` at a time, each shared token prefix once (see :meth:`text_embeddings`).

    Args:
        model: an open_clip CLIP model (``encode_image`` / ``encode_text``), eval mode.
        tokenizer: open_clip tokenizer (callable: list of str -> (T, 77) int64).
        model_id: identity of the weights (for :meth:`spec`).
        mean, std: image normalisation (OpenAI CLIP's by default).
        batch_size: prompts encoded per text-tower call.
        max_positions: distinct token prefixes per text-tower call (with
            ``share_prefixes``; bounds its memory: activations of about 12 floats per
            position and model width, about 200 MB for ViT-B/16 by default).
        image_cache_size: image embeddings kept.
        text_cache_size: text embeddings kept (least recently used ones are dropped).
        share_prefixes: run each distinct token prefix once (exact to float rounding).
            False is the previous path, kept as a reference for tests and benchmarks:
            prompts sorted by token length, each call cut after its longest prompt.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        model_id: str = "unknown",
        mean: Sequence[float] = OPENAI_CLIP_MEAN,
        std: Sequence[float] = OPENAI_CLIP_STD,
        batch_size: int = 1024,
        image_cache_size: int = 4,
        text_cache_size: int = 20000,
        share_prefixes: bool = True,
        max_positions: int = 8192,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"ClipScorer: batch_size must be >= 1, got {batch_size}")
        if max_positions < 77:
            raise ValueError(f"ClipScorer: max_positions must be >= 77, got {max_positions}")
        if text_cache_size < 0:
            raise ValueError(f"ClipScorer: text_cache_size must be >= 0, got {text_cache_size}")
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
        self._texts: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.text_encoder_calls = 0  # number of text-tower forward passes (diagnostics)
        self.image_encoder_calls = 0  # number of image-tower forward passes
        self.text_positions = 0  # token positions run through the text tower (diagnostics)
        self.share_prefixes = share_prefixes
        self.max_positions = max_positions

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

        Embeddings are kept in a least-recently-used cache of ``text_cache_size`` prompts.
        New prompts are tokenized and encoded in groups of at most ``batch_size``; for a
        standard CLIP text tower (causal mask, pooled at the end token) each distinct
        token prefix of a group is run through the tower once (:func:`_encode_shared`),
        which is exact because a token's features depend only on the tokens before it:
        the pre-filter's subset prompts ("a cat and a dog and ...") share most of their
        tokens, so this runs about 5x fewer token positions than encoding each prompt.
        """
        with self._lock:
            missing = list(dict.fromkeys(t for t in texts if t not in self._texts))
        new: dict[str, torch.Tensor] = {}
        if missing:
            tokens = self.tokenizer(missing)
            lengths = _token_lengths(tokens)
            rows = tokens.tolist()
            if self.share_prefixes:  # lexicographic: prompts with common prefixes together
                order = sorted(range(len(missing)), key=lambda j: rows[j][: int(lengths[j])])
            else:  # by length: little padding in each call
                order = torch.argsort(lengths, stable=True).tolist()
            p = next(self.model.parameters())
            for group in self._groups(order, rows, lengths.tolist()):
                idx = torch.tensor(group, dtype=torch.long)
                chunk = tokens[idx].to(p.device)
                with torch.inference_mode():
                    emb = self._encode_text(chunk, int(lengths[idx].max()))
                emb = F.normalize(emb.float(), dim=-1).cpu()
                new.update(zip([missing[j] for j in group], emb, strict=True))
                with self._lock:
                    self.text_encoder_calls += 1
        with self._lock:
            for t in texts:
                if t in self._texts:
                    self._texts.move_to_end(t)
            self._texts.update(new)
            table = {**self._texts, **new}
            while len(self._texts) > self.text_cache_size:
                self._texts.popitem(last=False)
        return torch.stack([table[t] for t in texts])

    def _groups(
        self, order: list[int], rows: list[list[int]], lengths: list[int]
    ) -> list[list[int]]:
        """Split prompts (indices in lexicographic token order) into text-tower calls of
        at most ``batch_size`` prompts and ``max_positions`` distinct token prefixes."""
        groups: list[list[int]] = []
        size = 0
        prev: list[int] = []
        for j in order:
            seq = rows[j][: lengths[j]]
            common = 0
            while common < min(len(seq), len(prev)) and seq[common] == prev[common]:
                common += 1
            grow = len(seq) - common
            full = self.share_prefixes and size + grow > self.max_positions
            if not groups or len(groups[-1]) >= self.batch_size or full:
                groups.append([])
                size, grow = 0, len(seq)
            groups[-1].append(j)
            size += grow
            prev = seq
        return groups

    def _encode_text(self, tokens: torch.Tensor, length: int) -> torch.Tensor:
        """(T, 77) int64 -> (T, E) text embeddings.

        A standard open_clip text tower (:func:`_standard_text_tower`) runs each distinct
        token prefix once (:func:`_encode_shared`), or with ``share_prefixes`` off only the
        first ``length`` positions (the longest prompt's token count) of every prompt;
        other models run their own ``encode_text``.
        """
        m: Any = self.model
        standard = _standard_text_tower(m)
        if self.share_prefixes and standard:
            emb, positions = _encode_shared(m, tokens)
            self.text_positions += positions
            return emb
        if not standard or length >= tokens.shape[1]:
            self.text_positions += int(tokens.numel())
            return m.encode_text(tokens)
        self.text_positions += int(tokens.shape[0] * length)
        cast = m.transformer.get_cast_dtype()
        x = m.token_embedding(tokens[:, :length]).to(cast)
        x = x + m.positional_embedding[:length].to(cast)
        x = m.transformer(x, attn_mask=m.attn_mask[:length, :length])
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


def _standard_text_tower(m: Any) -> bool:
    """True when ``m`` is an open_clip CLIP whose text tower :func:`_encode_shared`
    reproduces: token + positional embedding, pre-norm residual blocks with a packed
    ``nn.MultiheadAttention`` under a causal mask, final LayerNorm, end-token pooling."""
    mask: Any = getattr(m, "attn_mask", None)
    tf: Any = getattr(m, "transformer", None)
    if mask is None or tf is None or getattr(m, "text_pool_type", "argmax") != "argmax":
        return False
    if not all(hasattr(m, a) for a in ("token_embedding", "positional_embedding", "ln_final")):
        return False
    n = mask.shape[-1]
    causal = torch.full((n, n), float("-inf"), device=mask.device).triu_(1)
    if mask.shape != (n, n) or not torch.equal(mask.float(), causal):
        return False
    for b in getattr(tf, "resblocks", []):
        a = getattr(b, "attn", None)
        if (
            not isinstance(a, nn.MultiheadAttention)
            or not a._qkv_same_embed_dim
            or a.in_proj_bias is None
            or a.bias_k is not None
            or hasattr(b, "ln_1_kv")
            or not all(hasattr(b, x) for x in ("ln_1", "ln_2", "ls_1", "ls_2", "mlp"))
        ):
            return False
    return len(getattr(tf, "resblocks", [])) > 0


def _encode_shared(m: Any, tokens: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Encode (T, 77) CLIP tokens running each distinct token prefix once.

    The prompts' token sequences (up to and including the end token) form a trie, and
    the tower runs on its nodes, a node attending to itself and its ancestors ("tree
    attention"). Under CLIP's causal mask a position's features are a function of the
    tokens up to it, so this equals ``m.encode_text(tokens)`` up to float rounding while
    running each shared prefix once. Layer by layer, every node goes through one set of
    matrix products; attention runs per depth (nodes of depth d have d + 1 keys). In the
    last layer only the end-token nodes are finished (the others give keys and values).

    Returns:
        (T, E) embeddings (not normalised) and the number of positions run (trie nodes).
    """
    lengths = _token_lengths(tokens).tolist()
    children: dict[tuple[int, int], int] = {}
    parent: list[int] = []
    token_of: list[int] = []
    depth: list[int] = []
    leaf: list[int] = []
    for row, n in zip(tokens.tolist(), lengths, strict=True):
        node = -1
        for t in range(n):
            nxt = children.setdefault((node, row[t]), len(parent))
            if nxt == len(parent):
                parent.append(node)
                token_of.append(row[t])
                depth.append(t)
            node = nxt
        leaf.append(node)
    # Renumber the nodes by depth: node ids of one depth are one contiguous range.
    order = sorted(range(len(parent)), key=depth.__getitem__)
    new_id = [0] * len(order)
    for rank, i in enumerate(order):
        new_id[i] = rank
    depth_s = [depth[i] for i in order]
    parent_s = [new_id[parent[i]] if parent[i] >= 0 else -1 for i in order]
    leaf = [new_id[i] for i in leaf]
    n_nodes = len(order)
    dev = tokens.device
    # Ancestor paths, one (n_d, d + 1) tensor per depth d, into the node ids.
    starts = [0]
    for d in range(1, depth_s[-1] + 2):
        starts.append(starts[-1] + depth_s[starts[-1] :].count(d - 1))
    paths: list[torch.Tensor] = []
    par = torch.tensor(parent_s, dtype=torch.long)
    for d in range(len(starts) - 1):
        lo, hi = starts[d], starts[d + 1]
        own = torch.arange(lo, hi)[:, None]
        paths.append(own if d == 0 else torch.cat([paths[-1][par[lo:hi] - starts[d - 1]], own], 1))
    paths = [p.to(dev) for p in paths]

    tf: Any = m.transformer
    cast = tf.get_cast_dtype()
    pos = torch.tensor(depth_s, dtype=torch.long, device=dev)
    tok = torch.tensor([token_of[i] for i in order], dtype=torch.long, device=dev)
    x = m.token_embedding(tok).to(cast) + m.positional_embedding[pos].to(cast)
    blocks = list(tf.resblocks)
    leaves = torch.tensor(sorted(set(leaf)), dtype=torch.long, device=dev)
    for layer, b in enumerate(blocks):
        a: nn.MultiheadAttention = b.attn
        width = x.shape[-1]
        heads, hd = a.num_heads, width // a.num_heads
        qkv = F.linear(b.ln_1(x), a.in_proj_weight, a.in_proj_bias)
        kv = qkv[:, width:].contiguous()
        last = layer == len(blocks) - 1
        if last:  # only the end tokens' outputs are used: finish those alone
            x, qkv = x[leaves], qkv[leaves]
            slot = torch.full((n_nodes,), -1, dtype=torch.long, device=dev)
            slot[leaves] = torch.arange(len(leaves), device=dev)
        att = torch.empty(x.shape[0], width, dtype=x.dtype, device=dev)
        for d, path in enumerate(paths):
            lo, hi = starts[d], starts[d + 1]
            if last:  # the leaves of this depth, by their row in x
                keep = slot[lo:hi] >= 0
                if not bool(keep.any()):
                    continue
                path, dst = path[keep], slot[lo:hi][keep]
            step = max(1, _GATHER_KEYS // (d + 1))  # bounds the gathered keys' memory
            for i in range(0, path.shape[0], step):
                p_i = path[i : i + step]
                n = p_i.shape[0]
                g = kv[p_i].view(n, d + 1, 2, heads, hd)
                # (not last: rows lo + i .. lo + i + n - 1, slices rather than gathers)
                q = qkv[dst[i : i + step], :width] if last else qkv[lo + i : lo + i + n, :width]
                k = g[:, :, 0].transpose(1, 2)
                v = g[:, :, 1].transpose(1, 2)
                o = F.scaled_dot_product_attention(q.reshape(n, heads, 1, hd), k, v)
                if last:
                    att[dst[i : i + step]] = o.reshape(n, width)
                else:
                    att[lo + i : lo + i + n] = o.reshape(n, width)
        x = x + b.ls_1(a.out_proj(att))
        x = x + b.ls_2(b.mlp(b.ln_2(x)))
    # After the last layer x holds the leaves (in ``leaves`` order).
    where = torch.full((n_nodes,), -1, dtype=torch.long, device=dev)
    where[leaves] = torch.arange(len(leaves), device=dev)
    x = m.ln_final(x[where[torch.tensor(leaf, dtype=torch.long, device=dev)]])
    proj = m.text_projection
    if proj is not None:
        x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
    return x, n_nodes
