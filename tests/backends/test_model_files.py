"""Model files: verification before use, one preflight for a whole preset, manifest-only
downloads, and the loading progress hook.

No network: the hub cache is a temporary folder laid out like huggingface_hub's
(``models--org--name/snapshots/<commit>/...``, ``refs/main``), and "downloads" are a
stand-in ``snapshot_download`` that copies files from local fake repos made of the tiny
random models.
"""

from __future__ import annotations

import fnmatch
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch
from helpers import save_tiny_model_repos
from huggingface_hub import constants

from ovdiff_core.backends import loading
from ovdiff_core.backends.generator import GENERATION_CPU
from ovdiff_core.backends.loading import (
    MODELS,
    MissingModelsError,
    ModelNotAvailableError,
    ModelRef,
    check_file,
    clear_shared,
    manifest,
    sd_variant,
)
from ovdiff_core.backends.presets import PRESETS, build_ovdiff, check_preset_models

COMMIT = "c" * 40


@pytest.fixture(autouse=True)
def _fresh(monkeypatch, tmp_path):
    for entry in MODELS.values():
        monkeypatch.delenv(entry.env, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    loading._REACHABLE.clear()
    clear_shared()
    yield
    clear_shared()
    loading._REACHABLE.clear()


@pytest.fixture(scope="module")
def tiny_repos(tmp_path_factory) -> Path:
    """The tiny models saved like their hub repos (sd, taesd, dinov2, clip), plus the
    extra files real repos carry that the project never loads."""
    from ovdiff_core.backends.tiny_sd import tiny_sd_pipeline

    root = tmp_path_factory.mktemp("repos")
    save_tiny_model_repos(root)
    fp16 = tiny_sd_pipeline(seed=0)
    for part in ("unet", "vae", "text_encoder"):
        getattr(fp16, part).to(torch.float16).save_pretrained(root / "sd" / part, variant="fp16")
    # What real repos also hold: other copies of the same weights, docs.
    for name in ("sd", "taesd", "dinov2", "clip"):
        (root / name / "README.md").write_text("# model card")
    (root / "sd" / "v1-5-pruned.ckpt").write_bytes(b"\0" * 4096)
    (root / "dinov2" / "pytorch_model.bin").write_bytes(b"\0" * 4096)
    (root / "clip" / "open_clip_pytorch_model.bin").write_bytes(b"\0" * 4096)
    (root / "clip" / "model.safetensors").write_bytes(b"\0" * 4096)
    return root


def _copy(src: Path, dst: Path, patterns=None) -> None:
    for f in sorted(src.rglob("*")):
        rel = f.relative_to(src).as_posix()
        if f.is_file() and (patterns is None or any(fnmatch.fnmatch(rel, p) for p in patterns)):
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, dst / rel)


def _cached(repo: str) -> Path:
    """The snapshot folder of ``repo`` in the (temporary) hub cache."""
    return (
        Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}" / "snapshots" / COMMIT
    )


def _put_in_cache(repo: str, src: Path, patterns=None) -> Path:
    snap = _cached(repo)
    _copy(src, snap, patterns)
    (snap.parent.parent / "refs").mkdir(exist_ok=True)
    (snap.parent.parent / "refs" / "main").write_text(COMMIT)
    return snap


