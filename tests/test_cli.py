"""The `ovdiff` command, run in-process with the colour backend on a synthetic VOC folder."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tomllib
from helpers import loop_miou
from PIL import Image

from ovdiff_core.cli import main, make_model, resolve_vocabulary
from ovdiff_core.evaluation.datasets import class_names
from ovdiff_core.evaluation.synthetic import color_world, write_synthetic_voc
from ovdiff_core.stuff import STUFF

ROOT = Path(__file__).resolve().parent.parent
VOC_NAMES = class_names("voc")


def run(*argv):
    out = io.StringIO()
    rc = main([*argv, "--quiet"], stdout=out)
    return rc, out.getvalue()


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    root = tmp_path_factory.mktemp("voc")
    written = write_synthetic_voc(root, color_world(VOC_NAMES), VOC_NAMES, n_images=6, seed=5)
    return root, written


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@pytest.mark.parametrize("dataset", ["voc", "voc20"])
def test_eval_on_grid_aligned_scenes_is_100(voc, cache, tmp_path, dataset):
    root, _ = voc
    rc, out = run("eval", dataset, "--root", str(root), "--backend", "color", "--cache", cache,
                  "--out", str(tmp_path))  # fmt: skip
    assert rc == 0
    name = "voc21" if dataset == "voc" else "voc20"
    data = json.loads((tmp_path / f"{name}.json").read_text())
    assert data["mIoU"] == 100.0 and data["aAcc"] == 100.0 and data["n_images"] == 6
    assert data["dataset"] == name and data["names_version"] == 1
    assert data["images_per_s"] > 0
    assert ("background" in data["per_class"]) == (dataset == "voc")
    assert "| 100.00 | 100.00 | 100.00 | 6 |" in (tmp_path / f"{name}.md").read_text()
    assert "mIoU 100.00" in out


def test_eval_with_known_annotation_errors_and_limit(cache, tmp_path):
    root = tmp_path / "voc"
    written = write_synthetic_voc(
        root, color_world(VOC_NAMES), VOC_NAMES, n_images=6, seed=7, mislabelled=2
    )
    rc, _ = run("eval", "voc", "--root", str(root), "--backend", "color", "--cache", cache,
                "--out", str(tmp_path / "res"), "--limit", "4")  # fmt: skip
    assert rc == 0
    data = json.loads((tmp_path / "res" / "voc21.json").read_text())
    assert data["n_images"] == 4
    # a perfect model predicts the painting; the first two annotations name another class
    expected = loop_miou([(w.painted, w.label) for w in written[:4]], 21)
    assert expected < 0.95
    assert data["exact"]["mIoU"] == pytest.approx(expected, abs=1e-12)


def _files(folder):
    return {p: p.read_bytes() for p in Path(folder).rglob("*.safetensors")}


def test_build_is_resumable_second_run_all_cache_hits(tmp_path):
    cache = str(tmp_path / "cache")
    rc, first = run("build", "voc", "--backend", "color", "--cache", cache)
    assert rc == 0
    assert "20 classes: 20 built, 0 from cache" in first
    assert "| monitor | no | 16 | no |" in first
    before = _files(cache)
    assert len(before) == 20 * 3  # a support set and two banks per class
    rc, second = run("build", "voc", "--backend", "color", "--cache", cache)
    assert rc == 0
    assert "20 classes: 0 built, 20 from cache" in second
    assert "| potted plant | no | 16 | yes |" in second
    assert _files(cache) == before  # nothing rewritten


def test_build_resumes_after_an_interrupted_run(tmp_path):
    cache = str(tmp_path / "cache")
    assert run("build", "cat,sofa", "--backend", "color", "--cache", cache)[0] == 0
    rc, out = run("build", "cat,sofa,lamp,grass", "--backend", "color", "--cache", cache)
    assert rc == 0
    assert "4 classes: 2 built, 2 from cache" in out
    assert "| grass | yes |" in out  # stuff flag from the thing/stuff table


def test_segment_writes_palette_pngs_overlays_and_json(voc, cache, tmp_path):
    root, written = voc
    images = root / "VOCdevkit" / "VOC2012" / "JPEGImages"
    out = tmp_path / "seg"
    rc, text = run("segment", str(images), "--vocab", "voc", "--out", str(out),
                   "--backend", "color", "--cache", cache)  # fmt: skip
    assert rc == 0
    assert f"{len(written)} of {len(written)} images segmented" in text
    for w in written:
        with Image.open(out / f"{w.image_id}.png") as im:
            assert im.mode == "P"
            labels = np.asarray(im)
        # the vocabulary is VOC's, so label i is VOC class i: the painting, off the borders
        off_border = w.label != 255
        np.testing.assert_array_equal(labels[off_border], w.painted[off_border])
        with Image.open(out / f"{w.image_id}_overlay.png") as im:
            assert im.size == (224, 160) and im.mode == "RGB"
        record = json.loads((out / f"{w.image_id}.json").read_text())
        painted = {VOC_NAMES[k - 1] for k in np.unique(w.painted) if k}
        assert painted <= set(record["kept"])
        assert sum(a["pixels"] for a in record["areas"].values()) == 160 * 224
        for name, area in record["areas"].items():
            index = 0 if name == "background" else VOC_NAMES.index(name) + 1
            assert area["pixels"] == int((labels == index).sum())


def test_segment_reports_a_bad_image_and_goes_on(cache, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(np.full((64, 64, 3), (230, 120, 20), np.uint8)).save(folder / "a.png")
    (folder / "b.jpg").write_bytes(b"not a jpeg")
    rc, text = run("segment", str(folder), "--vocab", "cat,sofa", "--out", str(tmp_path / "o"),
                   "--backend", "color", "--cache", cache)  # fmt: skip
    assert rc == 1
    assert "1 of 2 images segmented" in text
    assert (tmp_path / "o" / "a.json").is_file() and not (tmp_path / "o" / "b.json").exists()


def test_user_errors_are_one_line_with_exit_status_2(tmp_path, capsys):
    rc, _ = run("eval", "ade20k", "--root", str(tmp_path), "--backend", "color")
    assert rc == 2
    assert "unknown dataset 'ade20k'" in capsys.readouterr().err
    rc, _ = run("eval", "voc", "--root", str(tmp_path), "--backend", "color")
    assert rc == 2
    err = capsys.readouterr().err
    assert "VOCdevkit" in err and "Traceback" not in err
    rc, _ = run("build", "missing/names.txt", "--backend", "color")
    assert rc == 2
    assert "does not exist" in capsys.readouterr().err
    rc, _ = run("build", "cat,background", "--backend", "color", "--cache", str(tmp_path))
    assert rc == 2
    assert "reserved" in capsys.readouterr().err


def test_vocabulary_sources(tmp_path):
    assert resolve_vocabulary("voc") == VOC_NAMES
    assert len(resolve_vocabulary("coco-object")) == 80
    assert set(resolve_vocabulary("stuff")) == set(STUFF)
    assert resolve_vocabulary(" cat , sofa,cat,,lamp ") == ["cat", "sofa", "lamp"]
    f = tmp_path / "names.txt"
    f.write_text("# my classes\ncat\n\n  potted   plant  # remapped by hand\nsofa\n")
    assert resolve_vocabulary(str(f)) == ["cat", "potted plant", "sofa"]


def test_console_script_and_python_m(tmp_path):
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["ovdiff"] == "ovdiff_core.cli:main"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "ovdiff_core", "build", "cat,lamp", "--backend", "color",
         "--cache", str(tmp_path), "--quiet"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "2 classes: 2 built, 0 from cache" in proc.stdout


def test_colour_model_support_sets_show_every_background(tmp_path):
    """The precondition of the known 100 %: every VOC class has background prototypes of
    every background colour that scenes use (a class whose support images never show a
    colour cannot call it background)."""
    model = make_model("color", "cpu", VOC_NAMES, str(tmp_path))
    backgrounds = np.array(color_world(VOC_NAMES).backgrounds, dtype=float)
    for cat in model.build(VOC_NAMES):
        seen = set()
        for image, bg in zip(cat.support.images, cat.support.background, strict=True):
            mean = image[bg].mean(axis=0)
            seen.add(int(np.argmin(np.linalg.norm(backgrounds - mean, axis=1))))
        assert seen == {0, 1, 2}, cat.name


def test_missing_real_models_are_one_error_not_a_traceback(tmp_path, monkeypatch, capsys):
    for var in ("SD", "TAESD", "CLIP", "DINOV2", "DINO"):
        monkeypatch.setenv(f"OVDIFF_{var}_MODEL", str(tmp_path / "no-such-model"))
    rc, _ = run("build", "cat", "--backend", "real", "--cache", str(tmp_path / "c"))
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("ovdiff build: error:") and "no-such-model" in err
    assert "Traceback" not in err


def test_ablation_no_background_never_predicts_background(voc, cache, tmp_path):
    root, _ = voc
    rc, _ = run("eval", "voc", "--root", str(root), "--backend", "color", "--cache", cache,
                "--out", str(tmp_path), "--no-background")  # fmt: skip
    assert rc == 0
    data = json.loads((tmp_path / "voc21.json").read_text())
    assert data["settings"]["no_background"] is True
    matrix = np.array(data["confusion_matrix"])
    assert matrix[:, 0].sum() == 0  # no pixel predicted as background
    assert matrix[0].sum() > 0 and data["per_class"]["background"]["IoU"] == 0.0
    assert data["mIoU"] < 100.0


def test_ablation_no_prefilter_keeps_every_class(voc, cache, tmp_path):
    root, written = voc
    image = root / "VOCdevkit" / "VOC2012" / "JPEGImages" / f"{written[0].image_id}.jpg"
    for flags, kept in (([], "some"), (["--no-prefilter"], "all")):
        out = tmp_path / kept
        rc, _ = run("segment", str(image), "--vocab", "voc", "--out", str(out),
                    "--backend", "color", "--cache", cache, *flags)  # fmt: skip
        assert rc == 0
        record = json.loads((out / f"{written[0].image_id}.json").read_text())
        if kept == "all":
            assert record["kept"] == VOC_NAMES
        else:
            assert len(record["kept"]) < len(VOC_NAMES)


def test_ablation_extractor_subset_and_class_mean_banks(voc, tmp_path, capsys):
    root, _ = voc
    cache = str(tmp_path / "cache")
    rc, _ = run("eval", "voc", "--root", str(root), "--backend", "color", "--cache", cache,
                "--out", str(tmp_path / "r"), "--extractors", "color")  # fmt: skip
    assert rc == 0
    assert json.loads((tmp_path / "r" / "voc21.json").read_text())["mIoU"] == 100.0
    # one extractor: a support set and one bank per class
    assert len(list(Path(cache).rglob("*.safetensors"))) == 20 * 2
    rc, out = run("build", "voc", "--backend", "color", "--cache", cache,
                  "--extractors", "color", "--class-mean-only")  # fmt: skip
    assert rc == 0
    assert "20 built, 0 from cache" in out  # new banks under their own keys
    assert len(list(Path(cache).rglob("*.safetensors"))) == 20 * 3
    rc, _ = run("build", "cat", "--backend", "color", "--extractors", "dino,color")
    assert rc == 2
    assert "['color', 'color2']" in capsys.readouterr().err


def test_progress_bars_overall_and_per_class_on_stderr(tmp_path, capsys):
    out = io.StringIO()
    rc = main(["build", "cat,sofa", "--backend", "color", "--cache", str(tmp_path)], stdout=out)
    assert rc == 0
    err = capsys.readouterr().err
    assert "classes: 100%" in err and "2/2" in err  # the overall bar
    assert "  cat: 100%" in err and "16/16" in err and "bank color2 ready" in err
    assert "|" not in out.getvalue().splitlines()[-1]  # stdout ends with the totals line
