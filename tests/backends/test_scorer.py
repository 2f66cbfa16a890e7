"""ClipScorer on a tiny random open_clip model with CLIP's real tokenizer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ovdiff_core.backends.scorer import ClipScorer
from ovdiff_core.backends.tiny_vision import tiny_open_clip
from ovdiff_core.prefilter import prefilter
from ovdiff_core.protocols import ImageTextScorer


@pytest.fixture(scope="module")
def model():
    return tiny_open_clip(seed=0)


@pytest.fixture(scope="module")
def tokenizer():
    import open_clip

    return open_clip.get_tokenizer("ViT-B-16")


@pytest.fixture
def scorer(model, tokenizer):
    return ClipScorer(model, tokenizer, model_id="tiny-clip", batch_size=64)


def _image(h=50, w=80, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_scores_are_raw_cosines_of_open_clip_embeddings(scorer, model, tokenizer):
    image = _image()
    texts = ["a cat", "a sofa and a lamp", "a photo of something rather long to read"]
    scores = scorer.image_text_scores(image, texts)
    assert isinstance(scorer, ImageTextScorer)
    assert scores.shape == (3,) and scores.dtype == np.float32
    with torch.no_grad():
        img = F.normalize(model.encode_image(scorer.preprocess(image)), dim=-1)[0]
        txt = F.normalize(model.encode_text(tokenizer(texts)), dim=-1)
    np.testing.assert_allclose(scores, (txt @ img).numpy(), atol=1e-5)


def test_preprocess_matches_open_clip_eval_transform(scorer):
    """Short side to the model size, centre crop, OpenAI normalisation (PIL reference)."""
    import open_clip
    from PIL import Image

    image = _image(60, 90, seed=1)
    ref = open_clip.image_transform(32, is_train=False)(Image.fromarray(image))[None]
    ours = scorer.preprocess(image)
    assert ours.shape == ref.shape == (1, 3, 32, 32)
    # Torch vs PIL bicubic resampling differ slightly; the layout must agree.
    assert (ours - ref).abs().mean() < 0.05
    shifted = torch.roll(ref, shifts=2, dims=-1)
    assert (ours - ref).abs().mean() < 0.5 * (ours - shifted).abs().mean()


def test_truncated_text_encoding_is_exact_for_many_prompts(scorer, model, tokenizer):
    names = [f"thing{i}" for i in range(8)]  # all 255 subset prompts of 8 classes
    texts = [
        " and ".join(f"a {n}" for j, n in enumerate(names) if mask >> j & 1)
        for mask in range(1, 256)
    ]
    emb = scorer.text_embeddings(texts)
    assert emb.shape == (255, 32)
    with torch.no_grad():
        ref = F.normalize(model.encode_text(tokenizer(texts)), dim=-1)
    torch.testing.assert_close(emb, ref, atol=1e-5, rtol=1e-5)
    assert scorer.text_encoder_calls == 4  # ceil(255 / 64) batched calls


def test_embeddings_are_cached(scorer):
    image = _image(seed=2)
    a = scorer.image_text_scores(image, ["a cat", "a dog"])
    b = scorer.image_text_scores(image.copy(), ["a dog", "a cat", "a cat"])
    assert scorer.image_encoder_calls == 1 and scorer.text_encoder_calls == 1
    # Cached embeddings give the same scores; the batch shape of the matrix product may
    # change the last bits, so compare with a tolerance (as diffusers' tests do).
    np.testing.assert_allclose(b, [a[1], a[0], a[0]], rtol=1e-5, atol=1e-6)
    scorer.image_text_scores(_image(seed=3), ["a cat"])
    assert scorer.image_encoder_calls == 2 and scorer.text_encoder_calls == 1


def test_bad_inputs(scorer):
    with pytest.raises(ValueError, match="texts"):
        scorer.image_text_scores(_image(), [])
    with pytest.raises(ValueError, match="texts"):
        scorer.image_text_scores(_image(), "a cat")
    with pytest.raises(ValueError, match="uint8"):
        scorer.image_text_scores(_image().astype(np.float32), ["a cat"])
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        scorer.image_text_scores(_image()[..., 0], ["a cat"])


def test_prefilter_with_clip_scorer(scorer):
    names = ["cat", "sofa", "lamp", "dog"]
    result = prefilter(_image(seed=4), names, scorer)
    assert result.kept and set(result.kept) <= set(names)
    assert set(result.probabilities) == set(names)
    assert abs(sum(result.probabilities.values()) - 1.0) < 1e-6
    n = len(result.candidates)
    assert len(result.subset_scores) == (2**n - 1 if n > 1 else 0)
    assert scorer.image_encoder_calls == 1  # the image is embedded once for both stages
