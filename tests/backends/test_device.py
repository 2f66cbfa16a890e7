"""Device and dtype plumbing, checked without a GPU.

* Extractors: a model moved to PyTorch's ``meta`` device (shapes, no data) is a real
  non-CPU device; its features must come back on ``meta`` (a ``.cpu()`` anywhere in the
  extractor fails: a meta tensor cannot be copied out).
* Stage 2 (K-means, banks): run with ``torch.set_default_device("meta")``, every tensor
  created without an explicit device lands on ``meta`` and breaks the computation, which
  is what a CPU-default allocation does next to CUDA points. The results must equal the
  normal run's, banks on the CPU.
* Loading: tiny models saved with ``save_pretrained(variant="fp16")`` holding *different*
  weights than the fp32 files, so the loaded values show which files were read.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import save_tiny_model_repos

import ovdiff_core.kmeans as kmeans_module
from ovdiff_core.backends import loading
from ovdiff_core.backends.extractors import ClipExtractor, DinoExtractor, SDFeatureExtractor
from ovdiff_core.backends.loading import (
    MODELS,
    FP16FallbackWarning,
    ModelRef,
    best_dtype,
    check_model,
    clear_shared,
    dtype_by_name,
)
from ovdiff_core.backends.presets import build_ovdiff, preset_models
from ovdiff_core.backends.tiny_sd import tiny_sd_pipeline
from ovdiff_core.backends.tiny_vision import tiny_dino, tiny_dinov2, tiny_open_clip
from ovdiff_core.config import PrototypeConfig
from ovdiff_core.kmeans import kmeans
from ovdiff_core.pipeline import extract_features
from ovdiff_core.prototypes import build_bank
from ovdiff_core.types import SupportSet


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    for entry in MODELS.values():
        monkeypatch.delenv(entry.env, raising=False)
    monkeypatch.delenv("OVDIFF_DTYPE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    clear_shared()
    yield
    clear_shared()


# --------------------------------------------------------------------------- extractors


def _extractors() -> dict[str, object]:
    return {
        "dino": DinoExtractor(tiny_dino(seed=0)),
        "dinov2": DinoExtractor(tiny_dinov2(seed=0)),
        "clip": ClipExtractor(tiny_open_clip(seed=0)),
        "sd": SDFeatureExtractor.from_pipeline(tiny_sd_pipeline(seed=0)),
    }


@pytest.mark.parametrize("kind", ["dino", "dinov2", "clip", "sd"])
def test_features_stay_on_the_models_device(kind: str) -> None:
    ex = _extractors()[kind]
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    on_cpu = ex(images)  # type: ignore[operator]
    assert on_cpu.device.type == "cpu" and on_cpu.dtype == torch.float32
    for module in ("model", "visual", "unet", "vae", "text_encoder"):
        if hasattr(ex, module):
            getattr(ex, module).to("meta")
    if kind == "sd":
        ex._empty = None  # type: ignore[attr-defined]  # re-encode the prompt on meta
    feats = ex(images)  # type: ignore[operator]  # CPU images in, model's device out
    assert feats.device.type == "meta"
    assert ex.device.type == "meta"  # type: ignore[attr-defined]
    assert feats.shape == on_cpu.shape and feats.dtype == torch.float32
    # the pipeline's batching keeps them there too
    uint8 = (images.permute(0, 2, 3, 1) * 255).to(torch.uint8).numpy()
    batched = extract_features(ex, uint8, batch_size=1)  # type: ignore[arg-type]
    assert batched.device.type == "meta" and batched.shape == on_cpu.shape


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_features_dtype_is_configurable_and_part_of_the_spec(dtype: torch.dtype) -> None:
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    model = tiny_dino(seed=0)
    ref = DinoExtractor(model)
    half = DinoExtractor(model, features_dtype=dtype)
    out = half(images)
    assert out.dtype == dtype
    torch.testing.assert_close(out, ref(images).to(dtype), rtol=0, atol=0)
    assert "features_dtype" not in ref.spec()  # float32 cache keys are unchanged
    assert half.spec()["features_dtype"] == str(dtype).removeprefix("torch.")
    sd = SDFeatureExtractor.from_pipeline(tiny_sd_pipeline(seed=0), features_dtype=dtype)
    assert sd(images).dtype == dtype
    clip = ClipExtractor(tiny_open_clip(seed=0), features_dtype=dtype)
    assert clip(images).dtype == dtype
    with pytest.raises(ValueError, match="features_dtype must be one of"):
        DinoExtractor(model, features_dtype=torch.int8)


# --------------------------------------------------------------------------- stage 2


class _AllocationsOnMeta:
    """Context: tensors created without an explicit device go to ``meta``."""

    def __enter__(self) -> None:
        torch.set_default_device("meta")

    def __exit__(self, *exc: object) -> None:
        torch.set_default_device(None)


def _points(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(6, d, generator=g) * 5
    return centres[torch.randint(6, (n,), generator=g)] + torch.randn(n, d, generator=g)


@pytest.mark.parametrize("n", [300, kmeans_module.SEED_SAMPLE + 300])  # with the subsample
def test_kmeans_places_every_tensor_on_the_points_device(n: int) -> None:
    x = _points(n, 5, seed=n)
    ref = kmeans(x, 6, seed=1)
    with _AllocationsOnMeta():
        got = kmeans(x, 6, seed=1)
    assert got.centroids.device.type == "cpu" and got.labels.device.type == "cpu"
    assert torch.equal(got.labels, ref.labels) and got.n_iter == ref.n_iter
    assert torch.equal(got.centroids, ref.centroids)
    assert got.inertia == ref.inertia


def _support(n: int, size: int, seed: int) -> SupportSet:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 255, (n, size, size, 3), dtype=np.uint8)
    fg = np.zeros((n, size, size), dtype=bool)
    for i in range(n):
        top, left = rng.integers(0, size // 2, 2)
        fg[i, top : top + size // 2, left : left + size // 2] = True
    return SupportSet("thing", images, fg.astype(np.float32), fg, ~fg)


@pytest.mark.parametrize("streamed", [False, True])
def test_build_bank_places_every_tensor_on_the_features_device(
    streamed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if streamed:  # tiny chunks: the seeding reads its subsample from the features
        monkeypatch.setattr(kmeans_module, "_PASS_ELEMENTS", 4096)
    support = _support(3, 96, seed=2)
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(3, 8, 48, 48, generator=g) + torch.arange(8.0)[:, None, None]
    config = PrototypeConfig(n_parts=5)
    ref = build_bank(support, feats, "x", config)
    with _AllocationsOnMeta():
        got = build_bank(support, feats, "x", config)
    for name in ("vectors", "foreground", "kinds", "image_index", "member_offsets"):
        assert getattr(got, name).device.type == "cpu", name
        assert torch.equal(getattr(got, name), getattr(ref, name)), name
    assert torch.equal(got.member_cells, ref.member_cells)


# --------------------------------------------------------------------------- loading


def test_dtype_names_and_the_environment_override(monkeypatch: pytest.MonkeyPatch) -> None:
    assert dtype_by_name("fp16") is torch.float16 and dtype_by_name("bfloat16") is torch.bfloat16
    assert dtype_by_name("torch.float32") is torch.float32
    with pytest.raises(ValueError, match="dtype must be one of"):
        dtype_by_name("float8")
    assert best_dtype("cpu") == torch.float32 and best_dtype("cuda") == torch.float16
    monkeypatch.setenv("OVDIFF_DTYPE", "float32")
    assert best_dtype("cuda") == torch.float32
    monkeypatch.setenv("OVDIFF_DTYPE", "bf16")
    assert best_dtype("cpu") == torch.bfloat16
    monkeypatch.setenv("OVDIFF_DTYPE", "double")
    with pytest.raises(ValueError, match="OVDIFF_DTYPE"):
        best_dtype("cpu")
    # the dtype decides which SD files a preset needs
    monkeypatch.setenv("OVDIFF_DTYPE", "float16")
    assert preset_models("cpu", "cpu")[0].fp16
    monkeypatch.delenv("OVDIFF_DTYPE")
    assert not preset_models("cpu", "cpu")[0].fp16
    assert all(r.fp16 for r in preset_models("paper", "cpu", fp16=True) if r.kind in ("sd", "dino"))


@pytest.fixture(scope="module")
def repos(tmp_path_factory) -> Path:
    """Tiny model folders (sd, taesd, dinov2, clip) whose fp16 variant files hold the
    weights of *another* seed than their fp32 files."""
    root = tmp_path_factory.mktemp("repos")
    save_tiny_model_repos(root)
    other = tiny_sd_pipeline(seed=1)
    for part in ("unet", "vae", "text_encoder"):
        getattr(other, part).to(torch.float16).save_pretrained(root / "sd" / part, variant="fp16")
    tiny_dinov2(seed=1).to(torch.float16).save_pretrained(root / "dinov2", variant="fp16")
    return root


def _first(module: torch.nn.Module) -> torch.Tensor:
    return next(module.parameters()).detach()


def _point_at(monkeypatch: pytest.MonkeyPatch, repos: Path, sd: Path | None = None) -> None:
    for var, name in (
        ("OVDIFF_SD_MODEL", "sd"),
        ("OVDIFF_TAESD_MODEL", "taesd"),
        ("OVDIFF_CLIP_MODEL", "clip"),
        ("OVDIFF_DINOV2_MODEL", "dinov2"),
    ):
        monkeypatch.setenv(var, str(sd if name == "sd" and sd is not None else repos / name))


def test_float16_reads_the_fp16_variant_files(repos: Path, monkeypatch) -> None:
    _point_at(monkeypatch, repos)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FP16FallbackWarning)
        ov = build_ovdiff("cpu", backend="real", device="cpu", dtype="float16", use_cache=False)
    pipe = loading.load_sd_pipeline(str(repos / "sd"), device="cpu", dtype=torch.float16)
    fp16_unet, fp32_unet = tiny_sd_pipeline(seed=1).unet, tiny_sd_pipeline(seed=0).unet
    assert _first(pipe.unet).dtype == torch.float16
    assert torch.equal(_first(pipe.unet), _first(fp16_unet).half())
    assert not torch.equal(_first(pipe.unet), _first(fp32_unet).half())
    dino = {e.name: e for e in ov.extractors}["dinov2"]
    assert isinstance(dino, DinoExtractor)
    assert torch.equal(_first(dino.model), _first(tiny_dinov2(seed=1)).half())
    clip = {e.name: e for e in ov.extractors}["clip"]
    assert isinstance(clip, ClipExtractor)
    assert _first(clip.visual).dtype == torch.float16  # no variant: converted
    assert clip.spec()["dtype"] == "float16" and dino.spec()["dtype"] == "float16"
    # float32 (the CPU default) reads the fp32 files
    clear_shared()
    ov32 = build_ovdiff("cpu", backend="real", device="cpu", use_cache=False)
    dino32 = {e.name: e for e in ov32.extractors}["dinov2"]
    assert isinstance(dino32, DinoExtractor)
    assert torch.equal(_first(dino32.model), _first(tiny_dinov2(seed=0)))
    pipe32 = loading.load_sd_pipeline(str(repos / "sd"), device="cpu", dtype=torch.float32)
    assert torch.equal(_first(pipe32.unet), _first(fp32_unet))


def test_a_folder_without_fp16_files_falls_back_with_a_warning(
    repos: Path, tmp_path: Path, monkeypatch
) -> None:
    import shutil

    sd32 = tmp_path / "sd32"
    shutil.copytree(repos / "sd", sd32, ignore=shutil.ignore_patterns("*.fp16.*"))
    _point_at(monkeypatch, repos, sd=sd32)
    with pytest.warns(FP16FallbackWarning, match=r"no fp16 weights .*unet/diffusion_pytorch"):
        pipe = loading.load_sd_pipeline(str(sd32), device="cpu", dtype=torch.float16)
    assert _first(pipe.unet).dtype == torch.float16
    assert torch.equal(_first(pipe.unet), _first(tiny_sd_pipeline(seed=0).unet).half())
    with warnings.catch_warnings():  # float32 asks for no fp16 files: no warning
        warnings.simplefilter("error", FP16FallbackWarning)
        loading.load_sd_pipeline(str(sd32), device="cpu", dtype=torch.float32)


def test_a_dino_folder_with_only_fp16_weights_is_complete_for_float16(
    repos: Path, tmp_path: Path
) -> None:
    import shutil

    only16 = tmp_path / "dinov2-fp16"
    shutil.copytree(repos / "dinov2", only16, ignore=shutil.ignore_patterns("model.safetensors"))
    assert check_model(ModelRef("dinov2", str(only16), fp16=True)) is None
    missing = check_model(ModelRef("dinov2", str(only16)))  # float32 needs the fp32 file
    assert missing is not None and "model.safetensors" in missing.describe()
    ex = DinoExtractor.from_pretrained(str(only16), device="cpu", dtype=torch.float16)
    assert torch.equal(_first(ex.model), _first(tiny_dinov2(seed=1)).half())


def test_tiny_backend_takes_the_dtype() -> None:
    ov = build_ovdiff("cpu", backend="tiny", device="cpu", dtype=torch.bfloat16, use_cache=False)
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    for ex in ov.extractors:
        assert ex.spec()["dtype"] == "bfloat16", ex.name
        assert ex(images).dtype == torch.float32, ex.name  # features: float32 by default
