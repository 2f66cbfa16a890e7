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
* Faults: every failed write raises :class:`CacheWriteError` (an ``OSError``) whose message
  says what happened (disk full, read-only, no permission) and what to do; a failed write
  leaves no temporary file behind.
* Read-only caches (e.g. a prebuilt cache shipped with a Space) serve hits: pass
  ``read_only=True`` (or set ``OVDIFF_CACHE_READONLY=1``), or let the cache find out on its
  own (a read-only file system or missing permission turns locking off and writes into
  :class:`CacheWriteError`).
* Stale temporary files (left by a writer killed mid-write) are removed when a cache is
  opened: only those older than ``temp_grace_s`` that no live writer holds locked.
* Disk budget: at most ``max_bytes`` of entries (``OVDIFF_CACHE_MAX_BYTES``, default
  10 GiB; None = unbounded). After each write the least recently *used* entries (a load
  counts as a use) are evicted until the cache fits; an entry whose build lock is held is
  never evicted. An evicted entry is simply rebuilt when next needed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import struct
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from ovdiff_core.types import PrototypeBank, SupportSet, stable_hash

try:  # POSIX only
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "DEFAULT_MAX_BYTES",
    "Cache",
    "CacheWriteError",
    "default_cache_dir",
    "default_max_bytes",
    "safe_slug",
]

T = TypeVar("T")

