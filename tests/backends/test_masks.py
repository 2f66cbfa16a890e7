"""The foreground/background rule over given segments (ovdiff_core.masks) and proposers."""

from __future__ import annotations

import numpy as np
import pytest

from ovdiff_core.backends.proposer import (
    FeatureClusterProposer,
    ThresholdProposer,
    connected_components,
    make_proposer,
)
from ovdiff_core.colorworld import ColorExtractor, paint_scene
from ovdiff_core.masks import MaskConfig, erode, select_masks, select_masks_batch


def _box(h: int, w: int, top: int, left: int, bh: int, bw: int) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[top : top + bh, left : left + bw] = True
    return m


def test_best_segment_is_foreground_worst_is_background() -> None:
    h = w = 64
    att = np.full((h, w), 0.1, dtype=np.float32)
    obj = _box(h, w, 10, 10, 20, 20)
    other = _box(h, w, 40, 40, 16, 16)
    att[obj] = 0.9
    att[other] = 0.4
    # The "no instance" complement (mean 0.1) is the worst candidate.
    sel = select_masks(att, [other, obj], MaskConfig(bg_erosion=0.0))
    assert sel.fg_index == 1
    assert sel.bg_index == 2  # the complement
    np.testing.assert_allclose(sel.scores, [0.4, 0.9, 0.1], rtol=1e-6)
    np.testing.assert_array_equal(sel.foreground, obj)
    np.testing.assert_array_equal(sel.background, ~obj & ~other)


def test_background_needs_low_attribution_and_is_eroded() -> None:
    h = w = 64
    att = np.zeros((h, w), dtype=np.float32)
    obj = _box(h, w, 16, 16, 32, 32)
    att[obj] = 1.0
    att[:, :4] = 0.3  # inside the worst segment but not confidently background
    cfg = MaskConfig(bg_erosion=2 / 64)  # radius 2 px at 64 px
    sel = select_masks(att, [obj], cfg)
    assert cfg.erosion_radius((h, w)) == 2
    assert not sel.background[:, :4].any()  # attribution >= 0.2 is never background
    expected = erode(~obj & (att < 0.2), 2)
    np.testing.assert_array_equal(sel.background, expected)
    # Erosion pulls the background 2 px away from the object and from the 0.3 strip ...
    assert not sel.background[14:50, 14:50].any()
    assert not sel.background[:, 4:6].any()
    assert sel.background[:, 6].any()
    # ... but not from the image border.
    assert sel.background[0, 10] and sel.background[63, 63]
    assert not (sel.foreground & sel.background).any()


def test_no_segments_uses_thresholds() -> None:
    att = np.linspace(0, 1, 100, dtype=np.float32).reshape(10, 10)
    sel = select_masks(att, np.zeros((0, 10, 10), bool), MaskConfig(bg_erosion=0.0))
    assert sel.fg_index == sel.bg_index == -1
    np.testing.assert_array_equal(sel.foreground, att > 0.5)
    np.testing.assert_array_equal(sel.background, att < 0.2)


def test_empty_and_overlapping_segments() -> None:
    h = w = 32
    att = np.zeros((h, w), dtype=np.float32)
    a = _box(h, w, 0, 0, 16, 32)
    att[a] = 0.8
    empty = np.zeros((h, w), bool)
    covering = np.ones((h, w), bool)  # complement is then empty
    sel = select_masks(att, [empty, a, covering], MaskConfig(bg_erosion=0.0))
    assert np.isnan(sel.scores[0]) and np.isnan(sel.scores[3])
    assert sel.fg_index == 1
    assert sel.bg_index == 2  # covering: mean 0.4 < 0.8
    np.testing.assert_array_equal(sel.background, ~a)


def test_erode_square() -> None:
    m = _box(9, 9, 2, 2, 5, 5)
    e = erode(m, 1)
    np.testing.assert_array_equal(e, _box(9, 9, 3, 3, 3, 3))
    np.testing.assert_array_equal(erode(m, 0), m)
    full = np.ones((5, 5), bool)
    np.testing.assert_array_equal(erode(full, 2), full)  # the border is not "outside"


