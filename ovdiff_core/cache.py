"""On-disk cache of support sets and prototype banks, keyed by content.

Each entry is one safetensors file whose header metadata carries the JSON description of
the entry, its cache key and a SHA-256 checksum of every tensor's dtype, shape and bytes
and of the JSON description.

* Keys: SHA-256 of the canonical JSON of everything that determines the entry's bytes
  (see :meth:`Cache.key`). Category names enter keys, never paths: file names are a short
  ASCII slug of the name plus the key, so ``"../../etc"``, slashes, NUL bytes or
  10,000-character names are harmless.
* Writes are atomic: a uniquely named temporary file in the same folder, flushed and
  fsync'ed, then ``os.replace``. Readers see the old entry or the new one, never half.
* Reads verify the key and the checksum; a truncated or corrupted file is deleted and
  reported as missing, so the caller rebuilds it. Nothing is ever unpickled.
* :meth:`Cache.lock` serialises builders of the same key across processes (``fcntl``
  advisory lock; on platforms without it builders may duplicate work but still cannot
  corrupt an entry, thanks to the atomic replace).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from ovdiff_core.types import PrototypeBank, SupportSet, stable_hash

try:  # POSIX only
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["Cache", "default_cache_dir", "safe_slug"]

T = TypeVar("T")

_FORMAT = 1


def default_cache_dir() -> Path:
    """``$OVDIFF_CACHE``, else ``$XDG_CACHE_HOME/ovdiff``, else ``~/.cache/ovdiff``."""
    env = os.environ.get("OVDIFF_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "ovdiff"


def safe_slug(name: str, max_len: int = 40) -> str:
    """Lower-case ASCII slug of ``name`` for file names: letters, digits and '-' only."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:max_len].strip("-")
    return slug or "x"


def entry_checksum(tensors: dict[str, torch.Tensor], meta_json: str) -> str:
    """SHA-256 over the tensors (see :func:`tensor_checksum`) and the entry's JSON text."""
    return hashlib.sha256(f"{tensor_checksum(tensors)}|{meta_json}".encode()).hexdigest()


def tensor_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of ``tensors`` (sorted by name)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class Cache:
    """A folder of cache entries (see module docstring).

    Args:
        root: the folder; created on first write. Defaults to :func:`default_cache_dir`.
    """

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root) if root is not None else default_cache_dir()

    # ------------------------------------------------------------------ keys and paths

    @staticmethod
    def key(kind: str, spec: dict[str, Any]) -> str:
        """Content key (64 hex chars) of an entry of ``kind`` described by ``spec``."""
        return stable_hash({"kind": kind, "format": _FORMAT, "spec": spec})

    def path(self, kind: str, name: str, key: str) -> Path:
        """File of an entry. ``kind`` must be a plain identifier; ``name`` is slugged."""
        if not re.fullmatch(r"[a-z][a-z0-9_]{0,31}", kind):
            raise ValueError(f"Cache: kind must be a short lower-case identifier, got {kind!r}")
        if not re.fullmatch(r"[0-9a-f]{64}", key):
            raise ValueError("Cache: key must be a 64-character hex digest from Cache.key")
        return self.root / kind / f"{safe_slug(name)}-{key[:32]}.safetensors"

    # ------------------------------------------------------------------ raw entries

    def save(
        self, kind: str, name: str, key: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
    ) -> Path:
        """Write an entry atomically; returns its path."""
        path = self.path(kind, name, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        meta_json = json.dumps(meta, sort_keys=True)
        header = {
            "ovdiff_format": str(_FORMAT),
            "ovdiff_key": key,
            "ovdiff_meta": meta_json,
            "ovdiff_checksum": entry_checksum(tensors, meta_json),
        }
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=path.parent)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=header)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return path

    def load(
        self, kind: str, name: str, key: str
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """Read and verify an entry; None if missing or invalid (an invalid file is removed)."""
        path = self.path(kind, name, key)
        if not path.is_file():
            return None
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:  # one open: header and data agree
                header = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
            meta_json = header.get("ovdiff_meta", "null")
            ok = header.get("ovdiff_key") == key and header.get(
                "ovdiff_checksum"
            ) == entry_checksum(tensors, meta_json)
            meta = json.loads(meta_json) if ok else None
        except (SafetensorError, OSError, ValueError, RuntimeError):
            ok, meta, tensors = False, None, {}
        if not ok or not isinstance(meta, dict):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            return None
        return tensors, meta

    @contextlib.contextmanager
    def lock(self, kind: str, key: str) -> Iterator[None]:
        """Exclusive inter-process lock for building entry ``key`` of ``kind``."""
        path = self.path(kind, "lock", key).with_suffix(".lock")
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a+b") as f:
            if fcntl is not None:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                if fcntl is not None:
                    fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    # ------------------------------------------------------------------ typed helpers

    def save_support(self, key: str, support: SupportSet) -> Path:
        meta = {"category": support.category, "settings": support.settings}
        return self.save("support", support.category, key, support.tensors(), meta)

    def _load_typed(
        self,
        kind: str,
        key: str,
        category: str,
        build: Callable[[dict[str, torch.Tensor], dict[str, Any]], T],
    ) -> T | None:
        """Load entry ``key`` of ``kind`` and build it; None if missing, invalid or foreign."""
        got = self.load(kind, category, key)
        if got is None or got[1].get("category") != category:
            return None
        try:
            return build(*got)
        except (KeyError, ValueError):
            return None

    def load_support(self, key: str, category: str) -> SupportSet | None:
        return self._load_typed(
            "support",
            key,
            category,
            lambda t, m: SupportSet.from_tensors(category, t, m.get("settings", {})),
        )

    def save_bank(self, key: str, bank: PrototypeBank) -> Path:
        return self.save("bank", bank.category, key, bank.tensors(), bank.meta())

    def load_bank(self, key: str, category: str) -> PrototypeBank | None:
        return self._load_typed("bank", key, category, PrototypeBank.from_tensors)
