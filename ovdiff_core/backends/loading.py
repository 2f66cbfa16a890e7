"""Model loading: device and dtype choice, offline-first model resolution, shared instances.

Everything that touches the Hugging Face hub goes through :func:`resolve_model`, which
looks in the local cache first and fails *at once* with :class:`ModelNotAvailableError`
when the weights are not there and the hub cannot be reached (``HF_HUB_OFFLINE=1`` or no
network), instead of letting every file lookup retry for ~20 s.

Default model ids can be overridden with environment variables (a hub id or a local
directory), see :data:`MODELS` and :func:`default_model_id`:

* ``OVDIFF_SD_MODEL``: Stable Diffusion (default ``stable-diffusion-v1-5/stable-diffusion-v1-5``
  here; the presets of :mod:`ovdiff_core.backends.presets` replace their generator's
  model, SD v1.5 or SD-Turbo, with it).
* ``OVDIFF_TAESD_MODEL``: tiny SD autoencoder for fast decoding (``madebyollin/taesd``).
* ``OVDIFF_DINO_MODEL``: DINO ViT-B/8 (``facebook/dino-vitb8``).
* ``OVDIFF_DINOV2_MODEL``: DINOv2 (``facebook/dinov2-small``).
* ``OVDIFF_CLIP_MODEL``: open_clip ViT-B/16 with OpenAI weights
  (``timm/vit_base_patch16_clip_224.openai``; a directory needs ``open_clip_config.json``).

``OVDIFF_DEVICE`` (e.g. ``cpu``, ``cuda:1``) overrides :func:`best_device`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import torch

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

__all__ = [
    "MODELS",
    "ModelNotAvailableError",
    "best_device",
    "best_dtype",
    "clear_shared",
    "default_model_id",
    "hub_offline",
    "load_sd_pipeline",
    "resolve_model",
    "shared",
]

T = TypeVar("T")


class ModelNotAvailableError(RuntimeError):
    """The weights of a model are neither on disk nor downloadable right now."""


@dataclass(frozen=True)
class ModelEntry:
    """A default model id and the environment variable that overrides it."""

    default: str  # Hugging Face hub id used when the variable is unset
    env: str  # environment variable holding a hub id or a local directory
    description: str  # what the model is for (used in error messages)


MODELS: dict[str, ModelEntry] = {
    "sd": ModelEntry(
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "OVDIFF_SD_MODEL",
        "Stable Diffusion pipeline (support images, SD features)",
    ),
    "taesd": ModelEntry(
        "madebyollin/taesd", "OVDIFF_TAESD_MODEL", "tiny SD autoencoder (fast CPU decoding)"
    ),
    "dino": ModelEntry("facebook/dino-vitb8", "OVDIFF_DINO_MODEL", "DINO ViT-B/8 features"),
    "dinov2": ModelEntry("facebook/dinov2-small", "OVDIFF_DINOV2_MODEL", "DINOv2 features"),
    "clip": ModelEntry(
        "timm/vit_base_patch16_clip_224.openai",
        "OVDIFF_CLIP_MODEL",
        "open_clip ViT-B/16 (CLIP features and category pre-filter)",
    ),
}


def default_model_id(key: str) -> str:
    """The model id (hub id or local directory) to use for ``key`` (see :data:`MODELS`).

    The environment variable of the entry wins over the default when it is set and
    non-empty.
    """
    if key not in MODELS:
        raise ValueError(f"model key must be one of {sorted(MODELS)}, got {key!r}")
    return default_model_id_of(MODELS[key])


# --------------------------------------------------------------------------------------
# Device and dtype
# --------------------------------------------------------------------------------------


def best_device() -> torch.device:
    """The fastest available device: ``OVDIFF_DEVICE`` if set, else cuda > mps > cpu."""
    override = os.environ.get("OVDIFF_DEVICE", "").strip()
    if override:
        try:
            return torch.device(override)
        except RuntimeError as err:
            raise ValueError(
                f"OVDIFF_DEVICE={override!r} is not a torch device; use e.g. 'cpu' or 'cuda:0'"
            ) from err
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def best_dtype(device: torch.device | str) -> torch.dtype:
    """float16 on CUDA, float32 elsewhere (CPU half precision is slow, MPS fp16 is fragile)."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


