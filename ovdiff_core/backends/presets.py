"""Named end-to-end configurations and the one factory that builds an :class:`OVDiff`.

A :class:`Preset` says which generator settings, feature extractors (with model ids),
pre-filter model, prototype and segmentation settings to use. :func:`build_ovdiff` turns a
preset into a ready :class:`ovdiff_core.pipeline.OVDiff` with one of the :data:`BACKENDS`:

* ``"real"``: the preset's models (Hugging Face cache or download, see
  :mod:`ovdiff_core.backends.loading`);
* ``"tiny"``: tiny random models of the same classes (offline, seconds on a CPU; for
  tests, CI and trying the app without weights). "real" and "tiny" build the same object
  graph: an ``SDSupportGenerator`` over a ``StableDiffusionPipeline``, the preset's
  ``FeatureExtractor`` classes, a ``ClipScorer``;
* ``"color"``: the colour world of :mod:`ovdiff_core.colorworld` (no networks at all;
  categories are colours, so segmentations are meaningful and exact): two colour
  extractors (strides 8 and 16) and a CLIP stand-in, segmenting with
  :data:`COLOR_SEGMENT` of the preset.

Presets:

* ``"paper"``: the authors' configuration (SD v1.5 30 steps, 32 images at 512 px; SD +
  DINO ViT-B/8 + CLIP ViT-B/16 features; 448 px sliding windows). Needs a GPU.
* ``"cpu"``: one class within about three minutes on a 2-core CPU
  (``benchmarks/bench_presets.py``): the generator's :data:`GENERATION_CPU` (SD-Turbo,
  1-2 steps without guidance, 8 images, TAESD decoder); CLIP ViT-B/16 + DINOv2-S/14 key
  features (no SD features: a full-VAE encode and a UNet pass per image would add about
  as much time as generation itself); masks from DINOv2-S/14 feature clusters; one
  whole-image view at 320 px for segmentation.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

from ovdiff_core.backends.generator import GENERATION_CPU, GENERATION_PAPER, GenerationConfig
from ovdiff_core.backends.loading import (
    MODELS,
    MissingModel,
    MissingModelsError,
    ModelRef,
    ProgressFn,
    check_model,
    default_model_id,
    dtype_by_name,
)
from ovdiff_core.config import FAST_SEGMENT, PAPER_SEGMENT, PrototypeConfig, SegmentConfig

if TYPE_CHECKING:
    from ovdiff_core.pipeline import OVDiff
    from ovdiff_core.protocols import FeatureExtractor

__all__ = [
    "BACKENDS",
    "COLOR_SEGMENT",
    "PRESETS",
    "ExtractorConfig",
    "Preset",
    "build_ovdiff",
    "check_preset_models",
    "preset_models",
]

EXTRACTOR_KINDS = ("sd", "dino", "dinov2", "clip")
BACKENDS = ("real", "tiny", "color")  # see the module docstring


@dataclass(frozen=True)
class ExtractorConfig:
    """One feature extractor of a preset."""

    kind: str  # "sd" (UNet queries), "dino" (ViT keys), "dinov2" (DINOv2 keys), "clip" (keys)
    model_id: str | None = None  # hub id or local dir; None = the kind's default, which the
    #   OVDIFF_{SD,DINO,DINOV2,CLIP}_MODEL environment variables override ("sd": the
    #   generator's model, so that both share one UNet)
    revision: str | None = None  # hub revision of model_id
    layer: int | None = None  # block index; None = the paper's (-1 DINO, -2 CLIP)
    input_size: int | None = None  # fixed square input side; None = each image's own size

    def __post_init__(self) -> None:
        if self.kind not in EXTRACTOR_KINDS:
            raise ValueError(
                f"ExtractorConfig.kind must be one of {EXTRACTOR_KINDS}, got {self.kind!r}"
            )

    @property
    def name(self) -> str:
        """The extractor's name in banks and segmentations (the kind)."""
        return self.kind


