"""Support sets from user photos on the tiny random pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ovdiff_core.backends.attention import AttributionRecorder, capture_cross_attention
from ovdiff_core.backends.incontext import InContextConfig, InContextSupport
from ovdiff_core.backends.proposer import FeatureClusterProposer
from ovdiff_core.backends.tiny_sd import tiny_sd_pipeline
from ovdiff_core.colorworld import ColorExtractor, paint_scene
from ovdiff_core.masks import MaskConfig, erode
from ovdiff_core.types import stable_hash

CFG = InContextConfig(resolution=64, batch_size=2, masks=MaskConfig(proposer="threshold"))


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd_pipeline(seed=0)


@pytest.fixture(scope="module")
def photos():
    a, _ = paint_scene((80, 120), (40, 40, 40), [([(230, 120, 20)], (20, 30, 40, 50))], seed=1)
    b, _ = paint_scene((64, 64), (200, 200, 200), [([(20, 60, 220)], (8, 8, 30, 30))], seed=2)
    c, _ = paint_scene((50, 70), (150, 110, 140), [([(30, 170, 40)], (10, 10, 20, 20))], seed=3)
    return [a, b, c]


def test_support_set_shape_and_settings(pipe, photos) -> None:
    maker = InContextSupport(pipe, CFG)
    support = maker("pottedplant", photos)
    assert len(support) == 3
    assert support.images.shape == (3, 64, 64, 3) and support.images.dtype == np.uint8
    assert support.attributions.shape == (3, 64, 64)
    assert support.attributions.min() >= 0 and support.attributions.max() <= 1
    assert support.settings["prompt"] == "A good picture of a potted plant"
    assert support.settings["token_positions"] == [6, 7]
    assert support.settings["timestep"] == 200 and support.settings["n_images"] == 3
    assert support.settings == maker.spec("pottedplant", photos)
    # threshold fallback
    np.testing.assert_array_equal(support.foreground, support.attributions > 0.5)
    assert not (support.foreground & support.background).any()
    # The (already 64 x 64) second photo is passed through unchanged.
    np.testing.assert_array_equal(support.images[1], photos[1])


def test_deterministic_and_input_dependent(pipe, photos) -> None:
    maker = InContextSupport(pipe, CFG)
    a = maker("cat", photos[:2])
    b = maker("cat", photos[:2])
    np.testing.assert_array_equal(a.attributions, b.attributions)
    c = maker("cat", [photos[1], photos[0]])
    assert stable_hash(c.settings) != stable_hash(a.settings)  # inputs are in the key
    # batching does not change a photo's map: photo 1 alone vs in a batch of two
    alone = maker("cat", [photos[0]])
    np.testing.assert_allclose(alone.attributions[0], a.attributions[0], atol=1e-5)
    assert maker.spec("dog", photos[:2]) != maker.spec("cat", photos[:2])


def test_matches_a_manual_single_unet_pass(pipe, photos) -> None:
    """The attribution is the capture of one UNet pass on the VAE latent noised to t."""
    maker = InContextSupport(pipe, CFG.replace(timestep=300, seed=5))
    support = maker("cat", [photos[1]])
    img = torch.from_numpy(photos[1]).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        z = pipe.vae.encode(img).latent_dist.mean * pipe.vae.config.scaling_factor
        noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(5))
        a_bar = pipe.scheduler.alphas_cumprod[300]
        noisy = a_bar.sqrt() * z + (1 - a_bar).sqrt() * noise
        ids = pipe.tokenizer(
            "A good picture of a cat", padding="max_length", max_length=77, return_tensors="pt"
        ).input_ids
        emb = pipe.text_encoder(ids)[0]
        rec = AttributionRecorder([6], 1, (8, 8))
        with capture_cross_attention(pipe.unet, rec):
            pipe.unet(noisy, torch.tensor([300]), encoder_hidden_states=emb)
    np.testing.assert_allclose(support.attributions, rec.attribution((64, 64)), atol=1e-5)
    assert rec.n_records == 7  # one pass through 7 cross-attention layers


def test_user_mask_overrides_foreground(pipe, photos) -> None:
    maker = InContextSupport(pipe, CFG.replace(masks=MaskConfig(proposer="threshold")))
    mask = np.zeros(photos[0].shape[:2], bool)
    mask[20:60, 30:80] = True  # (80, 120) photo -> (64, 64)
    support = maker("cat", photos[:2], masks=[mask, None])
    rows = (np.arange(64) * 80 / 64).astype(int)
    cols = (np.arange(64) * 120 / 64).astype(int)
    expected = mask[rows][:, cols]
    np.testing.assert_array_equal(support.foreground[0], expected)
    radius = CFG.masks.erosion_radius((64, 64))
    np.testing.assert_array_equal(support.background[0], erode(~expected, radius))
    auto = maker("cat", photos[:2])
    np.testing.assert_array_equal(support.foreground[1], auto.foreground[1])
    assert maker.spec("cat", photos[:2], [mask, None]) != maker.spec("cat", photos[:2])


def test_feature_proposer(pipe, photos) -> None:
    proposer = FeatureClusterProposer(ColorExtractor(stride=4), n_clusters=2)
    maker = InContextSupport(pipe, CFG.replace(masks=MaskConfig(n_clusters=2)), proposer)
    support = maker("cat", photos)
    assert support.settings["proposer"]["type"] == "feature_clusters"
    assert support.foreground.any(axis=(1, 2)).all()
    for att, fg in zip(support.attributions, support.foreground, strict=True):
        assert att[fg].mean() >= att.mean()


def test_bad_inputs(pipe, photos) -> None:
    maker = InContextSupport(pipe, CFG)
    with pytest.raises(ValueError, match="at least one"):
        maker("cat", [])
    with pytest.raises(ValueError, match=r"images\[0\]"):
        maker("cat", [photos[0].astype(np.float32)])
    with pytest.raises(ValueError, match="one entry"):
        maker("cat", photos[:2], masks=[None])
    with pytest.raises(ValueError, match=r"masks\[0\]"):
        maker("cat", photos[:1], masks=[np.ones((5, 5), bool)])
    with pytest.raises(ValueError, match="empty"):
        maker("cat", photos[:1], masks=[np.zeros(photos[0].shape[:2], bool)])
    with pytest.raises(ValueError, match="needs a proposer"):
        InContextSupport(pipe, InContextConfig())
    with pytest.raises(ValueError, match="timestep"):
        InContextConfig(timestep=1000)


def test_tiny_autoencoder_encoder(pipe, photos) -> None:
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    encoder = AutoencoderTiny(
        encoder_block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
    ).eval()
    maker = InContextSupport(pipe, CFG.replace(encoder_id="x/taesd"), encoder=encoder)
    support = maker("cat", photos[:2])
    assert support.settings["encoder"] == "x/taesd"
    assert support.attributions.shape == (2, 64, 64)
    default = InContextSupport(pipe, CFG)("cat", photos[:2])
    assert not np.allclose(support.attributions, default.attributions)
