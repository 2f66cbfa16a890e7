"""Hosting settings: what a Space owner can set, and how GPU work is sized for ZeroGPU.

Everything here is read once at start-up from environment variables (a Space's
"Variables" settings), so the same code serves a laptop, a CPU Space and a ZeroGPU Space:

=========================  =================================================================
variable                   meaning (default)
=========================  =================================================================
``OVDIFF_PRESETS``         presets offered, comma-separated (``cpu,paper``; on a CPU-only
                           Space ``cpu``)
``OVDIFF_MAX_SUPPORT``     largest support-set size a visitor may ask for (64; on a CPU-only
                           Space 16; on ZeroGPU the largest that fits one GPU call)
``OVDIFF_CACHE``           cache folder (``/data/ovdiff-cache`` when the Space has persistent
                           storage mounted at ``/data``, else ``~/.cache/ovdiff``)
``OVDIFF_PREBUILD``        names built at start-up so that the Space opens ready (none)
``OVDIFF_SESSION_TTL``     seconds a visitor's categories and segmentation are kept after
                           their last action (1800)
``OVDIFF_MAX_SESSIONS``    visitor sessions kept in memory; the least recently used beyond
                           this are dropped (64)
``OVDIFF_TEMP_MAX_AGE``    seconds after which Gradio's temporary files are deleted (3600)
``OVDIFF_TILES_MAX_MB``    disk budget of the rendered support tiles, MiB (256)
``OVDIFF_GPU_MAX_SECONDS`` longest GPU call to ask ZeroGPU for (120)
=========================  =================================================================

ZeroGPU lends a GPU only for the duration a decorated function asks for (60 s when it
does not say), and aborts the call after that. :func:`build_seconds` and
:func:`segment_seconds` estimate the work from the model's own settings, so each GPU call
asks for what it needs: one call per category for a build, one call per segmentation.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ovdiff_core.backends.presets import PRESETS as BUILT_PRESETS

__all__ = [
    "GPU_MAX_SECONDS",
    "HostingConfig",
    "build_seconds",
    "gpu",
    "limit_malloc_arenas",
    "on_zero_gpu",
    "segment_seconds",
]

# names offered by default, the cpu preset first (what a visitor gets unless they choose)
PRESETS = tuple(sorted(BUILT_PRESETS, key=lambda name: name != "cpu"))
GPU_MAX_SECONDS = 120  # default cap of one ZeroGPU call, seconds
# Measured-on-paper estimates for one A100/H100-class GPU in fp16 (see README, "Spaces"):
SECONDS_PER_IMAGE_STEP = 0.05  # one 512 px UNet step of one image, guidance included
SECONDS_PER_IMAGE_FEATURES = 0.25  # decoding, masks and every extractor, per support image
GPU_OVERHEAD_SECONDS = 10  # GPU attach, model moves, first-call warm-up
SAFETY = 1.5  # margin over the estimate before ZeroGPU would abort the call


def on_zero_gpu() -> bool:
    """Whether this process runs on a ZeroGPU Space (the ``spaces`` package says so)."""
    try:
        import spaces.config  # type: ignore[import-not-found]

        return bool(spaces.config.Config.zero_gpu)
    except (ImportError, AttributeError):
        return os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "true")


def gpu(duration: int | Callable[..., int]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``spaces.GPU(duration=...)`` on ZeroGPU; a no-op decorator anywhere else.

    Args:
        duration: seconds, or a callable with the decorated function's signature that
            returns the seconds for that call (ZeroGPU's dynamic duration).
    """
    if on_zero_gpu():
        import spaces  # type: ignore[import-not-found]

        return spaces.GPU(duration=duration)  # type: ignore[no-any-return]

    def identity(fn: Callable[..., Any]) -> Callable[..., Any]:
        return fn

    return identity


def build_seconds(config: Any, n_images: int, cached: bool = False) -> int:
    """GPU seconds to ask for to build one category.

    Args:
        config: the generator's settings (a ``GenerationConfig``: steps, resolution and
            guidance), or None for a stand-in generator (one unguided 512 px step).
        n_images: support-set size.
        cached: the support set and banks are cached: only loading, no generation.

    Returns:
        whole seconds, at least 15, including a 1.5x safety margin.
    """
    if cached:
        return 15
    steps = int(getattr(config, "steps", 1))
    side = int(getattr(config, "resolution", 512))
    guided = float(getattr(config, "guidance_scale", 1.0)) > 1.0
    scale = (side / 512) ** 2 * (1.0 if guided else 0.5)  # unguided: half the UNet batch
    work = n_images * (steps * SECONDS_PER_IMAGE_STEP * scale + SECONDS_PER_IMAGE_FEATURES)
    return max(15, math.ceil(SAFETY * (GPU_OVERHEAD_SECONDS + work)))


def max_support_for(config: Any, limit_seconds: int) -> int:
    """Largest support-set size whose build of one category fits in ``limit_seconds``."""
    best = 1
    for n in range(1, 257):
        if build_seconds(config, n) > limit_seconds:
            break
        best = n
    return best


