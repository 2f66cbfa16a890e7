"""The CLIP category pre-filter with a scripted scorer (no model)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import combinations

import numpy as np
import pytest

from ovdiff_core.colorworld import ColorExtractor, ColorGenerator, ColorWorld, paint_scene
from ovdiff_core.config import SegmentConfig
from ovdiff_core.pipeline import OVDiff
from ovdiff_core.prefilter import prefilter, subset_prompt
from ovdiff_core.segment import segment

IMAGE = np.zeros((8, 8, 3), dtype=np.uint8)


class ScriptedScorer:
    """Returns ``scores[prompt]`` (default ``default``) and records every prompt asked."""

    def __init__(self, scores: Mapping[str, float], default: float = 0.0) -> None:
        self.scores = dict(scores)
        self.default = default
        self.asked: list[list[str]] = []

    def image_text_scores(self, image: np.ndarray, texts: Sequence[str]) -> np.ndarray:
        self.asked.append(list(texts))
        return np.array([self.scores.get(t, self.default) for t in texts], dtype=np.float32)

    @property
    def prompts(self) -> list[str]:
        return [t for batch in self.asked for t in batch]


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def test_softmax_over_raw_cosines_and_one_over_c_threshold() -> None:
    names = ["cat", "dog", "car", "cup"]
    cos = {"a cat": 0.30, "a dog": 0.30, "a car": 0.10, "a cup": 0.10}
    scorer = ScriptedScorer(cos)
    res = prefilter(IMAGE, names, scorer, subsets=False)
    p = softmax(np.array([0.30, 0.30, 0.10, 0.10]))  # no temperature
    assert res.probabilities == pytest.approx(dict(zip(names, p, strict=True)), abs=1e-6)
    assert p[0] >= 0.25 > p[2]
    assert res.candidates == ["cat", "dog"] and res.kept == ["cat", "dog"]
    assert res.dropped == ["car", "cup"]
    assert res.subset_scores == {}
    assert scorer.asked == [["a cat", "a dog", "a car", "a cup"]]


def test_probability_exactly_one_over_c_is_kept() -> None:
    names = ["a", "b", "c"]
    res = prefilter(IMAGE, names, ScriptedScorer({}, default=0.2), subsets=False)
    assert res.kept == names  # all p == 1/3 exactly


def test_cap_keeps_the_most_probable() -> None:
    # 12 of 15 classes pass p >= 1/C; only the 10 most probable survive, in given order.
    names = [f"c{i:02d}" for i in range(15)]
    cos = {f"a c{i:02d}": 0.5 + 0.001 * ((i * 7) % 12) for i in range(12)}
    scorer = ScriptedScorer(cos, default=0.0)
    res = prefilter(IMAGE, names, scorer, subsets=False)
    passing = [n for n in names if res.probabilities[n] >= 1 / 15]
    assert len(passing) == 12
    top10 = sorted(passing, key=lambda n: -res.probabilities[n])[:10]
    assert res.candidates == [n for n in names if n in top10]
    assert res.kept == res.candidates
    capped = prefilter(IMAGE, names, scorer, max_classes=3, subsets=False)
    assert capped.kept == [n for n in names if n in top10[:3]]


def test_best_subset_prompt_wins() -> None:
    names = ["cat", "sofa", "lamp", "tree"]
    single = {"a cat": 0.3, "a sofa": 0.3, "a lamp": 0.3, "a tree": 0.0}
    scorer = ScriptedScorer({**single, "a cat and a lamp": 0.9}, default=0.1)
    res = prefilter(IMAGE, names, scorer)
    assert res.candidates == ["cat", "sofa", "lamp"]
    assert res.kept == ["cat", "lamp"]
    assert res.dropped == ["sofa", "tree"]
    expected = [
        subset_prompt(list(g)) for r in (1, 2, 3) for g in combinations(["cat", "sofa", "lamp"], r)
    ]
    assert list(res.subset_scores) == expected and len(expected) == 7
    assert "a cat and a sofa and a lamp" in res.subset_scores
    assert res.subset_scores["a cat and a lamp"] == pytest.approx(0.9)
    assert scorer.asked[1] == expected


def test_subset_search_with_many_candidates_scores_all_subsets() -> None:
    names = [f"n{i}" for i in range(10)]
    target = "a n1 and a n4 and a n7"
    scorer = ScriptedScorer({target: 1.0}, default=0.0)
    res = prefilter(IMAGE, names, scorer)
    assert len(res.subset_scores) == 2**10 - 1
    assert res.kept == ["n1", "n4", "n7"]


def test_kept_is_never_empty() -> None:
    one = prefilter(IMAGE, ["cat"], ScriptedScorer({}))
    assert one.kept == ["cat"] and one.subset_scores == {}
    negative = prefilter(IMAGE, ["cat", "dog"], ScriptedScorer({}, default=-0.5))
    assert len(negative.kept) >= 1
    assert set(negative.kept) | set(negative.dropped) == {"cat", "dog"}


def test_custom_template() -> None:
    scorer = ScriptedScorer({"a photo of cat": 1.0, "a photo of dog": 0.0})
    res = prefilter(IMAGE, ["cat", "dog"], scorer, template="a photo of {}")
    assert res.kept == ["cat"]
    assert scorer.asked[0] == ["a photo of cat", "a photo of dog"]


@pytest.mark.parametrize(
    ("names", "kwargs", "match"),
    [
        ([], {}, "names is empty"),
        (["cat", "dog", "cat"], {}, "distinct"),
        (["cat"], {"max_classes": 0}, "max_classes"),
        (["cat"], {"max_classes": 11}, "max_classes"),
    ],
)
def test_errors(names: list[str], kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        prefilter(IMAGE, names, ScriptedScorer({}), **kwargs)


def test_scorer_returning_the_wrong_count() -> None:
    class Broken:
        def image_text_scores(self, image: np.ndarray, texts: Sequence[str]) -> np.ndarray:
            return np.zeros(len(texts) + 1, dtype=np.float32)

    with pytest.raises(ValueError, match="scores for"):
        prefilter(IMAGE, ["cat", "dog"], Broken())


# --------------------------------------------------------------------------- via segment


@pytest.fixture(scope="module")
def model() -> OVDiff:
    world = ColorWorld.default()
    m = OVDiff(ColorGenerator(world, n_images=3), [ColorExtractor()])
    m.build(["cat", "sofa", "lamp", "grass"])
    assert m.categories["grass"].stuff and not m.categories["cat"].stuff
    return m


def test_segment_applies_the_prefilter_and_stuff_bypasses_it(model: OVDiff) -> None:
    world = ColorWorld.default()
    image, _ = paint_scene((32, 48), (40, 40, 40), [(world.parts["cat"], (8, 8, 16, 16))])
    scorer = ScriptedScorer({"a cat": 0.9, "a sofa": 0.1, "a lamp": 0.1}, default=0.0)
    cats = list(model.categories.values())
    cfg = SegmentConfig(short_side=32, windows=False)
    seg = segment(image, cats, model.extractors, cfg, scorer)
    assert seg.prefilter is not None
    assert seg.prefilter.kept == ["cat"]
    assert seg.class_names == ["background", "cat", "grass"]  # stuff always kept, in order
    assert seg.queried == ["cat", "sofa", "lamp", "grass"]
    assert not any("grass" in t for t in scorer.prompts), "stuff classes skip the scorer"
    # off switch and no scorer: everything is kept
    off = segment(image, cats, model.extractors, cfg.replace(prefilter=False), scorer)
    assert off.prefilter is None and off.class_names[1:] == ["cat", "sofa", "lamp", "grass"]
    none = segment(image, cats, model.extractors, cfg)
    assert none.prefilter is None and len(none.class_names) == 5


def test_segment_with_only_stuff_does_not_call_the_scorer(model: OVDiff) -> None:
    scorer = ScriptedScorer({})
    image = np.full((32, 32, 3), 40, dtype=np.uint8)
    seg = segment(
        image, [model.categories["grass"]], model.extractors, SegmentConfig(short_side=32), scorer
    )
    assert scorer.asked == [] and seg.prefilter is None
    assert seg.class_names == ["background", "grass"]


def test_segment_prefilter_settings_are_passed(model: OVDiff) -> None:
    image = np.full((32, 32, 3), 40, dtype=np.uint8)
    scorer = ScriptedScorer({"the cat": 0.5, "the sofa": 0.5, "the lamp": 0.5})
    cfg = SegmentConfig(short_side=32, windows=False, prompt="the {}", prefilter_max=2)
    seg = segment(
        image, [model.categories[n] for n in ("cat", "sofa", "lamp")], model.extractors, cfg, scorer
    )
    assert seg.prefilter is not None and len(seg.prefilter.candidates) == 2
    assert scorer.asked[0] == ["the cat", "the sofa", "the lamp"]
    no_subsets = cfg.replace(prefilter_subsets=False)
    scorer2 = ScriptedScorer({"the cat": 0.5, "the sofa": 0.5, "the lamp": 0.5})
    seg2 = segment(
        image,
        [model.categories[n] for n in ("cat", "sofa", "lamp")],
        model.extractors,
        no_subsets,
        scorer2,
    )
    assert len(scorer2.asked) == 1 and seg2.prefilter is not None
    assert seg2.prefilter.kept == seg2.prefilter.candidates
