"""The VOC 2012 reader and the class-name files, on a synthetic VOC folder in the real format."""

import numpy as np
import pytest
from PIL import Image

from ovdiff_core.evaluation.datasets import (
    VOCSegmentation,
    class_names,
    names_version,
    voc_palette,
)
from ovdiff_core.evaluation.synthetic import color_world, write_synthetic_voc
from ovdiff_core.stuff import COCO_OBJECT, PASCAL_CONTEXT, VOC

REMAPS = {"diningtable": "table", "pottedplant": "potted plant", "tvmonitor": "monitor"}


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    root = tmp_path_factory.mktemp("voc")
    names = class_names("voc")
    written = write_synthetic_voc(root, color_world(names), names, n_images=5, seed=1)
    return root, written


def test_name_files_are_the_literature_lists_with_the_remaps():
    assert class_names("voc") == [REMAPS.get(n, n) for n in VOC]
    assert class_names("context59") == [REMAPS.get(n, n) for n in PASCAL_CONTEXT]
    assert class_names("coco-object") == list(COCO_OBJECT)
    assert len(class_names("voc")) == 20 and "monitor" in class_names("voc")
    assert len(class_names("context59")) == 59 and len(class_names("coco-object")) == 80
    assert names_version("voc") == 1
    with pytest.raises(ValueError, match="unknown class-name set"):
        class_names("ade150")


def test_voc_palette_matches_the_published_colours():
    pal = voc_palette()
    assert pal[0].tolist() == [0, 0, 0]
    assert pal[1].tolist() == [128, 0, 0]  # aeroplane
    assert pal[2].tolist() == [0, 128, 0]  # bicycle
    assert pal[15].tolist() == [192, 128, 128]  # person
    assert pal[20].tolist() == [0, 64, 128]  # tvmonitor
    assert pal[255].tolist() == [224, 224, 192]  # void borders


def test_synthetic_folder_is_in_the_real_format(voc):
    root, written = voc
    base = root / "VOCdevkit" / "VOC2012"
    ids = (base / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    assert ids == [w.image_id for w in written if w.split == "val"]
    with Image.open(base / "SegmentationClass" / f"{ids[0]}.png") as im:
        assert im.mode == "P"
        assert im.getpalette()[15 * 3 : 16 * 3] == [192, 128, 128]
        arr = np.asarray(im)
    assert 255 in arr and 0 in arr  # borders and background
    assert set(np.unique(arr)) <= set(range(21)) | {255}


@pytest.mark.parametrize("root_level", ["", "VOCdevkit", "VOCdevkit/VOC2012"])
def test_voc21_reads_the_val_list_images_and_annotations(voc, root_level):
    root, written = voc
    ds = VOCSegmentation(root / root_level)
    val = [w for w in written if w.split == "val"]
    assert len(ds) == len(val) == 5
    assert ds.class_names[0] == "background" and ds.class_names[1:] == class_names("voc")
    for sample, w in zip(ds, val, strict=True):
        assert sample.image_id == w.image_id
        assert sample.image.dtype == np.uint8 and sample.image.shape == (160, 224, 3)
        np.testing.assert_array_equal(sample.label, w.label)
        # the photo shows what was painted: each object in its class's world colour
        world = color_world(class_names("voc"))
        for k in set(np.unique(w.label)) - {0, 255}:
            colour = world.parts[ds.class_names[k]][0]
            mean = sample.image[w.label == k].mean(axis=0)
            assert np.abs(mean - colour).max() < 6


def test_voc20_ignores_background_and_shifts_the_classes(voc):
    root, written = voc
    ds = VOCSegmentation(root, background=False)
    assert ds.class_names == class_names("voc")
    for sample, w in zip(ds, written, strict=False):
        expected = w.label.astype(int) - 1
        expected[(w.label == 0) | (w.label == 255)] = 255
        np.testing.assert_array_equal(sample.label, expected)


def test_limit_and_split(voc):
    root, written = voc
    assert len(VOCSegmentation(root, limit=2)) == 2
    train = VOCSegmentation(root, split="train")
    assert train.ids == [w.image_id for w in written if w.split == "train"]
    with pytest.raises(ValueError, match="--split"):
        VOCSegmentation(root, split="test")
    with pytest.raises(ValueError, match="limit"):
        VOCSegmentation(root, limit=0)


def test_helpful_errors_for_wrong_folders_and_files(voc, tmp_path):
    with pytest.raises(ValueError, match="VOCdevkit"):
        VOCSegmentation(tmp_path)
    root, written = voc
    # an annotation saved as RGB colours instead of palette indices
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    png = copy / "VOCdevkit" / "VOC2012" / "SegmentationClass" / f"{written[0].image_id}.png"
    with Image.open(png) as im:
        im.convert("RGB").save(png)
    with pytest.raises(ValueError, match="palette"):
        VOCSegmentation(copy)[0]
