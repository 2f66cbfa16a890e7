"""Feature extractors on tiny random models of the real classes.

Each extractor is checked against an independent computation from the module weights
(the model's own forward for the activations, our formula only for the last projection),
for shapes and strides at several input sizes, determinism, batch independence, sharing
of SD components with the generator's pipeline, and loading from local directories.
"""

from __future__ import annotations

import json
import threading

import pytest
import torch
import torch.nn.functional as F

from ovdiff_core.backends import loading
from ovdiff_core.backends.extractors import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ClipExtractor,
    DinoExtractor,
    SDFeatureExtractor,
    paper_sd_layers,
)
from ovdiff_core.backends.tiny_vision import (
    TINY_CLIP_CONFIG,
    tiny_dino,
    tiny_dinov2,
    tiny_open_clip,
)
from ovdiff_core.protocols import FeatureExtractor


def _images(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _norm(x: torch.Tensor, mean, std) -> torch.Tensor:
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@pytest.fixture(autouse=True)
def _no_shared_leaks():
    yield
    loading.clear_shared()


# ------------------------------------------------------------------------------- DINO


@pytest.fixture(scope="module")
def dino():
    return DinoExtractor(tiny_dino(seed=0), model_id="tiny-dino")


@pytest.mark.parametrize(
    ("size", "grid"),
    [((32, 32), (4, 4)), ((40, 48), (5, 6)), ((64, 24), (8, 3)), ((63, 17), (8, 2))],
)
def test_dino_shapes_and_stride(dino, size, grid):
    out = dino(_images(2, *size))
    assert isinstance(dino, FeatureExtractor)
    assert dino.stride == 8 and dino.name == "dino"
    assert out.shape == (2, 32, *grid)
    assert out.dtype == torch.float32 and out.device.type == "cpu"


def _vit_keys_reference(model, x: torch.Tensor, block: int, norm_name: str) -> torch.Tensor:
    """Keys of ``block`` from the model's own hidden states and the block's weights."""
    kwargs = {"interpolate_pos_encoding": True} if norm_name == "layernorm_before" else {}
    with torch.no_grad():
        hidden = model(pixel_values=x, output_hidden_states=True, **kwargs).hidden_states[block]
        blocks = model.layers if hasattr(model, "layers") else model.encoder.layer
        layer = blocks[block]
        norm = getattr(layer, norm_name)
        h = F.layer_norm(hidden, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        k = layer.attention.k_proj
        return h @ k.weight.T + k.bias


@pytest.mark.parametrize("size", [(32, 32), (48, 40)])  # native and interpolated grid
@pytest.mark.parametrize("layer", [-1, 0])
def test_dino_key_facet_matches_weights(dino, size, layer):
    model = dino.model
    ex = DinoExtractor(model, layer=layer)
    x = _images(2, *size, seed=1)
    ref = _vit_keys_reference(
        model, _norm(x, IMAGENET_MEAN, IMAGENET_STD), layer % 2, "layernorm_before"
    )
    gh, gw = size[0] // 8, size[1] // 8
    ref = ref[:, 1:].reshape(2, gh, gw, -1).permute(0, 3, 1, 2)  # CLS dropped
    torch.testing.assert_close(ex(x), ref, atol=1e-5, rtol=1e-5)


def test_dinov2_shapes_and_key_facet():
    model = tiny_dinov2(seed=0)
    ex = DinoExtractor(model, model_id="tiny-dinov2", name="dinov2")
    assert ex.stride == 14
    for size, grid in [((56, 56), (4, 4)), ((42, 70), (3, 5)), ((30, 100), (2, 7))]:
        assert ex(_images(1, *size)).shape == (1, 32, *grid)
    x = _images(2, 42, 70, seed=2)
    ref = _vit_keys_reference(model, _norm(x, IMAGENET_MEAN, IMAGENET_STD), 1, "norm1")
    ref = ref[:, 1:].reshape(2, 3, 5, -1).permute(0, 3, 1, 2)
    torch.testing.assert_close(ex(x), ref, atol=1e-5, rtol=1e-5)


def test_dino_deterministic_and_batch_independent(dino):
    x = _images(3, 40, 48, seed=3)
    a, b = dino(x), dino(x)
    assert torch.equal(a, b)
    torch.testing.assert_close(dino(x[1:2]), a[1:2], atol=1e-5, rtol=1e-5)


def test_dino_fixed_input_size(dino):
    ex = DinoExtractor(dino.model, input_size=(16, 24))
    assert ex(_images(1, 100, 50)).shape == (1, 32, 2, 3)
    assert ex.spec()["input_size"] == [16, 24]
    with pytest.raises(ValueError, match="multiples of the patch"):
        DinoExtractor(dino.model, input_size=20)


def test_dino_bad_inputs(dino):
    with pytest.raises(ValueError, match="float"):
        dino((_images(1, 32, 32) * 255).to(torch.uint8))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        dino(torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match="at least 8x8"):
        dino(torch.rand(1, 3, 4, 32))
    with pytest.raises(ValueError, match="layer"):
        DinoExtractor(dino.model, layer=2)


def test_dino_spec_is_json_and_identifies_features(dino):
    spec = dino.spec()
    json.dumps(spec)
    assert spec["model_id"] == "tiny-dino" and spec["facet"] == "key" and spec["layer"] == 1
    assert spec["dtype"] == "float32"
    assert DinoExtractor(dino.model, model_id="tiny-dino", layer=0).spec() != spec


def test_dino_from_pretrained_local_dir(tmp_path, dino):
    dino.model.save_pretrained(tmp_path / "dino")
    ex = DinoExtractor.from_pretrained(str(tmp_path / "dino"), device="cpu")
    assert ex.spec()["model_id"] == str(tmp_path / "dino")
    x = _images(1, 32, 40, seed=4)
    torch.testing.assert_close(ex(x), dino(x))
    again = DinoExtractor.from_pretrained(str(tmp_path / "dino"), device="cpu")
    assert again.model is ex.model  # one instance per model per process

    tiny_dinov2(seed=0).save_pretrained(tmp_path / "dinov2")
    v2 = DinoExtractor.from_pretrained(str(tmp_path / "dinov2"), device="cpu")
    assert v2.name == "dinov2" and v2.stride == 14


def test_dino_from_pretrained_missing_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("OVDIFF_DINO_MODEL", raising=False)
    monkeypatch.delenv("OVDIFF_DINOV2_MODEL", raising=False)
    with pytest.raises(loading.ModelNotAvailableError, match="facebook/dino-vitb8") as info:
        DinoExtractor.from_pretrained(device="cpu")
    assert "OVDIFF_DINO_MODEL" in str(info.value)
    with pytest.raises(loading.ModelNotAvailableError, match="OVDIFF_DINOV2_MODEL") as info:
        DinoExtractor.from_pretrained(device="cpu", kind="dinov2")
    assert "facebook/dinov2-small" in str(info.value)
    with pytest.raises(ValueError, match="kind"):
        DinoExtractor.from_pretrained(device="cpu", kind="vit")


# ------------------------------------------------------------------------------- CLIP


@pytest.fixture(scope="module")
def clip_model():
    return tiny_open_clip(seed=0)


@pytest.mark.parametrize(
    ("size", "grid"), [((32, 32), (2, 2)), ((48, 80), (3, 5)), ((448, 448), (28, 28))]
)
def test_clip_shapes_and_stride(clip_model, size, grid):
    ex = ClipExtractor(clip_model)
    out = ex(_images(2, *size))
    assert isinstance(ex, FeatureExtractor)
    assert ex.stride == 16 and ex.name == "clip" and ex.layer == 1  # second-to-last of 3
    assert out.shape == (2, 32, *grid) and out.dtype == torch.float32


def _clip_keys_reference(visual, x: torch.Tensor, block: int) -> torch.Tensor:
    """Keys of ``block`` from open_clip's own forward (input captured by a hook)."""
    captured = []
    target = visual.transformer.resblocks[block]
    handle = target.register_forward_pre_hook(lambda m, args: captured.append(args[0]))
    try:
        with torch.no_grad():
            visual(x)
    finally:
        handle.remove()
    h = target.ln_1(captured[0])
    d = h.shape[-1]
    attn = target.attn
    with torch.no_grad():
        return h @ attn.in_proj_weight[d : 2 * d].T + attn.in_proj_bias[d : 2 * d]


@pytest.mark.parametrize("layer", [-2, -1, 0])
def test_clip_key_facet_matches_weights(clip_model, layer):
    ex = ClipExtractor(clip_model, layer=layer)
    x = _images(2, 32, 32, seed=5)
    ref = _clip_keys_reference(
        clip_model.visual, _norm(x, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD), layer % 3
    )
    ref = ref[:, 1:].reshape(2, 2, 2, -1).permute(0, 3, 1, 2)
    torch.testing.assert_close(ex(x), ref, atol=1e-5, rtol=1e-5)


def test_clip_interpolated_positions_match_open_clip_resize(clip_model):
    """At 64 px our interpolated embedding equals open_clip's own checkpoint resizing."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg, resize_pos_embed

    cfg = TINY_CLIP_CONFIG
    big = CLIP(
        embed_dim=cfg["embed_dim"],
        vision_cfg=CLIPVisionCfg(**{**cfg["vision_cfg"], "image_size": 64}),
        text_cfg=CLIPTextCfg(**cfg["text_cfg"]),
        quick_gelu=cfg["quick_gelu"],
    ).eval()
    state = dict(clip_model.state_dict())
    resize_pos_embed(state, big)
    big.load_state_dict(state)
    x = _images(1, 64, 64, seed=6)
    ref = _clip_keys_reference(big.visual, _norm(x, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD), 1)
    ref = ref[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    torch.testing.assert_close(ClipExtractor(clip_model)(x), ref, atol=1e-5, rtol=1e-5)


def test_clip_deterministic_and_batch_independent(clip_model):
    ex = ClipExtractor(clip_model)
    x = _images(3, 48, 64, seed=7)
    a = ex(x)
    assert torch.equal(a, ex(x))
    torch.testing.assert_close(ex(x[2:]), a[2:], atol=1e-5, rtol=1e-5)


def _save_open_clip_dir(model, path):
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    config = {"model_cfg": TINY_CLIP_CONFIG, "preprocess_cfg": {}}
    (path / "open_clip_config.json").write_text(json.dumps(config))
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        path / "open_clip_model.safetensors",
    )


def test_clip_from_pretrained_local_dir_shared_with_scorer(tmp_path, clip_model):
    from ovdiff_core.backends.scorer import ClipScorer

    _save_open_clip_dir(clip_model, tmp_path / "clip")
    ex = ClipExtractor.from_pretrained(str(tmp_path / "clip"), device="cpu")
    x = _images(1, 48, 48, seed=8)
    torch.testing.assert_close(ex(x), ClipExtractor(clip_model)(x))
    scorer = ClipScorer.from_pretrained(str(tmp_path / "clip"), device="cpu")
    assert scorer.model.visual is ex.visual  # one open_clip model for both


# ------------------------------------------------------------------------------- SD


@pytest.fixture(scope="module")
def pipe():
    from ovdiff_core.backends.tiny_sd import tiny_sd_pipeline

    return tiny_sd_pipeline(seed=0)


@pytest.fixture(scope="module")
def sd(pipe):
    return SDFeatureExtractor.from_pipeline(pipe, model_id="tiny-sd")


def test_paper_layers_of_sd15_structure_give_7680_channels():
    """SD v1.5's UNet (built on the meta device: no memory, no weights)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(
            sample_size=64,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            layers_per_block=2,
            cross_attention_dim=768,
            attention_head_dim=8,
        )
    layers = paper_sd_layers(unet)
    assert layers == [
        "down_blocks.0.attentions.0",
        "mid_block.attentions.0",
        "up_blocks.1.attentions.0",
        "up_blocks.1.attentions.1",
        "up_blocks.1.attentions.2",
        "up_blocks.2.attentions.0",
        "up_blocks.2.attentions.1",
        "up_blocks.2.attentions.2",
        "up_blocks.3.attentions.2",
    ]
    modules = dict(unet.named_modules())
    dims = [modules[f"{name}.transformer_blocks.0.attn2.to_q"].out_features for name in layers]
    assert sum(dims) == 7680


@pytest.mark.parametrize(
    ("size", "grid"), [((64, 64), (8, 8)), ((48, 80), (6, 10)), ((100, 100), (12, 12))]
)
def test_sd_shapes_and_stride(sd, size, grid):
    out = sd(_images(2, *size))
    assert isinstance(sd, FeatureExtractor)
    assert sd.stride == 8 and sd.name == "sd" and sd.multiple == 16
    assert out.shape == (2, 32 + 64 + 64 + 64 + 32, *grid) and out.dtype == torch.float32
    assert sd.layers == paper_sd_layers(sd.unet)


def test_sd_queries_match_independent_computation(pipe, sd):
    """Diffusers' own VAE, DDPM noising, prompt encoding and UNet forward; queries from
    each layer's attn2 input times its to_q weight."""
    from diffusers import DDPMScheduler

    x = _images(2, 64, 64, seed=9)
    with torch.no_grad():
        latents = pipe.vae.encode(x * 2 - 1).latent_dist.mean * pipe.vae.config.scaling_factor
        noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0))
        t = torch.tensor([200])
        noisy = DDPMScheduler.from_config(pipe.scheduler.config).add_noise(
            latents, noise.expand(2, -1, -1, -1), t
        )
        empty, _ = pipe.encode_prompt("", "cpu", 2, False)
        modules = dict(pipe.unet.named_modules())
        inputs: dict[str, torch.Tensor] = {}
        handles = [
            modules[f"{name}.transformer_blocks.0.attn2"].register_forward_pre_hook(
                lambda m, args, kw, name=name: inputs.__setitem__(
                    name, args[0] if args else kw["hidden_states"]
                ),
                with_kwargs=True,
            )
            for name in sd.layers
        ]
        try:
            pipe.unet(noisy, t.expand(2), encoder_hidden_states=empty)
        finally:
            for h in handles:
                h.remove()
    out = sd(x)
    start = 0
    for name in sd.layers:
        to_q = modules[f"{name}.transformer_blocks.0.attn2.to_q"]
        q = F.linear(inputs[name], to_q.weight, to_q.bias)
        side = int(q.shape[1] ** 0.5)
        q = q.reshape(2, side, side, -1).permute(0, 3, 1, 2)
        q = F.interpolate(q, size=(8, 8), mode="bilinear", align_corners=False)
        torch.testing.assert_close(out[:, start : start + q.shape[1]], q, atol=1e-4, rtol=1e-4)
        start += q.shape[1]
    assert start == out.shape[1]


