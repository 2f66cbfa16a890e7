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

``OVDIFF_DEVICE`` (e.g. ``cpu``, ``cuda:1``) overrides :func:`best_device`;
``OVDIFF_DTYPE`` (``float32``, ``float16``, ``bfloat16``) overrides :func:`best_dtype`.

On CUDA the weights are float16 by default, read from the repo's fp16 variant files
(``*.fp16.safetensors``, ``variant="fp16"``) where the folder has them; a folder without
them gives its float32 weights converted to float16, with an :class:`FP16FallbackWarning`
saying how to get the fp16 files. On the CPU everything is float32.

Before a model is loaded, :func:`ensure_model` checks that every file the loader reads
(its :func:`manifest`) is present and complete (:func:`check_file`: safetensors sizes
against their headers, JSON that parses, no unfinished hub download). Online, missing
or broken files are (re-)downloaded, and only the manifest files: never whole repos.
Offline, :class:`MissingModelsError` names each bad file and the exact command that
fixes it. Nothing ever falls back to random weights. :data:`ProgressFn` is the progress
hook of loading and downloading.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, TypeVar

import torch

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

__all__ = [
    "DTYPES",
    "MODELS",
    "FP16FallbackWarning",
    "FileProblem",
    "MissingModel",
    "MissingModelsError",
    "ModelNotAvailableError",
    "ModelRef",
    "ProgressFn",
    "best_device",
    "best_dtype",
    "check_file",
    "check_model",
    "clear_shared",
    "default_model_id",
    "download_model",
    "dtype_by_name",
    "ensure_model",
    "hub_offline",
    "load_sd_pipeline",
    "load_taesd",
    "locate_model",
    "manifest",
    "resolve_model",
    "sd_variant",
    "shared",
    "transformers_variant",
    "verify_model",
]

T = TypeVar("T")


class ModelNotAvailableError(RuntimeError):
    """The weights of a model are neither on disk nor downloadable right now."""


class FP16FallbackWarning(UserWarning):
    """float16 was asked for but the model folder has no fp16 variant files: its float32
    weights are read and converted (correct, but twice the bytes read)."""


@dataclass(frozen=True)
class ModelEntry:
    """A default model id and the environment variable that overrides it."""

    default: str  # Hugging Face hub id used when the variable is unset
    env: str  # environment variable holding a hub id or a local directory
    description: str  # what the model is for (used in error messages)
    label: str = ""  # short name for progress messages ("CLIP ViT-B/16")


