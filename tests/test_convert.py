"""One-time converters: COCO RLE and polygons, Pascal Context .mat files, COCO-Object merging,
on synthetic downloads written in the real formats with known label maps."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from ovdiff_core.evaluation.convert import (
    context59_lookup,
    convert_coco_object,
    convert_context,
    decode_rle,
    fill_polygon,
    read_context_labels,
)
from ovdiff_core.evaluation.datasets import class_names
from ovdiff_core.evaluation.synthetic import (
    color_world,
    encode_rle,
    write_synthetic_coco,
    write_synthetic_context,
)

CONTEXT = class_names("context59")
COCO = class_names("coco-object")
# mmseg's Pascal Context converter: these 459-ids, sorted, become labels 0..59
MMSEG_IDS = sorted([0, 2, 259, 260, 415, 324, 9, 258, 144, 18, 19, 22, 23, 397, 25, 284, 158,
                    159, 416, 33, 162, 420, 454, 295, 296, 427, 44, 45, 46, 308, 59, 440, 445,
                    31, 232, 65, 354, 424, 68, 326, 72, 458, 34, 207, 80, 355, 85, 347, 220,
                    349, 360, 98, 187, 104, 105, 366, 189, 368, 113, 115])  # fmt: skip


def test_uncompressed_rle_is_column_major_starting_with_zeros():
    mask = decode_rle({"size": [2, 4], "counts": [3, 2, 1, 2]})
    # column-major pixels: 0 0 0 1 1 0 1 1 -> columns (0,0) (0,1) (1,0) (1,1)
    np.testing.assert_array_equal(mask, [[0, 0, 1, 1], [0, 1, 0, 1]])


def test_compressed_rle_strings_worked_by_hand():
    # 100 = 3 * 32 + 4: the group 4 with the "more" bit (48 + 4 + 32 = 'T'), then '3'
    assert not decode_rle({"size": [10, 10], "counts": "T3"}).any()
    assert decode_rle({"size": [10, 10], "counts": "0T3"}).all()
    # runs 5, 10, 2, 3: the fourth is stored as 3 - 10 = -7, one group 25 = 'I' (sign bit set)
    mask = decode_rle({"size": [4, 5], "counts": "5:2I"})
    flat = mask.T.ravel()
    np.testing.assert_array_equal(flat, [0] * 5 + [1] * 10 + [0] * 2 + [1] * 3)


def test_rle_round_trips_random_masks_in_both_forms():
    rng = np.random.default_rng(0)
    for _ in range(20):
        h, w = rng.integers(1, 40, size=2)
        mask = rng.random((h, w)) < rng.random()
        for compressed in (True, False):
            np.testing.assert_array_equal(decode_rle(encode_rle(mask, compressed)), mask)


def test_bad_rle_is_refused():
    with pytest.raises(ValueError, match="add up"):
        decode_rle({"size": [3, 3], "counts": [4, 4]})
    with pytest.raises(ValueError, match="size"):
        decode_rle({"counts": "T3"})


def test_polygons_fill_pixel_centres():
    box = fill_polygon([2, 3, 7, 3, 7, 9, 2, 9], (12, 12))
    expected = np.zeros((12, 12), bool)
    expected[3:9, 2:7] = True  # x 2..7 covers columns 2..6, y 3..9 rows 3..8
    np.testing.assert_array_equal(box, expected)
    tri = fill_polygon([0, 0, 10, 0, 0, 10], (12, 12))
    i, j = np.mgrid[:12, :12]
    np.testing.assert_array_equal(tri, (i + 0.5) + (j + 0.5) < 10)  # centre below x + y = 10
    with pytest.raises(ValueError, match="3\\+"):
        fill_polygon([0, 0, 1, 1], (4, 4))


def test_context_lookup_equals_mmsegs_mapping(tmp_path):
    write_synthetic_context(tmp_path, color_world(CONTEXT), CONTEXT[:3], n_images=1)
    labels = read_context_labels(tmp_path / "context" / "labels.txt")
    assert len(labels) == 459
    lut = context59_lookup(labels)
    for k, i in enumerate(MMSEG_IDS):
        assert lut[i] == k
    others = np.setdiff1d(np.arange(lut.size), MMSEG_IDS)
    assert not lut[others].any()
    del labels[427]  # tvmonitor
    with pytest.raises(ValueError, match="tvmonitor"):
        context59_lookup(labels)


@pytest.fixture()
def context(tmp_path):
    written = write_synthetic_context(
        tmp_path, color_world(CONTEXT), CONTEXT, n_images=5, max_objects=3, seed=3
    )
    return tmp_path, written


def test_convert_context_writes_the_known_label_maps_and_lists(context):
    root, written = context
    voc = root / "VOCdevkit" / "VOC2010"
    result = convert_context(root / "context", root / "VOCdevkit")
    assert result.n_images == 6 and result.skipped == []
    val = (voc / "ImageSets" / "SegmentationContext" / "val.txt").read_text().split()
    assert val == [w.image_id for w in written if w.split == "val"]
    train = (voc / "ImageSets" / "SegmentationContext" / "train.txt").read_text().split()
    assert train == [w.image_id for w in written if w.split == "train"]
    for w in written:
        with Image.open(voc / "SegmentationClassContext" / f"{w.image_id}.png") as im:
            assert im.mode == "P"
            np.testing.assert_array_equal(np.asarray(im), w.label)
    assert any(len(np.unique(w.label)) >= 3 for w in written)
    assert not list((voc / "SegmentationClassContext").glob(".*"))  # no temp files left


def test_convert_context_skips_missing_mats_and_explains_missing_inputs(context, tmp_path):
    root, written = context
    (root / "context" / "trainval" / f"{written[1].image_id}.mat").unlink()
    result = convert_context(root / "context", root / "VOCdevkit" / "VOC2010")
    assert result.skipped == [written[1].image_id] and result.n_images == 5
    listed = result.lists["val"].read_text().split()
    assert written[1].image_id not in listed and written[0].image_id in listed
    with pytest.raises(ValueError, match="trainval"):
        convert_context(tmp_path / "nowhere", root / "VOCdevkit")
    with pytest.raises(ValueError, match="VOC 2010"):
        convert_context(root / "context", tmp_path / "nowhere")
    (root / "context" / "labels.txt").unlink()
    with pytest.raises(ValueError, match=r"labels\.txt"):
        convert_context(root / "context", root / "VOCdevkit")


@pytest.fixture()
def coco(tmp_path):
    written = write_synthetic_coco(
        tmp_path / "coco", color_world(COCO), COCO, n_images=6, seed=4, overlap=True, empty=1
    )
    return tmp_path / "coco", written


def _label(root, stem):
    with Image.open(root / "annotations" / "object_val2017" / f"{stem}.png") as im:
        assert im.mode == "P"
        return np.asarray(im)


def test_convert_coco_merges_polygons_and_rle_into_the_known_label_maps(coco):
    root, written = coco
    data = json.loads((root / "annotations" / "instances_val2017.json").read_text())
    kinds = {
        type(a["segmentation"]).__name__
        + (str(type(a["segmentation"]["counts"]).__name__) if isinstance(a["segmentation"], dict)
           else str(len(a["segmentation"])))
        for a in data["annotations"]
    }  # fmt: skip
    assert kinds == {"list1", "list2", "dictstr", "dictlist"}  # every encoding is exercised
    assert [c["id"] for c in data["categories"]] != sorted(c["id"] for c in data["categories"])
    result = convert_coco_object(root)
    assert result.n_images == 7
    stems = (root / "annotations" / "object_val2017.txt").read_text().split()
    assert stems == [w.image_id for w in written]
    for w in written:
        np.testing.assert_array_equal(_label(root, w.image_id), w.label)
    # the overlapping pair: the inner (smaller) object is listed first yet wins
    assert len(np.unique(written[0].label)) >= 3
    assert not written[-1].label.any()  # the image without annotations is all background


def test_coco_labels_follow_the_sorted_category_ids(coco):
    root, written = coco
    convert_coco_object(root)
    data = json.loads((root / "annotations" / "instances_val2017.json").read_text())
    names = {c["id"]: c["name"] for c in data["categories"]}
    by_stem = {f"{i['id']:012d}": i["id"] for i in data["images"]}
    for ann in data["annotations"]:
        stem = f"{ann['image_id']:012d}"
        x, y, bw, bh = ann["bbox"]
        centre = _label(root, stem)[y + bh // 2, x + bw // 2]
        if stem == written[0].image_id and ann is data["annotations"][1]:
            continue  # the outer box of the overlap: its centre belongs to the inner object
        assert COCO[centre - 1] == names[ann["category_id"]]
        assert stem in by_stem


def test_coco_crowds_can_be_ignored_and_dst_elsewhere_links_the_images(coco, tmp_path):
    root, written = coco
    out = tmp_path / "out"
    convert_coco_object(root, out, crowd="ignore")
    data = json.loads((root / "annotations" / "instances_val2017.json").read_text())
    crowds = [a for a in data["annotations"] if a["iscrowd"]]
    assert crowds
    for a in crowds:
        x, y, bw, bh = a["bbox"]
        assert (_label(out, f"{a['image_id']:012d}")[y : y + bh, x : x + bw] == 255).all()
    assert (out / "val2017").is_symlink() and (
        out / "val2017" / f"{written[0].image_id}.jpg"
    ).is_file()
    with pytest.raises(ValueError, match="crowd"):
        convert_coco_object(root, crowd="maybe")


def test_coco_converter_refuses_foreign_categories_and_missing_json(coco, tmp_path):
    root, _ = coco
    with pytest.raises(ValueError, match=r"instances_val2017\.json"):
        convert_coco_object(tmp_path / "nowhere")
    bad = tmp_path / "bad"
    shutil.copytree(root, bad)
    ann = bad / "annotations" / "instances_val2017.json"
    data = json.loads(ann.read_text())
    data["categories"][0]["name"] = "unicorn"
    ann.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="unicorn"):
        convert_coco_object(bad)
