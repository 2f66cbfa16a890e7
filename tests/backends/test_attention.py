"""Cross-attention capture on the tiny random Stable Diffusion UNet."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ovdiff_core.backends.attention import (
    AttributionRecorder,
    capture_cross_attention,
    cross_attention_layers,
)
from ovdiff_core.backends.tiny_sd import tiny_sd_pipeline
from ovdiff_core.backends.tokens import locate_name_tokens


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd_pipeline(seed=0)


def _run(pipe, prompt: str, n: int = 2, steps: int = 2, guidance: float = 8.0) -> np.ndarray:
    out = pipe(
        prompt=prompt,
        negative_prompt="blurry" if guidance > 1 else None,
        num_images_per_prompt=n,
        num_inference_steps=steps,
        guidance_scale=guidance,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(3),
        output_type="np",
    )
    return np.asarray(out.images)


def test_capture_does_not_change_images_and_restores_processors(pipe) -> None:
    found = locate_name_tokens(pipe.tokenizer, "A good picture of a {}", "potted plant")
    before = {n: m.processor for n, m in cross_attention_layers(pipe.unet).items()}
    self_attn = {n: p for n, p in pipe.unet.attn_processors.items() if ".attn1." in n}
    assert len(self_attn) == 7
    plain = _run(pipe, found.prompt)
    rec = AttributionRecorder(found.positions, n_images=2, latent_size=(8, 8))
    with capture_cross_attention(pipe.unet, rec):
        # Self-attention keeps its processor object while cross-attention is wrapped.
        now = pipe.unet.attn_processors
        assert all(now[n] is p for n, p in self_attn.items())
        assert all(
            type(m.processor).__name__ == "_CaptureProcessor"
            for m in cross_attention_layers(pipe.unet).values()
        )
        captured = _run(pipe, found.prompt)
    np.testing.assert_array_equal(plain, captured)  # bit-identical
    after = {n: m.processor for n, m in cross_attention_layers(pipe.unet).items()}
    assert all(after[n] is before[n] for n in before)
    # 7 cross-attention layers x 2 steps, every layer contributed.
    assert rec.n_records == 7 * 2
    assert len(rec.layers) == 7
    att = rec.attribution((64, 64))
    assert att.shape == (2, 64, 64) and att.dtype == np.float32
    assert att.min() >= 0.0 and att.max() <= 1.0
    assert np.isclose(att.reshape(2, -1).max(1), 1.0, atol=0.05).all()


def test_processors_restored_after_error(pipe) -> None:
    before = {n: m.processor for n, m in cross_attention_layers(pipe.unet).items()}
    rec = AttributionRecorder([6], n_images=3, latent_size=(8, 8))  # wrong batch on purpose
    with (
        pytest.raises(ValueError, match="does not match n_images"),
        capture_cross_attention(pipe.unet, rec),
    ):
        _run(pipe, "A good picture of a cat", n=2)
    after = {n: m.processor for n, m in cross_attention_layers(pipe.unet).items()}
    assert all(after[n] is before[n] for n in before)


def _reference_maps(pipe, prompt: str, positions, n: int, steps: int, guidance: float):
    """Independent reference: hooks on to_q / to_k of every attn2, softmax(q k^T * scale),
    conditional half, mean over the name's tokens, then the spec's aggregation."""
    layers = cross_attention_layers(pipe.unet)
    captured: dict[str, list] = {name: [] for name in layers}
    qs: dict[str, torch.Tensor] = {}
    handles = []
    for name, attn in layers.items():

        def on_q(_m, _inp, out, name=name):
            qs[name] = out.detach()

        def on_k(_m, _inp, out, name=name, attn=attn):
            captured[name].append((qs.pop(name), out.detach(), attn.heads, float(attn.scale)))

        handles.append(attn.to_q.register_forward_hook(on_q))
        handles.append(attn.to_k.register_forward_hook(on_k))
    try:
        images = _run(pipe, prompt, n=n, steps=steps, guidance=guidance)
    finally:
        for h in handles:
            h.remove()
    total = torch.zeros(n, 64, 64)
    per_layer_probs: dict[str, list[torch.Tensor]] = {}
    for name, calls in captured.items():
        for q, k, heads, scale in calls:
            b = q.shape[0]
            cond = slice(b // 2, b) if guidance > 1 else slice(0, b)
            q, k = q[cond], k[cond]
            nq, d = q.shape[1], q.shape[2] // heads
            qh = q.reshape(n, nq, heads, d).permute(0, 2, 1, 3)
            kh = k.reshape(n, -1, heads, d).permute(0, 2, 1, 3)
            probs = torch.softmax(qh @ kh.transpose(-1, -2) * scale, dim=-1)
            name_probs = probs[..., list(positions)].mean(-1)  # (n, heads, nq)
            per_layer_probs.setdefault(name, []).append(name_probs)
            side = round(nq**0.5)
            maps = name_probs.reshape(n, heads, side, side)
            up = F.interpolate(maps, size=(64, 64), mode="bicubic", align_corners=False)
            total += up.clamp(min=0).sum(1) / heads
    return images, total, per_layer_probs


@pytest.mark.parametrize("guidance", [8.0, 1.0])
def test_recorded_probabilities_match_independent_reference(pipe, guidance) -> None:
    found = locate_name_tokens(pipe.tokenizer, "A good picture of a {}", "tv monitor")
    assert found.positions == (6, 7)
    ref_images, ref_total, ref_probs = _reference_maps(
        pipe, found.prompt, found.positions, n=2, steps=2, guidance=guidance
    )

    seen: dict[str, list[torch.Tensor]] = {}

    class Spy(AttributionRecorder):
        def add(self, layer, probs):
            seen.setdefault(layer, []).append(probs.clone())
            super().add(layer, probs)

    rec = Spy(found.positions, n_images=2, latent_size=(8, 8))
    with capture_cross_attention(pipe.unet, rec):
        images = _run(pipe, found.prompt, n=2, steps=2, guidance=guidance)
    np.testing.assert_array_equal(images, ref_images)
    assert seen.keys() == ref_probs.keys()
    for name in ref_probs:
        for ours, theirs in zip(seen[name], ref_probs[name], strict=True):
            side = round(theirs.shape[-1] ** 0.5)
            torch.testing.assert_close(
                ours, theirs.reshape(*theirs.shape[:2], side, side), atol=1e-6, rtol=1e-5
            )
    torch.testing.assert_close(rec.maps(), ref_total, atol=1e-5, rtol=1e-5)
    # The maps depend on the name: another token gives other maps.
    other = AttributionRecorder([2], n_images=2, latent_size=(8, 8))  # "good"
    with capture_cross_attention(pipe.unet, other):
        _run(pipe, found.prompt, n=2, steps=2, guidance=guidance)
    assert not torch.allclose(other.maps(), rec.maps())


def test_attribution_normalisation_and_resize() -> None:
    rec = AttributionRecorder([1], n_images=2, latent_size=(4, 4), map_size=8)
    probs = torch.zeros(2, 2, 4, 4)
    probs[0, :, 1, 1] = 1.0  # image 0: a peak; image 1: nothing (constant map)
    rec.add("layer", probs)
    att = rec.attribution((16, 32))
    assert att.shape == (2, 16, 32)
    assert att[0].max() == pytest.approx(1.0, abs=0.05) and att[0].min() == 0.0
    assert (att[1] == 0).all()
    # The peak at latent cell (1, 1) of 4 lands in the upper-left quarter.
    r, c = np.unravel_index(att[0].argmax(), att[0].shape)
    assert r < 8 and c < 16


def test_grid_of_and_bad_inputs() -> None:
    rec = AttributionRecorder([1], n_images=1, latent_size=(48, 40))
    assert rec.grid_of(48 * 40) == (48, 40)
    assert rec.grid_of(24 * 20) == (24, 20)
    assert rec.grid_of(6 * 5) == (6, 5)
    with pytest.raises(ValueError, match="latent grid"):
        rec.grid_of(7)
    with pytest.raises(ValueError, match="positions"):
        AttributionRecorder([], n_images=1, latent_size=(8, 8))
    with pytest.raises(RuntimeError, match="no cross-attention"):
        rec.attribution((8, 8))
    assert rec.conditional_rows(2) == slice(1, 2)
    assert rec.conditional_rows(1) == slice(0, 1)
