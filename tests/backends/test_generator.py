"""SDSupportGenerator on the tiny random pipeline: batches, spec, determinism, masks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ovdiff_core.backends.generator import (
    GENERATION_CPU,
    GENERATION_PAPER,
    GenerationConfig,
    SDSupportGenerator,
)
from ovdiff_core.backends.proposer import FeatureClusterProposer
from ovdiff_core.backends.tiny_sd import tiny_sd_pipeline
from ovdiff_core.colorworld import ColorExtractor
from ovdiff_core.masks import MaskConfig
from ovdiff_core.protocols import SupportGenerator
from ovdiff_core.types import SupportSet, stable_hash

TINY = GenerationConfig(
    steps=2,
    resolution=64,
    batch_size=2,
    n_images=3,
    safety_checker=False,
    masks=MaskConfig(proposer="threshold"),
)


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd_pipeline(seed=0)


def test_paper_preset_matches_spec() -> None:
    c = GENERATION_PAPER
    assert c.model_id == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert (c.steps, c.guidance_scale, c.resolution, c.seed) == (30, 8.0, 512, 42)
    assert (c.batch_size, c.n_images, c.scheduler) == (8, 32, "dpm_multistep")
    assert c.prompt.format("cat") == "A good picture of a cat"
    assert c.negative_prompt == (
        "text, low quality, blurry, cartoon, meme, low resolution, bad, poor, faded"
    )
    assert c.prompt_name("diningtable") == "table"
    assert c.prompt_name("tvmonitor") == "monitor"
    assert c.prompt_name("pottedplant") == "potted plant"
    assert c.prompt_name("cat") == "cat"
    assert c.safety_checker and c.masks.fg_threshold == 0.5 and c.masks.bg_threshold == 0.2
    cpu = GENERATION_CPU
    assert cpu.steps * cpu.n_images * (2 if cpu.guided else 1) < c.steps * c.n_images * 2 / 50


def test_generator_yields_batches_with_spec(pipe) -> None:
    gen = SDSupportGenerator(pipe, TINY)
    assert isinstance(gen, SupportGenerator)
    spec = gen.spec("pottedplant")
    json.dumps(spec)  # JSON-serialisable
    assert spec["prompt"] == "A good picture of a potted plant"
    assert spec["token_positions"] == [6, 7]
    assert spec["scheduler_class"] == "DPMSolverMultistepScheduler"
    assert spec["steps"] == 2 and spec["guidance_scale"] == 8.0 and spec["seed"] == 42
    assert spec["device"] == "cpu" and spec["dtype"] == "float32"
    batches = list(gen.generate("pottedplant"))
    assert [len(b) for b in batches] == [2, 1]
    for b in batches:
        assert isinstance(b, SupportSet)
        assert b.category == "pottedplant"
        assert b.images.shape[1:] == (64, 64, 3) and b.images.dtype == np.uint8
        assert b.attributions.min() >= 0 and b.attributions.max() <= 1
        assert b.settings == spec
        # threshold fallback: fg = att > 0.5, bg within att < 0.2, disjoint
        np.testing.assert_array_equal(b.foreground, b.attributions > 0.5)
        assert not (b.foreground & b.background).any()
        assert (b.attributions[b.background] < 0.2).all()
        assert b.foreground.any(axis=(1, 2)).all()


def test_generation_is_deterministic_and_seeded_per_class(pipe) -> None:
    gen = SDSupportGenerator(pipe, TINY)
    a = list(gen.generate("cat"))
    b = list(gen.generate("cat"))
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.images, y.images)
        np.testing.assert_array_equal(x.attributions, y.attributions)
    # Seed reset per class: the first batch's noise is the same for another class, but
    # images and maps differ through the prompt.
    dog = next(iter(gen.generate("dog")))
    assert not np.array_equal(dog.images, a[0].images)
    # Batches continue one noise stream: images within a class differ.
    assert not np.array_equal(a[0].images[0], a[0].images[1])
    # A different seed gives different images.
    other = next(iter(SDSupportGenerator(pipe, TINY.replace(seed=7)).generate("cat")))
    assert not np.array_equal(other.images, a[0].images)


def test_capture_does_not_change_generated_images(pipe) -> None:
    gen = SDSupportGenerator(pipe, TINY.replace(n_images=2))
    ours = next(iter(gen.generate("cat"))).images
    latents = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(42))
    plain = gen.pipe(
        prompt="A good picture of a cat",
        negative_prompt=TINY.negative_prompt,
        num_images_per_prompt=2,
        num_inference_steps=2,
        guidance_scale=8.0,
        height=64,
        width=64,
        latents=latents,
        output_type="np",
    ).images
    expected = (np.clip(plain, 0, 1) * 255).round().astype(np.uint8)
    np.testing.assert_array_equal(ours, expected)


def test_spec_changes_with_every_setting(pipe) -> None:
    base = SDSupportGenerator(pipe, TINY)
    keys = {stable_hash(base.spec("cat"))}
    variants = [
        TINY.replace(steps=3),
        TINY.replace(seed=1),
        TINY.replace(n_images=4),
        TINY.replace(batch_size=3),
        TINY.replace(guidance_scale=5.0),
        TINY.replace(prompt="a photo of a {}"),
        TINY.replace(negative_prompt="ugly"),
        TINY.replace(resolution=128),
        TINY.replace(scheduler="ddim"),
        TINY.replace(masks=MaskConfig(proposer="threshold", bg_threshold=0.1)),
        TINY.replace(map_size=32),
    ]
    for cfg in variants:
        keys.add(stable_hash(SDSupportGenerator(pipe, cfg).spec("cat")))
    assert len(keys) == len(variants) + 1
    assert base.spec("cat") != base.spec("dog")
    other_weights = SDSupportGenerator(tiny_sd_pipeline(seed=1), TINY)
    assert other_weights.spec("cat")["model"] != base.spec("cat")["model"]
    named = SDSupportGenerator(pipe, TINY, model_name="org/model@abc")
    assert named.spec("cat")["model"] == "org/model@abc"


def test_generator_does_not_modify_the_given_pipeline(pipe) -> None:
    scheduler = pipe.scheduler
    gen = SDSupportGenerator(pipe, TINY.replace(scheduler="euler", timestep_spacing="trailing"))
    assert pipe.scheduler is scheduler
    assert type(gen.pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    assert gen.pipe.scheduler.config.timestep_spacing == "trailing"
    assert gen.pipe.unet is pipe.unet  # components are shared, not copied


def test_no_guidance_mode(pipe) -> None:
    cfg = TINY.replace(guidance_scale=0.0, scheduler="euler", timestep_spacing="trailing")
    gen = SDSupportGenerator(pipe, cfg)
    assert gen.spec("cat")["negative_prompt"] is None
    (batch, _) = list(gen.generate("cat"))
    assert batch.attributions.shape == (2, 64, 64)
    assert batch.foreground.any()


def test_feature_proposer_masks(pipe) -> None:
    cfg = TINY.replace(n_images=2, masks=MaskConfig(n_clusters=3))
    proposer = FeatureClusterProposer(ColorExtractor(stride=4), n_clusters=3)
    gen = SDSupportGenerator(pipe, cfg, proposer=proposer)
    assert gen.spec("cat")["proposer"]["type"] == "feature_clusters"
    (batch,) = list(gen.generate("cat"))
    assert batch.foreground.any(axis=(1, 2)).all()
    assert not (batch.foreground & batch.background).any()
    # The foreground is the segment with the highest mean attribution, so its mean
    # attribution is at least the image's mean.
    for att, fg in zip(batch.attributions, batch.foreground, strict=True):
        assert att[fg].mean() >= att.mean()


def test_safety_checker_drops_flagged_images(pipe) -> None:
    class FlagFirst(torch.nn.Module):
        """Stand-in checker flagging the first image of each batch (blackens it)."""

        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        @property
        def device(self) -> torch.device:  # pipelines ask their modules for .device
            return self.w.device

        @property
        def dtype(self) -> torch.dtype:
            return self.w.dtype

        def forward(self, images, clip_input):
            flags = [i == 0 for i in range(len(images))]
            images = images.clone()
            images[0] = 0
            return images, flags

    class Features:
        def __init__(self, n: int) -> None:
            self.pixel_values = torch.zeros(n, 3, 8, 8)

        def to(self, *_args, **_kwargs):
            return self

    class Extractor:
        def __call__(self, images, return_tensors="pt"):
            return Features(len(images))

    from diffusers import StableDiffusionPipeline

    checked = StableDiffusionPipeline(
        **{**pipe.components, "safety_checker": FlagFirst(), "feature_extractor": Extractor()},
        requires_safety_checker=True,
    )
    gen = SDSupportGenerator(checked, TINY.replace(safety_checker=True))
    assert gen.spec("cat")["safety_checker"] is True
    batches = list(gen.generate("cat"))
    assert [len(b) for b in batches] == [1]  # 2 -> 1 kept; the 1-image batch fully dropped
    unchecked = SDSupportGenerator(checked, TINY)
    assert unchecked.spec("cat")["safety_checker"] is False
    full = list(unchecked.generate("cat"))
    np.testing.assert_array_equal(batches[0].images[0], full[0].images[1])


def test_config_validation(pipe) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        GenerationConfig(prompt="a cat")
    with pytest.raises(ValueError, match="multiple of 8"):
        GenerationConfig(resolution=100)
    with pytest.raises(ValueError, match="scheduler"):
        GenerationConfig(scheduler="plms")
    with pytest.raises(ValueError, match="needs a proposer"):
        SDSupportGenerator(pipe, GenerationConfig())


def test_from_pretrained_fails_fast_offline(monkeypatch) -> None:
    from ovdiff_core.backends.loading import ModelNotAvailableError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotAvailableError):
        SDSupportGenerator.from_pretrained(
            GENERATION_CPU.replace(model_id="nobody/not-a-model"), extractor=ColorExtractor()
        )


def _tiny_taesd():
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    return AutoencoderTiny(
        encoder_block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
    ).eval()


def test_tiny_autoencoder_decoder(pipe) -> None:
    decoder = _tiny_taesd()
    gen = SDSupportGenerator(pipe, TINY.replace(n_images=2, decoder_id="x/taesd"), decoder=decoder)
    assert gen.pipe.vae is decoder and pipe.vae is not decoder
    spec = gen.spec("cat")
    assert spec["decoder"] == "x/taesd"
    assert spec != SDSupportGenerator(pipe, TINY.replace(n_images=2)).spec("cat")
    (batch,) = list(gen.generate("cat"))
    assert batch.images.shape == (2, 64, 64, 3)
    plain = next(iter(SDSupportGenerator(pipe, TINY.replace(n_images=2)).generate("cat")))
    # Same latents and attention (the decoder runs after sampling), other pixels.
    np.testing.assert_array_equal(batch.attributions, plain.attributions)
    assert not np.array_equal(batch.images, plain.images)
