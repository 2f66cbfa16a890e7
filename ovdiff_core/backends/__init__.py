"""Model backends: Stable Diffusion generator, feature extractors, CLIP scorer, presets.

Importing this package is cheap: every public name is imported from its submodule on
first access (diffusers / transformers / open_clip load only when used).

Typical use::

    from ovdiff_core.backends import build_ovdiff
    model = build_ovdiff("cpu")            # real weights (hub cache or download)
    model = build_ovdiff("cpu", backend="tiny")   # same object graph, tiny random models
    model = build_ovdiff("cpu", backend="color")  # the colour world: no networks at all
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ovdiff_core.backends.extractors import ClipExtractor, DinoExtractor, SDFeatureExtractor
    from ovdiff_core.backends.generator import (
        GENERATION_CPU,
        GENERATION_PAPER,
        GenerationConfig,
        SDSupportGenerator,
    )
    from ovdiff_core.backends.loading import (
        ModelNotAvailableError,
        best_device,
        best_dtype,
        default_model_id,
        load_sd_pipeline,
        resolve_model,
    )
    from ovdiff_core.backends.presets import BACKENDS, PRESETS, Preset, build_ovdiff
    from ovdiff_core.backends.proposer import FeatureClusterProposer, ThresholdProposer
    from ovdiff_core.backends.scorer import ClipScorer
    from ovdiff_core.backends.tiny_sd import tiny_sd_pipeline
    from ovdiff_core.backends.tiny_vision import tiny_dino, tiny_dinov2, tiny_open_clip

_EXPORTS = {
    "ClipExtractor": "extractors",
    "DinoExtractor": "extractors",
    "SDFeatureExtractor": "extractors",
    "GENERATION_CPU": "generator",
    "GENERATION_PAPER": "generator",
    "GenerationConfig": "generator",
    "SDSupportGenerator": "generator",
    "ModelNotAvailableError": "loading",
    "best_device": "loading",
    "best_dtype": "loading",
    "default_model_id": "loading",
    "load_sd_pipeline": "loading",
    "resolve_model": "loading",
    "BACKENDS": "presets",
    "PRESETS": "presets",
    "Preset": "presets",
    "build_ovdiff": "presets",
    "FeatureClusterProposer": "proposer",
    "ThresholdProposer": "proposer",
    "ClipScorer": "scorer",
    "tiny_sd_pipeline": "tiny_sd",
    "tiny_dino": "tiny_vision",
    "tiny_dinov2": "tiny_vision",
    "tiny_open_clip": "tiny_vision",
}

__all__ = [
    "BACKENDS",
    "GENERATION_CPU",
    "GENERATION_PAPER",
    "PRESETS",
    "ClipExtractor",
    "ClipScorer",
    "DinoExtractor",
    "FeatureClusterProposer",
    "GenerationConfig",
    "ModelNotAvailableError",
    "Preset",
    "SDFeatureExtractor",
    "SDSupportGenerator",
    "ThresholdProposer",
    "best_device",
    "best_dtype",
    "build_ovdiff",
    "default_model_id",
    "load_sd_pipeline",
    "resolve_model",
    "tiny_dino",
    "tiny_dinov2",
    "tiny_open_clip",
    "tiny_sd_pipeline",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ovdiff_core.backends' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"ovdiff_core.backends.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
