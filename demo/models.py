"""Which models the demo runs: backends, presets, and one shared model per setting.

Backends:

* ``real``  - the real models (:func:`ovdiff_core.backends.presets.build_ovdiff`), weights
  from the Hugging Face hub or local folders.
* ``tiny``  - the same classes with tiny random weights (offline; CI). Segmentations are
  meaningless; the UI is identical.
* ``color`` - the colour world of :mod:`ovdiff_core.colorworld`: categories are colours,
  no neural network at all, yet the segmentations are meaningful. For teaching and tests.

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

from ovdiff_core.cache import Cache
from ovdiff_core.config import SegmentConfig
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
    "color_model",
    "make_model_factory",
]

BACKENDS = ("real", "tiny", "color")
PRESETS = ("cpu", "paper")
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


def color_model(preset: str, support_size: int | None, cache_dir: str | None) -> OVDiff:
    """The colour-world model: two colour extractors (strides 8 and 16) and a CLIP stand-in.

    ``preset`` "cpu" segments one whole-image view at short side 160; "paper" adds
    sliding windows at short side 224.
    """
    from ovdiff_core.colorworld import ColorExtractor, ColorGenerator, ColorScorer, ColorWorld

    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
    world = ColorWorld.default()
    generator = ColorGenerator(world, n_images=support_size or 6, batch_size=2, size=(96, 96))
    extractors = [ColorExtractor("color", stride=8), ColorExtractor("color2", stride=16, seed=1)]
    if preset == "cpu":
        seg = SegmentConfig(short_side=160, windows=False)
    else:
        seg = SegmentConfig(short_side=224, window_sizes=(160, 112), window_stride=80)
    return OVDiff(
        generator,
        extractors,
        ColorScorer(world),
        segment_config=seg,
        cache=Cache(cache_dir) if cache_dir else Cache(),
    )


def _preset_model(
    backend: str,
    preset: str,
    support_size: int | None,
    cache_dir: str | None,
    progress: ProgressFn | None = None,
) -> OVDiff:
    from ovdiff_core.backends.presets import build_ovdiff

    model = build_ovdiff(preset=preset, backend=backend, cache_dir=cache_dir, progress=progress)
    if support_size is not None:
        _set_support_size(model, support_size)
    return model


def _set_support_size(model: OVDiff, n: int) -> None:
    """Make ``model``'s generator produce ``n`` images per category.

    Works with generators that keep a frozen ``config`` dataclass with ``n_images`` and
    ``replace()`` (the Stable Diffusion generator) or a plain ``n_images`` attribute.
    The model is private to one (preset, size) setting of the pool, so this is safe.
    """
    gen = model.generator
    config = getattr(gen, "config", None)
    if config is not None and hasattr(config, "n_images") and hasattr(config, "replace"):
        gen.config = config.replace(n_images=n)  # type: ignore[union-attr]
    elif hasattr(gen, "n_images"):
        gen.n_images = n  # type: ignore[union-attr]
    else:
        raise ValueError(f"this generator ({type(gen).__name__}) has no adjustable support size")


def make_model_factory(backend: str, cache_dir: str | None = None) -> ModelFactory:
    """The model factory of ``backend``; ``cache_dir`` defaults to ``$OVDIFF_CACHE``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    cache_dir = cache_dir or os.environ.get("OVDIFF_CACHE") or None

    def factory(
        preset: str, support_size: int | None, progress: ProgressFn | None = None
    ) -> OVDiff:
        if backend == "color":
            return color_model(preset, support_size, cache_dir)
        return _preset_model(backend, preset, support_size, cache_dir, progress)

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
        self._impl: Any = None
        gen: Any = model.generator
        cfg = getattr(gen, "config", None)
        if gen is not None and hasattr(gen, "pipe") and hasattr(cfg, "resolution"):
            from ovdiff_core.backends.incontext import InContextConfig, InContextSupport

            assert cfg is not None
            icfg = InContextConfig(
                model_id=cfg.model_id,
                revision=cfg.revision,
                encoder_id=cfg.decoder_id,
                prompt=cfg.prompt,
                resolution=cfg.resolution,
                map_size=cfg.map_size,
                name_remaps=cfg.name_remaps,
                masks=cfg.masks,
                proposer_input_size=cfg.proposer_input_size,
            )
            encoder = gen.pipe.vae if cfg.decoder_id else None
            self._impl = InContextSupport(
                gen.pipe, icfg, gen.proposer, model_name=gen.model_name, encoder=encoder
            )

    @property
    def needs_masks(self) -> bool:
        """True when every photo must come with a painted foreground."""
        return self._impl is None

    def __call__(self, name: str, photos: OwnPhotos) -> SupportSet:
        """Support set of ``name`` from ``photos`` (see :data:`OwnPhotos`).

        Raises:
            ValueError: no photos, or a photo without paint where masks are required.
        """
        if not photos:
            raise ValueError("No photos: add at least one photo of the category.")
        if self._impl is None:
            return painted_support(name, photos)
        support: SupportSet = self._impl(name, [p for p, _ in photos], [m for _, m in photos])
        return support


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