MODELS: dict[str, ModelEntry] = {
    "sd": ModelEntry(
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "OVDIFF_SD_MODEL",
        "Stable Diffusion pipeline (support images, SD features)",
        "Stable Diffusion",
    ),
    "taesd": ModelEntry(
        "madebyollin/taesd",
        "OVDIFF_TAESD_MODEL",
        "tiny SD autoencoder (fast CPU decoding)",
        "TAESD decoder",
    ),
    "dino": ModelEntry(
        "facebook/dino-vitb8", "OVDIFF_DINO_MODEL", "DINO ViT-B/8 features", "DINO ViT-B/8"
    ),
    "dinov2": ModelEntry(
        "facebook/dinov2-small", "OVDIFF_DINOV2_MODEL", "DINOv2 features", "DINOv2"
    ),
    "clip": ModelEntry(
        "timm/vit_base_patch16_clip_224.openai",
        "OVDIFF_CLIP_MODEL",
        "open_clip ViT-B/16 (CLIP features and category pre-filter)",
        "CLIP ViT-B/16",
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


DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def dtype_by_name(name: str) -> torch.dtype:
    """The torch dtype for ``"float32"``, ``"float16"`` (``"fp16"``, ``"half"``) or
    ``"bfloat16"`` (``"bf16"``); ValueError naming the choices otherwise."""
    key = name.strip().lower().removeprefix("torch.")
    key = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}.get(
        key, key
    )
    if key not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[key]


def best_dtype(device: torch.device | str) -> torch.dtype:
    """Weights dtype for ``device``: ``OVDIFF_DTYPE`` if set, else float16 on CUDA and
    float32 elsewhere (CPU half precision is slow, MPS fp16 is fragile)."""
    override = os.environ.get("OVDIFF_DTYPE", "").strip()
    if override:
        try:
            return dtype_by_name(override)
        except ValueError as err:
            raise ValueError(f"OVDIFF_DTYPE: {err}") from err
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
# File manifests, verification before use, downloads of just what is loaded
# --------------------------------------------------------------------------------------

ProgressFn = Callable[[str, "float | None", str], None]
"""Progress hook ``(stage, fraction, message)`` of model loading and downloading.

* ``stage``: ``"check"`` (verifying the files on disk; no weights read), ``"download"``
  (fetching files; ``fraction`` = bytes done / bytes to fetch for this model, when the
  hub reports them), ``"load"`` (building one model; ``fraction`` = models done / all
  models), ``"ready"`` (every model loaded; ``fraction`` 1.0).
* ``fraction``: in [0, 1], or None when unknown.
* ``message``: one line for people that names the model, e.g.
  ``"Loading CLIP ViT-B/16 (2/4)..."``.
"""

# Weights file name per library of an SD pipeline part; {v} is "" or ".fp16".
_WEIGHTS = {
    "transformers": "model{v}.safetensors",
    "diffusers": "diffusion_pytorch_model{v}.safetensors",
}
_SD_PARTS = (("text_encoder", "transformers"), ("unet", "diffusers"), ("vae", "diffusers"))


@dataclass(frozen=True)
class ModelRef:
    """One model a preset loads, and how (decides which files are needed).

    Attributes:
        kind: key in :data:`MODELS` (``"sd"``, ``"taesd"``, ``"dino"``, ``"dinov2"``,
            ``"clip"``); picks the file manifest.
        model_id: hub id (``"org/name"``) or local directory.
        revision: hub revision; None = ``main``.
        fp16: the weights run in float16 (the GPU path): SD needs its
            ``*.fp16.safetensors`` variant (downloaded), DINO/DINOv2 accept a
            ``model.fp16.safetensors`` in place of ``model.safetensors`` (their hub repos
            have none, so nothing more is downloaded); ignored by TAESD and CLIP.
        safety_checker: SD only: also the NSFW safety checker and its image processor
            (required only when the repo's ``model_index.json`` lists them).
    """

    kind: str
    model_id: str
    revision: str | None = None
    fp16: bool = False
    safety_checker: bool = False

    def __post_init__(self) -> None:
        if self.kind not in MODELS:
            raise ValueError(f"ModelRef.kind must be one of {sorted(MODELS)}, got {self.kind!r}")
        if not self.model_id or not self.model_id.strip():
            raise ValueError("ModelRef.model_id must be a hub id like 'org/name' or a local path")

    @property
    def label(self) -> str:
        """Short human name, e.g. ``"CLIP ViT-B/16"``."""
        return MODELS[self.kind].label or self.kind

    @property
    def env(self) -> str:
        """The environment variable that overrides this kind of model."""
        return MODELS[self.kind].env

    def describe(self) -> str:
        """``"<label> '<id>'[ (revision <rev>)]"``."""
        rev = f" (revision {self.revision})" if self.revision else ""
        return f"{self.label} {self.model_id!r}{rev}"


def manifest(ref: ModelRef) -> tuple[str, ...]:
    """The files the loaders read for ``ref``: allow patterns (relative to the repo root,
    ``*`` globs) for ``snapshot_download`` and ``hf download <id> <files...>``.

    Real repos hold several copies of the same weights (``.bin``, ``.ckpt``, fp16 and
    fp32, framework ports); this names one: the fp16 variant when ``ref.fp16`` (SD on a
    GPU), the fp32 safetensors otherwise. Optional SD parts (safety checker) are listed
    when ``ref.safety_checker``; patterns that match nothing in a repo download nothing.
    """
    if ref.kind == "sd":
        v = ".fp16" if ref.fp16 else ""
        files = ["model_index.json", "scheduler/scheduler_config.json", "tokenizer/*"]
        for part, lib in _SD_PARTS:
            files += [f"{part}/config.json", f"{part}/{_WEIGHTS[lib].format(v=v)}"]
        if ref.safety_checker:
            files += [
                "safety_checker/config.json",
                f"safety_checker/model{v}.safetensors",
                "feature_extractor/preprocessor_config.json",
            ]
        return tuple(files)
    if ref.kind == "taesd":
        return ("config.json", "diffusion_pytorch_model.safetensors")
    if ref.kind in ("dino", "dinov2"):
        return ("config.json", "model.safetensors")
    return ("open_clip_config.json", "open_clip_model.safetensors")


# Older repos without safetensors: the next alternative of a weights file.
_ALTERNATIVES = {
    "model.safetensors": ("pytorch_model.bin",),
    "open_clip_model.safetensors": ("open_clip_pytorch_model.bin",),
}


def sd_variant(ref: ModelRef, root: str) -> str | None:
    """``"fp16"`` when the SD pipeline in ``root`` should be loaded with
    ``variant="fp16"``: ``ref.fp16`` and the fp16 files are (being) used; None for a
    folder that holds only the fp32 weights (then those are loaded and cast)."""
    if ref.kind != "sd" or not ref.fp16:
        return None

    def weights(v: str) -> list[str]:
        return [os.path.join(root, p, _WEIGHTS[lib].format(v=v)) for p, lib in _SD_PARTS]

    has16 = any(os.path.isfile(f) for f in weights(".fp16"))
    has32 = all(os.path.isfile(f) for f in weights(""))
    return "fp16" if has16 or not has32 else None


def transformers_variant(root: str, dtype: torch.dtype) -> str | None:
    """``"fp16"`` when a transformers model folder ``root`` (DINO, DINOv2) holds
    ``model.fp16.safetensors`` and the model runs in float16; None otherwise (the
    float32 weights are loaded and converted)."""
    has16 = os.path.isfile(os.path.join(root, "model.fp16.safetensors"))
    return "fp16" if dtype == torch.float16 and has16 else None


def fp16_fallback(what: str, root: str, files: Sequence[str]) -> None:
    """Warn (:class:`FP16FallbackWarning`) that ``what`` in ``root`` runs in float16 from
    its float32 weights because the fp16 variant ``files`` are not there."""
    import warnings

    warnings.warn(
        f"{what} in {root} has no fp16 weights ({', '.join(files)}): loading its float32 "
        "weights and converting them to float16. To read half the bytes, put the repo's "
        "fp16 variant files there (`python -m ovdiff_core.backends.download --preset paper "
        "--fp16` for hub models), or set OVDIFF_DTYPE=float32 to run in float32.",
        FP16FallbackWarning,
        stacklevel=2,
    )


def _read_json(path: str) -> Any:
    import json

    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _required(ref: ModelRef, root: str) -> list[tuple[str, ...]]:
    """Required files of ``ref`` in ``root``: groups of alternatives, preferred first."""
    if ref.kind in ("dino", "dinov2") and ref.fp16:
        # A local copy may hold only the fp16 variant (the hub repos have none).
        return [
            ("config.json",),
            ("model.safetensors", *_ALTERNATIVES["model.safetensors"], "model.fp16.safetensors"),
        ]
    if ref.kind != "sd":
        return [(f, *_ALTERNATIVES.get(f, ())) for f in manifest(ref)]
    variant = sd_variant(ref, root)
    v = f".{variant}" if variant else ""
    groups: list[tuple[str, ...]] = [
        ("model_index.json",),
        ("scheduler/scheduler_config.json",),
        ("tokenizer/tokenizer_config.json",),
        ("tokenizer/vocab.json", "tokenizer/tokenizer.json"),
    ]
    if os.path.isfile(os.path.join(root, "tokenizer", "vocab.json")):
        groups.append(("tokenizer/merges.txt",))
    for part, lib in _SD_PARTS:
        groups += [(f"{part}/config.json",), (f"{part}/{_WEIGHTS[lib].format(v=v)}",)]
    if ref.safety_checker:
        try:
            index = _read_json(os.path.join(root, "model_index.json"))
        except (OSError, ValueError):
            index = {}
        if isinstance(index, dict) and (index.get("safety_checker") or [None])[0]:
            groups += [
                ("safety_checker/config.json",),
                (f"safety_checker/model{v}.safetensors",),
                ("feature_extractor/preprocessor_config.json",),
            ]
    return groups


def check_file(path: str) -> str | None:
    """What is wrong with one model file, or None when it looks complete.

    Cheap (no weights are read): a ``.safetensors`` file must be exactly 8 bytes + its
    JSON header + the data its header describes; a ``.json`` file must parse; a
    ``.bin``/``.pth`` zip archive must have its central directory; any file must be
    non-empty.
    """
    import json
    import zipfile

    if not os.path.isfile(path):
        return "missing"
    size = os.path.getsize(path)
    if size == 0:
        return "empty (0 bytes)"
    if path.endswith(".safetensors"):
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 0 or n > size - 8:
                return f"truncated ({size:,} bytes, the safetensors header is incomplete)"
            try:
                header = json.loads(f.read(n))
                end = max(
                    (int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"),
                    default=0,
                )
            except (ValueError, KeyError, TypeError, IndexError):
                return "corrupt (unreadable safetensors header)"
        expected = 8 + n + end
        if size < expected:
            return f"truncated ({size:,} of {expected:,} bytes)"
        if size > expected:
            return f"corrupt ({size:,} bytes, the header describes {expected:,})"
        return None
    if path.endswith(".json"):
        try:
            _read_json(path)
        except (ValueError, UnicodeDecodeError):
            return "not valid JSON (unfinished or corrupt)"
        return None
    if path.endswith((".bin", ".pth")):
        with open(path, "rb") as f:
            zipped = f.read(2) == b"PK"
        if zipped:
            try:
                with zipfile.ZipFile(path):
                    pass
            except (zipfile.BadZipFile, OSError):
                return "truncated or corrupt (bad zip archive)"
    return None


@dataclass(frozen=True)
class FileProblem:
    """One required file that is missing or broken."""

    file: str  # path relative to the model folder ('/' separators)
    problem: str  # "missing", "truncated (1,024 of 4,096 bytes)", ...

    @property
    def missing(self) -> bool:
        return self.problem.startswith("missing")


@dataclass(frozen=True)
class MissingModel:
    """A model that cannot be loaded as it is on disk now.

    Attributes:
        model: which model.
        path: the folder that was checked (local directory or hub-cache snapshot); None
            when the model is not on disk at all.
        problems: the missing or broken files (empty when ``path`` is None).
    """

    model: ModelRef
    path: str | None
    problems: tuple[FileProblem, ...] = ()

    @property
    def local(self) -> bool:
        """True when the model id is a local directory (not a hub id)."""
        return _looks_local(self.model.model_id)

    @property
    def fix(self) -> str:
        """The exact command(s) that make this model complete."""
        ref = self.model
        rev = f" --revision {ref.revision}" if ref.revision else ""

        def command(repo: str, files: Sequence[str], extra: str = "") -> str:
            quoted = " ".join(f"'{f}'" if "*" in f else f for f in files)
            return f"hf download {repo}{rev}{extra} {quoted}"

        if self.local:
            files = [p.file for p in self.problems] or list(manifest(ref))
            default = MODELS[ref.kind].default
            return (
                f"copy the listed files into {ref.model_id} again, or, if it is a copy of "
                f"{default}: `{command(default, files, ' --force-download')} --local-dir "
                f"{ref.model_id}`"
            )
        if self.path is None:
            return f"`{command(ref.model_id, manifest(ref))}`"
        missing = [p.file for p in self.problems if p.missing]
        broken = [p.file for p in self.problems if not p.missing]
        parts = []
        if missing:
            parts.append(f"`{command(ref.model_id, missing)}`")
        if broken:
            parts.append(f"`{command(ref.model_id, broken, ' --force-download')}`")
        return " and ".join(parts)

    def describe(self) -> str:
        """One line: the model, what is wrong, how to fix it."""
        if self.path is None:
            what = "not downloaded (not in the Hugging Face cache)"
        else:
            what = (
                "incomplete in "
                + self.path
                + ": "
                + "; ".join(f"{p.file} {p.problem}" for p in self.problems)
            )
        return f"{self.model.describe()} [{self.model.env}]: {what}. Fix: {self.fix}"


class MissingModelsError(ModelNotAvailableError):
    """One or more models are missing or incomplete; ``missing`` lists every one."""

    def __init__(self, missing: Sequence[MissingModel], why: str) -> None:
        self.missing = list(missing)
        n = len(self.missing)
        lines = "\n".join(f"  - {m.describe()}" for m in self.missing)
        super().__init__(
            f"{n} model{'s are' if n > 1 else ' is'} missing or incomplete and cannot be "
            f"downloaded now ({why}):\n{lines}\n"
            "Run the commands on a machine with internet access (older huggingface_hub: "
            "`huggingface-cli download` with the same arguments) so the files land in the "
            "Hugging Face cache (HF_HOME / HF_HUB_CACHE), or fetch every model of a preset "
            "with `python -m ovdiff_core.backends.download --preset cpu` (or `paper "
            "--fp16`), or point the environment variable in brackets at a local directory "
            "holding a complete copy."
        )


def _looks_local(model_id: str) -> bool:
    return os.path.exists(os.path.expanduser(model_id)) or (
        model_id.startswith((".", "/", "~", "\\")) or model_id.count("/") > 1
    )


def _unfinished_downloads(root: str) -> list[str]:
    """``blobs/*.incomplete`` files of the hub-cache repo that holds snapshot ``root``."""
    snapshots = os.path.dirname(os.path.normpath(root))
    if os.path.basename(snapshots) != "snapshots":
        return []
    blobs = os.path.join(os.path.dirname(snapshots), "blobs")
    if not os.path.isdir(blobs):
        return []
    return sorted(f"blobs/{n}" for n in os.listdir(blobs) if n.endswith(".incomplete"))


def verify_model(ref: ModelRef, root: str) -> list[FileProblem]:
    """Every required file of ``ref`` in folder ``root`` that is missing or broken (see
    :func:`check_file`); empty when the model is complete. Reads no weights."""
    problems = []
    for group in _required(ref, root):
        present = [f for f in group if os.path.isfile(os.path.join(root, f))]
        if not present:
            alt = f" (nor {', '.join(group[1:])})" if len(group) > 1 else ""
            problems.append(FileProblem(group[0], "missing" + alt))
            continue
        problem = check_file(os.path.join(root, present[0]))
        if problem is not None:
            problems.append(FileProblem(present[0], problem))
    unfinished = _unfinished_downloads(root) if problems else []
    if unfinished:
        note = f" (an unfinished download is in the hub cache: {', '.join(unfinished)})"
        problems = [FileProblem(p.file, p.problem + note) if p.missing else p for p in problems]
    return problems


def locate_model(ref: ModelRef, cache_dir: str | None = None) -> str | None:
    """The folder holding ``ref`` on this machine (the local directory, or its snapshot in
    the hub cache), without any network access; None when it is not on disk."""
    path = os.path.expanduser(ref.model_id)
    if os.path.exists(path):
        return path
    if _looks_local(ref.model_id):
        return None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        found = snapshot_download(
            ref.model_id, revision=ref.revision, cache_dir=cache_dir, local_files_only=True
        )
    except HFValidationError as err:
        raise ValueError(
            f"model id {ref.model_id!r} is neither an existing local path nor a valid hub id "
            f"('org/name'): {err}"
        ) from err
    except (LocalEntryNotFoundError, FileNotFoundError):
        return None
    return str(found)


def check_model(ref: ModelRef, cache_dir: str | None = None) -> MissingModel | None:
    """None when ``ref`` is complete on disk, else what is missing (no network, no
    weights loaded)."""
    root = locate_model(ref, cache_dir)
    if root is None:
        return MissingModel(ref, None)
    problems = verify_model(ref, root)
    return MissingModel(ref, root, tuple(problems)) if problems else None


def _reporting_tqdm(progress: ProgressFn, prefix: str) -> type:
    """A tqdm class that forwards the hub's byte counts to ``progress``."""
    from tqdm.auto import tqdm

    class Reporting(tqdm):
        def update(self, n: float | None = 1) -> bool | None:
            out = super().update(n)
            if getattr(self, "unit", "") == "B":
                total = float(self.total or 0)
                frac = min(1.0, self.n / total) if total > 0 else None
                size = f"{self.n / 1e6:,.1f} of {total / 1e6:,.1f} MB" if total else "..."
                progress("download", frac, f"{prefix}: {size}")
            return out

    return Reporting


def download_model(
    ref: ModelRef,
    files: Sequence[str] | None = None,
    force: bool = False,
    cache_dir: str | None = None,
    progress: ProgressFn | None = None,
    prefix: str | None = None,
) -> str:
    """Download ``files`` (default: :func:`manifest`) of hub model ``ref`` into the hub
    cache (``force``: fetch them again even when cached, for broken files) and return
    the snapshot folder. Needs the network."""
    from huggingface_hub import snapshot_download

    kwargs: dict[str, Any] = {}
    if progress is not None:
        kwargs["tqdm_class"] = _reporting_tqdm(progress, prefix or f"Downloading {ref.label}")
    return str(
        snapshot_download(
            ref.model_id,
            revision=ref.revision,
            cache_dir=cache_dir,
            allow_patterns=list(files if files is not None else manifest(ref)),
            force_download=force,
            **kwargs,
        )
    )


def _why_offline() -> str | None:
    """Why nothing can be downloaded now, or None when the hub can be used."""
    if hub_offline():
        return "HF_HUB_OFFLINE=1"
    if not _hub_reachable():
        return "the Hugging Face hub cannot be reached"
    return None


def ensure_model(
    ref: ModelRef,
    cache_dir: str | None = None,
    progress: ProgressFn | None = None,
    prefix: str | None = None,
) -> str:
    """The local folder of ``ref`` with every required file present and complete.

    Verifies the files (:func:`verify_model`); online, downloads what is missing and
    downloads broken files again (only the :func:`manifest` files); never returns a
    folder with missing or broken files, so no loader can fall back to random weights.

    Raises:
        MissingModelsError: not complete and it cannot be fixed now (offline, hub
            unreachable, or a local directory, which is never written to); the
            message names each bad file and the exact command that fixes it.
        ValueError: ``ref.model_id`` is not a valid hub id or path.
    """
    missing = check_model(ref, cache_dir)
    if missing is None:
        root = locate_model(ref, cache_dir)
        assert root is not None
        return root
    if missing.local:
        raise MissingModelsError([missing], "a local directory is never changed by the loader")
    why = _why_offline()
    if why is not None:
        raise MissingModelsError([missing], why)
    if missing.path is None:
        download_model(ref, None, False, cache_dir, progress, prefix)
    else:
        lost = [p.file for p in missing.problems if p.missing]
        broken = [p.file for p in missing.problems if not p.missing]
        if lost:
            download_model(ref, lost, False, cache_dir, progress, prefix)
        if broken:
            download_model(ref, broken, True, cache_dir, progress, prefix)
    missing = check_model(ref, cache_dir)
    if missing is not None and missing.path is not None:
        # The repo lacks the preferred files: its fp32 weights (no fp16 variant), or
        # the older alternative of a weights file (pytorch_model.bin).
        extra = [a for p in missing.problems if p.missing for a in _ALTERNATIVES.get(p.file, ())]
        if ref.fp16:
            extra += list(manifest(replace(ref, fp16=False)))
        if extra:
            download_model(ref, extra, False, cache_dir, progress, prefix)
            missing = check_model(ref, cache_dir)
    if missing is not None:
        raise MissingModelsError([missing], "still incomplete after downloading")
    root = locate_model(ref, cache_dir)
    assert root is not None
    return root


def load_taesd(
    model_id: str | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    revision: str | None = None,
) -> Any:
    """The shared ``diffusers.AutoencoderTiny`` (default ``$OVDIFF_TAESD_MODEL`` or
    ``madebyollin/taesd``) in eval mode on ``device`` in ``dtype``; files verified
    first (:func:`ensure_model`)."""
    mid = model_id or default_model_id("taesd")
    dev = torch.device(device) if device is not None else best_device()
    dt = dtype if dtype is not None else best_dtype(dev)
    path = ensure_model(ModelRef("taesd", mid, revision))

    def build() -> Any:
        from diffusers import AutoencoderTiny

        return AutoencoderTiny.from_pretrained(path, torch_dtype=dt).to(dev).eval()

    return shared(("taesd", mid, str(dev), str(dt)), build)


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
        ModelNotAvailableError: missing or incomplete files that cannot be fetched now
            (see :func:`ensure_model`): named with the command that fixes them.
    """
    mid = model_id if model_id is not None else default_model_id("sd")
    dev = torch.device(device) if device is not None else best_device()
    dt = dtype if dtype is not None else best_dtype(dev)
    ref = ModelRef("sd", mid, revision, fp16=dt == torch.float16, safety_checker=safety_checker)
    path = ensure_model(ref)
    variant: dict[str, Any] = {"variant": v} if (v := sd_variant(ref, path)) else {}

    def build_base() -> StableDiffusionPipeline:
        from diffusers import StableDiffusionPipeline

        if ref.fp16 and not variant:
            fp16_fallback(
                f"Stable Diffusion {mid!r}",
                path,
                [f"{p}/{_WEIGHTS[lib].format(v='.fp16')}" for p, lib in _SD_PARTS],
            )

        pipe = StableDiffusionPipeline.from_pretrained(
            path,
            dtype=dt,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            **variant,
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

        index = _read_json(os.path.join(path, "model_index.json"))
        if not (index.get("safety_checker") or [None])[0]:
            return base
        from diffusers.pipelines.stable_diffusion.safety_checker import (
            StableDiffusionSafetyChecker,
        )
        from transformers import CLIPImageProcessor

        checker: Any = StableDiffusionSafetyChecker.from_pretrained(
            path, subfolder="safety_checker", dtype=dt, **variant
        )
        checker = checker.to(dev)
        processor = CLIPImageProcessor.from_pretrained(path, subfolder="feature_extractor")
        components = {
            **base_any.components,
            "safety_checker": checker,
            "feature_extractor": processor,
        }
        pipe: Any = StableDiffusionPipeline(**components, requires_safety_checker=True)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return shared(("sd_pipeline+checker", mid, revision, str(dev), str(dt)), build_checked)
