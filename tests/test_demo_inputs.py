"""Validation of what visitors type, upload and click (demo/inputs.py); no Gradio needed."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from demo.inputs import (
    MAX_CATEGORIES,
    MAX_DECODE_PIXELS,
    MAX_SIDE,
    array_to_rgb,
    bounded_number,
    click_point,
    load_image,
    load_upload,
    mask_from_editor,
    parse_category_names,
    split_names_leniently,
)

# --------------------------------------------------------------------------- names


def test_parse_names_splits_cleans_and_keeps_order() -> None:
    text = " cat,  potted   plant ;sofa\nlamp, "
    assert parse_category_names(text) == ["cat", "potted plant", "sofa", "lamp"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "No categories"),
        ("   ,  ", "No categories"),
        ("cat,,dog", "Category 2 is empty"),
        ("cat, dog, Cat", "'Cat' is listed twice"),
        ("cat, background", "reserved"),
        ("cat, " + "x" * 101, "at most 100"),
        ("cat, d\x00og", "control characters"),
    ],
)
def test_parse_names_rejects_bad_input_with_a_fix(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_category_names(text)


def test_parse_names_limits_the_count() -> None:
    names = [f"thing {i}" for i in range(MAX_CATEGORIES)]
    assert len(parse_category_names(", ".join(names))) == MAX_CATEGORIES
    with pytest.raises(ValueError, match=f"at most {MAX_CATEGORIES}"):
        parse_category_names(", ".join([*names, "one more"]))


def test_split_names_leniently_skips_invalid_and_duplicates() -> None:
    assert split_names_leniently("cat,, Cat, sky, background, " + "y" * 200) == ["cat", "sky"]
    assert split_names_leniently(None) == []


# --------------------------------------------------------------------------- images


def _save(tmp_path: Path, im: Image.Image, name: str, **kw: object) -> str:
    path = tmp_path / name
    im.save(path, **kw)
    return str(path)


def test_load_rgb_png_unchanged(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    out = load_image(_save(tmp_path, Image.fromarray(arr), "a.png"))
    assert out.image.dtype == np.uint8 and out.image.shape == (40, 60, 3)
    np.testing.assert_array_equal(out.image, arr)
    assert out.notes == [] and out.original_size == (40, 60)
    assert out.image.flags.writeable


def test_load_grayscale_becomes_rgb_with_a_note(tmp_path: Path) -> None:
    arr = np.tile(np.arange(50, dtype=np.uint8)[None] * 5, (30, 1))
    out = load_image(_save(tmp_path, Image.fromarray(arr, "L"), "g.png"))
    assert out.image.shape == (30, 50, 3)
    for c in range(3):
        np.testing.assert_array_equal(out.image[..., c], arr)
    assert any("Grayscale" in n for n in out.notes)


def test_load_rgba_composites_on_white(tmp_path: Path) -> None:
    arr = np.zeros((20, 20, 4), dtype=np.uint8)
    arr[..., 0] = 200  # red
    arr[:, :10, 3] = 255  # left half opaque, right half fully transparent
    out = load_image(_save(tmp_path, Image.fromarray(arr, "RGBA"), "t.png"))
    np.testing.assert_array_equal(out.image[0, 0], [200, 0, 0])
    np.testing.assert_array_equal(out.image[0, 15], [255, 255, 255])
    assert any("Transparent" in n for n in out.notes)


def test_load_palette_image(tmp_path: Path) -> None:
    im = Image.fromarray(np.full((16, 16, 3), (10, 200, 30), dtype=np.uint8)).convert(
        "P", palette=Image.Palette.ADAPTIVE
    )
    out = load_image(_save(tmp_path, im, "p.png"))
    np.testing.assert_array_equal(out.image[5, 5], [10, 200, 30])
    assert any("Palette" in n for n in out.notes)


def test_load_16_bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    arr = np.zeros((12, 12), dtype=np.uint16)
    arr[:, :4] = 65535
    arr[:, 4:8] = 257 * 100
    out = load_image(_save(tmp_path, Image.fromarray(arr), "d.png"))
    assert out.image.shape == (12, 12, 3)
    assert out.image[0, 0, 0] == 255 and out.image[0, 5, 1] == 100 and out.image[0, 10, 2] == 0
    assert any("16-bit" in n for n in out.notes)


def test_load_huge_image_is_downscaled_with_a_note(tmp_path: Path) -> None:
    arr = np.zeros((1500, 3000, 3), dtype=np.uint8)
    arr[:, 1500:] = 255
    for name in ("big.png", "big.jpg"):
        out = load_image(_save(tmp_path, Image.fromarray(arr), name))
        assert out.image.shape == (512, MAX_SIDE, 3), name
        assert out.original_size == (1500, 3000)
        assert any("downscaled from 3000x1500 to 1024x512" in n for n in out.notes), out.notes
        assert out.image[:, :500].mean() < 10 and out.image[:, 524:].mean() > 245


def test_load_exif_rotated_jpeg_is_upright(tmp_path: Path) -> None:
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    path = tmp_path / "r.jpg"
    im.save(path, exif=exif.tobytes())
    out = load_image(str(path))
    assert out.image.shape == (40, 20, 3)
    assert out.original_size == (40, 20)
    assert any("EXIF" in n for n in out.notes)
    assert not any("downscaled" in n for n in out.notes)


def test_load_animated_gif_uses_first_frame(tmp_path: Path) -> None:
    frames = [Image.fromarray(np.full((16, 16, 3), v, dtype=np.uint8)) for v in (0, 255)]
    path = tmp_path / "a.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    out = load_image(str(path))
    assert out.image.max() < 5
    assert any("2 frames" in n for n in out.notes)


def test_load_rejects_non_images_and_corrupt_files(tmp_path: Path) -> None:
    text = tmp_path / "notes.png"
    text.write_text("this is not an image")
    with pytest.raises(ValueError, match="not an image this app can read"):
        load_image(str(text))
    buf = io.BytesIO()
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8) + 90).save(buf, "JPEG")
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_image(str(truncated))
    with pytest.raises(ValueError, match="could not be found"):
        load_image(str(tmp_path / "missing.png"))
    with pytest.raises(ValueError, match="No image"):
        load_image(None)
    with pytest.raises(ValueError, match="Cannot read an image from a dict"):
        load_image({"path": "x"})


def test_load_rejects_tiny_images(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="only 4x3 pixels"):
        load_image(_save(tmp_path, Image.fromarray(np.zeros((3, 4, 3), np.uint8)), "s.png"))


def test_array_to_rgb_conversions() -> None:
    notes: list[str] = []
    f = np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4)
    out = array_to_rgb(f, notes)
    assert out.shape == (4, 4, 3) and out[0, 0, 0] == 0 and out[3, 3, 2] == 255
    assert out.dtype == np.uint8
    assert array_to_rgb(np.ones((4, 4), bool))[0, 0, 0] == 255
    wide = array_to_rgb(np.array([[-5.0, 5.0]]))
    assert wide[0, 0, 0] == 0 and wide[0, 1, 0] == 255
    with pytest.raises(ValueError, match="shape"):
        array_to_rgb(np.zeros((4, 4, 2)))
    with pytest.raises(ValueError, match="no finite"):
        array_to_rgb(np.full((4, 4), np.nan))


# --------------------------------------------------------------------------- masks, clicks


def test_mask_from_editor_reads_painted_alpha() -> None:
    layer = np.zeros((10, 20, 4), dtype=np.uint8)
    layer[2:5, 3:9, 3] = 255
    mask = mask_from_editor({"background": None, "layers": [layer]}, (10, 20))
    assert mask is not None and mask.dtype == bool and mask.sum() == 18
    assert mask[3, 4] and not mask[0, 0]
    half = mask_from_editor({"layers": [layer]}, (5, 10))
    assert half is not None and half.shape == (5, 10) and half.any()
    assert mask_from_editor({"layers": [np.zeros((10, 20, 4), np.uint8)]}, (10, 20)) is None
    assert mask_from_editor(None, (10, 20)) is None


def test_click_point_validation() -> None:
    assert click_point([3, 7], (10, 20)) == (3, 7)
    assert click_point((3.4, 6.6), (10, 20)) == (3, 7)
    with pytest.raises(ValueError, match="segment an image first"):
        click_point([1, 1], None)
    with pytest.raises(ValueError, match="outside the 20x10 image"):
        click_point([20, 3], (10, 20))
    with pytest.raises(ValueError, match="outside"):
        click_point([-1, 3], (10, 20))
    for bad in (None, "xy", [1], [1, 2, 3], ["a", "b"]):
        with pytest.raises(ValueError, match="Click on the segmented image"):
            click_point(bad, (10, 20))  # type: ignore[arg-type]

    for bad in ([float("nan"), 1], [1, float("inf")], [float("-inf"), 1], [1e309, 1]):
        with pytest.raises(ValueError, match="Click on the segmented image"):
            click_point(bad, (10, 20))
    with pytest.raises(ValueError, match="outside"):
        click_point([1e300, 1], (10, 20))


def test_bounded_number_refuses_non_finite_and_out_of_range() -> None:
    assert bounded_number(4, "Size", 2, 64) == 4
    assert bounded_number(4.6, "Size", 2, 64) == 5
    assert bounded_number("8", "Size", 2, 64) == 8
    for bad in (float("nan"), float("inf"), float("-inf"), "nan", "abc", None, 1e309, 65, 1):
        with pytest.raises(ValueError, match=r"Size must be 2\.\.64, got .+; set a whole number"):
            bounded_number(bad, "Size", 2, 64)


# --------------------------------------------------------------------------- bounded memory

_CHILD = """
import json, resource, sys
from demo.inputs import load_image