def test_sd_deterministic_and_batch_independent(sd):
    x = _images(3, 64, 64, seed=10)
    a = sd(x)
    assert torch.equal(a, sd(x))
    torch.testing.assert_close(sd(x[1:2]), a[1:2], atol=1e-4, rtol=1e-4)


def test_sd_shares_pipeline_components_and_leaves_no_hooks(pipe, sd):
    assert sd.unet is pipe.unet and sd.vae is pipe.vae and sd.text_encoder is pipe.text_encoder
    kwargs = {"num_inference_steps": 2, "height": 64, "width": 64, "output_type": "np"}
    before = pipe("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    sd(_images(1, 64, 64))
    after = pipe("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert (before == after).all()
    for module in pipe.unet.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_sd_ignores_unet_calls_from_other_threads(pipe, sd):
    x = _images(1, 64, 64, seed=11)
    expected = sd(x)
    stop = threading.Event()

    def busy():
        latents = torch.randn(1, 4, 8, 8)
        emb = torch.randn(1, 77, 32)
        while not stop.is_set():
            with torch.no_grad():
                pipe.unet(latents, 10, encoder_hidden_states=emb)

    worker = threading.Thread(target=busy)
    worker.start()
    try:
        results = [sd(x) for _ in range(3)]
    finally:
        stop.set()
        worker.join()
    for r in results:
        torch.testing.assert_close(r, expected)


def test_sd_layer_validation(pipe):
    with pytest.raises(ValueError, match="not a cross-attention module"):
        SDFeatureExtractor.from_pipeline(pipe, layers=["down_blocks.9.attentions.0"])
    with pytest.raises(ValueError, match="timestep"):
        SDFeatureExtractor.from_pipeline(pipe, timestep=5000)
    one = SDFeatureExtractor.from_pipeline(pipe, layers=["mid_block.attentions.0"])
    assert one(_images(1, 64, 64)).shape == (1, 64, 8, 8)
    assert one.spec()["layers"] == ["mid_block.attentions.0"]


def test_sd_from_pretrained_local_dir_shares_loaded_pipeline(tmp_path, pipe):
    pipe.save_pretrained(tmp_path / "sd")
    ex = SDFeatureExtractor.from_pretrained(str(tmp_path / "sd"), device="cpu")
    loaded = loading.load_sd_pipeline(str(tmp_path / "sd"), device="cpu")
    assert ex.unet is loaded.unet
    assert ex.spec()["model_id"] == str(tmp_path / "sd")
    x = _images(1, 64, 64, seed=12)
    torch.testing.assert_close(ex(x), SDFeatureExtractor.from_pipeline(pipe)(x))
