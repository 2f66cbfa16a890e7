"""PAMR: properties of the refinement and one step against an independent computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ovdiff_core.pamr import PAPER_PAMR, PamrConfig, pamr, pamr_affinity


def two_colour_image(h: int = 48, w: int = 64, edge: int = 30, noise: float = 0.0) -> np.ndarray:
    """Red left of column ``edge``, blue from it on; optional Gaussian pixel noise."""
    img = np.zeros((h, w, 3), dtype=np.float64)
    img[:, :edge] = (200, 40, 40)
    img[:, edge:] = (30, 60, 210)
    img += np.random.default_rng(0).normal(0, noise, img.shape)
    return img.clip(0, 255).astype(np.uint8)


def reference_step(image: np.ndarray, scores: np.ndarray, dilations: tuple[int, ...]) -> np.ndarray:
    """One PAMR iteration written pixel by pixel from the description (numpy only)."""
    h, w, _ = image.shape
    img = image.astype(np.float64) / 255.0
    out = np.zeros_like(scores, dtype=np.float64)
    for y in range(h):
        for x in range(w):
            nbrs = []
            for d in dilations:
                for dy in (-d, 0, d):
                    for dx in (-d, 0, d):
                        if dy == 0 and dx == 0:
                            continue
                        nbrs.append((min(max(y + dy, 0), h - 1), min(max(x + dx, 0), w - 1)))
            colours = np.array([img[r, c] for r, c in nbrs])  # (P, 3)
            sigma = colours.std(axis=0)  # (3,)
            k = (-np.abs(img[y, x][None] - colours) / (sigma[None] + 1e-8)).mean(axis=1)
            a = np.exp(k - k.max())
            a /= a.sum()
            for p, (r, c) in enumerate(nbrs):
                out[:, y, x] += a[p] * scores[:, r, c]
    return out


def test_one_step_matches_an_independent_computation() -> None:
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)
    image[:3, :3] = (90, 90, 90)  # a flat patch: zero local deviation in places
    scores = rng.random((3, 6, 7)).astype(np.float32)
    dilations = (1, 2, 4)  # 4 > the image: neighbours from the replicated border
    got = pamr(image, scores, iterations=1, dilations=dilations)
    expected = reference_step(image, scores.astype(np.float64), dilations)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # two iterations are two steps
    twice = pamr(image, scores, iterations=2, dilations=dilations)
    np.testing.assert_allclose(
        twice, reference_step(image, expected, dilations), rtol=1e-5, atol=1e-6
    )


def test_shape_dtype_and_types() -> None:
    image = two_colour_image()
    scores = np.random.default_rng(2).random((4, 48, 64)).astype(np.float64)
    out = pamr(image, scores)
    assert isinstance(out, np.ndarray) and out.shape == (4, 48, 64) and out.dtype == np.float32
    t = pamr(torch.from_numpy(image), torch.from_numpy(scores).float())
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32
    np.testing.assert_allclose(t.numpy(), out, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(pamr(image, scores, iterations=0), scores.astype(np.float32))
    aff = pamr_affinity(torch.from_numpy(image).permute(2, 0, 1) / 255.0, (1, 2))
    assert aff.shape == (16, 48, 64)
    torch.testing.assert_close(aff.sum(0), torch.ones(48, 64))


def test_chunks_of_classes_give_the_same_result() -> None:
    image = two_colour_image(noise=10)
    scores = np.random.default_rng(3).random((5, 48, 64)).astype(np.float32)
    whole = pamr(image, scores)
    chunked = pamr(image, scores, budget_bytes=1)  # one class at a time
    np.testing.assert_array_equal(chunked, whole)


def test_uniform_scores_stay_fixed() -> None:
    image = np.random.default_rng(4).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    scores = np.stack([np.full((40, 50), v, np.float32) for v in (0.0, 0.3, 0.9)])
    np.testing.assert_allclose(pamr(image, scores), scores, atol=1e-6)


def test_noise_inside_a_uniform_region_is_smoothed() -> None:
    image = two_colour_image(noise=2.0)
    rng = np.random.default_rng(5)
    scores = (0.5 + rng.normal(0, 0.1, (1, 48, 64))).astype(np.float32)
    out = pamr(image, scores)
    for cols in (slice(0, 30), slice(30, 64)):  # each colour region
        before, after = scores[0, :, cols], out[0, :, cols]
        assert after.std() < before.std() / 20, "noise inside one colour is averaged out"
        assert abs(after.mean() - before.mean()) < 0.02


def test_score_edges_on_colour_edges_are_kept_and_others_move_to_them() -> None:
    image = two_colour_image(noise=3.0)
    cols = np.arange(64)
    truth = (cols >= 30).astype(np.int64)  # label 1 on the blue side
    aligned = np.stack([cols < 30, cols >= 30]).astype(np.float32)[:, None, :].repeat(48, 1)
    out = pamr(image, aligned)
    assert (out.argmax(0) == truth[None]).all()
    step = out[0, :, 29] - out[0, :, 30]  # across the colour edge
    assert step.min() > 0.4, "the edge stays sharp"
    flat = pamr(np.full_like(image, 100), aligned)  # no colour edge: the scores blur
    assert np.abs(flat[0, :, 29] - flat[0, :, 30]).max() < 0.05
    # a score edge 4 px left of the colour edge moves onto it
    shifted = np.stack([cols < 26, cols >= 26]).astype(np.float32)[:, None, :].repeat(48, 1)
    assert (shifted.argmax(0) != truth[None]).mean() > 0.05
    assert (pamr(image, shifted).argmax(0) == truth[None]).all()


def test_bad_input() -> None:
    image = two_colour_image()
    with pytest.raises(ValueError, match="scores must be"):
        pamr(image, np.zeros((2, 10, 10), np.float32))
    with pytest.raises(ValueError, match="image must be"):
        pamr(image[..., 0], np.zeros((2, 48, 64), np.float32))
    with pytest.raises(ValueError, match="dilations"):
        PamrConfig(dilations=(0, 1))
    with pytest.raises(ValueError, match="iterations"):
        pamr(image, np.zeros((2, 48, 64), np.float32), iterations=-1)
    assert PAPER_PAMR.iterations == 10 and PAPER_PAMR.dilations == (1, 2, 4, 8, 12, 24)
