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


def _distinct_prefixes(tokens: torch.Tensor) -> int:
    """Distinct token prefixes (up to and including the end token) of tokenized prompts."""
    lengths = (tokens.argmax(-1) + 1).tolist()
    rows = zip(tokens.tolist(), lengths, strict=True)
    return len({tuple(row[:i]) for row, n in rows for i in range(1, n + 1)})


def test_shared_prefixes_run_once_and_match_the_full_encoder(model, tokenizer):
    """Every distinct token prefix runs once; embeddings equal the untruncated 77-token
    ``encode_text`` to 1e-5, for subset prompts and for unrelated prompts of mixed length."""
    names = ["cat", "traffic light", "sofa", "potted plant", "tv"]
    texts = [
        " and ".join(f"a {n}" for j, n in enumerate(names) if mask >> j & 1)
        for mask in range(1, 2 ** len(names))
    ]
    texts += ["a cat", "A  Cat", "x", "a photo of " + "a very long prompt " * 20, "a"]
    scorer = ClipScorer(model, tokenizer, model_id="tiny-clip")
    emb = scorer.text_embeddings(texts)
    tokens = tokenizer(texts)
    with torch.no_grad():
        ref = F.normalize(model.encode_text(tokens), dim=-1)
    torch.testing.assert_close(emb, ref, atol=1e-5, rtol=1e-5)
    distinct = _distinct_prefixes(tokenizer(list(dict.fromkeys(texts))))
    assert scorer.text_positions == distinct
    assert distinct < 0.5 * int((tokens.argmax(-1) + 1).sum())  # the sharing is real
    assert scorer.text_encoder_calls == 1


def test_position_budget_splits_calls_and_stays_exact(model, tokenizer):
    names = [f"thing{i}" for i in range(6)]
    texts = [
        " and ".join(f"a {n}" for j, n in enumerate(names) if mask >> j & 1)
        for mask in range(1, 64)
    ]
    small = ClipScorer(model, tokenizer, max_positions=80)
    emb = small.text_embeddings(texts)
    assert small.text_encoder_calls > 1
    big = ClipScorer(model, tokenizer)
    torch.testing.assert_close(emb, big.text_embeddings(texts), atol=1e-5, rtol=1e-5)
    assert big.text_encoder_calls == 1 and big.text_positions < small.text_positions
    reference = ClipScorer(model, tokenizer, share_prefixes=False, batch_size=16)
    torch.testing.assert_close(emb, reference.text_embeddings(texts), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="max_positions"):
        ClipScorer(model, tokenizer, max_positions=10)


def test_text_cache_drops_the_least_recently_used(model, tokenizer):
    scorer = ClipScorer(model, tokenizer, text_cache_size=3)
    scorer.text_embeddings(["a cat", "a dog", "a sofa"])
    scorer.text_embeddings(["a cat"])  # cat is now the most recently used
    scorer.text_embeddings(["a lamp"])  # evicts dog only
    calls = scorer.text_encoder_calls
    scorer.text_embeddings(["a cat", "a sofa", "a lamp"])
    assert scorer.text_encoder_calls == calls, "recent prompts stay cached"
    scorer.text_embeddings(["a dog"])
    assert scorer.text_encoder_calls == calls + 1, "the least recently used one was dropped"


def test_prefilter_keeps_the_same_set_as_the_reference_encoder(model, tokenizer):
    """Ten candidates (1023 subset prompts): the kept set and every subset score equal
    those of the per-prompt encoder."""
    names = ["person", "bicycle", "car", "motorcycle", "airplane"]
    names += ["bus", "train", "truck", "boat", "traffic light"]
    singles = [f"a {n}" for n in names]

    class AllPass:  # every class passes the first step: 10 candidates
        def __init__(self, inner: ClipScorer) -> None:
            self.inner = inner

        def image_text_scores(self, image, texts):
            if list(texts) == singles:
                return np.zeros(len(texts), dtype=np.float32)
            return self.inner.image_text_scores(image, texts)

    fast = AllPass(ClipScorer(model, tokenizer))
    slow = AllPass(ClipScorer(model, tokenizer, share_prefixes=False))
    for seed in range(3):
        image = _image(seed=10 + seed)
        a = prefilter(image, names, fast, max_classes=10)
        b = prefilter(image, names, slow, max_classes=10)
        assert a.candidates == names and len(a.subset_scores) == 1023
        assert a.kept == b.kept
        assert list(a.subset_scores) == list(b.subset_scores)
        np.testing.assert_allclose(
            list(a.subset_scores.values()), list(b.subset_scores.values()), atol=1e-5
        )
