"""Model loading: device/dtype choice, offline-first resolution, shared instances."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from ovdiff_core.backends import loading
from ovdiff_core.backends.loading import (
    MODELS,
    ModelNotAvailableError,
    best_device,
    best_dtype,
    clear_shared,
    default_model_id,
    load_sd_pipeline,
    resolve_model,
    shared,
)


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.delenv("OVDIFF_DEVICE", raising=False)
    for entry in MODELS.values():
        monkeypatch.delenv(entry.env, raising=False)
    loading._REACHABLE.clear()
    yield
    clear_shared()
    loading._REACHABLE.clear()


# ----------------------------------------------------------------------- device, dtype


def _fake_accelerators(monkeypatch, cuda: bool, mps: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)


@pytest.mark.parametrize(
    ("cuda", "mps", "expected"),
    [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")],
)
def test_best_device_prefers_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, expected):
    _fake_accelerators(monkeypatch, cuda, mps)
    assert best_device().type == expected


def test_best_device_env_override(monkeypatch):
    _fake_accelerators(monkeypatch, True, False)
    monkeypatch.setenv("OVDIFF_DEVICE", "cpu")
    assert best_device() == torch.device("cpu")
    monkeypatch.setenv("OVDIFF_DEVICE", "not-a-device")
    with pytest.raises(ValueError, match="OVDIFF_DEVICE"):
        best_device()


def test_best_dtype_half_on_cuda_only():
    assert best_dtype(torch.device("cuda")) == torch.float16
    assert best_dtype("cuda:1") == torch.float16
    assert best_dtype("cpu") == torch.float32
    assert best_dtype(torch.device("mps")) == torch.float32


# ----------------------------------------------------------------------- model ids


def test_default_model_id_env_override(monkeypatch):
    assert default_model_id("dino") == "facebook/dino-vitb8"
    assert default_model_id("sd") == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    monkeypatch.setenv("OVDIFF_DINO_MODEL", "/models/dino")
    assert default_model_id("dino") == "/models/dino"
    monkeypatch.setenv("OVDIFF_DINO_MODEL", "  ")  # blank means unset
    assert default_model_id("dino") == "facebook/dino-vitb8"
    with pytest.raises(ValueError, match="model key"):
        default_model_id("resnet")


# ----------------------------------------------------------------------- resolve_model


def test_resolve_local_directory_is_returned_as_is(tmp_path):
    assert resolve_model(str(tmp_path)) == str(tmp_path)


def _fake_hub_cache(root: Path, repo: str, commit: str) -> Path:
    """The on-disk layout huggingface_hub uses: refs/main -> snapshots/<commit>/files."""
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    snap = repo_dir / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    return snap


def test_resolve_finds_cached_snapshot_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    commit = "a" * 40
    snap = _fake_hub_cache(tmp_path, "org/model", commit)
    assert Path(resolve_model("org/model", cache_dir=str(tmp_path))) == snap
    assert Path(resolve_model("org/model", revision=commit, cache_dir=str(tmp_path))) == snap


def test_missing_model_offline_raises_at_once_with_id_and_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError("resolve_model must not probe the hub when HF_HUB_OFFLINE=1")

    monkeypatch.setattr(loading, "_hub_reachable", no_network)
    with pytest.raises(ModelNotAvailableError) as info:
        resolve_model("facebook/dino-vitb8", cache_dir=str(tmp_path))
    msg = str(info.value)
    assert "'facebook/dino-vitb8'" in msg
    assert "hf download facebook/dino-vitb8" in msg
    assert "huggingface-cli download facebook/dino-vitb8" in msg
    assert "OVDIFF_DINO_MODEL" in msg  # the variable for *this* model
    assert "OVDIFF_SD_MODEL" not in msg
    assert "HF_HUB_OFFLINE" in msg


def test_missing_model_unreachable_hub_probes_once_without_retries(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    calls = []

    class DeadSession:
        def head(self, url, timeout):
            calls.append((url, timeout))
            raise ConnectionError("no route to host")

    import huggingface_hub.utils

    monkeypatch.setattr(huggingface_hub.utils, "get_session", lambda: DeadSession())
    for _ in range(3):
        with pytest.raises(ModelNotAvailableError, match="cannot be reached"):
            resolve_model("org/absent", revision="v1", cache_dir=str(tmp_path))
    assert len(calls) == 1  # one probe per process, memoised
    assert calls[0][1] <= 5  # a short timeout, not the default retry loop


def test_missing_model_reachable_hub_defers_to_from_pretrained(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(loading, "_hub_reachable", lambda: True)
    assert resolve_model("org/absent", cache_dir=str(tmp_path)) == "org/absent"


def test_resolve_rejects_bad_ids(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="model_id"):
        resolve_model("  ")
    with pytest.raises(ModelNotAvailableError, match="local path but does not exist"):
        resolve_model(str(tmp_path / "nowhere"))


# ----------------------------------------------------------------------- shared


def test_shared_builds_once_across_threads():
    calls = []

    def factory():
        calls.append(1)
        time.sleep(0.05)
        return object()

    results = []
    threads = [
        threading.Thread(target=lambda: results.append(shared("k", factory))) for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert len(results) == 8 and all(r is results[0] for r in results)
    assert shared("other", object) is not results[0]


def test_shared_failed_factory_stores_nothing():
    def boom():
        raise RuntimeError("broken")

    with pytest.raises(RuntimeError):
        shared("k2", boom)
    assert shared("k2", lambda: 5) == 5


# ----------------------------------------------------------------------- SD pipeline


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    """A tiny SD pipeline saved with a tiny NSFW safety checker, like real SD repos."""
    from diffusers import StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    from ovdiff_core.backends.tiny_sd import tiny_sd_pipeline

    small = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1}
    config = CLIPConfig(
        text_config={**small, "num_attention_heads": 4},
        vision_config={**small, "num_attention_heads": 4, "image_size": 32, "patch_size": 16},
        projection_dim=32,
    )
    torch.manual_seed(0)
    checker = StableDiffusionSafetyChecker(config)
    processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    base = tiny_sd_pipeline(seed=3)
    pipe = StableDiffusionPipeline(
        **{**base.components, "safety_checker": checker, "feature_extractor": processor},
        requires_safety_checker=True,
    )
    path = tmp_path_factory.mktemp("sd") / "tiny-sd"
    pipe.save_pretrained(path)
    return path


def test_load_sd_pipeline_from_local_dir_is_shared(sd_dir):
    from ovdiff_core.backends.tiny_sd import tiny_sd_pipeline

    pipe = load_sd_pipeline(str(sd_dir), device="cpu", safety_checker=False)
    assert pipe.unet.dtype == torch.float32 and pipe.device == torch.device("cpu")
    assert pipe.safety_checker is None
    assert load_sd_pipeline(str(sd_dir), device="cpu", safety_checker=False) is pipe
    ref = tiny_sd_pipeline(seed=3)  # the saved weights came back
    for a, b in zip(ref.unet.parameters(), pipe.unet.parameters(), strict=True):
        assert torch.equal(a, b)


def test_load_sd_pipeline_safety_checker_shares_components(sd_dir):
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    checked = load_sd_pipeline(str(sd_dir), device="cpu", safety_checker=True)
    plain = load_sd_pipeline(str(sd_dir), device="cpu", safety_checker=False)
    assert isinstance(checked.safety_checker, StableDiffusionSafetyChecker)
    assert checked is not plain
    for part in ("unet", "vae", "text_encoder", "tokenizer"):
        assert getattr(checked, part) is getattr(plain, part)  # one copy of the weights
    assert load_sd_pipeline(str(sd_dir), device="cpu", safety_checker=True) is checked
    out = checked("a cat", num_inference_steps=1, height=64, width=64, output_type="np")
    assert out.nsfw_content_detected is not None and len(out.nsfw_content_detected) == 1


def test_load_sd_pipeline_without_checker_in_repo(tmp_path):
    from ovdiff_core.backends.tiny_sd import tiny_sd_pipeline

    tiny_sd_pipeline(seed=1).save_pretrained(tmp_path / "sd")  # no safety checker saved
    pipe = load_sd_pipeline(str(tmp_path / "sd"), device="cpu", safety_checker=True)
    assert pipe.safety_checker is None
    assert pipe is load_sd_pipeline(str(tmp_path / "sd"), device="cpu", safety_checker=False)


def test_load_sd_pipeline_missing_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OVDIFF_SD_MODEL", "someone/not-downloaded-sd")
    with pytest.raises(ModelNotAvailableError, match="someone/not-downloaded-sd"):
        load_sd_pipeline(device="cpu")
