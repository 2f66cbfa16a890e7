"""Support sets from the user's own photos ("bring your own support images").

Instead of generating support images, the user uploads a few photos of the category
(optionally with a drawn mask each). Attribution is read the same way as during
generation, with one UNet pass per batch instead of a whole sampling run: the photo is
encoded with the VAE, noised to timestep ``t`` (200 by default, the timestep OVDiff uses
for its SD features: the image is still clearly recognisable, yet the UNet attends to
the text), and passed once through the UNet with the category prompt (no guidance); the
cross-attention of the name's tokens is captured exactly as in
:mod:`ovdiff_core.backends.attention`. Foreground/background then follow
:mod:`ovdiff_core.masks` over the proposer's segments.

A user-drawn mask overrides the automatic foreground of its photo: foreground = the mask,
background = everything outside it, eroded by the configured radius (the user has said
what the object is; all the rest of the photo is treated as not-the-object).

Photos of any size are resized (stretched, not cropped, so nothing the user drew is cut
off) to a ``resolution`` x ``resolution`` square: a support set needs one image size.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F

from ovdiff_core.backends.attention import AttributionRecorder, capture_cross_attention
from ovdiff_core.backends.generator import (
    NAME_REMAPS,
    GenerationConfig,
    SDSupportGenerator,
    remap_name,
)
from ovdiff_core.backends.proposer import SegmentProposer, ThresholdProposer, make_proposer
from ovdiff_core.backends.tokens import locate_name_tokens
from ovdiff_core.masks import MaskConfig, erode, select_masks_batch
from ovdiff_core.protocols import FeatureExtractor
from ovdiff_core.types import SupportSet

__all__ = ["INCONTEXT_CPU", "INCONTEXT_DEFAULT", "InContextConfig", "InContextSupport"]

INCONTEXT_VERSION = 1


@dataclass(frozen=True)
class InContextConfig:
    """How support sets are made from user photos."""

    model_id: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # SD 1.x/2.x repo or dir
    revision: str | None = None  # hub revision of model_id
    encoder_id: str | None = None  # AutoencoderTiny repo/dir used to encode (e.g.
    #   "madebyollin/taesd", much faster on CPUs); None = the model's own VAE
    prompt: str = "A good picture of a {}"  # template; "{}" is the (remapped) category name
    resolution: int = 512  # photos are resized to this square side, pixels (multiple of 8)
    timestep: int = 200  # noise level of the single UNet pass, in [0, 999]
    seed: int = 0  # seed of the added noise
    batch_size: int = 4  # photos per UNet pass
    map_size: int = 64  # side of the grid attention maps are accumulated on
    name_remaps: tuple[tuple[str, str], ...] = NAME_REMAPS  # (class name, prompt name)
    masks: MaskConfig = field(default_factory=MaskConfig)  # fg/bg rule and proposer
    proposer_input_size: int | None = None  # proposer's extractor input side (None = as is)

    def __post_init__(self) -> None:
        if self.prompt.count("{}") != 1:
            raise ValueError(
                f"InContextConfig.prompt must contain exactly one '{{}}', got {self.prompt!r}"
            )
        if self.resolution < 64 or self.resolution % 8:
            raise ValueError(
                "InContextConfig.resolution must be a multiple of 8 and >= 64, "
                f"got {self.resolution}"
            )
        if not 0 <= self.timestep <= 999:
            raise ValueError(f"InContextConfig.timestep must be in [0, 999], got {self.timestep}")
        if self.batch_size < 1:
            raise ValueError(f"InContextConfig.batch_size must be >= 1, got {self.batch_size}")

    def prompt_name(self, category: str) -> str:
        return remap_name(category, self.name_remaps)

    @classmethod
    def from_generation(cls, config: GenerationConfig) -> InContextConfig:
        """The in-context settings that match a generator's: same model, decoder (as the
        encoder), prompt, resolution, attention grid, name remaps, mask rules and proposer
        input size; the in-context fields of its own (timestep, noise seed, batch) keep
        their defaults."""
        return cls(
            model_id=config.model_id,
            revision=config.revision,
            encoder_id=config.decoder_id,
            prompt=config.prompt,
            resolution=config.resolution,
            map_size=config.map_size,
            name_remaps=config.name_remaps,
            masks=config.masks,
            proposer_input_size=config.proposer_input_size,
        )

    def replace(self, **changes: Any) -> InContextConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["name_remaps"] = [list(p) for p in self.name_remaps]
        return d


INCONTEXT_DEFAULT = InContextConfig()
# CPU: the tiny autoencoder encodes in milliseconds; 384 px halves the UNet pass.
INCONTEXT_CPU = InContextConfig(
    model_id="stabilityai/sd-turbo",
    encoder_id="madebyollin/taesd",
    resolution=384,
    proposer_input_size=224,
)


def _resize_image(image: np.ndarray, size: int) -> np.ndarray:
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    return x[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def _resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    x = torch.from_numpy(mask.astype(np.float32))[None, None]
    return (F.interpolate(x, size=(size, size), mode="nearest")[0, 0] > 0.5).numpy()


def _inputs_digest(images: Sequence[np.ndarray], masks: Sequence[np.ndarray | None]) -> str:
    h = hashlib.sha256()
    for img, mask in zip(images, masks, strict=True):
        h.update(str(img.shape).encode())
        h.update(np.ascontiguousarray(img).tobytes())
        if mask is None:
            h.update(b"no-mask")
        else:
            h.update(np.packbits(np.ascontiguousarray(mask, dtype=bool)).tobytes())
    return h.hexdigest()


class InContextSupport:
    """Support sets from user photos (see module docstring).

    Args:
        pipeline: a ``diffusers.StableDiffusionPipeline`` (its VAE, text encoder,
            tokenizer, UNet and scheduler's noise schedule are used; it is not modified).
        config: settings.
        proposer: segment proposer; None = :class:`ThresholdProposer` (valid only with
            ``config.masks.proposer == "threshold"``).
        model_name: identity of the weights for the settings (default: the pipeline's
            ``name_or_path``).
        encoder: optional ``AutoencoderTiny`` used instead of the pipeline's VAE.
    """

    def __init__(
        self,
        pipeline: Any,
        config: InContextConfig = INCONTEXT_DEFAULT,
        proposer: SegmentProposer | None = None,
        model_name: str | None = None,
        encoder: Any | None = None,
    ) -> None:
        if proposer is None:
            if config.masks.proposer != "threshold":
                raise ValueError(
                    "InContextSupport needs a proposer when config.masks.proposer is "
                    "'features': pass proposer=FeatureClusterProposer(extractor), or use "
                    "config.replace(masks=MaskConfig(proposer='threshold'))"
                )
            proposer = ThresholdProposer()
        self.pipe = pipeline
        self.config = config
        self.proposer = proposer
        self.encoder = encoder if encoder is not None else pipeline.vae
        self.encoder_name = None if encoder is None else (config.encoder_id or "custom")
        self.model_name = model_name or getattr(pipeline, "name_or_path", None) or "unnamed"

    @classmethod
    def from_pretrained(
        cls,
        config: InContextConfig = INCONTEXT_DEFAULT,
        extractor: FeatureExtractor | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> InContextSupport:
        """Load the configured model (shared with the generator when ids match).

        Raises:
            ModelNotAvailableError: weights not on disk and the hub unreachable.
            ValueError: ``config.masks.proposer == "features"`` without an extractor.
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
        # safety_checker=True shares the instance with a default-configured generator (the
        # loader caches per argument set); in-context mode never runs the checker.
        pipe = load_sd_pipeline(config.model_id, config.revision, dev, dt, safety_checker=True)
        encoder = None
        if config.encoder_id is not None:
            encoder = load_taesd(config.encoder_id, dev, dt)
        name = config.model_id + (f"@{config.revision}" if config.revision else "")
        return cls(pipe, config, proposer, model_name=name, encoder=encoder)

    @classmethod
    def from_generator(cls, generator: SDSupportGenerator) -> InContextSupport:
        """Support from photos sharing ``generator``'s pipeline (its decoder, if any,
        encodes), proposer and settings (:meth:`InContextConfig.from_generation`): the
        photos of a category are read as the generator's images of it are."""
        config = InContextConfig.from_generation(generator.config)
        encoder = generator.pipe.vae if config.encoder_id is not None else None
        return cls(
            generator.pipe,
            config,
            generator.proposer,
            model_name=generator.model_name,
            encoder=encoder,
        )

    @property
    def device(self) -> torch.device:
        return cast(torch.device, self.pipe.unet.device)

    @property
    def dtype(self) -> torch.dtype:
        return cast(torch.dtype, self.pipe.unet.dtype)

    def _check(
        self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray | None] | None
    ) -> list[np.ndarray | None]:
        if len(images) == 0:
            raise ValueError("images must hold at least one (H, W, 3) uint8 photo")
        for i, img in enumerate(images):
            if img.ndim != 3 or img.shape[-1] != 3 or img.dtype != np.uint8:
                raise ValueError(
                    f"images[{i}] must be an (H, W, 3) uint8 RGB array, got {img.shape} {img.dtype}"
                )
        if masks is None:
            return [None] * len(images)
        if len(masks) != len(images):
            raise ValueError(
                f"masks must hold one entry (an (H, W) bool array or None) per image: "
                f"{len(masks)} masks for {len(images)} images"
            )
        for i, (img, mask) in enumerate(zip(images, masks, strict=True)):
            if mask is None:
                continue
            if mask.shape != img.shape[:2] or mask.dtype != np.bool_:
                raise ValueError(
                    f"masks[{i}] must be an (H, W) = {img.shape[:2]} bool array like its "
                    f"image, got {mask.shape} {mask.dtype}"
                )
            if not mask.any():
                raise ValueError(f"masks[{i}] is empty; draw the object or pass None")
        return list(masks)

    def spec(
        self,
        category: str,
        images: Sequence[np.ndarray],
        masks: Sequence[np.ndarray | None] | None = None,
    ) -> dict[str, Any]:
        """JSON-serialisable identity of the support set (includes a digest of the inputs)."""
        cfg = self.config
        mask_list = self._check(images, masks)
        tokens = locate_name_tokens(self.pipe.tokenizer, cfg.prompt, cfg.prompt_name(category))
        settings = cfg.to_dict()
        for key in ("model_id", "revision", "encoder_id", "name_remaps", "prompt"):
            settings.pop(key)
        return {
            "type": "incontext_support",
            "version": INCONTEXT_VERSION,
            "category": category,
            "prompt": tokens.prompt,
            "token_positions": list(tokens.positions),
            "model": self.model_name,
            "encoder": self.encoder_name,
            "dtype": str(self.dtype).replace("torch.", ""),
            "device": self.device.type,
            "proposer": self.proposer.spec(),
            "inputs": _inputs_digest(images, mask_list),
            "n_images": len(images),
            **settings,
        }

    def _encode(self, images: np.ndarray) -> torch.Tensor:
        """(B, H, W, 3) uint8 -> (B, 4, H/8, W/8) scaled latents on the UNet's device."""
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        x = x.to(self.encoder.device, self.encoder.dtype)
        out = self.encoder.encode(x)
        # AutoencoderKL: the posterior mean (deterministic); AutoencoderTiny: its latents.
        z = out.latent_dist.mean if hasattr(out, "latent_dist") else out.latents
        z = z * float(getattr(self.encoder.config, "scaling_factor", 1.0))
        return z.to(self.device, self.dtype)

    def __call__(
        self,
        category: str,
        images: Sequence[np.ndarray],
        masks: Sequence[np.ndarray | None] | None = None,
    ) -> SupportSet:
        """Build the support set of ``category`` from photos.

        Args:
            category: category name (remapped for the prompt like generation does).
            images: photos, each (H_i, W_i, 3) uint8 RGB, any size.
            masks: optional, one per photo: None (automatic) or an (H_i, W_i) bool mask of
                the object drawn by the user, which becomes the foreground.

        Returns:
            A :class:`SupportSet` of ``len(images)`` images at ``resolution`` x
            ``resolution``; ``settings`` = :meth:`spec`.
        """
        cfg = self.config
        spec = self.spec(category, images, masks)
        mask_list = self._check(images, masks)
        size = cfg.resolution
        resized = np.stack([_resize_image(img, size) for img in images])
        user = [None if m is None else _resize_mask(m, size) for m in mask_list]
        alphas = self.pipe.scheduler.alphas_cumprod
        a_bar = float(alphas[cfg.timestep])
        gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
        t = torch.tensor([cfg.timestep], device=self.device)
        maps = []
        with torch.no_grad():
            for lo in range(0, len(resized), cfg.batch_size):
                batch = resized[lo : lo + cfg.batch_size]
                z = self._encode(batch)
                noise = torch.randn(z.shape, generator=gen, dtype=torch.float32)
                noisy = a_bar**0.5 * z + (1.0 - a_bar) ** 0.5 * noise.to(z.device, z.dtype)
                emb, _ = self.pipe.encode_prompt(
                    spec["prompt"], self.device, len(batch), do_classifier_free_guidance=False
                )
                latent_size = (int(z.shape[-2]), int(z.shape[-1]))
                rec = AttributionRecorder(
                    spec["token_positions"], len(batch), latent_size, cfg.map_size
                )
                with capture_cross_attention(self.pipe.unet, rec):
                    self.pipe.unet(noisy, t.expand(len(batch)), encoder_hidden_states=emb)
                maps.append(rec.attribution((size, size)))
        attributions = np.concatenate(maps)
        segments = self.proposer(resized)
        fg, bg, _ = select_masks_batch(attributions, segments, cfg.masks)
        radius = cfg.masks.erosion_radius((size, size))
        for i, m in enumerate(user):
            if m is not None:
                fg[i] = m
                bg[i] = erode(~m, radius)
        return SupportSet(
            category=category,
            images=resized,
            attributions=attributions,
            foreground=fg,
            background=bg,
            settings=spec,
        )
