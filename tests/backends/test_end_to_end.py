"""End to end through the public API with tiny models of the real classes.

categories -> streamed support sets -> masks -> banks (cached in tmp_path) -> segment an
image -> trace a pixel; the same through the "real" backend loading saved tiny models
from local directories (offline); device/dtype selection; the missing-weights error.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import skimage.data
import torch
from helpers import save_tiny_model_repos

from ovdiff_core import FAST_SEGMENT, OVDiff, trace
from ovdiff_core.backends import (
    GENERATION_CPU,
    GENERATION_PAPER,
    PRESETS,
    ModelNotAvailableError,
    build_ovdiff,
    loading,
)
from ovdiff_core.backends.extractors import SDFeatureExtractor


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return skimage.data.chelsea()  # (300, 451, 3) uint8, a real cat photo


@pytest.fixture(scope="module")
def cpu_model(tmp_path_factory) -> tuple[OVDiff, object]:
    cache = tmp_path_factory.mktemp("cache")
    return build_ovdiff("cpu", backend="tiny", cache_dir=cache), cache


def test_tiny_cpu_preset_end_to_end(cpu_model, image):
    model, cache = cpu_model
    assert [e.name for e in model.extractors] == ["clip", "dinov2"]
    events = list(model.build_iter("cat"))

    support = [e for e in events if e.stage == "support"]
    assert [e.done for e in support] == [2, 4] and all(e.total == 4 for e in support)
    for e in support:  # each batch streams its own images and masks
        batch = e.batch
        assert batch.images.shape == (2, 64, 64, 3) and batch.images.dtype == np.uint8
        assert batch.foreground.shape == batch.background.shape == (2, 64, 64)
        assert batch.foreground.dtype == np.bool_ and batch.foreground.any()
        assert batch.attributions.min() >= 0 and batch.attributions.max() <= 1
        assert not e.cached
    banks = [e for e in events if e.stage == "bank"]
    assert [e.extractor for e in banks] == ["clip", "dinov2"]
    cat = events[-1].category_result
    assert events[-1].stage == "done" and cat.name == "cat" and len(cat.support) == 4
    for name, dim in (("clip", 32), ("dinov2", 32)):
        bank = cat.banks[name]
        assert bank.dim == dim and bank.foreground.any() and (~bank.foreground).any()
        torch.testing.assert_close(bank.vectors.norm(dim=1), torch.ones(len(bank)))
    # support set + one bank per extractor on disk
    files = sorted(p.parent.name for p in cache.rglob("*.safetensors"))
    assert files == ["bank", "bank", "support"]

    model.build(["sofa"])
    seg = model.segment(image)
    assert seg.labels.shape == image.shape[:2]
    assert seg.class_names[0] == "background" and set(seg.class_names[1:]) <= {"cat", "sofa"}
    assert seg.scores.shape == (len(seg.class_names), *image.shape[:2])
    assert seg.labels.min() >= 0 and seg.labels.max() < len(seg.class_names)
    np.testing.assert_array_equal(seg.labels, seg.scores.argmax(axis=0))

    why = trace(seg, x=200, y=150)
    assert (why.x, why.y) == (200, 150)
    assert why.label == seg.labels[150, 200] and why.label_name == seg.class_names[why.label]
    assert why.similarity_map.shape == image.shape[:2]


def test_tiny_build_comes_from_cache(cpu_model, monkeypatch):
    model, cache = cpu_model
    if "cat" not in model.categories:
        model.build(["cat"])
    again = build_ovdiff("cpu", backend="tiny", cache_dir=cache)

    def no_generation(name):
        raise AssertionError("a cached category must not be generated again")

    monkeypatch.setattr(again.generator, "generate", no_generation)
    events = list(again.build_iter("cat"))
    assert all(e.cached for e in events if e.stage in ("support", "bank"))
    first, second = model.categories["cat"], events[-1].category_result
    for name in ("clip", "dinov2"):
        torch.testing.assert_close(second.banks[name].vectors, first.banks[name].vectors)
    np.testing.assert_array_equal(second.support.images, first.support.images)


@pytest.mark.slow
def test_tiny_paper_preset_shares_sd_components(image):
    model = build_ovdiff("paper", backend="tiny", use_cache=False)
    assert [e.name for e in model.extractors] == ["sd", "dino", "clip"]
    sd = model.extractors[0]
    assert isinstance(sd, SDFeatureExtractor)
    assert sd.unet is model.generator.pipe.unet and sd.vae is model.generator.pipe.vae
    assert model.generator.config.guidance_scale == GENERATION_PAPER.guidance_scale
    assert model.segment_config == PRESETS["paper"].segment_config
    model.build(["cat"])
    seg = model.segment(image, config=FAST_SEGMENT.replace(short_side=128))
    assert seg.labels.shape == image.shape[:2] and seg.extractors == ["sd", "dino", "clip"]


def test_tiny_same_seed_same_models_and_device(tmp_path):
    a = build_ovdiff("cpu", backend="tiny", use_cache=False)
    b = build_ovdiff("cpu", backend="tiny", use_cache=False, device="cpu")
    assert a.extractors[0].visual is b.extractors[0].visual  # one tiny model per process
    assert a.scorer.model.visual is a.extractors[0].visual  # scorer and extractor share CLIP
    assert next(a.extractors[1].model.parameters()).device.type == "cpu"


# ------------------------------------------------------------------ real backend, offline


def test_real_backend_from_local_dirs_offline(tmp_path, monkeypatch, image):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(loading, "_hub_reachable", lambda: pytest.fail("no hub lookups"))
    save_tiny_model_repos(tmp_path)
    # The user's way to point the presets at local copies: environment variables.
    for var, sub in (
        ("OVDIFF_CLIP_MODEL", "clip"),
        ("OVDIFF_DINOV2_MODEL", "dinov2"),
        ("OVDIFF_SD_MODEL", "sd"),
        ("OVDIFF_TAESD_MODEL", "taesd"),
    ):
        monkeypatch.setenv(var, str(tmp_path / sub))
    small = GENERATION_CPU.replace(resolution=64, n_images=2, batch_size=2)
    preset = PRESETS["cpu"].replace(generation=small.replace(proposer_input_size=None))
    try:
        model = build_ovdiff(preset, backend="real", cache_dir=tmp_path / "cache")
        device = loading.best_device()  # device=None picks the best device and its dtype
        for ex in model.extractors:
            p = next((ex.visual if hasattr(ex, "visual") else ex.model).parameters())
            assert p.device.type == device.type and p.dtype == loading.best_dtype(device)
        assert type(model.generator.pipe.vae).__name__ == "AutoencoderTiny"
        assert model.generator.spec("cat")["model"] == str(tmp_path / "sd")
        assert model.extractors[0].spec()["model_id"] == str(tmp_path / "clip")
        assert model.extractors[1].spec()["model_id"] == str(tmp_path / "dinov2")
        model.build(["cat"])
        seg = model.segment(image)
        assert seg.labels.shape == image.shape[:2]
    finally:
        loading.clear_shared()


def test_real_backend_missing_weights_error_names_the_model(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(loading, "_hub_reachable", lambda: pytest.fail("no hub lookups"))
    monkeypatch.setenv("OVDIFF_CLIP_MODEL", "ovdiff-tests/no-such-clip")
    with pytest.raises(ModelNotAvailableError) as info:
        build_ovdiff("cpu", backend="real", use_cache=False)
    msg = str(info.value)
    assert "'ovdiff-tests/no-such-clip'" in msg and "OVDIFF_CLIP_MODEL" in msg
    assert "hf download ovdiff-tests/no-such-clip" in msg


def test_build_ovdiff_rejects_unknown_names():
    with pytest.raises(ValueError, match="preset must be one of"):
        build_ovdiff("gpu-turbo", backend="tiny")
    with pytest.raises(ValueError, match="backend must be one of"):
        build_ovdiff("cpu", backend="fake")


def test_presets_match_the_spec():
    paper = PRESETS["paper"]
    g = paper.generation
    assert (g.steps, g.guidance_scale, g.resolution, g.n_images, g.seed) == (30, 8.0, 512, 32, 42)
    assert [e.kind for e in paper.extractors] == ["sd", "dino", "clip"]
    assert paper.prototype_config.n_parts == 32
    assert paper.segment_config.window_sizes == (448, 336)
    assert paper.segment_config.window_stride == 224 and paper.segment_config.prefilter
    cpu = PRESETS["cpu"]
    assert cpu.generation is GENERATION_CPU and cpu.proposer == "dinov2"
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # conftest keeps tests offline


def test_env_generation_overrides_only_what_is_set(monkeypatch):
    from ovdiff_core.backends.presets import env_generation

    monkeypatch.delenv("OVDIFF_SD_MODEL", raising=False)
    monkeypatch.delenv("OVDIFF_TAESD_MODEL", raising=False)
    assert env_generation(GENERATION_CPU) is GENERATION_CPU
    monkeypatch.setenv("OVDIFF_SD_MODEL", "/models/sd-turbo")
    monkeypatch.setenv("OVDIFF_TAESD_MODEL", "/models/taesd")
    cpu = env_generation(GENERATION_CPU)
    assert (cpu.model_id, cpu.decoder_id) == ("/models/sd-turbo", "/models/taesd")
    assert cpu.steps == GENERATION_CPU.steps  # nothing else changes
    paper = env_generation(GENERATION_PAPER)
    assert paper.model_id == "/models/sd-turbo" and paper.decoder_id is None  # paper: full VAE
