"""Which models the demo runs: backends, presets, and one shared model per setting.

Backends:

* ``real``  - the real models, weights from the Hugging Face hub or local folders.
* ``tiny``  - the same classes with tiny random weights (offline; CI). Segmentations are
  meaningless; the UI is identical.
* ``color`` - the colour world of :mod:`ovdiff_core.colorworld`: categories are colours,
  no neural network at all, yet the segmentations are meaningful. For teaching and tests.

All three are built by :func:`ovdiff_core.backends.build_ovdiff`.

A *model factory* maps (preset, support-set size) to an :class:`~ovdiff_core.OVDiff`.
:class:`ModelPool` calls it once per distinct setting and shares the result between
visitors (banks are shared through the on-disk cache too).
"""

from __future__ import annotations

import inspect
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ovdiff_core.backends.generator import SDSupportGenerator
from ovdiff_core.backends.incontext import InContextSupport
from ovdiff_core.backends.presets import BACKENDS, PRESETS, build_ovdiff
from ovdiff_core.pipeline import OVDiff
from ovdiff_core.stuff import VOC
from ovdiff_core.types import SupportSet

__all__ = [
    "BACKENDS",
    "PRESETS",
    "BackendInfo",
    "ModelFactory",
    "ModelPool",
    "OwnPhotos",
    "ProgressFn",
    "backend_info",
    "make_model_factory",
]

ASSETS = Path(__file__).resolve().parent.parent / "assets"

# (preset, support-set size or None for the preset's default) -> model. A factory may
# also accept a keyword ``progress`` (a ProgressFn) to report loading and downloads.
ModelFactory = Callable[[str, "int | None"], OVDiff]

# Progress hook (stage, fraction or None, message): see
# ovdiff_core.backends.loading.ProgressFn.
ProgressFn = Callable[[str, "float | None", str], None]


@dataclass(frozen=True)
class BackendInfo:
    """How the UI presents a backend.

    Attributes:
        name: backend name.
        banner: Markdown warning shown at the top of the page (None for real models).
        ready_sets: ``{label: comma-separated names}`` offered as one-click category sets.
        default_names: the category text box's initial value.
        examples: example image paths for the segmentation tab.
        default_support: the support-set size slider's initial value.
    """

    name: str
    banner: str | None
    ready_sets: dict[str, str]
    default_names: str
    examples: list[str] = field(default_factory=list)
    default_support: int = 8


def _photo_examples() -> list[str]:
    names = ("cat.jpg", "coffee.jpg", "astronaut.jpg", "grace_hopper.jpg")
    return [str(ASSETS / n) for n in names if (ASSETS / n).is_file()]


_COMMON_SETS = {
    "VOC (20 classes)": ", ".join(VOC),
    "Pascal Context stuff (8)": "sky, grass, tree, water, road, building, wall, floor",
    "Living room": "cat, sofa, lamp, floor, wall",
    "Kitchen table": "cup, plate, spoon, table",
}