def _online_fake_hub(monkeypatch, repos: dict[str, Path]) -> list[tuple[str, list[str], bool]]:
    """Go 'online' against fake repos: ``snapshot_download`` copies the allowed files of
    ``repos[id]`` into the cache; returns the list of (repo, patterns, force) calls."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(loading, "_hub_reachable", lambda: True)
    real = huggingface_hub.snapshot_download
    calls: list[tuple[str, list[str], bool]] = []

    def fake(repo_id, *, revision=None, cache_dir=None, local_files_only=False, **kw):
        if local_files_only:
            return real(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True)
        patterns = list(kw["allow_patterns"])
        calls.append((repo_id, patterns, bool(kw.get("force_download"))))
        snap = _cached(repo_id)
        before = {p: p.stat().st_size for p in snap.rglob("*") if p.is_file()}
        _put_in_cache(repo_id, repos[repo_id], patterns)
        size = sum(p.stat().st_size for p in snap.rglob("*") if p.is_file()) - sum(before.values())
        bar = kw.get("tqdm_class")
        if bar is not None:  # the hub's byte counter
            b = bar(total=max(size, 1), unit="B", disable=False)
            b.update(max(size, 1))
            b.close()
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    return calls


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _small_cpu_preset():
    small = GENERATION_CPU.replace(resolution=64, n_images=2, batch_size=2)
    return PRESETS["cpu"].replace(generation=small.replace(proposer_input_size=None))


# ------------------------------------------------------------------ verify before use


def test_check_file_finds_truncated_and_corrupt_files(tiny_repos, tmp_path):
    good = tiny_repos / "dinov2" / "model.safetensors"
    assert check_file(str(good)) is None
    cut = tmp_path / "model.safetensors"
    shutil.copyfile(good, cut)
    _truncate(cut, 0.9)
    assert check_file(str(cut)).startswith("truncated (")
    _truncate(cut, 0.0001)  # not even the whole header
    assert "truncated" in check_file(str(cut))
    bad_json = tmp_path / "config.json"
    bad_json.write_text('{"hidden_size": 3')
    assert "not valid JSON" in check_file(str(bad_json))
    assert check_file(str(tmp_path / "absent.json")) == "missing"
    (tmp_path / "empty.txt").write_text("")
    assert check_file(str(tmp_path / "empty.txt")).startswith("empty")


def test_truncated_weights_in_cache_offline_name_file_and_command(tiny_repos):
    from ovdiff_core.backends.extractors import DinoExtractor

    snap = _put_in_cache("org/dinov2", tiny_repos / "dinov2", manifest(ModelRef("dinov2", "x")))
    _truncate(snap / "model.safetensors")
    with pytest.raises(ModelNotAvailableError) as info:
        DinoExtractor.from_pretrained("org/dinov2", device="cpu", kind="dinov2")
    msg = str(info.value)
    assert "model.safetensors truncated" in msg
    assert "hf download org/dinov2 --force-download model.safetensors" in msg
    assert "OVDIFF_DINOV2_MODEL" in msg and "HF_HUB_OFFLINE=1" in msg


def test_clip_folder_without_weights_never_gives_random_weights(tiny_repos, tmp_path):
    from ovdiff_core.backends.extractors import ClipExtractor

    clip = tmp_path / "clip"
    clip.mkdir()
    shutil.copyfile(tiny_repos / "clip" / "open_clip_config.json", clip / "open_clip_config.json")
    with pytest.raises(ModelNotAvailableError) as info:
        ClipExtractor.from_pretrained(str(clip), device="cpu")
    assert "open_clip_model.safetensors missing" in str(info.value)
    assert str(clip) in str(info.value)


def test_clip_weights_that_do_not_fit_the_config_raise(tiny_repos, tmp_path):
    from safetensors.torch import load_file, save_file

    from ovdiff_core.backends.extractors import ClipExtractor

    clip = tmp_path / "clip"
    shutil.copytree(tiny_repos / "clip", clip)
    state = load_file(clip / "open_clip_model.safetensors")
    state.pop("logit_scale")
    save_file(state, clip / "open_clip_model.safetensors")
    with pytest.raises(ValueError, match="do not match"):
        ClipExtractor.from_pretrained(str(clip), device="cpu")


def test_half_finished_sd_download_offline_says_which_files(tiny_repos):
    snap = _put_in_cache("org/sd", tiny_repos / "sd", manifest(ModelRef("sd", "x")))
    (snap / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    blobs = snap.parent.parent / "blobs"
    blobs.mkdir()
    (blobs / "0123abcd.incomplete").write_bytes(b"\0" * 10)
    with pytest.raises(ModelNotAvailableError) as info:
        loading.load_sd_pipeline("org/sd", device="cpu", safety_checker=False)
    msg = str(info.value)
    assert "unet/diffusion_pytorch_model.safetensors missing" in msg
    assert "blobs/0123abcd.incomplete" in msg
    assert "hf download org/sd unet/diffusion_pytorch_model.safetensors" in msg


def test_half_finished_sd_download_is_completed_online(tiny_repos, monkeypatch):
    from ovdiff_core.backends.tiny_sd import tiny_sd_pipeline

    snap = _put_in_cache("org/sd", tiny_repos / "sd", manifest(ModelRef("sd", "x")))
    (snap / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    _truncate(snap / "vae" / "diffusion_pytorch_model.safetensors")
    calls = _online_fake_hub(monkeypatch, {"org/sd": tiny_repos / "sd"})
    pipe = loading.load_sd_pipeline("org/sd", device="cpu", safety_checker=False)
    # Only the two bad files were fetched; the broken one with force_download.
    assert calls == [
        ("org/sd", ["unet/diffusion_pytorch_model.safetensors"], False),
        ("org/sd", ["vae/diffusion_pytorch_model.safetensors"], True),
    ]
    ref = tiny_sd_pipeline(seed=0)
    for part in ("unet", "vae"):
        for a, b in zip(
            getattr(ref, part).parameters(), getattr(pipe, part).parameters(), strict=True
        ):
            assert torch.equal(a, b)


# ------------------------------------------------------------------ one preflight


def test_preflight_reports_every_missing_model_in_one_error(tiny_repos, monkeypatch):
    monkeypatch.setattr(loading, "_hub_reachable", lambda: pytest.fail("no hub lookups"))
    monkeypatch.setenv("OVDIFF_SD_MODEL", str(tiny_repos / "sd"))
    monkeypatch.setenv("OVDIFF_TAESD_MODEL", str(tiny_repos / "taesd"))
    monkeypatch.setenv("OVDIFF_CLIP_MODEL", "ovdiff-tests/no-clip")
    monkeypatch.setenv("OVDIFF_DINOV2_MODEL", "ovdiff-tests/no-dinov2")
    missing = check_preset_models("cpu", device="cpu")
    assert [m.model.model_id for m in missing] == ["ovdiff-tests/no-clip", "ovdiff-tests/no-dinov2"]
    with pytest.raises(MissingModelsError) as info:
        build_ovdiff("cpu", backend="real", device="cpu", use_cache=False)
    assert loading._SHARED == {}  # nothing was loaded before the error
    msg = str(info.value)
    assert msg.startswith("2 models are missing")
    assert (
        "hf download ovdiff-tests/no-clip open_clip_config.json open_clip_model.safetensors" in msg
    )
    assert "hf download ovdiff-tests/no-dinov2 config.json model.safetensors" in msg
    assert "OVDIFF_CLIP_MODEL" in msg and "OVDIFF_DINOV2_MODEL" in msg
    assert [m.model.model_id for m in info.value.missing] == [
        "ovdiff-tests/no-clip",
        "ovdiff-tests/no-dinov2",
    ]


# ------------------------------------------------------------------ manifests


def test_manifests_name_one_copy_of_the_weights():
    sd32 = manifest(ModelRef("sd", "a/b"))
    sd16 = manifest(ModelRef("sd", "a/b", fp16=True, safety_checker=True))
    assert "unet/diffusion_pytorch_model.safetensors" in sd32
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in sd16
    assert "safety_checker/model.fp16.safetensors" in sd16
    assert not any("fp16" in f or "safety" in f for f in sd32)
    assert not any(f.endswith((".bin", ".ckpt")) for f in sd16 + sd32)
    assert manifest(ModelRef("clip", "a/b")) == (
        "open_clip_config.json",
        "open_clip_model.safetensors",
    )


def test_preset_loads_from_manifest_files_only_with_progress(tiny_repos, monkeypatch, tmp_path):
    repos = {f"fake/{n}": tiny_repos / n for n in ("sd", "taesd", "clip", "dinov2")}
    calls = _online_fake_hub(monkeypatch, repos)
    for var, name in (
        ("OVDIFF_SD_MODEL", "sd"),
        ("OVDIFF_TAESD_MODEL", "taesd"),
        ("OVDIFF_CLIP_MODEL", "clip"),
        ("OVDIFF_DINOV2_MODEL", "dinov2"),
    ):
        monkeypatch.setenv(var, f"fake/{name}")
    events: list[tuple[str, float | None, str]] = []
    model = build_ovdiff(
        _small_cpu_preset(),
        backend="real",
        device="cpu",
        use_cache=False,
        progress=lambda *e: events.append(e),
    )
    assert sorted(c[0] for c in calls) == sorted(repos)  # one download per model
    for repo in repos:
        got = sorted(
            p.relative_to(_cached(repo)).as_posix() for p in _cached(repo).rglob("*") if p.is_file()
        )
        assert not any(f.endswith((".bin", ".ckpt", ".md")) or "fp16" in f for f in got), got
        assert "model_index.json" in got if repo == "fake/sd" else len(got) == 2
    assert type(model.generator.pipe.vae).__name__ == "AutoencoderTiny"
    assert model.extractors[1].spec()["model_id"] == "fake/dinov2"
    stages = [e[0] for e in events]
    assert stages[0] == "check" and stages[-1] == "ready"
    downloads = [e[2] for e in events if e[0] == "download"]
    assert any("MB" in d for d in downloads)  # byte counts from the hub's progress bar
    loads = [e for e in events if e[0] == "load"]
    assert [e[2] for e in loads] == [
        "Loading Stable Diffusion (1/4)...",
        "Loading TAESD decoder (2/4)...",
        "Loading CLIP ViT-B/16 (3/4)...",
        "Loading DINOv2 (4/4)...",
    ]
    assert [e[1] for e in loads] == [0.0, 0.25, 0.5, 0.75]
    assert stages.index("load") > max(i for i, s in enumerate(stages) if s == "download")


def test_progress_from_local_folders_names_every_model_in_order(tiny_repos, monkeypatch):
    monkeypatch.setattr(loading, "_hub_reachable", lambda: pytest.fail("no hub lookups"))
    for var, name in (
        ("OVDIFF_SD_MODEL", "sd"),
        ("OVDIFF_TAESD_MODEL", "taesd"),
        ("OVDIFF_CLIP_MODEL", "clip"),
        ("OVDIFF_DINOV2_MODEL", "dinov2"),
    ):
        monkeypatch.setenv(var, str(tiny_repos / name))
    events: list[tuple[str, float | None, str]] = []
    build_ovdiff(
        _small_cpu_preset(),
        backend="real",
        device="cpu",
        use_cache=False,
        progress=lambda *e: events.append(e),
    )
    assert [e[0] for e in events] == ["check", "load", "load", "load", "load", "ready"]
    labels = ["Stable Diffusion", "TAESD decoder", "CLIP ViT-B/16", "DINOv2"]
    for event, label in zip(events[1:5], labels, strict=True):
        assert label in event[2]
    assert events[-1][1] == 1.0


def test_fp16_variant_downloaded_and_loaded(tiny_repos, monkeypatch):
    calls = _online_fake_hub(monkeypatch, {"fake/sd": tiny_repos / "sd"})
    pipe = loading.load_sd_pipeline(
        "fake/sd", device="cpu", dtype=torch.float16, safety_checker=False
    )
    assert pipe.unet.dtype == torch.float16
    got = {p.name for p in _cached("fake/sd").rglob("*.safetensors")}
    assert got == {"diffusion_pytorch_model.fp16.safetensors", "model.fp16.safetensors"}
    assert len(calls) == 1
    assert sd_variant(ModelRef("sd", "fake/sd", fp16=True), str(_cached("fake/sd"))) == "fp16"


def test_repo_without_fp16_files_falls_back_to_fp32(tiny_repos, monkeypatch, tmp_path):
    src = tmp_path / "sd32"
    shutil.copytree(tiny_repos / "sd", src, ignore=shutil.ignore_patterns("*.fp16.*"))
    _online_fake_hub(monkeypatch, {"fake/sd32": src})
    ref = ModelRef("sd", "fake/sd32", fp16=True)
    root = loading.ensure_model(ref)
    assert sd_variant(ref, root) is None
    assert (Path(root) / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_download_cli_fetches_exactly_the_manifest(tiny_repos, monkeypatch, capsys):
    from ovdiff_core.backends.download import main

    for var, name in (
        ("OVDIFF_SD_MODEL", "sd"),
        ("OVDIFF_TAESD_MODEL", "taesd"),
        ("OVDIFF_CLIP_MODEL", "clip"),
        ("OVDIFF_DINOV2_MODEL", "dinov2"),
    ):
        monkeypatch.setenv(var, f"fake/{name}")
    assert main(["--preset", "cpu", "--print"]) == 1  # offline: nothing there yet
    out = capsys.readouterr().out
    assert out.count("MISSING") == 4
    assert "hf download fake/dinov2 config.json model.safetensors" in out
    calls = _online_fake_hub(
        monkeypatch, {f"fake/{n}": tiny_repos / n for n in ("sd", "taesd", "clip", "dinov2")}
    )
    assert main(["--preset", "cpu"]) == 0
    assert {c[0]: c[1] for c in calls}["fake/clip"] == [
        "open_clip_config.json",
        "open_clip_model.safetensors",
    ]
    assert main(["--preset", "cpu", "--print"]) == 0
    assert capsys.readouterr().out.count("ready") == 8  # 4 after download + 4 checked
