"""Support-set generation with Stable Diffusion (OVDiff stage 1).

:class:`SDSupportGenerator` turns a category name into support images, their
cross-attention attribution maps (:mod:`ovdiff_core.backends.attention`) and
foreground/background masks (:mod:`ovdiff_core.masks` over segments from
:mod:`ovdiff_core.backends.proposer`), batch by batch. It satisfies
:class:`ovdiff_core.protocols.SupportGenerator`.

Two named presets:

* :data:`GENERATION_PAPER`: the authors' settings (SD v1.5, DPM-Solver multistep, 30
  steps, guidance 8.0, 512 px, seed 42 reset per class, batch 8, 32 images). For GPUs.
* :data:`GENERATION_CPU`: one class in about two minutes on a 2-core CPU (measured with
  real-size random-weight architectures, ``benchmarks/bench_generation.py``): SD-Turbo
  (an SD 2.1 UNet distilled for 1-4 steps without guidance), 1 step at 512 px, 8 images,
  with the tiny autoencoder TAESD as decoder. See the preset's comment.

Components are passed in (a ready ``StableDiffusionPipeline``: tests use
:func:`ovdiff_core.backends.tiny_sd.tiny_sd_pipeline`); :meth:`SDSupportGenerator.
from_pretrained` loads real weights through :mod:`ovdiff_core.backends.loading`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, cast

import numpy as np
import torch

from ovdiff_core.backends.attention import AttributionRecorder, capture_cross_attention
from ovdiff_core.backends.proposer import SegmentProposer, ThresholdProposer, make_proposer
from ovdiff_core.backends.tokens import locate_name_tokens
from ovdiff_core.masks import MaskConfig, select_masks_batch
from ovdiff_core.protocols import FeatureExtractor
from ovdiff_core.types import SupportSet

__all__ = [
    "GENERATION_CPU",
    "GENERATION_PAPER",
    "NAME_REMAPS",
    "GenerationConfig",
    "SDSupportGenerator",
]

# Bump when a code change alters generated support sets for equal settings.
GENERATOR_VERSION = 1

# Dataset class names that make poor prompts -> what to ask the generator for.
NAME_REMAPS: tuple[tuple[str, str], ...] = (
    ("diningtable", "table"),
    ("tvmonitor", "monitor"),
    ("pottedplant", "potted plant"),
)

PAPER_NEGATIVE_PROMPT = "text, low quality, blurry, cartoon, meme, low resolution, bad, poor, faded"

_SCHEDULERS = {
    "dpm_multistep": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_ancestral": "EulerAncestralDiscreteScheduler",
    "ddim": "DDIMScheduler",
    "model": None,  # keep the scheduler the model ships with
}


def remap_name(category: str, remaps: Sequence[tuple[str, str]]) -> str:
    """``category`` stripped, or its remap (case-insensitive), e.g. "diningtable" -> "table"."""
    name = category.strip()
    return {k.lower(): v for k, v in remaps}.get(name.lower(), name)


@dataclass(frozen=True)
class GenerationConfig:
    """Everything that determines a generated support set (with the model weights)."""

    model_id: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # SD 1.x/2.x repo or dir
    revision: str | None = None  # hub revision of model_id (None = main)
    decoder_id: str | None = None  # AutoencoderTiny repo/dir replacing the VAE (e.g.
    #   "madebyollin/taesd" for SD 1.x/2.x); None = the model's own VAE
    prompt: str = "A good picture of a {}"  # template; "{}" is the (remapped) category name
    negative_prompt: str = PAPER_NEGATIVE_PROMPT  # used only with guidance (> 1)
    guidance_scale: float = 8.0  # classifier-free guidance; <= 1 turns guidance off
    steps: int = 30  # denoising steps
    scheduler: str = "dpm_multistep"  # dpm_multistep | euler | euler_ancestral | ddim | model
    timestep_spacing: str | None = None  # scheduler override ("trailing" for few-step models)
    resolution: int = 512  # square image side, pixels (multiple of 8)
    seed: int = 42  # latent noise seed, reset for every class
    batch_size: int = 8  # images per pipeline call (and per yielded SupportSet)
    n_images: int = 32  # images per class (fewer if the safety checker drops some)
    map_size: int = 64  # side of the grid attention maps are accumulated on (spec 64)
    safety_checker: bool = True  # drop images the NSFW checker flags (when the model has one)
    name_remaps: tuple[tuple[str, str], ...] = NAME_REMAPS  # (class name, prompt name) pairs
    masks: MaskConfig = field(default_factory=MaskConfig)  # fg/bg selection and proposer
    proposer_input_size: int | None = None  # proposer's extractor input side (None = as is)

    def __post_init__(self) -> None:
        if self.prompt.count("{}") != 1:
            raise ValueError(
                f"GenerationConfig.prompt must contain exactly one '{{}}', got {self.prompt!r}"
            )
        if self.steps < 1:
            raise ValueError(f"GenerationConfig.steps must be >= 1, got {self.steps}")
        if self.resolution < 64 or self.resolution % 8:
            raise ValueError(
                f"GenerationConfig.resolution must be a multiple of 8 and >= 64, "
                f"got {self.resolution}"
            )
        if self.batch_size < 1 or self.n_images < 1:
            raise ValueError(
                "GenerationConfig.batch_size and .n_images must be >= 1, got "
                f"{self.batch_size} and {self.n_images}"
            )
        if self.scheduler not in _SCHEDULERS:
            raise ValueError(
                f"GenerationConfig.scheduler must be one of {sorted(_SCHEDULERS)}, "
                f"got {self.scheduler!r}"
            )
        if self.map_size < 8:
            raise ValueError(f"GenerationConfig.map_size must be >= 8, got {self.map_size}")

    @property
    def guided(self) -> bool:
        """True when classifier-free guidance is on (UNet batch doubles)."""
        return self.guidance_scale > 1.0

    def prompt_name(self, category: str) -> str:
        """The name put into the prompt: the remap of ``category`` if any, else itself."""
        return remap_name(category, self.name_remaps)

    def replace(self, **changes: Any) -> GenerationConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["name_remaps"] = [list(p) for p in self.name_remaps]
        return d


# The authors' settings (spec, stage 1). Needs a GPU: ~7 h per class on a 2-core CPU.
GENERATION_PAPER = GenerationConfig()

# A usable class on a 2-core CPU, chosen by measuring real-size architectures with random
# weights (benchmarks/bench_generation.py: FLOPs per class and end-to-end seconds):
# * SD-Turbo (stabilityai/sd-turbo: SD 2.1 UNet, 866M, adversarially distilled) makes an
#   image in 1 step *without* guidance: one UNet pass per image instead of 2 x 30, i.e.
#   60x less UNet work than the paper at equal resolution. Guided alternatives (SD 1.5 with
#   10 steps at 256 px, the distilled BK-SDM-Tiny UNet) cost 2-10x more per class and still
#   make poor images with so few steps.
# * 512 px, SD-Turbo's training resolution: 1 step at 512 px costs the same FLOPs as
#   2 steps at 384 px, and off-resolution images are worse support images. Attribution
#   then comes from the one (t=999) step: coarser maps, but masks take their shape from
#   the proposer's segments; the maps only rank them.
# * TAESD decodes a 512 px image with 141 GFLOP instead of the full VAE decoder's 2515
#   (which alone would cost 3x the UNet step).
# * 8 images in 2 batches of 4 (the first batch streams after half the time); feature-
#   cluster masks on a 224 px proposer input (DINO ViT-B/8: 28 x 28 cells).
# No safety checker ships with SD-Turbo: with safety_checker=True nothing is filtered
# unless the loader adds one (spec() records whether one ran).
GENERATION_CPU = GenerationConfig(
    model_id="stabilityai/sd-turbo",
    decoder_id="madebyollin/taesd",
    guidance_scale=0.0,
    steps=1,
    scheduler="euler",
    timestep_spacing="trailing",
    resolution=512,
    seed=42,
    batch_size=4,
    n_images=8,
    proposer_input_size=224,
)


def _to_uint8(images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) float in [0, 1] -> uint8, rounding."""
    return (np.clip(images, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def _weights_fingerprint(modules: list[torch.nn.Module]) -> str:
    """Short hash of a few values of every parameter (identifies unnamed pipelines)."""
    h = hashlib.sha256()
    for module in modules:
        for name, p in module.state_dict().items():
            flat = p.detach().reshape(-1)
            sample = torch.cat([flat[:16], flat[-16:]]).float().cpu().numpy()
            h.update(name.encode())
            h.update(str(tuple(p.shape)).encode())
            h.update(sample.tobytes())
    return h.hexdigest()[:16]


class SDSupportGenerator:
    """Stable Diffusion support-set generator (satisfies ``SupportGenerator``).

    Args:
        pipeline: a ``diffusers.StableDiffusionPipeline`` (SD 1.x or 2.x). Not modified:
            the generator builds its own pipeline object sharing the components, with the
            configured scheduler and decoder. Attention processors of the UNet's
            cross-attention layers are swapped only for the duration of a batch.
        config: generation settings (:data:`GENERATION_PAPER` by default).
        proposer: segment proposer for masks; None = :class:`ThresholdProposer` (valid
            only with ``config.masks.proposer == "threshold"``).
        model_name: identity of the weights for :meth:`spec`; default: ``config.model_id``
            and revision when loaded by :meth:`from_pretrained`, else the pipeline's
            ``name_or_path``, else a fingerprint of the weights.
        decoder: optional ``AutoencoderTiny`` replacing the pipeline's VAE for decoding.
    """

    def __init__(
        self,
        pipeline: Any,
        config: GenerationConfig = GENERATION_PAPER,
        proposer: SegmentProposer | None = None,
        model_name: str | None = None,
        decoder: Any | None = None,
    ) -> None:
        if proposer is None:
            if config.masks.proposer != "threshold":
                raise ValueError(
                    "SDSupportGenerator needs a proposer when config.masks.proposer is "
                    "'features': pass proposer=FeatureClusterProposer(extractor) (or "
                    "make_proposer(config.masks, extractor)), or use "
                    "config.replace(masks=MaskConfig(proposer='threshold'))"
                )
            proposer = ThresholdProposer()
        self.config = config
        self.proposer = proposer
        self.pipe = self._own_pipeline(pipeline, config, decoder)
        self.decoder_name = None if decoder is None else (config.decoder_id or "custom")
        if model_name is None:
            model_name = getattr(pipeline, "name_or_path", None) or (
                "weights:" + _weights_fingerprint([pipeline.unet, pipeline.text_encoder])
            )
        self.model_name = model_name

    @staticmethod
    def _own_pipeline(pipeline: Any, config: GenerationConfig, decoder: Any | None) -> Any:
        import diffusers

        components = dict(pipeline.components)
        cls_name = _SCHEDULERS[config.scheduler]
        sched_cls = type(pipeline.scheduler) if cls_name is None else getattr(diffusers, cls_name)
        overrides: dict[str, Any] = {}
        if cls_name == "DDIMScheduler":  # SD's DDIM settings unless the model says otherwise
            for key, value in (("clip_sample", False), ("set_alpha_to_one", False)):
                if key not in pipeline.scheduler.config:
                    overrides[key] = value
        if config.timestep_spacing is not None:
            overrides["timestep_spacing"] = config.timestep_spacing
        components["scheduler"] = sched_cls.from_config(pipeline.scheduler.config, **overrides)
        if decoder is not None:
            components["vae"] = decoder
        has_checker = components.get("safety_checker") is not None
        if not config.safety_checker:
            components["safety_checker"] = None
        pipe = type(pipeline)(
            **components,
            requires_safety_checker=bool(config.safety_checker and has_checker),
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @classmethod
    def from_pretrained(
        cls,
        config: GenerationConfig = GENERATION_PAPER,
        extractor: FeatureExtractor | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> SDSupportGenerator:
        """Load the configured model (and decoder) and build the generator.

        Args:
            config: settings, including ``model_id``, ``revision`` and ``decoder_id``.
            extractor: feature extractor for the mask proposer (DINO in practice);
                required when ``config.masks.proposer == "features"``.
            device, dtype: default :func:`~ovdiff_core.backends.loading.best_device` and
                :func:`~ovdiff_core.backends.loading.best_dtype`.

        Raises:
            ModelNotAvailableError: weights not on disk and the hub unreachable.
        """
        from ovdiff_core.backends.loading import (
            best_device,
            best_dtype,
            load_sd_pipeline,
            load_taesd,
        )

        dev = torch.device(device) if device is not None else best_device()
        dt = dtype if dtype is not None else best_dtype(dev)
        proposer = make_proposer(config.masks, extractor, config.proposer_input_size)
        pipe = load_sd_pipeline(
            config.model_id, config.revision, dev, dt, safety_checker=config.safety_checker
        )
        decoder = None
        if config.decoder_id is not None:
            decoder = load_taesd(config.decoder_id, dev, dt)
        name = config.model_id + (f"@{config.revision}" if config.revision else "")
        return cls(pipe, config, proposer, model_name=name, decoder=decoder)

    # ----------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return cast(torch.device, self.pipe.unet.device)

    @property
    def dtype(self) -> torch.dtype:
        return cast(torch.dtype, self.pipe.unet.dtype)

    def spec(self, category: str) -> dict[str, Any]:
        """JSON-serialisable identity of the support set of ``category``.

        Equal specs mean equal outputs: it holds the prompt, the name's token positions,
        every generation setting, model and decoder identity, scheduler, dtype, device
        type, mask settings and the proposer's spec.
        """
        cfg = self.config
        tokens = locate_name_tokens(self.pipe.tokenizer, cfg.prompt, cfg.prompt_name(category))
        settings = cfg.to_dict()
        for key in ("model_id", "revision", "decoder_id", "name_remaps", "prompt"):
            settings.pop(key)
        if not cfg.guided:
            settings["negative_prompt"] = None
        settings["safety_checker"] = self.pipe.safety_checker is not None
        return {
            "type": "sd_support",
            "version": GENERATOR_VERSION,
            "category": category,
            "prompt": tokens.prompt,
            "token_positions": list(tokens.positions),
            "model": self.model_name,
            "decoder": self.decoder_name,
            "scheduler_class": type(self.pipe.scheduler).__name__,
            "dtype": str(self.dtype).replace("torch.", ""),
            "device": self.device.type,
            "proposer": self.proposer.spec(),
            **settings,
        }

    def generate(self, category: str) -> Iterator[SupportSet]:
        """Generate ``category``'s support set, one :class:`SupportSet` per batch.

        Each yielded set holds that batch's images (config.resolution square, uint8),
        attribution maps and masks; ``settings == spec(category)``. Images flagged by the
        safety checker are dropped (a fully flagged batch yields nothing), so the total
        can be below ``n_images``.
        """
        cfg = self.config
        spec = self.spec(category)
        positions = spec["token_positions"]
        latent = cfg.resolution // int(self.pipe.vae_scale_factor)
        gen = torch.Generator(device="cpu").manual_seed(cfg.seed)  # reset per class
        done = 0
        while done < cfg.n_images:
            count = min(cfg.batch_size, cfg.n_images - done)
            done += count
            recorder = AttributionRecorder(positions, count, (latent, latent), cfg.map_size)
            # Latents are drawn on the CPU so that equal seeds give equal images anywhere.
            latents = torch.randn(
                (count, self.pipe.unet.config.in_channels, latent, latent),
                generator=gen,
                dtype=torch.float32,
            ).to(self.device, self.dtype)
            with torch.no_grad(), capture_cross_attention(self.pipe.unet, recorder):
                out = self.pipe(
                    prompt=spec["prompt"],
                    negative_prompt=cfg.negative_prompt if cfg.guided else None,
                    num_images_per_prompt=count,
                    num_inference_steps=cfg.steps,
                    guidance_scale=cfg.guidance_scale,
                    height=cfg.resolution,
                    width=cfg.resolution,
                    latents=latents,
                    output_type="np",
                )
            images = _to_uint8(np.asarray(out.images, dtype=np.float32))
            attributions = recorder.attribution((cfg.resolution, cfg.resolution))
            flagged = getattr(out, "nsfw_content_detected", None)
            if flagged is not None:
                keep = np.array([not f for f in flagged], dtype=bool)
                images, attributions = images[keep], attributions[keep]
            if len(images) == 0:
                continue
            segments = self.proposer(images)
            fg, bg, _ = select_masks_batch(attributions, segments, cfg.masks)
            yield SupportSet(
                category=category,
                images=images,
                attributions=attributions,
                foreground=fg,
                background=bg,
                settings=spec,
            )
