"""The mask rule: how support masks become feature-grid cells, and why the default is not
the paper's "any overlap" rule (sky part prototypes made of ground cells)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ovdiff_core.colorworld import ColorExtractor, paint_scene
from ovdiff_core.config import MASK_RULES, PrototypeConfig, SegmentConfig
from ovdiff_core.pipeline import OVDiff, extract_features
from ovdiff_core.prototypes import build_bank, region_coverage, region_to_grid
from ovdiff_core.types import PrototypeKind, SupportSet

# --------------------------------------------------------------------------- the rule


def one_image_mask() -> np.ndarray:
    """(1, 8, 8) mask over a 2x2 grid of 4x4 cells with coverage 16/16, 9/16, 8/16, 1/16."""
    m = np.zeros((1, 8, 8), dtype=bool)
    m[0, :4, :4] = True  # cell (0, 0): full
    m[0, :3, 4:7] = True  # cell (0, 1): 9 of 16
    m[0, 4:6, :4] = True  # cell (1, 0): 8 of 16, exactly half
    m[0, 7, 7] = True  # cell (1, 1): 1 of 16
    return m


def test_coverage_is_the_fraction_of_cell_pixels() -> None:
    cover = region_coverage(one_image_mask(), (2, 2))
    assert cover.shape == (1, 2, 2)
    np.testing.assert_array_equal(cover[0], [[1.0, 9 / 16], [8 / 16, 1 / 16]])
    # uneven spans (rows 0-2 and 3-6 of 7; columns 0-1 and 2-4 of 5)
    m = np.zeros((1, 7, 5), dtype=bool)
    m[0, 3:7, 2:5] = True
    m[0, 0, 0] = True
    np.testing.assert_allclose(region_coverage(m, (2, 2))[0], [[1 / 6, 0.0], [0.0, 1.0]])


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        ("any", [[True, True], [True, True]]),
        ("majority", [[True, True], [False, False]]),  # exactly half is not a majority
        ("eroded", [[True, False], [False, False]]),
    ],
)
def test_rules(rule: str, expected: list[list[bool]]) -> None:
    grid = region_to_grid(one_image_mask(), (2, 2), rule)
    assert grid.dtype == bool
    np.testing.assert_array_equal(grid[0], expected)


def test_small_regions_keep_their_best_cells() -> None:
    """An image whose region passes the rule nowhere keeps its best-covered cells; an
    empty mask stays empty; other images are untouched."""
    m = np.zeros((3, 8, 8), dtype=bool)
    m[0, 3:5, 3:5] = True  # a 2x2 blob over the centre: 1/16 of each of the 4 cells
    m[1, 0, 0:2] = True  # 2 px in cell (0, 0), 1 px in cell (0, 1)
    m[1, 0, 4] = True
    m[2, :4, :4] = True  # a full cell: the rule applies normally
    m[2, 7, 7] = True
    for rule in ("majority", "eroded"):
        grid = region_to_grid(m, (2, 2), rule)
        assert grid[0].all(), "four cells tie at 1/16"
        np.testing.assert_array_equal(grid[1], [[True, False], [False, False]])
        np.testing.assert_array_equal(grid[2], [[True, False], [False, False]])
        assert not region_to_grid(np.zeros((1, 8, 8), bool), (2, 2), rule).any()


def test_rule_is_validated() -> None:
    with pytest.raises(ValueError, match="mask_rule must be one of"):
        PrototypeConfig(mask_rule="half")
    with pytest.raises(ValueError, match="rule must be one of"):
        region_to_grid(one_image_mask(), (2, 2), "all")
    with pytest.raises(ValueError, match="smaller than the grid"):
        region_to_grid(np.zeros((1, 2, 2), dtype=bool), (3, 3), "majority")


def test_default_and_cache_key() -> None:
    """The default is "majority"; the rule is part of the bank's settings and cache key."""
    assert PrototypeConfig().mask_rule == "majority"
    assert set(MASK_RULES) == {"any", "majority", "eroded"}
    keys = set()
    for rule in MASK_RULES:
        model = OVDiff(None, [ColorExtractor()], prototype_config=PrototypeConfig(mask_rule=rule))
        assert model.prototype_config.to_dict()["mask_rule"] == rule
        keys.add(model.bank_key("support-key", model.extractors[0]))
    assert len(keys) == 3, "each rule has its own banks in the cache"


