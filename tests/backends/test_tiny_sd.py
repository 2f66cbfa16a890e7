"""The offline CLIP tokenizer and the tiny random Stable Diffusion pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ovdiff_core.backends.tiny_sd import (
    clip_tokenizer_offline,
    tiny_sd_pipeline,
    write_clip_tokenizer_files,
)

PROMPTS = [
    "A good picture of a cat",
    "potted plant",
    "tv monitor",
    "Hello, World!  dining-table",
    "naïve café 123 ümlaut",
    "don't stop",
    "a photo of 🐱 and the Eiffel Tower, 1999!",
    "supercalifragilisticexpialidocious",
]


def test_tokenizer_ids_equal_open_clip() -> None:
    import open_clip

    tok = clip_tokenizer_offline()
    reference = open_clip.get_tokenizer("ViT-B-16")
    assert len(tok) == 49408
    assert tok.model_max_length == 77
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (49406, 49407, 49407)
    for prompt in PROMPTS:
        ours = tok(prompt).input_ids
        theirs = [i for i in reference([prompt])[0].tolist() if i != 0]  # open_clip pads with 0
        assert ours == theirs, prompt
    # Known ids of CLIP's vocabulary (the same in every CLIP/SD tokenizer).
    assert tok("a cat").input_ids == [49406, 320, 2368, 49407]


def test_tokenizer_pads_to_77_like_sd() -> None:
    tok = clip_tokenizer_offline()
    ids = tok("a cat", padding="max_length", max_length=tok.model_max_length).input_ids
    assert len(ids) == 77
    assert ids[4:] == [49407] * 73


def test_tokenizer_files_written_to_given_dir(tmp_path) -> None:
    write_clip_tokenizer_files(tmp_path)
    vocab = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 49408
    assert vocab["<|startoftext|>"] == 49406 and vocab["cat</w>"] == 2368
    merges = (tmp_path / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0].startswith("#version") and len(merges) == 1 + 48894
    tok = clip_tokenizer_offline(cache_dir=tmp_path / "cache")
    assert tok("tv monitor").input_ids == [49406, 1583, 10198, 49407]


def test_tiny_pipeline_structure() -> None:
    pipe = tiny_sd_pipeline()
    assert pipe.vae_scale_factor == 8
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size == 32
    assert pipe.text_encoder.config.vocab_size == 49408
    cross = [n for n, _ in pipe.unet.named_modules() if n.endswith("attn2")]
    assert any(n.startswith("down_blocks") for n in cross)
    assert any(n.startswith("mid_block") for n in cross)
    assert any(n.startswith("up_blocks") for n in cross)
    assert pipe.safety_checker is None
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"


def test_tiny_pipeline_deterministic_given_seed() -> None:
    def run(seed: int) -> np.ndarray:
        pipe = tiny_sd_pipeline(seed)
        out = pipe(
            "a cat",
            num_inference_steps=2,
            height=64,
            width=64,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        )
        return np.asarray(out.images)

    state = torch.random.get_rng_state()
    a, b, c = run(0), run(0), run(1)
    assert torch.equal(state, torch.random.get_rng_state())  # global RNG untouched
    assert a.shape == (1, 64, 64, 3)
    assert np.isfinite(a).all() and a.min() >= 0.0 and a.max() <= 1.0
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


@pytest.mark.parametrize("seed", [0, 3])
def test_tiny_pipeline_weights_depend_on_seed_only(seed: int) -> None:
    torch.manual_seed(123)
    p1 = tiny_sd_pipeline(seed)
    torch.manual_seed(456)
    p2 = tiny_sd_pipeline(seed)
    for m1, m2 in ((p1.unet, p2.unet), (p1.vae, p2.vae), (p1.text_encoder, p2.text_encoder)):
        for t1, t2 in zip(m1.state_dict().values(), m2.state_dict().values(), strict=True):
            assert torch.equal(t1, t2)


@pytest.mark.parametrize(
    ("arch", "millions"),
    [("sd15", 859.5), ("sd21", 865.9), ("sd-turbo", 865.9), ("bk-sdm-tiny", 323.4)],
)
def test_real_size_unet_configs_match_published_sizes(arch: str, millions: float) -> None:
    """The benchmark architectures have the published parameter counts (built on meta)."""
    from diffusers import UNet2DConditionModel

    from ovdiff_core.backends.tiny_sd import SD_ARCHITECTURES

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD_ARCHITECTURES[arch]["unet"])
    n = sum(p.numel() for p in unet.parameters()) / 1e6
    assert n == pytest.approx(millions, abs=0.1)
    cross = [m for name, m in unet.named_modules() if name.endswith("attn2")]
    assert len(cross) == {"sd15": 16, "sd21": 16, "sd-turbo": 16, "bk-sdm-tiny": 9}[arch]


def test_random_sd_pipeline_rejects_unknown_arch() -> None:
    from ovdiff_core.backends.tiny_sd import random_sd_pipeline

    with pytest.raises(ValueError, match="arch must be one of"):
        random_sd_pipeline("sdxl")
    with pytest.raises(ValueError, match="decoder must be"):
        random_sd_pipeline("sd15", decoder="fast")