# --------------------------------------------------------------------------------------
# Resolving model ids to local directories
# --------------------------------------------------------------------------------------


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` is set to a true value (read at call time)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


_REACHABLE: dict[str, bool] = {}
_REACHABLE_LOCK = threading.Lock()


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One quick request to the hub endpoint (no retries); the answer is memoised."""
    from huggingface_hub import constants

    endpoint = constants.ENDPOINT
    with _REACHABLE_LOCK:
        if endpoint not in _REACHABLE:
            from huggingface_hub.utils import get_session

            try:
                # Any HTTP answer means reachable; only a failed connection means "no".
                get_session().head(endpoint, timeout=timeout)
                _REACHABLE[endpoint] = True
            except Exception:
                _REACHABLE[endpoint] = False
        return _REACHABLE[endpoint]


def _not_available(
    model: str, revision: str | None, why: str, env: str | None = None
) -> ModelNotAvailableError:
    rev = f" --revision {revision}" if revision else ""
    if env is not None:
        envs = env
    else:
        matching = [e.env for e in MODELS.values() if model in (e.default, default_model_id_of(e))]
        envs = ", ".join(matching or [e.env for e in MODELS.values()])
    return ModelNotAvailableError(
        f"model {model!r}{f' (revision {revision})' if revision else ''} is not available: "
        f"{why}. Download it once on a machine with internet access with "
        f"`hf download {model}{rev}` (older huggingface_hub: `huggingface-cli download "
        f"{model}{rev}`) so it lands in the Hugging Face cache (HF_HOME / HF_HUB_CACHE), or "
        f"point the model id at a local directory holding a copy (environment variable "
        f"{envs}, or the model_id argument / preset field)."
    )


def default_model_id_of(entry: ModelEntry) -> str:
    """The id ``entry`` resolves to now (its environment variable, else its default)."""
    return os.environ.get(entry.env, "").strip() or entry.default


def resolve_model(
    model_id: str,
    revision: str | None = None,
    cache_dir: str | None = None,
    env: str | None = None,
) -> str:
    """Turn a model id into something ``from_pretrained`` can load without surprises.

    Args:
        model_id: a local directory (or file) path, or a Hugging Face hub repo id
            (``"org/name"``).
        revision: hub branch, tag or commit; ``None`` means ``main``.
        cache_dir: hub cache directory; ``None`` means the default (``HF_HUB_CACHE``).
        env: the environment variable that overrides this model, named in the error
            (default: the :data:`MODELS` entries whose id is ``model_id``, else all).

    Returns:
        ``model_id`` itself when it is an existing local path; else the local snapshot
        directory when the repo is in the hub cache; else (hub reachable and not
        offline) ``model_id`` unchanged, so ``from_pretrained`` downloads what it needs.

    Raises:
        ValueError: ``model_id`` is empty.
        ModelNotAvailableError: not local, not cached and the hub is offline or
            unreachable. Raised immediately, with the id and how to get the weights.
    """
    if not model_id or not model_id.strip():
        raise ValueError("model_id must be a hub id like 'org/name' or a local path, got ''")
    if os.path.exists(os.path.expanduser(model_id)):
        return os.path.expanduser(model_id)
    if model_id.startswith((".", "/", "~", "\\")) or model_id.count("/") > 1:
        raise _not_available(
            model_id, revision, "it looks like a local path but does not exist", env
        )

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return str(
            snapshot_download(
                model_id, revision=revision, cache_dir=cache_dir, local_files_only=True
            )
        )
    except HFValidationError as err:
        raise ValueError(
            f"model_id {model_id!r} is neither an existing local path nor a valid hub id "
            f"('org/name'): {err}"
        ) from err
    except (LocalEntryNotFoundError, FileNotFoundError):
        pass
    if hub_offline():
        raise _not_available(
            model_id, revision, "it is not in the local cache and HF_HUB_OFFLINE=1", env
        )
    if not _hub_reachable():
        raise _not_available(
            model_id, revision, "it is not in the local cache and the hub cannot be reached", env
        )
    return model_id


# --------------------------------------------------------------------------------------
# One instance per model per process
# --------------------------------------------------------------------------------------

_SHARED: dict[Hashable, Any] = {}
_SHARED_LOCKS: dict[Hashable, threading.Lock] = {}
_SHARED_GUARD = threading.Lock()