@dataclass(frozen=True)
class Preset:
    """A complete OVDiff configuration."""

    name: str  # key in PRESETS
    description: str  # one line for UIs
    generation: GenerationConfig  # stage 1: support images, attribution, masks
    extractors: tuple[ExtractorConfig, ...]  # stage 2/3 features; scores are averaged
    proposer: str | None = "dino"  # kind of the extractor that clusters support images into
    #   segments for masks (generation.masks.proposer == "features"); reuses that
    #   extractor's model; None only with threshold masks
    scorer: ExtractorConfig | None = field(  # CLIP for the category pre-filter; None = off
        default_factory=lambda: ExtractorConfig("clip")
    )
    prototype_config: PrototypeConfig = field(default_factory=PrototypeConfig)  # stage 2
    segment_config: SegmentConfig = field(default_factory=SegmentConfig)  # stage 3

    def __post_init__(self) -> None:
        if not self.extractors:
            raise ValueError(f"Preset {self.name!r}: extractors is empty")
        names = [e.name for e in self.extractors]
        if len(set(names)) != len(names):
            raise ValueError(f"Preset {self.name!r}: extractor kinds must be distinct: {names}")
        if self.proposer is not None and self.proposer not in EXTRACTOR_KINDS:
            raise ValueError(
                f"Preset {self.name!r}: proposer must be None or one of {EXTRACTOR_KINDS}"
            )
        if self.proposer is None and self.generation.masks.proposer == "features":
            raise ValueError(
                f"Preset {self.name!r}: feature-cluster masks need proposer='dino' (or another "
                "extractor kind), or use generation.masks.proposer='threshold'"
            )

    def replace(self, **changes: Any) -> Preset:
        return replace(self, **changes)


PRESETS: dict[str, Preset] = {
    "paper": Preset(
        name="paper",
        description="The authors' settings: SD v1.5, 32 images, SD+DINO+CLIP features (GPU)",
        generation=GENERATION_PAPER,
        extractors=(ExtractorConfig("sd"), ExtractorConfig("dino"), ExtractorConfig("clip")),
        proposer="dino",
        prototype_config=PrototypeConfig(),
        segment_config=PAPER_SEGMENT,
    ),
    "cpu": Preset(
        name="cpu",
        description="Laptop CPU: SD-Turbo, 8 images, CLIP+DINOv2 features, one view",
        generation=GENERATION_CPU,
        extractors=(ExtractorConfig("clip"), ExtractorConfig("dinov2")),
        proposer="dinov2",
        prototype_config=PrototypeConfig(),
        segment_config=FAST_SEGMENT,
    ),
}

# Tiny backend: the preset's generation settings at toy scale (the structure is kept:
# scheduler, guidance, prompts, masks; only sizes and counts shrink).
TINY_RESOLUTION = 64
TINY_IMAGES = 4
TINY_BATCH = 2
TINY_STEPS = 2

# Colour backend: stage-3 settings per preset name (the colour world's images are small):
# "cpu" segments one whole-image view at short side 160, "paper" adds sliding windows.
COLOR_SEGMENT: dict[str, SegmentConfig] = {
    "cpu": SegmentConfig(short_side=160, windows=False),
    "paper": SegmentConfig(short_side=224, window_sizes=(160, 112), window_stride=80),
}
COLOR_IMAGES = 16  # support images per category (every background colour shows up)
COLOR_BATCH = 2  # support images per streamed batch
COLOR_SIDE = 96  # support image side, pixels
COLOR_ALIGN = 16  # object boxes snap to the coarser extractor's stride


def _preset(preset: str | Preset) -> Preset:
    if isinstance(preset, Preset):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)} or a Preset, got {preset!r}")
    return PRESETS[preset]