def test_batch_and_validation() -> None:
    att = np.random.default_rng(0).random((3, 16, 16)).astype(np.float32)
    segs = [np.zeros((0, 16, 16), bool), [_box(16, 16, 0, 0, 8, 8)], np.zeros((0, 16, 16), bool)]
    fg, bg, picks = select_masks_batch(att, segs)
    assert fg.shape == bg.shape == (3, 16, 16) and fg.dtype == bool
    assert [p.fg_index for p in picks] == [-1, 0, -1] or picks[1].fg_index in (0, 1)
    with pytest.raises(ValueError, match="one candidate set per image"):
        select_masks_batch(att, segs[:2])
    with pytest.raises(ValueError, match="segments must be"):
        select_masks(att[0], [np.ones((8, 8), bool)])
    with pytest.raises(ValueError, match="bg_threshold"):
        MaskConfig(bg_threshold=0.6, fg_threshold=0.5)
    with pytest.raises(ValueError, match="proposer"):
        MaskConfig(proposer="cutler")


def test_connected_components_8_connected() -> None:
    m = np.zeros((6, 6), bool)
    m[0, 0] = m[1, 1] = True  # diagonal neighbours: one component
    m[4:6, 4:6] = True
    labels, n = connected_components(m)
    assert n == 2
    assert labels[0, 0] == labels[1, 1] != labels[5, 5]
    assert labels[3, 3] == 0


def test_feature_cluster_proposer_finds_the_objects() -> None:
    # Two same-coloured objects on one background: one cluster, two components.
    img, index = paint_scene(
        (64, 64),
        (40, 40, 40),
        [([(230, 120, 20)], (8, 8, 16, 24)), ([(230, 120, 20)], (40, 32, 16, 24))],
        noise=2.0,
    )
    proposer = FeatureClusterProposer(ColorExtractor(stride=4), n_clusters=2)
    (segments,) = proposer(img[None])
    assert segments.dtype == bool and segments.shape[1:] == (64, 64)
    ious = []
    for k in (1, 2):
        truth = index == k
        best = max((s & truth).sum() / (s | truth).sum() for s in segments)
        ious.append(best)
    assert min(ious) > 0.8
    # Feeding them to the rule with an attribution peaked on object 1 picks object 1.
    att = (index == 1).astype(np.float32)
    sel = select_masks(att, segments, MaskConfig(bg_erosion=0.0))
    truth = index == 1
    assert (sel.foreground & truth).sum() / (sel.foreground | truth).sum() > 0.8
    assert not (sel.background & truth).any()


def test_feature_cluster_proposer_drops_small_components_and_is_deterministic() -> None:
    img, _ = paint_scene((64, 64), (200, 200, 200), [([(20, 60, 220)], (30, 30, 4, 4))], noise=0)
    proposer = FeatureClusterProposer(ColorExtractor(stride=2), n_clusters=2, min_segment_area=0.01)
    (segments,) = proposer(img[None])
    assert len(segments) == 1  # the 16-pixel object (< 1 % of the image) is dropped
    assert segments[0].sum() >= 64 * 64 - 36 and not segments[0][31, 31]
    (again,) = proposer(img[None])
    np.testing.assert_array_equal(segments, again)
    big = FeatureClusterProposer(ColorExtractor(stride=2), n_clusters=2, min_segment_area=0.5)
    (only_large,) = big(img[None])
    assert len(only_large) == 1  # only the background survives


def test_threshold_proposer_and_factory() -> None:
    imgs = np.zeros((2, 16, 16, 3), np.uint8)
    segs = ThresholdProposer()(imgs)
    assert [s.shape for s in segs] == [(0, 16, 16), (0, 16, 16)]
    assert isinstance(make_proposer(MaskConfig(proposer="threshold"), None), ThresholdProposer)
    with pytest.raises(ValueError, match="needs a feature extractor"):
        make_proposer(MaskConfig(), None)
    p = make_proposer(MaskConfig(n_clusters=3), ColorExtractor(), input_size=32)
    assert isinstance(p, FeatureClusterProposer)
    assert p.spec()["n_clusters"] == 3 and p.spec()["input_size"] == 32
    with pytest.raises(ValueError, match="uint8"):
        ThresholdProposer()(imgs.astype(np.float32))