def segment_seconds(n_passes: int, n_extractors: int) -> int:
    """GPU seconds to ask for to segment one image: feature passes plus scoring.

    Args:
        n_passes: views of the image (windows plus the whole image).
        n_extractors: feature extractors run on each view.
    """
    work = 0.3 * n_passes * n_extractors + 2.0
    return max(10, math.ceil(SAFETY * (GPU_OVERHEAD_SECONDS + work)))


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Cap glibc's malloc arenas (as ``MALLOC_ARENA_MAX`` would) for a long-running server.

    A threaded server otherwise gets one arena per thread, up to 8 per core, and memory
    freed in one is not reused by another: resident memory then creeps up over weeks even
    though what the app keeps is bounded (``benchmarks/soak.py`` shows it). Call it at
    start-up, before the server's threads exist. Does nothing where ``MALLOC_ARENA_MAX``
    is already set or the C library is not glibc.

    Returns:
        whether the cap was applied.
    """
    if os.environ.get("MALLOC_ARENA_MAX"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-8, arenas))  # -8 = M_ARENA_MAX
    except (OSError, AttributeError):
        return False


def _int(environ: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be a whole number, got {raw!r}") from None
    if not low <= value <= high:
        raise ValueError(f"{name} must be in {low}..{high}, got {value}")
    return value


@dataclass(frozen=True)
class HostingConfig:
    """Settings of one running app (see the module docstring for the variables).

    Attributes:
        presets: presets offered in the UI, in order.
        max_support: largest support-set size a visitor may choose.
        cache_dir: cache folder, or None for the library's default.
        prebuild: category names built at start-up.
        session_ttl: seconds a visitor's state lives after its last update.
        max_sessions: visitor sessions kept in memory (least recently used dropped).
        temp_max_age: seconds after which Gradio's temporary files are deleted.
        tiles_max_mb: disk budget of the rendered support tiles, MiB.
        gpu_max_seconds: longest GPU call asked of ZeroGPU.
        zero_gpu: running on ZeroGPU.
        space: running on a Hugging Face Space (``SPACE_ID`` is set).
    """

    presets: tuple[str, ...] = PRESETS
    max_support: int = 64
    cache_dir: str | None = None
    prebuild: tuple[str, ...] = ()
    session_ttl: int = 1800
    max_sessions: int = 64
    temp_max_age: int = 3600
    tiles_max_mb: int = 256
    gpu_max_seconds: int = GPU_MAX_SECONDS
    zero_gpu: bool = False
    space: bool = False

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        zero_gpu: bool | None = None,
        cuda: bool | None = None,
        data_dir: str | os.PathLike[str] = "/data",
    ) -> HostingConfig:
        """Read the settings from ``environ`` (default ``os.environ``).

        Args:
            zero_gpu: override of :func:`on_zero_gpu` (tests).
            cuda: whether a CUDA GPU is visible (default: ask torch).
            data_dir: where a Space mounts persistent storage.

        Raises:
            ValueError: a variable is malformed; the message names it.
        """
        env = os.environ if environ is None else environ
        zero = on_zero_gpu() if zero_gpu is None else zero_gpu
        if cuda is None:
            import torch

            cuda = torch.cuda.is_available()
        space = bool(env.get("SPACE_ID"))
        cpu_space = space and not zero and not cuda
        raw_presets = env.get("OVDIFF_PRESETS", "")
        presets = tuple(p.strip() for p in raw_presets.split(",") if p.strip())
        if not presets:
            presets = ("cpu",) if cpu_space else PRESETS
        unknown = [p for p in presets if p not in PRESETS]
        if unknown:
            raise ValueError(f"OVDIFF_PRESETS: unknown preset(s) {unknown}; use {PRESETS}")
        max_support = _int(env, "OVDIFF_MAX_SUPPORT", 16 if cpu_space else 64, 2, 64)
        cache_dir = env.get("OVDIFF_CACHE") or None
        data = Path(data_dir)
        if cache_dir is None and data.is_dir() and os.access(data, os.W_OK):
            cache_dir = str(data / "ovdiff-cache")
        prebuild = tuple(n.strip() for n in env.get("OVDIFF_PREBUILD", "").split(",") if n.strip())
        return cls(
            presets=presets,
            max_support=max_support,
            cache_dir=cache_dir,
            prebuild=prebuild,
            session_ttl=_int(env, "OVDIFF_SESSION_TTL", 1800, 60, 7 * 86400),
            max_sessions=_int(env, "OVDIFF_MAX_SESSIONS", 64, 1, 100_000),
            temp_max_age=_int(env, "OVDIFF_TEMP_MAX_AGE", 3600, 60, 7 * 86400),
            tiles_max_mb=_int(env, "OVDIFF_TILES_MAX_MB", 256, 16, 1_000_000),
            gpu_max_seconds=_int(env, "OVDIFF_GPU_MAX_SECONDS", GPU_MAX_SECONDS, 15, 3600),
            zero_gpu=zero,
            space=space,
        )
