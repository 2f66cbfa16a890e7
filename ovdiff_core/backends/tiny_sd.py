"""Offline stand-ins for Stable Diffusion: the real CLIP tokenizer and a tiny random pipeline.

Nothing here touches the network.

* :func:`clip_tokenizer_offline` rebuilds the exact CLIP BPE tokenizer (the one Stable
  Diffusion 1.x uses, 49,408 tokens) from the BPE merge list that ``open_clip`` bundles in
  its wheel (``open_clip/bpe_simple_vocab_16e6.txt.gz``). The ``vocab.json`` and
  ``merges.txt`` files are written once to a cache directory and loaded with
  ``transformers.CLIPTokenizer.from_pretrained(directory)`` (in transformers 5 passing the
  file paths to the constructor silently yields a 3-token tokenizer).
* :func:`tiny_sd_pipeline` builds a ``diffusers.StableDiffusionPipeline`` with the real
  classes (``UNet2DConditionModel``, ``AutoencoderKL``, ``CLIPTextModel``,
  ``DPMSolverMultistepScheduler``) from tiny configs and random weights, deterministic
  given a seed. It keeps the *structure* of SD 1.x that the rest of the project relies on:
  cross-attention (``attn2``) and self-attention (``attn1``) in down, mid and up blocks,
  a VAE that downsamples by 8 to 4 latent channels, 77-token prompts. At 64x64 with 2-4
  steps it runs in about a second on a CPU. Used by tests and by benchmarks.
* :func:`random_sd_pipeline` builds *real-size* architectures (SD 1.5, SD 2.1 / SD-Turbo,
  BK-SDM-Tiny; full VAE or TAESD) with random weights from configs written here from the
  models' published configuration values, for honest CPU timings without downloads.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

__all__ = [
    "SD_ARCHITECTURES",
    "clip_tokenizer_offline",
    "random_sd_pipeline",
    "tiny_sd_pipeline",
    "write_clip_tokenizer_files",
]

CLIP_VOCAB_SIZE = 49408  # 256 bytes x 2 (plain, end-of-word) + 48,894 merges + 2 specials
CLIP_CONTEXT_LENGTH = 77  # tokens per prompt, start and end tokens included
_N_MERGES = 49152 - 256 - 2  # merges CLIP uses from the bundled list (the list is longer)
START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"


def _bundled_bpe_path() -> Path:
    """Path of open_clip's bundled BPE merge list (a gzip text file)."""
    import open_clip

    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise FileNotFoundError(
            f"open_clip's BPE file {path} is missing; reinstall open_clip_torch "
            "(pip install --force-reinstall open_clip_torch)"
        )
    return path


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode character table (256 entries).

    Printable Latin-1 bytes map to themselves; the remaining bytes map, in increasing
    byte order, to the characters 256, 257, ... The *order of the values* (printable
    bytes first) is the order of the first 256 vocabulary entries.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _clip_vocab_and_merges(bpe_path: Path) -> tuple[dict[str, int], list[str]]:
    """CLIP's token->id table and merge list, rebuilt from the bundled BPE file."""
    lines = gzip.decompress(bpe_path.read_bytes()).decode("utf-8").split("\n")
    merges = lines[1 : _N_MERGES + 1]  # line 0 is a version header
    if len(merges) != _N_MERGES or any(len(m.split()) != 2 for m in merges):
        raise ValueError(f"{bpe_path} does not look like CLIP's BPE merge list")
    base = list(_bytes_to_unicode().values())
    tokens = base + [t + "</w>" for t in base]
    tokens += ["".join(m.split()) for m in merges]
    tokens += [START_TOKEN, END_TOKEN]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != CLIP_VOCAB_SIZE:
        raise ValueError(f"rebuilt CLIP vocabulary has {len(vocab)} tokens, expected 49408")
    return vocab, merges