def shared(key: Hashable, factory: Callable[[], T]) -> T:
    """Return the process-wide instance for ``key``, building it with ``factory`` once.

    Thread-safe and lazy: concurrent callers with the same key wait for a single build;
    different keys build concurrently. A factory that raises stores nothing (the next
    call tries again).
    """
    with _SHARED_GUARD:
        if key in _SHARED:
            return _SHARED[key]
        lock = _SHARED_LOCKS.setdefault(key, threading.Lock())
    with lock:
        with _SHARED_GUARD:
            if key in _SHARED:
                return _SHARED[key]
        value = factory()
        with _SHARED_GUARD:
            _SHARED[key] = value
        return value


def clear_shared() -> None:
    """Forget every shared instance (tests; freeing memory)."""
    with _SHARED_GUARD:
        _SHARED.clear()
        _SHARED_LOCKS.clear()


# --------------------------------------------------------------------------------------
# Stable Diffusion
# --------------------------------------------------------------------------------------


def load_sd_pipeline(
    model_id: str | None = None,
    revision: str | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    safety_checker: bool = True,
) -> StableDiffusionPipeline:
    """Load (once per process) a Stable Diffusion pipeline on ``device`` in ``dtype``.

    The UNet, VAE, text encoder, tokenizer and scheduler are loaded once per (model,
    revision, device, dtype) and shared by the pipelines with and without safety checker,
    so a generator and an SD feature extractor never hold two copies of the weights.

    Args:
        model_id: hub id or local directory; ``None`` means ``default_model_id("sd")``.
        revision: hub revision.
        device: target device; ``None`` means :func:`best_device`.
        dtype: weights dtype; ``None`` means :func:`best_dtype` of the device.
        safety_checker: include the repo's NSFW safety checker (when it has one; repos
            without one give a pipeline whose ``safety_checker`` is None either way).

    Returns:
        A shared ``diffusers.StableDiffusionPipeline`` with its progress bar disabled.
        Callers must not modify its modules or scheduler in place; build a new pipeline
        object from ``pipe.components`` to change the scheduler.

    Raises:
        ModelNotAvailableError: see :func:`resolve_model`.
    """
    mid = model_id if model_id is not None else default_model_id("sd")
    dev = torch.device(device) if device is not None else best_device()
    dt = dtype if dtype is not None else best_dtype(dev)
    path = resolve_model(mid, revision, env=MODELS["sd"].env)
    rev: dict[str, Any] = {"revision": revision} if revision and path == mid else {}

    def build_base() -> StableDiffusionPipeline:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(
            path, dtype=dt, safety_checker=None, requires_safety_checker=False, **rev
        )
        pipe = pipe.to(dev)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    base = shared(("sd_pipeline", mid, revision, str(dev), str(dt)), build_base)
    if not safety_checker:
        return base
    base_any: Any = base

    def build_checked() -> StableDiffusionPipeline:
        from diffusers import StableDiffusionPipeline

        index = _model_index(path, revision)
        if not (index.get("safety_checker") or [None])[0]:
            return base
        from diffusers.pipelines.stable_diffusion.safety_checker import (
            StableDiffusionSafetyChecker,
        )
        from transformers import CLIPImageProcessor

        checker: Any = StableDiffusionSafetyChecker.from_pretrained(
            path, subfolder="safety_checker", dtype=dt, **rev
        )
        checker = checker.to(dev)
        processor = CLIPImageProcessor.from_pretrained(path, subfolder="feature_extractor", **rev)
        components = {
            **base_any.components,
            "safety_checker": checker,
            "feature_extractor": processor,
        }
        pipe: Any = StableDiffusionPipeline(**components, requires_safety_checker=True)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return shared(("sd_pipeline+checker", mid, revision, str(dev), str(dt)), build_checked)


def _model_index(path: str, revision: str | None) -> dict[str, Any]:
    """The pipeline's ``model_index.json`` (from a local directory or the hub)."""
    import json

    local = os.path.join(path, "model_index.json")
    if not os.path.isfile(local):
        from huggingface_hub import hf_hub_download

        local = hf_hub_download(path, "model_index.json", revision=revision)
    with open(local, encoding="utf-8") as f:
        data: dict[str, Any] = json.load(f)
    return data
