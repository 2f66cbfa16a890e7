"""Stuff classes: no background prototypes of their own, and they veto close ones."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ovdiff_core.colorworld import ColorExtractor, ColorGenerator, ColorWorld
from ovdiff_core.config import SegmentConfig
from ovdiff_core.pipeline import OVDiff
from ovdiff_core.segment import segment
from ovdiff_core.stuff import COCO_OBJECT, PASCAL_CONTEXT, STUFF, VOC, is_stuff
from ovdiff_core.types import Category, PrototypeBank, PrototypeKind

D = 6


def vec_at_cosine(c: float) -> torch.Tensor:
    """Unit vector with cosine ``c`` to e0 (the stuff prototype), in the e0-e1 plane."""
    v = torch.zeros(D, dtype=torch.float64)
    v[0], v[1] = c, math.sqrt(1 - c * c)
    return v


def bank(name: str, fg: list[torch.Tensor], bg: list[torch.Tensor]) -> PrototypeBank:
    vectors = torch.stack(fg + bg).float()
    p = len(vectors)
    return PrototypeBank(
        category=name,
        extractor="ex",
        vectors=vectors,
        foreground=torch.tensor([True] * len(fg) + [False] * len(bg)),
        kinds=torch.full((p,), int(PrototypeKind.PART), dtype=torch.int8),
        image_index=torch.full((p,), -1, dtype=torch.int32),
        member_offsets=torch.arange(p + 1, dtype=torch.int64),
        member_cells=torch.arange(p, dtype=torch.int64),
        grid_size=(4, 4),
        image_size=(8, 8),
    )


class OnesExtractor:
    name = "ex"
    stride = 4

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[2:]
        return torch.ones(images.shape[0], D, -(-h // 4), -(-w // 4))

    def spec(self) -> dict:
        return {}


# Background cosines to the stuff foreground prototype e0. Prototypes are float32, so the
# cosine of the third is exactly float32(0.85) and the second the next float32 above it.
NEXT_UP = float(np.nextafter(np.float32(0.85), np.float32(1.0)))
BG_COSINES = [0.9, NEXT_UP, 0.85, 0.8499, 0.2]


def categories(stuff_flag: bool = True) -> list[Category]:
    e = torch.eye(D, dtype=torch.float64)
    thing = Category(
        "cat", {"ex": bank("cat", [e[2], e[3]], [vec_at_cosine(c) for c in BG_COSINES])}
    )
    # the stuff class has background prototypes too: they must not be used
    sky = Category("sky", {"ex": bank("sky", [e[0]], [e[4], e[5]])}, stuff=stuff_flag)
    return [thing, sky]


def scoring(cats: list[Category], **cfg: object):  # type: ignore[no-untyped-def]
    image = np.zeros((16, 16, 3), dtype=np.uint8)
    config = SegmentConfig(short_side=16, windows=False, **cfg)  # type: ignore[arg-type]
    return segment(image, cats, [OnesExtractor()], config).scoring["ex"]


def background_rows(sc, source: int) -> list[int]:  # type: ignore[no-untyped-def]
    sel = (sc.channel == 0) & (sc.source == source)
    return sc.bank_index[sel].tolist()


def test_stuff_background_prototypes_are_dropped_above_threshold() -> None:
    sc = scoring(categories())
    # cat's bank rows: 0, 1 foreground; 2..6 background with BG_COSINES
    kept = background_rows(sc, 1)
    assert kept == [4, 5, 6], "cosines 0.85, 0.8499, 0.2 stay; 0.9 and just above 0.85 go"
    assert sc.dropped_by_stuff == 2
    # the stuff class contributes no background prototypes at all
    assert background_rows(sc, 2) == []
    assert int((sc.channel == 0).sum()) == 3
    # foreground prototypes are untouched
    assert sc.bank_index[sc.channel == 1].tolist() == [0, 1]
    assert sc.bank_index[sc.channel == 2].tolist() == [0]


def test_threshold_is_configurable() -> None:
    sc = scoring(categories(), stuff_threshold=0.95)
    assert background_rows(sc, 1) == [2, 3, 4, 5, 6] and sc.dropped_by_stuff == 0
    sc = scoring(categories(), stuff_threshold=0.5)
    assert background_rows(sc, 1) == [6] and sc.dropped_by_stuff == 4


def test_without_stuff_nothing_is_dropped() -> None:
    sc = scoring(categories(stuff_flag=False))
    assert background_rows(sc, 1) == [2, 3, 4, 5, 6]
    assert background_rows(sc, 2) == [1, 2], "a thing keeps its background prototypes"
    assert sc.dropped_by_stuff == 0


def test_background_off_drops_everything_and_counts_nothing() -> None:
    sc = scoring(categories(), background=False)
    assert int((sc.channel == 0).sum()) == 0 and sc.dropped_by_stuff == 0


def test_is_stuff_table() -> None:
    assert is_stuff("sky") and is_stuff("  Grass ") and is_stuff("brick wall")
    assert not is_stuff("cat") and not is_stuff("pottedplant")
    assert not any(is_stuff(n) for n in VOC)
    assert not any(is_stuff(n) for n in COCO_OBJECT)
    assert {n for n in PASCAL_CONTEXT if is_stuff(n)} <= STUFF
    assert is_stuff("cat", {"Cat": True}) and not is_stuff("sky", {"sky": False})


@pytest.fixture(scope="module")
def model() -> OVDiff:
    world = ColorWorld.default()
    return OVDiff(
        ColorGenerator(world, n_images=2), [ColorExtractor()], stuff_overrides={"lamp": True}
    )


def test_pipeline_flags_stuff(model: OVDiff) -> None:
    grass, cat, lamp = model.build(["grass", "cat", "lamp"])
    assert grass.stuff and not cat.stuff and lamp.stuff
    explicit = next(e for e in model.build_iter("grass", stuff=False) if e.stage == "done")
    assert explicit.category_result is not None and not explicit.category_result.stuff