def write_clip_tokenizer_files(directory: str | os.PathLike[str]) -> Path:
    """Write CLIP's ``vocab.json``, ``merges.txt`` and tokenizer config into ``directory``.

    The directory is created if needed; existing files are overwritten. Returns it as a
    :class:`~pathlib.Path`, ready for ``CLIPTokenizer.from_pretrained``.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = _clip_vocab_and_merges(_bundled_bpe_path())
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": CLIP_CONTEXT_LENGTH,
        "bos_token": START_TOKEN,
        "eos_token": END_TOKEN,
        "unk_token": END_TOKEN,
        "pad_token": END_TOKEN,  # SD 1.x pads with the end token (SD 2.x with "!")
        "do_lower_case": True,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
    special = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=1), encoding="utf-8")
    return out


def _default_cache_root() -> Path:
    from ovdiff_core.cache import default_cache_dir

    return default_cache_dir()


def clip_tokenizer_offline(cache_dir: str | os.PathLike[str] | None = None) -> CLIPTokenizer:
    """The real CLIP tokenizer (SD 1.x's), rebuilt offline from open_clip's BPE file.

    Token ids are identical to ``open_clip.get_tokenizer("ViT-B-16")`` and to
    ``openai/clip-vit-large-patch14``'s tokenizer: start token 49406, end/pad token 49407,
    ``model_max_length`` 77.

    Args:
        cache_dir: where the rebuilt files are kept. Default:
            ``$OVDIFF_CACHE`` or ``~/.cache/ovdiff`` (``$XDG_CACHE_HOME/ovdiff``); the
            files go into a sub-directory named after the BPE file's hash. Written once,
            atomically, so concurrent processes are safe.

    Returns:
        A fresh ``transformers.CLIPTokenizer`` (callers may modify it).
    """
    from transformers import CLIPTokenizer

    bpe = _bundled_bpe_path()
    digest = hashlib.sha256(bpe.read_bytes()).hexdigest()[:16]
    root = Path(cache_dir) if cache_dir is not None else _default_cache_root()
    target = root / f"clip-tokenizer-{digest}"
    if not (target / "tokenizer_config.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".clip-tokenizer-", dir=root))
        try:
            write_clip_tokenizer_files(tmp)
            try:
                tmp.rename(target)
            except OSError:
                if not (target / "tokenizer_config.json").is_file():  # not a lost race
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = CLIPTokenizer.from_pretrained(str(target))
    if len(tokenizer) != CLIP_VOCAB_SIZE:
        raise RuntimeError(
            f"CLIPTokenizer loaded from {target} has {len(tokenizer)} tokens, expected "
            f"{CLIP_VOCAB_SIZE}; delete that directory to rebuild it"
        )
    return tokenizer


def tiny_sd_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """A tiny Stable-Diffusion-1.x-shaped pipeline with random weights (CPU, float32).

    Components (all the real diffusers/transformers classes):

    * UNet: ``block_out_channels=(32, 64)``, two cross-attention down blocks and two
      cross-attention up blocks plus the cross-attention mid block (so ``attn2`` layers at
      two resolutions, like SD's several), ``cross_attention_dim=32``, 8 heads of 4/8
      channels, ``norm_num_groups=8``, ``sample_size=8`` (64 px images).
    * VAE: ``AutoencoderKL`` with 4 blocks (downsamples by 8), 4 latent channels,
      ``scaling_factor=0.18215``.
    * Text encoder: ``CLIPTextModel`` hidden 32, 2 layers, 4 heads, vocabulary 49,408,
      77 positions; tokenizer: :func:`clip_tokenizer_offline`.
    * Scheduler: ``DPMSolverMultistepScheduler`` with SD 1.x's noise schedule.
    * ``safety_checker=None``, ``feature_extractor=None``, ``requires_safety_checker=False``.

    Args:
        seed: weights are a deterministic function of it; the global torch RNG state is
            left untouched.

    Returns:
        The pipeline, on the CPU, with its progress bar disabled.
    """
    from diffusers import (
        AutoencoderKL,
        DPMSolverMultistepScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,  # diffusers' legacy name: this is the number of heads
            norm_num_groups=8,
        )
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 16, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=64,
            scaling_factor=0.18215,
        )
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=CLIP_VOCAB_SIZE,
                hidden_size=32,
                intermediate_size=37,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=CLIP_CONTEXT_LENGTH,
                projection_dim=32,
                bos_token_id=49406,
                eos_token_id=49407,
                pad_token_id=49407,
            )
        )
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        steps_offset=1,  # SD 1.x's scheduler config (diffusers warns about 0)
        timestep_spacing="leading",
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer_offline(),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    cast(Any, pipe).set_progress_bar_config(disable=True)  # mixin method unknown to mypy
    for module in (unet, vae, text_encoder):
        cast(torch.nn.Module, module).eval()
    return pipe


# Published architecture facts (unet/config.json, text_encoder/config.json of each model).
_UNET_COMMON: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "downsample_padding": 1,
}
_SD_UNET = {
    **_UNET_COMMON,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
}
SD_ARCHITECTURES: dict[str, dict[str, Any]] = {
    # stable-diffusion-v1-5: 860M UNet, 8 heads everywhere, CLIP ViT-L/14 text encoder.
    "sd15": {
        "unet": {**_SD_UNET, "cross_attention_dim": 768, "attention_head_dim": 8},
        "text": {"hidden_size": 768, "layers": 12, "heads": 12, "mlp": 3072, "act": "quick_gelu"},
    },
    # stable-diffusion-2-1(-base) and stabilityai/sd-turbo: 866M UNet, 64-channel heads
    # (5/10/20/20 heads), linear projections, OpenCLIP ViT-H/14 text encoder (23 layers).
    "sd21": {
        "unet": {
            **_SD_UNET,
            "cross_attention_dim": 1024,
            "attention_head_dim": (5, 10, 20, 20),
            "use_linear_projection": True,
        },
        "text": {"hidden_size": 1024, "layers": 23, "heads": 16, "mlp": 4096, "act": "gelu"},
    },
    # nota-ai/bk-sdm-tiny: SD 1.5 UNet without mid block, innermost stage and one
    # block per stage (323M parameters).
    "bk-sdm-tiny": {
        "unet": {
            **_UNET_COMMON,
            "block_out_channels": (320, 640, 1280),
            "layers_per_block": 1,
            "down_block_types": ("CrossAttnDownBlock2D",) * 3,
            "up_block_types": ("CrossAttnUpBlock2D",) * 3,
            "mid_block_type": None,
            "cross_attention_dim": 768,
            "attention_head_dim": 8,
        },
        "text": {"hidden_size": 768, "layers": 12, "heads": 12, "mlp": 3072, "act": "quick_gelu"},
    },
}
SD_ARCHITECTURES["sd-turbo"] = SD_ARCHITECTURES["sd21"]


def random_sd_pipeline(
    arch: str = "sd15", decoder: str = "kl", seed: int = 0
) -> StableDiffusionPipeline:
    """A real-size Stable Diffusion architecture with random weights (CPU, float32).

    Args:
        arch: a key of :data:`SD_ARCHITECTURES` (``"sd15"``, ``"sd21"``/``"sd-turbo"``,
            ``"bk-sdm-tiny"``).
        decoder: ``"kl"`` for SD's full ``AutoencoderKL`` (83M) or ``"tiny"`` for TAESD's
            ``AutoencoderTiny`` (2.4M) as the pipeline's VAE.
        seed: weights seed (global RNG untouched).

    Returns:
        A pipeline with the offline CLIP tokenizer, a DPM-Solver multistep scheduler and
        no safety checker. Building it takes tens of seconds and ~4 GB of memory.
    """
    from diffusers import (
        AutoencoderKL,
        AutoencoderTiny,
        DPMSolverMultistepScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    if arch not in SD_ARCHITECTURES:
        raise ValueError(f"arch must be one of {sorted(SD_ARCHITECTURES)}, got {arch!r}")
    if decoder not in ("kl", "tiny"):
        raise ValueError(f"decoder must be 'kl' or 'tiny', got {decoder!r}")
    spec = SD_ARCHITECTURES[arch]
    t = spec["text"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**spec["unet"])
        vae: Any
        if decoder == "kl":
            vae = AutoencoderKL(
                in_channels=3,
                out_channels=3,
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4,
                block_out_channels=(128, 256, 512, 512),
                layers_per_block=2,
                latent_channels=4,
                norm_num_groups=32,
                sample_size=512,
                scaling_factor=0.18215,
            )
        else:
            vae = AutoencoderTiny()  # diffusers' defaults are TAESD's architecture
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=CLIP_VOCAB_SIZE,
                hidden_size=t["hidden_size"],
                intermediate_size=t["mlp"],
                num_hidden_layers=t["layers"],
                num_attention_heads=t["heads"],
                max_position_embeddings=CLIP_CONTEXT_LENGTH,
                hidden_act=t["act"],
                projection_dim=t["hidden_size"],
                bos_token_id=49406,
                eos_token_id=49407,
                pad_token_id=49407,
            )
        )
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        steps_offset=1,
        timestep_spacing="leading",
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer_offline(),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    cast(Any, pipe).set_progress_bar_config(disable=True)
    for module in (unet, vae, text_encoder):
        cast(torch.nn.Module, module).eval()
    return pipe