def build_ovdiff(
    preset: str | Preset = "cpu",
    backend: str = "real",
    cache_dir: str | os.PathLike[str] | None = None,
    device: torch.device | str | None = None,
    use_cache: bool = True,
    seed: int = 0,
    progress: ProgressFn | None = None,
    dtype: torch.dtype | str | None = None,
    support_size: int | None = None,
    names: Sequence[str] | None = None,
) -> OVDiff:
    """Build an :class:`~ovdiff_core.pipeline.OVDiff` from a preset.

    Args:
        preset: a name in :data:`PRESETS` (``"cpu"``, ``"paper"``) or a :class:`Preset`.
        backend: one of :data:`BACKENDS`: ``"real"`` (the preset's models, loaded once
            per process; downloads only when online and not cached), ``"tiny"`` (tiny
            random models of the same classes, CPU, offline: for tests and trying the
            app) or ``"color"`` (the colour world, no networks; the preset picks
            :data:`COLOR_SEGMENT`, a custom :class:`Preset` its own segment_config).
        cache_dir: support-set and bank cache folder; None = ``$OVDIFF_CACHE`` or
            ``~/.cache/ovdiff``.
        device: "real" backend device; None = :func:`~ovdiff_core.backends.loading.
            best_device`. The tiny backend runs on the CPU unless a device is given.
        use_cache: False keeps everything in memory (no cache folder).
        seed: weights seed of the tiny models (ignored by "real").
        progress: optional hook ``(stage, fraction, message)`` (see
            :data:`~ovdiff_core.backends.loading.ProgressFn`): "real" reports the file
            check, each download (bytes) and each model it loads, in order, then
            ``("ready", 1.0, ...)``; "tiny" reports only "ready".
        dtype: weights dtype of every model (a ``torch.dtype`` or ``"float32"``,
            ``"float16"``, ``"bfloat16"``); None = :func:`~ovdiff_core.backends.loading.
            best_dtype` of the device (float16 on CUDA, float32 elsewhere, or
            ``$OVDIFF_DTYPE``). float16 reads the SD fp16 variant files (see
            :func:`preset_models`). Features are float32 whatever the weights' dtype.
            Ignored by "color".
        support_size: support images per category; None = the preset's (real), at
            most 4 (tiny), 16 (color).
        names: "color" only: the vocabulary the colour world must tell apart (see
            :func:`~ovdiff_core.evaluation.synthetic.color_world`); None = the default
            world (other names get a colour from a hash of the name).

    Devices: every model lives on ``device``; features, prototype building (K-means)
    and scoring stay there, and only banks (cached) and segmentations are moved to the
    CPU.

    "real" first checks every model of the preset (:func:`check_preset_models`, no
    weights loaded): when some are missing or incomplete and the hub cannot be used,
    one error lists them all, each with the command that fixes it; online, only their
    missing or broken files are downloaded.

    Raises:
        ValueError: unknown preset or backend, or ``support_size`` < 1.
        ModelNotAvailableError: "real" weights neither on disk nor downloadable
            (:class:`~ovdiff_core.backends.loading.MissingModelsError`, every model
            at once).
    """
    from ovdiff_core.cache import Cache
    from ovdiff_core.pipeline import OVDiff

    p = _preset(preset)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if support_size is not None and (
        isinstance(support_size, bool) or not isinstance(support_size, int) or support_size < 1
    ):
        raise ValueError(f"support_size must be a positive integer or None, got {support_size!r}")
    if isinstance(dtype, str):
        dtype = dtype_by_name(dtype)
    if support_size is not None and backend == "real":
        p = p.replace(generation=p.generation.replace(n_images=support_size))
    if backend == "real":
        generator, extractors, scorer = _real_components(p, device, progress, dtype)
    elif backend == "tiny":
        generator, extractors, scorer = _tiny_components(p, device, seed, dtype, support_size)
        if progress is not None:
            progress("ready", 1.0, "Tiny test models ready")
    else:
        generator, extractors, scorer = _color_components(names, support_size)
        p = p.replace(segment_config=COLOR_SEGMENT.get(p.name, p.segment_config))
        if progress is not None:
            progress("ready", 1.0, "Colour world ready")
    return OVDiff(
        generator=generator,
        extractors=extractors,
        scorer=scorer if p.segment_config.prefilter else None,
        prototype_config=p.prototype_config,
        segment_config=p.segment_config,
        cache=Cache(cache_dir) if use_cache else None,
    )


def _color_components(
    names: Sequence[str] | None, support_size: int | None
) -> tuple[Any, list[FeatureExtractor], Any]:
    from ovdiff_core.colorworld import ColorExtractor, ColorGenerator, ColorScorer
    from ovdiff_core.evaluation.synthetic import color_world

    world = color_world(names or ())
    generator = ColorGenerator(
        world,
        n_images=support_size or COLOR_IMAGES,
        batch_size=COLOR_BATCH,
        size=(COLOR_SIDE, COLOR_SIDE),
        align=COLOR_ALIGN,
    )
    extractors: list[FeatureExtractor] = [
        ColorExtractor("color", stride=8),
        ColorExtractor("color2", stride=16, seed=1),
    ]
    return generator, extractors, ColorScorer(world)