_FORMAT = 1
DEFAULT_MAX_BYTES = 10 * 1024**3  # 10 GiB of entries unless OVDIFF_CACHE_MAX_BYTES says otherwise
DEFAULT_TEMP_GRACE_S = 3600.0  # temporary files younger than this are never cleaned
_TEMP_PREFIX = ".tmp"  # ours (".tmp-*") and those of safetensors' writer (".tmpXXXXXX")
_READONLY_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def default_cache_dir() -> Path:
    """``$OVDIFF_CACHE``, else ``$XDG_CACHE_HOME/ovdiff``, else ``~/.cache/ovdiff``."""
    env = os.environ.get("OVDIFF_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "ovdiff"


def default_max_bytes() -> int | None:
    """Disk budget from ``$OVDIFF_CACHE_MAX_BYTES``, else :data:`DEFAULT_MAX_BYTES` (10 GiB).

    The variable takes a byte count with an optional binary unit (``"500M"``, ``"10G"``,
    ``"2GiB"``) or ``"none"`` for no budget.

    Raises:
        ValueError: an unreadable value (the message shows the accepted forms).
    """
    raw = os.environ.get("OVDIFF_CACHE_MAX_BYTES", "").strip()
    if not raw:
        return DEFAULT_MAX_BYTES
    if raw.lower() in ("none", "unbounded", "unlimited"):
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?", raw.lower())
    if m is None:
        raise ValueError(
            f"OVDIFF_CACHE_MAX_BYTES={raw!r} is not a size; use bytes or a unit "
            "(e.g. 500M, 10G) or 'none' for no budget"
        )
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


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


def _sort_metadata(f: Any) -> None:
    """Rewrite a safetensors file's header with its metadata keys sorted, in place.

    safetensors stores the metadata dict in hash-map order, which changes from process to
    process; sorted, the same entry has the same bytes whoever writes it (builds split
    over several processes, or rerun, give byte-identical caches). Same keys and values,
    so the header keeps its length and the tensor bytes do not move.
    """
    (n,) = struct.unpack("<Q", f.read(8))
    raw = f.read(n)
    head = json.loads(raw)
    if "__metadata__" in head:
        head["__metadata__"] = dict(sorted(head["__metadata__"].items()))
    text = json.dumps(head, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if len(text) > n:  # never: reordering keeps the length; leave the valid file as it is
        return
    f.seek(8)
    f.write(text + b" " * (n - len(text)))  # safetensors pads its header with spaces
    f.flush()


class CacheWriteError(OSError):
    """A cache entry could not be written (disk full, read-only folder, no permission...).

    ``errno`` is the underlying error number when known (e.g. ``errno.ENOSPC``), ``path``
    the entry that was being written. The message says what happened and what to do.
    Nothing is left behind: the temporary file of the failed write is removed.
    """

    def __init__(self, path: Path, err: BaseException | None, read_only: bool = False) -> None:
        code = _error_code(err) if err is not None else errno.EROFS
        if read_only or code == errno.EROFS:
            what = "the cache is read-only"
            todo = (
                "set OVDIFF_CACHE to a writable folder to keep new entries (or leave it: "
                "entries already in the cache are still used)"
            )
        elif code in _FULL_ERRNOS:
            what = "the disk is full"
            todo = (
                "free disk space, set OVDIFF_CACHE to a folder on a bigger disk, or lower "
                "OVDIFF_CACHE_MAX_BYTES"
            )
        elif code in (errno.EACCES, errno.EPERM):
            what = "permission denied"
            todo = "make the folder writable or set OVDIFF_CACHE to a folder you can write to"
        else:
            what = f"{err}"
            todo = "check the cache folder (OVDIFF_CACHE) and the disk"
        self.message = f"could not write cache entry {path}: {what}; {todo}"
        super().__init__(code, self.message)
        self.path = path
        self.reason = what
        self.filename = str(path)

    def __str__(self) -> str:
        return self.message


def _error_code(err: BaseException) -> int | None:
    """errno of an ``OSError``, or the one named in a safetensors error's text."""
    if isinstance(err, OSError) and err.errno is not None:
        return err.errno
    text = str(err)
    m = re.search(r"code: (\d+)", text)
    if m:
        return int(m.group(1))
    for word, code in (
        ("StorageFull", errno.ENOSPC),
        ("No space left", errno.ENOSPC),
        ("QuotaExceeded", errno.EDQUOT),
        ("ReadOnlyFilesystem", errno.EROFS),
        ("Read-only file system", errno.EROFS),
        ("PermissionDenied", errno.EACCES),
        ("Permission denied", errno.EACCES),
    ):
        if word in text:
            return code
    return None


@contextlib.contextmanager
def _try_flock(path: Path) -> Iterator[bool]:
    """Hold an exclusive lock on ``path`` (a file or folder) if nobody else holds one.

    Yields True when the lock was taken (released on exit), False when another open file
    holds it or the path cannot be opened. Without ``fcntl`` always yields True.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        yield False
        return
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                yield False
                return
        yield True
    finally:
        os.close(fd)


class Cache:
    """A folder of cache entries (see module docstring).

    Args:
        root: the folder; created on first write. Defaults to :func:`default_cache_dir`.
        read_only: never write, lock or delete anything (entries are only read). "env"
            reads ``OVDIFF_CACHE_READONLY`` (``1``/``true`` = read-only).
        max_bytes: disk budget of the entries in bytes; None = unbounded. "env" reads
            :func:`default_max_bytes` (``OVDIFF_CACHE_MAX_BYTES``, default 10 GiB).
        temp_grace_s: temporary files younger than this many seconds are never cleaned
            (a writer may still be using them); older ones are removed on opening unless a
            live writer holds them locked.

    Raises:
        ValueError: a negative ``max_bytes`` or ``temp_grace_s``.
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        *,
        read_only: bool | Literal["env"] = "env",
        max_bytes: int | Literal["env"] | None = "env",
        temp_grace_s: float = DEFAULT_TEMP_GRACE_S,
    ) -> None:
        self.root = Path(root) if root is not None else default_cache_dir()
        self.read_only = _env_flag("OVDIFF_CACHE_READONLY") if read_only == "env" else read_only
        self.max_bytes = default_max_bytes() if max_bytes == "env" else max_bytes
        if self.max_bytes is not None and self.max_bytes < 0:
            raise ValueError(f"Cache: max_bytes must be >= 0 or None, got {self.max_bytes}")
        if not temp_grace_s >= 0:
            raise ValueError(f"Cache: temp_grace_s must be >= 0, got {temp_grace_s}")
        self.temp_grace_s = float(temp_grace_s)
        self._unwritable: OSError | None = None  # set once a write found the folder read-only
        if not self.read_only:
            self.clean_temp_files()

    @property
    def writable(self) -> bool:
        """False when read-only, by request or because a write found it so."""
        return not self.read_only and self._unwritable is None

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

    def _lock_path(self, kind: str, key: str) -> Path:
        return self.path(kind, "lock", key).with_suffix(".lock")

    # ------------------------------------------------------------------ raw entries

    def save(
        self, kind: str, name: str, key: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
    ) -> Path:
        """Write an entry atomically, then evict least recently used entries over budget.

        Returns:
            the entry's path.

        Raises:
            CacheWriteError: the entry could not be written (read-only cache, disk full,
                no permission...); no temporary file is left behind.
        """
        path = self.path(kind, name, key)
        if self.read_only:
            raise CacheWriteError(path, None, read_only=True)
        if self._unwritable is not None:
            raise CacheWriteError(path, self._unwritable)
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        meta_json = json.dumps(meta, sort_keys=True)
        header = {
            "ovdiff_format": str(_FORMAT),
            "ovdiff_key": key,
            "ovdiff_meta": meta_json,
            "ovdiff_checksum": entry_checksum(tensors, meta_json),
        }
        try:
            self._write(path, tensors, header)
        except (OSError, SafetensorError) as err:
            code = _error_code(err)
            if code in _READONLY_ERRNOS:  # later writes fail at once, loads stop touching
                self._unwritable = OSError(code, os.strerror(code or 0))
            raise CacheWriteError(path, err) from err
        self._evict(keep=path)
        return path

    def _write(self, path: Path, tensors: dict[str, torch.Tensor], header: dict[str, str]) -> None:
        """Write ``path`` through a private temporary folder next to it.

        The folder (``.tmp-*``) holds our file and the temporary file that safetensors'
        writer makes before renaming (``.tmpXXXXXX``); it is locked (``flock``) while in
        use so that :meth:`clean_temp_files` of another process never removes it, and it is
        removed whatever happens.
        """
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp_dir = Path(tempfile.mkdtemp(prefix=".tmp-", dir=path.parent))
        dir_fd = os.open(tmp_dir, os.O_RDONLY)
        try:
            if fcntl is not None:
                fcntl.flock(dir_fd, fcntl.LOCK_EX)
            tmp = tmp_dir / "entry.safetensors"
            save_file(tensors, str(tmp), metadata=header)
            with open(tmp, "rb+") as f:
                _sort_metadata(f)
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            os.close(dir_fd)

    def load(
        self, kind: str, name: str, key: str
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """Read and verify an entry; None if missing or invalid.

        An invalid file is removed when the cache is writable (and kept otherwise). A hit
        counts as a use for the least-recently-used eviction (its mtime is updated).
        """
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
            if self.writable:
                with contextlib.suppress(OSError):  # a read-only folder keeps it
                    path.unlink()
            return None
        if self.writable:
            with contextlib.suppress(OSError):
                os.utime(path)  # record the use (LRU eviction)
        return tensors, meta

    @contextlib.contextmanager
    def lock(self, kind: str, key: str) -> Iterator[None]:
        """Exclusive inter-process lock for building entry ``key`` of ``kind``.

        A read-only cache takes no lock (reading needs none; the atomic replace protects
        writers), and neither does one whose lock file cannot be created (read-only folder,
        full disk): builders may then duplicate work, but never corrupt an entry.
        """
        path = self._lock_path(kind, key)
        f = None
        if self.writable:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                f = open(path, "a+b")  # noqa: SIM115 - closed below
            except OSError as err:  # no lock: builders may duplicate work, nothing worse
                if err.errno in _READONLY_ERRNOS:
                    self._unwritable = err
        if f is None:
            yield
            return
        with f:
            if fcntl is not None:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                if fcntl is not None:
                    fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    # ------------------------------------------------------------------ housekeeping

    def _folders(self) -> list[Path]:
        """The root and its kind folders (those that exist)."""
        if not self.root.is_dir():
            return []
        try:
            return [self.root, *(p for p in self.root.iterdir() if p.is_dir() and p.name[0] != ".")]
        except OSError:
            return []

    def clean_temp_files(self) -> list[Path]:
        """Remove stale temporary files and folders (``.tmp*``) left by killed writers.

        Only those whose mtime is older than ``temp_grace_s`` and that no live writer
        holds locked (writers ``flock`` their temporary folder for the whole write) are
        removed. Never raises; does nothing on a read-only cache.

        Returns:
            the removed paths.
        """
        if self.read_only:
            return []
        removed: list[Path] = []
        cutoff = time.time() - self.temp_grace_s
        for folder in self._folders():
            with contextlib.suppress(OSError):
                for p in folder.iterdir():
                    if not p.name.startswith(_TEMP_PREFIX):
                        continue
                    with contextlib.suppress(OSError):
                        if p.lstat().st_mtime > cutoff:
                            continue
                        with _try_flock(p) as free:
                            if not free:
                                continue
                            if p.is_dir() and not p.is_symlink():
                                shutil.rmtree(p)
                            else:
                                p.unlink()
                            removed.append(p)
        return removed

    def entries(self) -> list[tuple[Path, int, float]]:
        """Every entry file as (path, size in bytes, last use time), oldest use first."""
        out = []
        for folder in self._folders()[1:]:
            with contextlib.suppress(OSError):
                for p in folder.glob("*.safetensors"):
                    if p.name.startswith("."):
                        continue
                    with contextlib.suppress(OSError):
                        st = p.stat()
                        out.append((p, st.st_size, st.st_mtime))
        out.sort(key=lambda e: e[2])
        return out

    def size_bytes(self) -> int:
        """Total size of the entries in bytes (temporary and lock files not counted)."""
        return sum(size for _, size, _ in self.entries())

    def _evict(self, keep: Path | None = None) -> list[Path]:
        """Delete least recently used entries until the entries fit in ``max_bytes``.

        ``keep`` (the entry just written) and entries whose build lock is held are kept.
        """
        if self.max_bytes is None or not self.writable:
            return []
        entries = self.entries()
        total = sum(size for _, size, _ in entries)
        removed: list[Path] = []
        for p, size, _ in entries:
            if total <= self.max_bytes:
                break
            if p == keep:
                continue
            lock = p.parent / f"lock-{p.stem.rsplit('-', 1)[-1]}.lock"
            with contextlib.ExitStack() as stack:
                if lock.exists() and not stack.enter_context(_try_flock(lock)):
                    continue  # being built right now
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                total -= size
                removed.append(p)
        return removed

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