def status_kib(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])

limit = status_kib("VmSize") * 1024 + int(sys.argv[2])  # address space the decode may add
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
base = status_kib("VmRSS")
with open("/proc/self/clear_refs", "w") as f:  # peak RSS mark := current RSS
    f.write("5")
try:
    out = load_image(sys.argv[1])
    result = {"shape": list(out.image.shape), "notes": out.notes}
except ValueError as err:
    result = {"error": str(err)}
except MemoryError:
    result = {"error": "MemoryError"}
result["peak_mib"] = (status_kib("VmHWM") - base) / 1024
print(json.dumps(result))
"""
ROOT = Path(__file__).resolve().parent.parent


def _load_in_child(path: Path, limit_bytes: int = 2**30) -> dict:
    """load_image(path) in a subprocess allowed ``limit_bytes`` (1 GiB) more address space.

    Returns the result's shape and notes, or its error, and ``peak_mib``: the peak
    resident memory the call added (``VmHWM`` after it minus ``VmRSS`` before it; the
    subprocess's ``ru_maxrss`` would include the memory of the pytest process that
    forked it).
    """
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path), str(limit_bytes)],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_decompression_bomb_is_refused_from_its_header(tmp_path: Path) -> None:
    # 13000x13000 RGBA of zeros: under 1 MB on disk, 169 Mpx (676 MB decoded)
    path = tmp_path / "bomb.png"
    Image.new("RGBA", (13000, 13000)).save(path, compress_level=9)
    assert path.stat().st_size < 2**20
    result = _load_in_child(path)
    assert "13000x13000 pixels (169 megapixels)" in result.get("error", ""), result
    assert f"at most {MAX_DECODE_PIXELS / 1e6:.0f} megapixels" in result["error"]
    assert result["peak_mib"] < 100  # refused before decoding anything


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["rgba", "16bit"])
def test_large_image_under_the_budget_decodes_in_bounded_memory(tmp_path: Path, kind: str) -> None:
    path = tmp_path / f"{kind}.png"
    if kind == "rgba":  # 30 Mpx half-transparent: a float64 copy alone would be 960 MB
        Image.new("RGBA", (6000, 5000), (10, 200, 30, 128)).save(path, compress_level=1)
        expected = [853, 1024, 3]
    else:  # 47.6 Mpx 16-bit grayscale, just under the budget
        ramp = np.linspace(0, 65535, 6900, dtype=np.float32).astype(np.uint16)
        Image.fromarray(np.broadcast_to(ramp, (6900, 6900)).copy()).save(path, compress_level=1)
        expected = [1024, 1024, 3]
    result = _load_in_child(path)
    assert result.get("shape") == expected, result
    assert any("downscaled" in n for n in result["notes"])
    # measured: about 250 MiB (rgba) and 340 MiB (16bit); the old decoder needed 3.4 GiB
    # and 1.4 GiB
    assert result["peak_mib"] < 768, result


def test_array_to_rgb_is_bounded() -> None:
    # a view of one pixel, shaped like a 100 Mpx editor array: refused before converting
    huge = np.broadcast_to(np.zeros(3, np.uint8), (10_000, 10_000, 3))
    with pytest.raises(ValueError, match="megapixels"):
        array_to_rgb(huge)
    with pytest.raises(ValueError, match="megapixels"):
        load_image(huge)
    # other depths convert by row chunks: no full-size float64 (or float32) copy
    rng = np.random.default_rng(0)
    data = rng.random((2000, 1500, 3), dtype=np.float32) * 3.0
    data[0, 0, 0] = np.nan
    tracemalloc.start()
    try:
        out = array_to_rgb(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out.shape == data.shape and out.dtype == np.uint8
    assert out.max() == 255 and out[0, 0, 0] == 0
    assert peak < 2.5 * out.nbytes, peak  # the uint8 result plus small chunks


def test_load_upload_decodes_each_file_once(tmp_path: Path, decoded_uploads: list[str]) -> None:
    calls = decoded_uploads
    path = _save(tmp_path, Image.new("RGB", (40, 30), (1, 2, 3)), "a.png")
    first = load_upload(path)
    second = load_upload(path)
    assert len(calls) == 1 and second.image is first.image and second.notes == first.notes
    second.notes.append("x")  # each caller gets its own notes
    assert load_upload(path).notes == first.notes
    assert load_upload(path, max_side=16).image.shape == (12, 16, 3) and len(calls) == 2
    os.utime(path, ns=(0, 0))  # another file at the same path
    load_upload(path)
    assert len(calls) == 3
    with pytest.raises(ValueError, match="could not be found"):
        load_upload(str(tmp_path / "gone.png"))
