"""Stage 3 at evaluation-size vocabularies: labels equal an independent dense float64
computation of the scores, pruning skips channels but never changes a label, per-channel
maxima are taken in chunks without changing them, and a segmentation keeps no dense
per-class maps."""

from __future__ import annotations

import importlib
from collections.abc import Sequence

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ovdiff_core.config import SegmentConfig
from ovdiff_core.segment import (
    interp_matrix,
    pixel_centres,
    processed_size,
    segment,
    view_boxes,
)
from ovdiff_core.standins import CodedExtractor, FixedExtractor, coded_scene, random_categories
from ovdiff_core.types import Category

seg_module = importlib.import_module("ovdiff_core.segment")

CFG = SegmentConfig(short_side=40, window_sizes=(32, 24), window_stride=12, prefilter=False)


def reference_scores(
    image: np.ndarray, cats: Sequence[Category], extractors: Sequence, cfg: SegmentConfig
) -> np.ndarray:
    """(C + 1, H, W) float64 scores written out from the method's definition: per view and
    extractor, every class's best fg cosine and the best bg cosine of all classes (floored
    at 0), each map resampled with dense bilinear matrices, averaged over passes."""
    h, w = image.shape[:2]
    hp, wp = processed_size((h, w), cfg.short_side)
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0
    x = F.interpolate(x, size=(hp, wp), mode="bilinear", antialias=True).clamp(0, 1)
    ys, xs = pixel_centres(h, hp), pixel_centres(w, wp)
    acc = np.zeros((len(cats) + 1, h, w))
    count = np.zeros((h, w))
    for ex in extractors:
        for top, left, vh, vw in view_boxes((hp, wp), cfg):
            f = ex(x[:, :, top : top + vh, left : left + vw])[0].double()
            d, gh, gw = f.shape
            f = F.normalize(f.reshape(d, -1), dim=0)
            maps = []
            bg = np.full(gh * gw, -np.inf)
            for c in cats:
                bank = c.banks[ex.name]
                v = bank.vectors.double()
                maps.append((v[bank.foreground] @ f).amax(0).numpy())
                bg = np.maximum(bg, (v[~bank.foreground] @ f).amax(0).numpy())
            stack = np.maximum(np.stack([bg, *maps]), 0.0).reshape(-1, gh, gw)
            rows = np.flatnonzero((ys >= top) & (ys < top + vh))
            cols = np.flatnonzero((xs >= left) & (xs < left + vw))
            wy = interp_matrix(ys[rows], top, vh, gh)
            wx = interp_matrix(xs[cols], left, vw, gw)
            acc[:, rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] += wy @ stack @ wx.T
            count[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] += 1
    return acc / count


def world(kind: str, n_classes: int) -> tuple[np.ndarray, list[Category], list]:
    if kind == "coded":
        extractors: list = [
            CodedExtractor("a", 24, 4, 0, noise=0.3),
            CodedExtractor("b", 16, 8, 1, noise=0.3),
        ]
    else:
        extractors = [FixedExtractor("a", 24, 4, 0), FixedExtractor("b", 16, 8, 1)]
    cats = random_categories(extractors, n_classes, n_images=2, image_px=16, n_parts=3)
    for ex in extractors:
        ex.categories = cats
    return coded_scene((50, 66), n_classes, 10, seed=n_classes), cats, extractors


class BlockSpy:
    """Counts channel-pixels blended while labelling."""

    def __init__(self) -> None:
        self.blended = 0

    def wrap(self, block):  # type: ignore[no-untyped-def]
        def spy(this, channels, r0, r1, c0, c1, columns=None):  # type: ignore[no-untyped-def]
            k = this.n_channels if channels is None else len(channels)
            n = c1 - c0 if columns is None else len(columns)
            self.blended += k * (r1 - r0) * n
            return block(this, channels, r0, r1, c0, c1, columns)

        return spy


