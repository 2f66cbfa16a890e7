"""Validation of what visitors type, upload and click (demo/inputs.py); no Gradio needed."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from demo.inputs import (
    MAX_CATEGORIES,
    MAX_SIDE,
    array_to_rgb,
    click_point,
    load_image,
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