def test_bank_members_follow_the_rule() -> None:
    """The class prototype's member cells are exactly the rule's cells."""
    m = np.zeros((2, 32, 32), dtype=bool)
    m[0, 2:19, 3:21] = True  # box edges off the 8 px cells
    m[1, 9:30, 0:13] = True
    images = np.zeros((2, 32, 32, 3), np.uint8)
    support = SupportSet("thing", images, m.astype(np.float32), m, ~m)
    feats = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    counts = {}
    for rule in MASK_RULES:
        bank = build_bank(support, feats, "x", PrototypeConfig(n_parts=2, mask_rule=rule))
        assert bank.settings["prototypes"]["mask_rule"] == rule
        n, r, c = bank.members(0)  # the foreground class prototype
        got = np.zeros((2, 4, 4), dtype=bool)
        got[n, r, c] = True
        np.testing.assert_array_equal(got, region_to_grid(m, (4, 4), rule))
        counts[rule] = int(got.sum())
    assert counts["any"] > counts["majority"] > counts["eroded"] > 0


# --------------------------------------------------------------------------- sky / ground

SKY = (110, 170, 240)
GROUND = (120, 90, 50)
KITE = (230, 30, 60)
SIZE = (64, 64)
STRIDE = 16  # one feature cell = 16 x 16 px


def sky_support() -> SupportSet:
    """Sky over ground; the horizon is one pixel below a cell edge, so the cells under it
    hold 1 row of sky and 15 of ground. Foreground = sky, background = ground."""
    images, fg = [], []
    for i in range(4):
        horizon = STRIDE * (1 + i % 3) + 1
        img, index = paint_scene(SIZE, GROUND, [([SKY], (0, 0, horizon, SIZE[1]))], noise=0)
        images.append(img)
        fg.append(index == 1)
    m = np.stack(fg)
    return SupportSet("sky", np.stack(images), m.astype(np.float32), m, ~m, {"t": "sky"})


def kite_support() -> SupportSet:
    """A kite in the sky over ground. Foreground = kite, background = sky and ground."""
    images, fg = [], []
    for i in range(4):
        horizon = 2 * STRIDE + 1 + (i % 2) * STRIDE
        box = (8 + 2 * i, 8 + 4 * i, 16, 16)
        img, index = paint_scene(
            SIZE, GROUND, [([SKY], (0, 0, horizon, SIZE[1])), ([KITE], box)], noise=0
        )
        images.append(img)
        fg.append(index == 2)
    m = np.stack(fg)
    return SupportSet("kite", np.stack(images), m.astype(np.float32), m, ~m, {"t": "kite"})


def ground_fractions(rule: str, sky_is_stuff: bool) -> tuple[dict[str, float], float]:
    """Segment a plain-ground image with kite and sky built under ``rule``: the label
    fractions, and the best cosine of a sky foreground prototype to ground."""
    ex = ColorExtractor(stride=STRIDE)
    model = OVDiff(
        None,
        [ex],
        prototype_config=PrototypeConfig(n_parts=4, mask_rule=rule),
        segment_config=SegmentConfig(short_side=48, windows=False, prefilter=False),
    )
    model.add_support(kite_support(), stuff=False)
    sky = model.add_support(sky_support(), stuff=sky_is_stuff)
    ground = np.empty((48, 48, 3), np.uint8)
    ground[:] = GROUND
    seg = model.segment(ground, ["kite", "sky"])
    fractions = {n: float((seg.labels == i).mean()) for i, n in enumerate(seg.class_names)}
    bank = sky.banks[ex.name]
    fg_parts = bank.vectors[bank.foreground & (bank.kinds == PrototypeKind.PART)]
    g = F.normalize(extract_features(ex, ground[None])[0, :, 0, 0], dim=0)
    return fractions, float((fg_parts @ g).max())


def test_any_overlap_turns_plain_ground_into_sky() -> None:
    """The failure of the issue, reproduced with the paper's rule: a sky part prototype
    made of horizon cells (15/16 ground) is close to ground; as stuff, sky has no
    background prototypes, and the stuff filter drops the kite's ground background
    prototypes for being close to that part: ground is labelled sky."""
    fractions, closest = ground_fractions("any", sky_is_stuff=True)
    assert closest > 0.85, "a sky part prototype is ground in disguise"
    assert fractions.get("sky", 0.0) > 0.9
    unmarked, _ = ground_fractions("any", sky_is_stuff=False)
    assert unmarked.get("background", 0.0) == 1.0


@pytest.mark.parametrize("rule", ["majority", "eroded", None])
def test_other_rules_keep_plain_ground_background(rule: str | None) -> None:
    """The default (None) and the stricter rules leave horizon cells out of sky's parts."""
    rule = rule or PrototypeConfig().mask_rule
    for stuff in (True, False):
        fractions, closest = ground_fractions(rule, sky_is_stuff=stuff)
        assert closest < 0.5
        assert fractions.get("background", 0.0) == 1.0, (rule, stuff, fractions)