def _ordered(p: Preset, built: dict[str, FeatureExtractor]) -> list[FeatureExtractor]:
    return [built[e.name] for e in p.extractors]


def _extractor_kwargs(cfg: ExtractorConfig) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"name": cfg.name}
    if cfg.layer is not None:
        kwargs["layer"] = cfg.layer
    if cfg.input_size is not None:
        kwargs["input_size"] = cfg.input_size
    return kwargs


def preset_models(
    preset: str | Preset, device: torch.device | str | None = None, fp16: bool | None = None
) -> list[ModelRef]:
    """Every model the "real" backend loads for ``preset``, once each, in load order.

    Model ids come from the preset, with the ``OVDIFF_*_MODEL`` environment variables
    applied as :func:`build_ovdiff` applies them.

    Args:
        preset: a name in :data:`PRESETS` or a :class:`Preset`.
        device: decides ``fp16`` when that is None (float16 on CUDA, see
            :func:`~ovdiff_core.backends.loading.best_dtype`); None = the best device.
        fp16: the models run in float16: SD needs its fp16 variant files, DINO/DINOv2
            accept a local ``model.fp16.safetensors``; None = from ``device``.
    """
    from ovdiff_core.backends.loading import best_device, best_dtype

    p = _preset(preset)
    g = env_generation(p.generation)
    if fp16 is None:
        dev = torch.device(device) if device is not None else best_device()
        fp16 = best_dtype(dev) == torch.float16
    refs: dict[tuple[str, str, str | None], ModelRef] = {}

    def add(ref: ModelRef) -> None:
        key = (ref.kind, ref.model_id, ref.revision)
        old = refs.get(key)
        if old is not None and ref.safety_checker and not old.safety_checker:
            refs[key] = replace(old, safety_checker=True)
        elif old is None:
            refs[key] = ref

    # SDFeatureExtractor loads the pipeline with its safety checker (shared instance).
    sd_extractor = any(e.kind == "sd" and e.model_id is None for e in p.extractors)
    add(ModelRef("sd", g.model_id, g.revision, fp16, g.safety_checker or sd_extractor))
    if g.decoder_id is not None:
        add(ModelRef("taesd", g.decoder_id))
    kinds: list[ExtractorConfig] = list(p.extractors)
    proposer = p.proposer if p.generation.masks.proposer == "features" else None
    if proposer is not None and proposer not in {e.kind for e in p.extractors}:
        kinds.append(ExtractorConfig(proposer))
    if p.scorer is not None:
        kinds.append(p.scorer)
    for cfg in kinds:
        if cfg.kind == "sd":
            if cfg.model_id is not None:
                add(ModelRef("sd", cfg.model_id, cfg.revision, fp16, True))
            continue
        mid = cfg.model_id or default_model_id(cfg.kind)
        add(ModelRef(cfg.kind, mid, cfg.revision, fp16 and cfg.kind in ("dino", "dinov2")))
    return list(refs.values())


def check_preset_models(
    preset: str | Preset,
    device: torch.device | str | None = None,
    cache_dir: str | None = None,
    dtype: torch.dtype | None = None,
) -> list[MissingModel]:
    """The models of ``preset`` (:func:`preset_models`) that are not complete on disk:
    not downloaded, or with missing or broken files. No network, no weights loaded.

    Args:
        preset: a name in :data:`PRESETS` or a :class:`Preset`.
        device: decides whether the SD fp16 files are the ones needed (when ``dtype``
            is None).
        cache_dir: hub cache; None = the default (``HF_HUB_CACHE``).
        dtype: the weights dtype; float16 needs the SD fp16 files.

    Returns:
        One :class:`~ovdiff_core.backends.loading.MissingModel` per incomplete model
        (``.describe()`` says what is wrong and the command that fixes it); empty when
        every model is ready.
    """
    fp16 = None if dtype is None else dtype == torch.float16
    refs = preset_models(preset, device, fp16)
    return [m for r in refs if (m := check_model(r, cache_dir))]


