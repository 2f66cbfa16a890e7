"""`--mask-rule` and `--pamr` on the `ovdiff` command (colour backend, synthetic VOC)."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ovdiff_core.cli import main
from ovdiff_core.evaluation.datasets import class_names
from ovdiff_core.evaluation.synthetic import color_world, write_synthetic_voc

VOC_NAMES = class_names("voc")


def run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    rc = main([*argv, "--quiet"], stdout=out)
    return rc, out.getvalue()


def test_mask_rule_builds_its_own_banks(tmp_path: Path) -> None:
    cache = str(tmp_path / "cache")
    common = ["--backend", "color", "--cache", cache, "--extractors", "color"]
    rc, out = run("build", "cat", *common)
    assert rc == 0 and "1 built, 0 from cache" in out
    rc, out = run("build", "cat", *common, "--mask-rule", "any")
    assert rc == 0 and "1 built, 0 from cache" in out, "another rule: another bank"
    rc, out = run("build", "cat", *common, "--mask-rule", "any")
    assert rc == 0 and "0 built, 1 from cache" in out
    rc, out = run("build", "cat", *common, "--mask-rule", "majority")
    assert rc == 0 and "0 built, 1 from cache" in out, "majority is the default"
    files = list(Path(cache).rglob("*.safetensors"))
    assert len(files) == 3  # one support set, two banks
    with pytest.raises(SystemExit):
        main(["build", "cat", *common, "--mask-rule", "half"])


def test_eval_and_segment_with_pamr(tmp_path: Path) -> None:
    root = tmp_path / "voc"
    written = write_synthetic_voc(root, color_world(VOC_NAMES), VOC_NAMES, n_images=3, seed=5)
    cache = str(tmp_path / "cache")
    common = ["--backend", "color", "--cache", cache, "--extractors", "color"]
    rc, _ = run("eval", "voc", "--root", str(root), *common, "--out", str(tmp_path / "r"),
                  "--pamr", "--mask-rule", "eroded")  # fmt: skip
    assert rc == 0
    data = json.loads((tmp_path / "r" / "voc21.json").read_text())
    assert data["settings"]["pamr"] is True and data["settings"]["mask_rule"] == "eroded"
    assert data["mIoU"] == 100.0, "PAMR keeps edges that follow the colours"
    images = root / "VOCdevkit" / "VOC2012" / "JPEGImages"
    rc, _ = run("segment", str(images), "--vocab", "voc", "--out", str(tmp_path / "seg"),
                   *common, "--pamr", "--mask-rule", "eroded")  # fmt: skip
    assert rc == 0
    for w in written:
        with Image.open(tmp_path / "seg" / f"{w.image_id}.png") as im:
            labels = np.asarray(im)
        off_border = w.label != 255
        np.testing.assert_array_equal(labels[off_border], w.painted[off_border])