def backend_info(backend: str) -> BackendInfo:
    """Presentation of ``backend`` (one of :data:`BACKENDS`)."""
    if backend == "real":
        return BackendInfo(
            "real", None, dict(_COMMON_SETS), "cat, sofa, lamp", _photo_examples(), 8
        )
    if backend == "tiny":
        banner = (
            "**Test mode: tiny random-weight models.** This page runs the real pipeline "
            "with miniature, *untrained* networks so that it works offline and in CI. "
            "Support images are noise and segmentations are meaningless; the controls, "
            "data flow and traces are exactly those of the real models. Start the app "
            "without `--backend tiny` for real results."
        )
        return BackendInfo(
            "tiny", banner, dict(_COMMON_SETS), "cat, sofa, grass", _photo_examples(), 4
        )
    if backend == "color":
        banner = (
            "**Colour-world mode: no neural networks.** Categories are colours "
            "(cat = orange/brown stripes, sofa = blue/purple, lamp = yellow, grass = green; "
            "any other name gets a colour of its own). The support images, masks, "
            "prototypes, segmentations and traces are real outputs of the OVDiff "
            "algorithm on this toy world, so everything here is meaningful and exact."
        )
        sets = {"Colour world (4)": "cat, sofa, lamp, grass", **_COMMON_SETS}
        scene = ASSETS / "colour_scene.png"
        examples = [str(scene)] if scene.is_file() else []
        return BackendInfo("color", banner, sets, "cat, sofa, lamp, grass", examples, 6)
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def make_model_factory(backend: str, cache_dir: str | None = None) -> ModelFactory:
    """The model factory of ``backend``; ``cache_dir`` defaults to ``$OVDIFF_CACHE``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    cache_dir = cache_dir or os.environ.get("OVDIFF_CACHE") or None

    def factory(
        preset: str, support_size: int | None, progress: ProgressFn | None = None
    ) -> OVDiff:
        return build_ovdiff(
            preset,
            backend=backend,
            cache_dir=cache_dir,
            progress=progress,
            support_size=support_size,
        )

    return factory


class ModelPool:
    """Shared models, one per (preset, support-set size), created on first use.

    At most ``max_models`` are kept; the least recently used beyond that is dropped
    (visitors moving the support-size slider would otherwise create one model each).
    Real backends share their weights between models (see :mod:`ovdiff_core.backends`),
    so a model costs its category registry, not another copy of the networks. Creating
    one model never blocks visitors who use another.

    Args:
        factory: see :data:`ModelFactory`.
        max_models: how many models to keep.
    """

    def __init__(self, factory: ModelFactory, max_models: int = 8) -> None:
        if max_models < 1:
            raise ValueError(f"ModelPool: max_models must be >= 1, got {max_models}")
        self._factory = factory
        self.max_models = max_models
        self._models: OrderedDict[tuple[str, int | None], OVDiff] = OrderedDict()
        self._lock = threading.Lock()
        self._creating: dict[tuple[str, int | None], threading.Lock] = {}

    def get(
        self, preset: str, support_size: int | None = None, progress: ProgressFn | None = None
    ) -> OVDiff:
        """The model of (preset, support-set size), created on first use.

        Args:
            progress: optional hook ``(stage, fraction, message)`` told what the
                factory is doing while it loads or downloads models (see
                :data:`ProgressFn`); ignored when the model exists already or the
                factory takes no ``progress`` keyword.
        """
        key = (preset, support_size)
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            creating = self._creating.setdefault(key, threading.Lock())
        with creating:  # one creation per key; other keys are not held up
            with self._lock:
                if key in self._models:
                    self._models.move_to_end(key)
                    return self._models[key]
            if progress is not None and _accepts_progress(self._factory):
                factory: Any = self._factory
                model = factory(preset, support_size, progress=progress)
            else:
                model = self._factory(preset, support_size)
            with self._lock:
                self._models[key] = model
                self._creating.pop(key, None)
                while len(self._models) > self.max_models:
                    self._models.popitem(last=False)
            return model

    def loaded(self) -> list[tuple[str, int | None]]:
        """Settings of the models held now, least recently used first."""
        with self._lock:
            return list(self._models)

    def holds(self, model: OVDiff) -> bool:
        """Whether ``model`` is one of the models held now."""
        with self._lock:
            return any(m is model for m in self._models.values())


def _accepts_progress(factory: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "progress" or p.kind is p.VAR_KEYWORD for p in params)


# Own photos: (H, W, 3) uint8 RGB photos and, per photo, an (H, W) bool painted
# foreground or None.
OwnPhotos = Sequence[tuple[np.ndarray, "np.ndarray | None"]]


class OwnPhotoSupport:
    """Turns a visitor's own photos into support sets for one model (in-context mode).

    With a Stable Diffusion generator (``tiny`` and ``real`` backends) this is
    :class:`ovdiff_core.backends.incontext.InContextSupport` sharing the generator's
    pipeline, proposer, prompt, resolution and mask rules: attribution from one UNet
    pass, automatic masks where nothing was painted. Otherwise (the colour world has no
    diffusion model) every photo needs a painted foreground; see :func:`painted_support`.
    """

    def __init__(self, model: OVDiff) -> None:
        self._impl: InContextSupport | None = None
        if isinstance(model.generator, SDSupportGenerator):
            self._impl = InContextSupport.from_generator(model.generator)

    def __call__(self, name: str, photos: OwnPhotos) -> SupportSet:
        """Support set of ``name`` from ``photos`` (see :data:`OwnPhotos`).

        Raises:
            ValueError: no photos, or a photo without paint where masks are required.
        """
        if not photos:
            raise ValueError("No photos: add at least one photo of the category.")
        if self._impl is None:
            return painted_support(name, photos)
        return self._impl(name, [p for p, _ in photos], [m for _, m in photos])


def painted_support(name: str, photos: OwnPhotos, side: int = 96) -> SupportSet:
    """Support set straight from painted photos (no model): foreground = the paint,
    background = pixels at least ``side // 16`` away from it, attribution = the paint.

    Photos are stretched to ``side`` x ``side`` (a support set has one image size).

    Raises:
        ValueError: a photo without paint.
    """
    from scipy.ndimage import binary_dilation

    missing = [i + 1 for i, (_, m) in enumerate(photos) if m is None or not m.any()]
    if missing:
        raise ValueError(
            f"Paint the object on photo(s) {missing}: this backend cannot find the "
            "foreground of your photos by itself."
        )
    images, fgs, bgs = [], [], []
    for photo, mask in photos:
        assert mask is not None
        im = Image.fromarray(photo).resize((side, side), Image.Resampling.BICUBIC)
        mk = Image.fromarray(mask.astype(np.uint8) * 255).resize(
            (side, side), Image.Resampling.NEAREST
        )
        fg = np.asarray(mk) > 0
        images.append(np.asarray(im))
        fgs.append(fg)
        bgs.append(~binary_dilation(fg, iterations=max(1, side // 16)))
    fg_arr = np.stack(fgs)
    return SupportSet(
        category=name,
        images=np.stack(images),
        attributions=fg_arr.astype(np.float32),
        foreground=fg_arr,
        background=np.stack(bgs),
        settings={"source": "own painted photos", "side": side},
    )