def _prepare_models(refs: list[ModelRef], progress: ProgressFn | None) -> None:
    """Preflight: check every model, then either fail once listing all the missing ones
    (hub unusable) or download just their missing or broken files."""
    from ovdiff_core.backends.loading import _why_offline, ensure_model

    if progress is not None:
        progress("check", 0.0, f"Checking the files of {len(refs)} models...")
    missing = [m for r in refs if (m := check_model(r))]
    if not missing:
        return
    local = [m for m in missing if m.local]
    why = _why_offline() if len(local) < len(missing) else None
    if local or why is not None:
        raise MissingModelsError(missing, why or "a local directory is never changed by the loader")
    for i, m in enumerate(missing):
        prefix = f"Downloading {m.model.label} ({i + 1}/{len(missing)})"
        if progress is not None:
            progress("download", None, f"{prefix}...")
        ensure_model(m.model, progress=progress, prefix=prefix)


def _load_model(ref: ModelRef, dev: torch.device, dt: torch.dtype) -> None:
    """Load ``ref`` into the process-wide shared instances (the builders reuse them)."""
    from ovdiff_core.backends.extractors import DinoExtractor, load_open_clip
    from ovdiff_core.backends.loading import load_sd_pipeline, load_taesd

    if ref.kind == "sd":
        load_sd_pipeline(ref.model_id, ref.revision, dev, dt, safety_checker=False)
        if ref.safety_checker:
            load_sd_pipeline(ref.model_id, ref.revision, dev, dt, safety_checker=True)
    elif ref.kind == "taesd":
        load_taesd(ref.model_id, dev, dt, ref.revision)
    elif ref.kind in ("dino", "dinov2"):
        DinoExtractor.from_pretrained(ref.model_id, ref.revision, dev, dt, kind=ref.kind)
    else:
        load_open_clip(ref.model_id, ref.revision, dev, dt)