@pytest.mark.parametrize("kind", ["coded", "fixed"])
@pytest.mark.parametrize("n_classes", [20, 150])
def test_labels_and_scores_match_a_dense_reference(
    kind: str, n_classes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    image, cats, extractors = world(kind, n_classes)
    spy = BlockSpy()
    monkeypatch.setattr(seg_module, "TILE", 8)
    monkeypatch.setattr(seg_module, "BLOCK_ELEMENTS", 20_000)
    monkeypatch.setattr(seg_module, "BLOCK_OVERHEAD", 0)
    monkeypatch.setattr(seg_module._ScoreField, "block", spy.wrap(seg_module._ScoreField.block))
    seg = segment(image, cats, extractors, CFG)
    blended = spy.blended
    ref = reference_scores(image, cats, extractors, CFG)
    n_ch, h, w = ref.shape
    assert blended > 0
    if kind == "coded":  # channels far below the winner are pruned (on tiny tiles)
        assert blended < 0.75 * n_ch * h * w
    np.testing.assert_allclose(seg.scores, ref, rtol=0, atol=1e-5)
    assert np.array_equal(seg.labels, seg.scores.argmax(0))
    top2 = np.sort(ref, axis=0)[-2:]
    differ = seg.labels != ref.argmax(0)
    assert (top2[1] - top2[0])[differ].max(initial=0.0) <= 1e-5, "labels differ beyond a tie"
    if kind == "coded":
        assert len(np.unique(seg.labels)) >= 3


def test_lazy_scores_are_the_dense_scores(monkeypatch: pytest.MonkeyPatch) -> None:
    image, cats, extractors = world("coded", 60)
    monkeypatch.setattr(seg_module, "BLOCK_ELEMENTS", 5_000)  # dense() in many row bands
    seg = segment(image, cats, extractors, CFG)
    held = seg.nbytes  # counts the dense scores once they are materialised
    maps = np.stack([seg.score_map(k) for k in range(len(seg.class_names))])
    h, w = seg.size
    for x, y in ((0, 0), (w - 1, h - 1), (w // 2, h // 3), (7, 41)):
        assert np.array_equal(seg.scores_at(x, y), maps[:, y, x])
    assert seg.nbytes == held, "per-pixel and per-class queries stay lazy"
    assert np.array_equal(seg.scores, maps)
    assert seg.nbytes == held + maps.nbytes
    objects = seg.object_labels()
    assert np.array_equal(objects, seg.scores[1:].argmax(0) + 1)
    with pytest.raises(ValueError, match="not a label"):
        seg.score_map(len(seg.class_names))
    with pytest.raises(ValueError, match="outside"):
        seg.scores_at(w, 0)


def test_segmentation_keeps_no_dense_maps() -> None:
    extractors = [CodedExtractor("a", 32, 8, 0), CodedExtractor("b", 16, 16, 1)]
    cats = random_categories(extractors, 150, n_images=2, image_px=16, n_parts=3)
    for ex in extractors:
        ex.categories = cats
    image = coded_scene((480, 640), 150, 12)
    seg = segment(image, cats, extractors, SegmentConfig(prefilter=False))
    n_ch, (h, w) = len(seg.class_names), seg.size
    assert seg.labels.dtype == np.uint8
    records = sum(v.values.nbytes + v.winners.nbytes for v in seg.views)
    assert all(v.winners.dtype == torch.int16 for v in seg.views)
    sims = sum(m.nbytes for m in seg.whole_view_sims.values())
    assert seg.nbytes < image.nbytes + seg.labels.nbytes + records + sims + 1_000_000
    assert seg.nbytes < n_ch * h * w, "a quarter of the dense scores it used to keep"
    # similarity maps only of prototypes a trace can name: fewer than were scored
    for name, maps in seg.whole_view_sims.items():
        assert 0 < len(maps) < len(seg.scoring[name].channel) / 2


def direct_cells(feats: torch.Tensor, cats: Sequence[Category], name: str) -> tuple:
    """Per channel best cosine and winning scoring-set index, one channel at a time."""
    d, gh, gw = feats.shape
    f = F.normalize(feats.reshape(d, -1).double(), dim=0)
    rows: list[list[torch.Tensor]] = [[] for _ in range(len(cats) + 1)]
    for ci, c in enumerate(cats, start=1):
        bank = c.banks[name]
        rows[ci].append(bank.vectors[bank.foreground])
        rows[0].append(bank.vectors[~bank.foreground])
    values, winners, offset = [], [], 0
    for c in range(len(cats) + 1):
        protos = torch.cat(rows[c]).double()
        v, a = (protos @ f).max(0)
        values.append(v.clamp(min=0))
        winners.append(a + offset)
        offset += len(protos)
    return torch.stack(values).reshape(-1, gh, gw), torch.stack(winners).reshape(-1, gh, gw)


@pytest.mark.parametrize("limit", [10_000_000, 40 * 30, 7 * 30])
def test_chunked_channel_maxima(limit: int, monkeypatch: pytest.MonkeyPatch) -> None:
    ex = FixedExtractor("a", 16, 4, 3)
    cats = random_categories([ex], 12, n_images=2, image_px=16, n_parts=3)
    # one class with a different number of prototypes splits the equal-size runs
    cats[5] = random_categories([ex], 1, n_images=5, image_px=16, n_parts=6)[0]
    cats[5].name = "odd"
    monkeypatch.setattr(seg_module, "SIMS_ELEMENTS", limit)  # 30 cells per view below
    seg = segment(
        np.zeros((20, 24, 3), dtype=np.uint8),
        cats,
        [ex],
        SegmentConfig(short_side=20, windows=False, prefilter=False),
    )
    values, winners = direct_cells(ex(torch.zeros(1, 3, 20, 24))[0], cats, "a")
    view = seg.views[0]
    np.testing.assert_allclose(view.values.double().numpy(), values.numpy(), atol=1e-6)
    assert torch.equal(view.winners.long(), winners)


def test_torch_blending_equals_numpy_blending(monkeypatch: pytest.MonkeyPatch) -> None:
    """The path used on GPUs (torch ops on the records' device), run on the CPU."""
    image, cats, extractors = world("coded", 40)
    seg = segment(image, cats, extractors, CFG)
    monkeypatch.setattr(seg_module, "TILE", 8)
    monkeypatch.setattr(seg_module, "BLOCK_ELEMENTS", 20_000)
    monkeypatch.setattr(seg_module, "BLOCK_OVERHEAD", 0)
    args = (seg.views, seg.size, seg.processed_size)
    with_numpy = seg_module._ScoreField(*args, numpy=True)
    with_torch = seg_module._ScoreField(*args, numpy=False)
    channels = list(range(len(seg.class_names)))
    assert np.array_equal(with_torch.argmax(channels), with_numpy.argmax(channels))
    assert np.array_equal(with_numpy.argmax(channels), seg.labels)
    block = with_torch.block([0, 3, 7], 5, 31, 2, 60)
    assert isinstance(block, torch.Tensor)
    np.testing.assert_allclose(block.numpy(), with_numpy.block([0, 3, 7], 5, 31, 2, 60), atol=1e-6)


def test_similarity_maps_kept_or_recomputed_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whole-view cosines kept from the scoring products equal a second product."""
    image, cats, extractors = world("coded", 30)
    kept = segment(image, cats, extractors, CFG)
    monkeypatch.setattr(seg_module, "WHOLE_SIMS_BYTES", 0)  # recompute for the needed ones
    again = segment(image, cats, extractors, CFG)
    for name, maps in kept.whole_view_sims.items():
        other = again.whole_view_sims[name]
        assert torch.equal(maps.index, other.index) and len(maps) > 0
        np.testing.assert_allclose(maps.maps.float().numpy(), other.maps.float().numpy(), atol=2e-3)


def compact_and_exact(monkeypatch: pytest.MonkeyPatch, kind: str, n_classes: int) -> tuple:
    image, cats, extractors = world(kind, n_classes)
    exact = segment(image, cats, extractors, CFG)
    monkeypatch.setattr(seg_module, "COMPACT_ABOVE_BYTES", 0)
    compact = segment(image, cats, extractors, CFG)
    return exact, compact


@pytest.mark.parametrize("kind", ["coded", "fixed"])
def test_compact_records_hold_the_exact_ones(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """16-bit values within 9.6e-6 (the 1e-5 the scores are held to), the same winners
    and labels, 8-bit similarity maps within half a step of their range, half the bytes."""
    exact, compact = compact_and_exact(monkeypatch, kind, 150)
    assert not any(v.compact for v in exact.views)
    for e, c in zip(exact.views, compact.views, strict=True):
        assert c.compact and c.data.dtype == torch.int16 and c.picks.dtype == torch.uint8
        assert c.starts is not None and c.bg_picks is not None
        span = (e.values.amax((1, 2)) - e.values.amin((1, 2)).clamp(max=0)).double()
        err = (c.values.double() - e.values.double()).abs().amax((1, 2))
        assert bool((err <= span / 131070 + 1e-7).all()) and float(err.max()) <= 9.6e-6
        assert torch.equal(c.winners, e.winners)
        for ch in (0, 1, len(exact.class_names) - 1):
            assert torch.equal(c.channel_values(ch), c.values[ch])
            assert torch.equal(c.channel_winners(ch), e.winners[ch].long())
        assert c.nbytes <= 0.5 * e.nbytes + 8 * 4 * len(exact.class_names)
    assert np.array_equal(compact.labels, exact.labels), "labels come from the exact values"
    diff = np.abs(compact.scores - exact.scores)
    assert diff.max() <= 1e-5 and diff.max() > 0
    top2 = np.sort(compact.scores, axis=0)[-2:]
    differ = compact.labels != compact.scores.argmax(0)
    assert (top2[1] - top2[0])[differ].max(initial=0.0) <= 2e-5
    for name, maps in exact.whole_view_sims.items():
        small = compact.whole_view_sims[name]
        assert torch.equal(small.index, maps.index)
        assert small.maps.dtype == torch.uint8 and small.maps.shape == maps.maps.shape
        for q in maps.index.tolist()[:50]:
            full, got = maps[q], small[q]
            half_step = float(full.max() - full.min()) / 510
            assert float((got - full).abs().max()) <= half_step + 1e-3  # + float16 rounding
    assert compact.nbytes < exact.nbytes


def test_store_keeps_exact_values_that_span_too_much() -> None:
    """Values spanning more than COMPACT_MAX_SPAN (a negative score floor) stay float32."""
    values = torch.tensor([[[-0.9, 0.0], [0.5, 0.6]], [[0.1, 0.2], [0.3, 0.4]]])
    winners = torch.tensor([[[0, 1], [2, 0]], [[3, 3], [4, -1]]], dtype=torch.int16)
    kept = seg_module.ViewRecord.store("a", (0, 0, 2, 2), values, winners, [0, 3, 5], True)
    assert not kept.compact and torch.equal(kept.values, values)
    narrow = values.clamp(min=0)
    packed = seg_module.ViewRecord.store("a", (0, 0, 2, 2), narrow, winners, [0, 3, 5], True)
    assert packed.compact
    assert float((packed.values - narrow).abs().max()) <= 0.6 / 131070 + 1e-7
    assert float(packed.values[0, 0, 1]) == 0.0 and float(packed.values[1, 1, 1]) > 0
    assert torch.equal(packed.winners, winners)  # -1 (no winner) survives the uint8 offsets


def test_store_keeps_wide_winners_when_a_channel_has_over_255_prototypes() -> None:
    values = torch.rand(3, 4, 5)
    winners = torch.randint(0, 300, (3, 4, 5), dtype=torch.int16)
    winners[1] = torch.randint(300, 600, (4, 5), dtype=torch.int16)
    winners[2] = torch.randint(600, 610, (4, 5), dtype=torch.int16)
    offsets = [0, 300, 600, 610]  # channel 1 has 300 prototypes
    got = seg_module.ViewRecord.store("a", (0, 0, 4, 5), values, winners, offsets, True)
    assert got.compact and got.starts is None and got.picks.dtype == torch.int16
    assert torch.equal(got.winners, winners)
    offsets = [0, 300, 555, 610]  # every foreground channel within 255
    winners[1] = torch.randint(300, 555, (4, 5), dtype=torch.int16)
    winners[2] = torch.randint(555, 610, (4, 5), dtype=torch.int16)
    got = seg_module.ViewRecord.store("a", (0, 0, 4, 5), values, winners, offsets, True)
    assert got.picks.dtype == torch.uint8 and torch.equal(got.winners, winners)


def test_similarity_maps_stay_within_their_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """Float16 maps over SIMS_MAX_BYTES become 8-bit; over it at 8 bits too, only the
    maps of the prototypes winning the most tapped cells are kept, and a trace whose
    winner has none says so (None) and is otherwise unchanged."""
    from ovdiff_core.trace import trace

    image, cats, extractors = world("fixed", 40)  # random features: winners change a lot
    full = segment(image, cats, extractors, CFG)
    assert all(m.maps.dtype == torch.float16 for m in full.whole_view_sims.values())
    field = seg_module._ScoreField(full.views, full.size, full.processed_size)
    counts = seg_module._explaining_prototypes(field, full.views, full.labels)
    need16 = sum(int(m.maps.numel()) * 2 for m in full.whole_view_sims.values())
    assert sum(len(q) for q, _ in counts.values()) == sum(
        len(m) for m in full.whole_view_sims.values()
    )

    def close(a: torch.Tensor, b: torch.Tensor) -> bool:  # 8-bit codes of a float16 map
        return float((a - b).abs().max()) <= float(b.max() - b.min()) / 510 + 1e-3

    # float16 over the budget, 8-bit within it: every map kept, at 8 bits
    monkeypatch.setattr(seg_module, "SIMS_MAX_BYTES", need16 - 1)
    small = segment(image, cats, extractors, CFG)
    for name, maps in small.whole_view_sims.items():
        assert maps.maps.dtype == torch.uint8 and maps.omitted == 0
        assert torch.equal(maps.index, full.whole_view_sims[name].index)
        assert all(close(maps[q], full.whole_view_sims[name][q]) for q in maps.index.tolist())
    # over it at 8 bits: the most-used maps only
    budget = need16 // 6
    monkeypatch.setattr(seg_module, "SIMS_MAX_BYTES", budget)
    cut = segment(image, cats, extractors, CFG)
    kept_bytes = sum(int(m.maps.numel()) for m in cut.whole_view_sims.values())
    assert 0 < kept_bytes <= budget
    won = {
        (e, int(q)): int(n)
        for e, (qs, ns) in counts.items()
        for q, n in zip(qs.tolist(), ns.tolist(), strict=True)
    }
    kept = {(e, q) for e, m in cut.whole_view_sims.items() for q in m.index.tolist()}
    least_kept = min(won[k] for k in kept)
    most_dropped = max((n for k, n in won.items() if k not in kept), default=-1)
    assert most_dropped >= 0 and least_kept >= most_dropped, "kept maps win the most cells"
    for name, maps in cut.whole_view_sims.items():
        assert maps.omitted == len(counts[name][0]) - len(maps)
        assert all(close(maps[q], full.whole_view_sims[name][q]) for q in maps.index.tolist())
    assert np.array_equal(cut.labels, full.labels)
    missing = 0
    h, w = cut.size
    for y in range(0, h, 3):
        for x in range(0, w, 3):
            a, b = trace(cut, x, y), trace(full, x, y)
            assert a.winner == b.winner and a.score == b.score
            if a.similarity_map is None:
                missing += 1
                assert b.winner is not None and b.similarity_map is not None
            else:
                assert a.similarity_map.shape == b.similarity_map.shape
    assert missing > 0
