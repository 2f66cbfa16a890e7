"""One builder for every backend: build_ovdiff("cpu"|"paper", backend="real"|"tiny"|"color")
with the support-set size and (colour world) vocabulary as arguments; the in-context
support of a generator."""

from __future__ import annotations

import numpy as np
import pytest

from ovdiff_core.backends import BACKENDS, PRESETS, build_ovdiff
from ovdiff_core.backends.incontext import InContextConfig, InContextSupport
from ovdiff_core.backends.presets import COLOR_SEGMENT
from ovdiff_core.colorworld import ColorWorld
from ovdiff_core.evaluation.synthetic import color_world


def test_backends_and_presets_are_the_builders():
    assert BACKENDS == ("real", "tiny", "color")
    assert set(COLOR_SEGMENT) == set(PRESETS)


@pytest.mark.parametrize("preset", ["cpu", "paper"])
def test_color_backend_builds_the_colour_world(preset):
    model = build_ovdiff(preset, backend="color", use_cache=False)
    assert [e.name for e in model.extractors] == ["color", "color2"]
    assert model.segment_config == COLOR_SEGMENT[preset]
    assert model.segment_config.windows == (preset == "paper")
    assert model.scorer is not None
    spec = model.generator.spec("cat")
    assert spec["n_images"] == 16
    assert spec["parts"] == [list(c) for c in ColorWorld.default().parts["cat"]]


def test_color_backend_support_size_and_vocabulary():
    names = ["cat", "aeroplane", "bottle"]
    model = build_ovdiff("cpu", backend="color", use_cache=False, support_size=3, names=names)
    world = color_world(names)
    spec = model.generator.spec("aeroplane")
    assert spec["parts"] == [list(c) for c in world.parts["aeroplane"]]
    (cat,) = model.build(["bottle"])
    assert len(cat.support) == 3


def test_tiny_backend_support_size_overrides_the_preset():
    assert (
        build_ovdiff("cpu", backend="tiny", use_cache=False).generator.spec("cat")["n_images"] == 4
    )
    model = build_ovdiff("cpu", backend="tiny", use_cache=False, support_size=6)
    assert model.generator.spec("cat")["n_images"] == 6


@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_support_size_must_be_positive(bad):
    with pytest.raises(ValueError, match="support_size must be a positive integer"):
        build_ovdiff("cpu", backend="color", use_cache=False, support_size=bad)


def test_unknown_backend_names_the_choices():
    with pytest.raises(ValueError, match=r"backend must be one of \('real', 'tiny', 'color'\)"):
        build_ovdiff("cpu", backend="colour")


def test_in_context_support_follows_the_generator():
    model = build_ovdiff("cpu", backend="tiny", use_cache=False)
    gen = model.generator
    own = InContextSupport.from_generator(gen)
    assert own.config == InContextConfig.from_generation(gen.config)
    assert (own.config.resolution, own.config.prompt, own.config.masks) == (
        gen.config.resolution,
        gen.config.prompt,
        gen.config.masks,
    )
    assert own.pipe is gen.pipe and own.proposer is gen.proposer
    rng = np.random.default_rng(0)
    photos = [rng.integers(0, 256, (80, 72, 3), dtype=np.uint8) for _ in range(2)]
    support = own("cat", photos, [None, None])
    assert support.images.shape == (2, gen.config.resolution, gen.config.resolution, 3)