def _real_components(
    p: Preset,
    device: torch.device | str | None,
    progress: ProgressFn | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[Any, list[FeatureExtractor], Any]:
    from ovdiff_core.backends.extractors import ClipExtractor, DinoExtractor, SDFeatureExtractor
    from ovdiff_core.backends.generator import SDSupportGenerator
    from ovdiff_core.backends.loading import best_device, best_dtype
    from ovdiff_core.backends.scorer import ClipScorer

    dev = torch.device(device) if device is not None else best_device()
    dt = dtype if dtype is not None else best_dtype(dev)
    refs = preset_models(p, dev, fp16=dt == torch.float16)
    _prepare_models(refs, progress)
    for i, ref in enumerate(refs):
        if progress is not None:
            progress("load", i / len(refs), f"Loading {ref.label} ({i + 1}/{len(refs)})...")
        _load_model(ref, dev, dt)

    def make(cfg: ExtractorConfig) -> FeatureExtractor:
        kwargs = _extractor_kwargs(cfg)
        if cfg.kind == "sd":
            if cfg.model_id is None:  # share the generator's UNet (one copy of the weights)
                mid, rev = p.generation.model_id, p.generation.revision
            else:
                mid, rev = cfg.model_id, cfg.revision
            if "layer" in kwargs:
                raise ValueError("ExtractorConfig.layer is not used by 'sd'; SD layers are fixed")
            return SDFeatureExtractor.from_pretrained(mid, rev, dev, dt, **kwargs)
        if cfg.kind in ("dino", "dinov2"):
            return DinoExtractor.from_pretrained(
                cfg.model_id, cfg.revision, dev, dt, kind=cfg.kind, **kwargs
            )
        return ClipExtractor.from_pretrained(cfg.model_id, cfg.revision, dev, dt, **kwargs)

    p = p.replace(generation=env_generation(p.generation))
    built = {cfg.name: make(cfg) for cfg in p.extractors}
    proposer_extractor = _proposer_extractor(p, built, make)
    generator = SDSupportGenerator.from_pretrained(
        p.generation, extractor=proposer_extractor, device=dev, dtype=dt
    )
    scorer = None
    if p.scorer is not None:
        scorer = ClipScorer.from_pretrained(p.scorer.model_id, p.scorer.revision, dev, dt)
    if progress is not None:
        progress("ready", 1.0, f"{len(refs)} models ready")
    return generator, _ordered(p, built), scorer


def env_generation(config: GenerationConfig) -> GenerationConfig:
    """``config`` with ``$OVDIFF_SD_MODEL`` / ``$OVDIFF_TAESD_MODEL`` (when set) as its
    model and decoder ids: point a preset at local copies without editing it. The
    decoder variable applies only to presets that use a tiny decoder."""
    changes: dict[str, Any] = {}
    sd = os.environ.get(MODELS["sd"].env, "").strip()
    if sd:
        changes.update(model_id=sd, revision=None)
    taesd = os.environ.get(MODELS["taesd"].env, "").strip()
    if taesd and config.decoder_id is not None:
        changes["decoder_id"] = taesd
    return config.replace(**changes) if changes else config


def _proposer_extractor(
    p: Preset, built: dict[str, FeatureExtractor], make: Any
) -> FeatureExtractor | None:
    if p.proposer is None or p.generation.masks.proposer != "features":
        return None
    if p.proposer in built:
        return built[p.proposer]
    return make(ExtractorConfig(p.proposer))


def tiny_generation(config: GenerationConfig) -> GenerationConfig:
    """``config`` at toy scale for the tiny pipeline: 64 px, 2 steps, 4 images in batches
    of 2, no decoder swap or safety checker; prompts, guidance, scheduler, masks kept."""
    return config.replace(
        model_id="tiny-sd",
        revision=None,
        decoder_id=None,
        resolution=TINY_RESOLUTION,
        steps=min(config.steps, TINY_STEPS),
        n_images=min(config.n_images, TINY_IMAGES),
        batch_size=min(config.batch_size, TINY_BATCH),
        safety_checker=False,
        proposer_input_size=None,
    )


def _tiny_components(
    p: Preset,
    device: torch.device | str | None,
    seed: int,
    dtype: torch.dtype | None = None,
    support_size: int | None = None,
) -> tuple[Any, list[FeatureExtractor], Any]:
    import open_clip

    from ovdiff_core.backends.extractors import ClipExtractor, DinoExtractor, SDFeatureExtractor
    from ovdiff_core.backends.generator import SDSupportGenerator
    from ovdiff_core.backends.loading import best_dtype, shared
    from ovdiff_core.backends.proposer import make_proposer
    from ovdiff_core.backends.scorer import ClipScorer
    from ovdiff_core.backends.tiny_sd import tiny_sd_pipeline
    from ovdiff_core.backends.tiny_vision import tiny_dino, tiny_dinov2, tiny_open_clip

    dev = torch.device(device) if device is not None else torch.device("cpu")
    dt = dtype if dtype is not None else best_dtype(dev)

    def on_device(model: Any) -> Any:  # built in float32
        return model.to(dev) if dt == torch.float32 else model.to(dev, dt)

    # One instance per tiny model per process (and device, dtype), like the real models.
    pipe = shared(("tiny_sd", seed, str(dev), str(dt)), lambda: on_device(tiny_sd_pipeline(seed)))
    clip = shared(("tiny_clip", seed, str(dev), str(dt)), lambda: on_device(tiny_open_clip(seed)))
    tag = f"tiny:seed={seed}"

    def make(cfg: ExtractorConfig) -> FeatureExtractor:
        kwargs = _extractor_kwargs(cfg)
        if cfg.kind == "sd":
            return SDFeatureExtractor.from_pipeline(pipe, model_id=f"{tag}:sd", **kwargs)
        if cfg.kind == "dino":
            key = ("tiny_dino", seed, str(dev), str(dt))
            model = shared(key, lambda: on_device(tiny_dino(seed)))
            return DinoExtractor(model, model_id=f"{tag}:dino", **kwargs)
        if cfg.kind == "dinov2":
            key = ("tiny_dinov2", seed, str(dev), str(dt))
            model = shared(key, lambda: on_device(tiny_dinov2(seed)))
            return DinoExtractor(model, model_id=f"{tag}:dinov2", **kwargs)
        return ClipExtractor(clip, model_id=f"{tag}:clip", **kwargs)

    built = {cfg.name: make(cfg) for cfg in p.extractors}
    generation = tiny_generation(p.generation)
    if support_size is not None:
        generation = generation.replace(n_images=support_size)
    proposer = make_proposer(
        generation.masks, _proposer_extractor(p, built, make), generation.proposer_input_size
    )
    generator = SDSupportGenerator(pipe, generation, proposer, model_name=f"{tag}:sd")
    scorer = None
    if p.scorer is not None:
        tokenizer = open_clip.get_tokenizer("ViT-B-16")  # CLIP's BPE, bundled
        scorer = ClipScorer(clip, tokenizer, model_id=f"{tag}:clip")
    return generator, _ordered(p, built), scorer
