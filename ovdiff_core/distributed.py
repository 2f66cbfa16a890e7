"""Several processes for one ``ovdiff`` command, under ``torchrun`` or ``accelerate launch``.

The launcher starts one process per GPU (or per CPU slot) and tells each who it is through
the environment: ``RANK`` (0..world-1 over all nodes), ``WORLD_SIZE``, ``LOCAL_RANK``
(0..processes-per-node-1) plus ``MASTER_ADDR`` / ``MASTER_PORT``. ``torchrun`` and
``accelerate launch`` both set these; on SLURM one runs either launcher per node with
``srun`` (see the README, "Scaling out"). This module reads them and nothing else:

* :func:`launch_env` parses the variables (one process and no variables: world size 1).
* :func:`distributed` opens a :class:`DistContext`: with ``WORLD_SIZE > 1`` it initialises
  ``torch.distributed`` (NCCL when CUDA is available, else gloo) and picks the device of
  ``LOCAL_RANK``; with one process it touches no ``torch.distributed`` at all. The process
  group is destroyed on exit, errors included.
* :meth:`DistContext.shard` splits a list deterministically (item ``i`` goes to rank
  ``i % world``): vocabularies for ``ovdiff build``, image lists for ``eval`` and
  ``segment``.
* :meth:`DistContext.all_reduce` sums (or maxes) a numpy array over the ranks (confusion
  matrices, counters); :meth:`DistContext.all_gather_json` collects small JSON-able rows
  (sent as UTF-8 JSON bytes, never pickled); :meth:`DistContext.barrier` waits for all.

Every rank writes support sets and banks into the same content-keyed cache, which locks
per key and writes atomically, so the cache folder must be on a file system that every
node sees.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal, TypeVar

import numpy as np
import torch

__all__ = [
    "DistContext",
    "LaunchEnv",
    "current",
    "distributed",
    "launch_env",
    "shard",
]

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 6 * 3600.0  # a rank may wait this long at a barrier (uneven shards)


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in a launch.

    Attributes:
        rank: global rank, ``0..world_size-1``.
        world_size: number of processes over all nodes.
        local_rank: rank on this node (picks the GPU).
        launcher: ``"torchrun"`` (torch elastic variables), ``"accelerate"`` (accelerate's
            own variables present), ``"env"`` (only RANK / WORLD_SIZE) or ``"none"``.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launcher: str = "none"


def _int_var(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name)
    if value is None or value.strip() == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """Read ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` as torchrun / accelerate set them.

    Args:
        environ: the environment (default ``os.environ``).

    Returns:
        The process's place; ``LaunchEnv()`` (one process) when ``WORLD_SIZE`` is unset.

    Raises:
        ValueError: inconsistent variables (RANK outside 0..WORLD_SIZE-1, WORLD_SIZE > 1
            without RANK, non-integers), with what to do.
    """
    env = os.environ if environ is None else environ
    world = _int_var(env, "WORLD_SIZE")
    rank = _int_var(env, "RANK")
    local = _int_var(env, "LOCAL_RANK")
    if world is None or world == 1:
        if world is None and env.get("SLURM_NTASKS", "1") not in ("", "1") and rank is None:
            print(
                "ovdiff: SLURM_NTASKS > 1 but no WORLD_SIZE: every task will do all the work. "
                "Start torchrun (or accelerate launch) with srun, one per node; see the "
                "README, 'Scaling out'",
                file=sys.stderr,
            )
        return LaunchEnv()
    if world < 1:
        raise ValueError(f"WORLD_SIZE must be >= 1, got {world}")
    if rank is None:
        raise ValueError(
            f"WORLD_SIZE={world} but RANK is not set: start the command with torchrun or "
            "accelerate launch, which set both"
        )
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside 0..{world - 1} (WORLD_SIZE={world})")
    if local is None:
        local = rank
    if local < 0:
        raise ValueError(f"LOCAL_RANK must be >= 0, got {local}")
    if any(k.startswith("ACCELERATE_") for k in env):
        launcher = "accelerate"
    elif "TORCHELASTIC_RUN_ID" in env or "LOCAL_WORLD_SIZE" in env:
        launcher = "torchrun"
    else:
        launcher = "env"
    return LaunchEnv(rank, world, local, launcher)


def shard(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """The items of ``rank``: ``items[rank::world_size]`` (item i goes to rank i % world).

    Deterministic and independent of timing: every rank computes the same split, the union
    over ranks is ``items`` and no item is on two ranks. Round-robin keeps neighbouring
    items (similar images, a vocabulary's related classes) on different ranks.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"shard: need 0 <= rank < world_size, got {rank} and {world_size}")
    return list(items[rank::world_size])


def pick_device(local_rank: int) -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA is available, else the CPU.

    Raises:
        ValueError: more processes on this node than visible GPUs.
    """
    if not torch.cuda.is_available():
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ValueError(
            f"LOCAL_RANK {local_rank} but this node sees {count} GPU(s): start at most "
            f"{count} processes per node (--nproc_per_node / --num_processes)"
        )
    return torch.device("cuda", local_rank)


class DistContext:
    """One process's handle on the launch (see the module docstring).

    With ``world_size == 1`` every collective is the identity and nothing of
    ``torch.distributed`` is used.

    Attributes:
        env: the :class:`LaunchEnv`.
        device: this rank's compute device (``cuda:LOCAL_RANK`` or ``cpu``).
        backend: ``"nccl"``, ``"gloo"`` or None (one process).
    """

    def __init__(self, env: LaunchEnv, device: torch.device, backend: str | None = None) -> None:
        self.env = env
        self.device = device
        self.backend = backend

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def is_main(self) -> bool:
        """True on rank 0, the rank that prints and writes results."""
        return self.env.rank == 0

    @property
    def _comm_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's items (:func:`shard`)."""
        return shard(items, self.rank, self.world_size)

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def all_reduce(self, array: np.ndarray, op: Literal["sum", "max"] = "sum") -> np.ndarray:
        """Element-wise sum (or max) of ``array`` over the ranks, returned on every rank.

        Args:
            array: any shape; integer arrays are reduced as int64 (exact), others as
                float64. Every rank must pass the same shape.

        Returns:
            A new array of ``array``'s shape, dtype int64 or float64.
        """
        exact = np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_
        out = np.asarray(array, dtype=np.int64 if exact else np.float64)
        if self.world_size == 1:
            return out.copy()
        import torch.distributed as dist

        t = torch.from_numpy(out.copy()).to(self._comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return t.cpu().numpy()

    def all_gather_json(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (JSON-able: dicts, lists, str, numbers), in rank order.

        Sent as UTF-8 JSON bytes in uint8 tensors (no pickle); meant for small rows such
        as a build summary or per-image records.
        """
        if self.world_size == 1:
            return [json.loads(json.dumps(obj))]
        import torch.distributed as dist

        data = json.dumps(obj).encode("utf-8")
        dev = self._comm_device
        size = torch.tensor([len(data)], dtype=torch.int64, device=dev)
        sizes = [torch.zeros_like(size) for _ in range(self.world_size)]
        dist.all_gather(sizes, size)
        longest = int(max(int(s.item()) for s in sizes))
        buf = torch.zeros(longest, dtype=torch.uint8, device=dev)
        if data:
            buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(dev)
        bufs = [torch.zeros_like(buf) for _ in range(self.world_size)]
        dist.all_gather(bufs, buf)
        return [
            json.loads(bytes(b[: int(s.item())].cpu().numpy().tobytes()).decode("utf-8"))
            for b, s in zip(bufs, sizes, strict=True)
        ]


_CURRENT: list[DistContext] = []


def current() -> DistContext:
    """The innermost open :func:`distributed` context; one process on the CPU if none."""
    if _CURRENT:
        return _CURRENT[-1]
    return DistContext(LaunchEnv(), torch.device("cpu"))


@contextlib.contextmanager
def distributed(
    environ: Mapping[str, str] | None = None,
    backend: str | None = None,
    timeout_s: float | None = None,
) -> Iterator[DistContext]:
    """Join the launch described by the environment for the duration of the block.

    Args:
        environ: the environment (default ``os.environ``); see :func:`launch_env`.
        backend: ``"gloo"`` or ``"nccl"``; None = NCCL when CUDA is available, else gloo
            (``OVDIFF_DIST_BACKEND`` overrides).
        timeout_s: how long a collective may wait for the slowest rank (None =
            ``OVDIFF_DIST_TIMEOUT_S`` or 6 hours: shards of a build can be uneven).

    Yields:
        The :class:`DistContext`. One process (no ``WORLD_SIZE``, or 1): no
        ``torch.distributed`` call at all, device = CPU unless CUDA is available (then
        ``cuda:0``). Several: the process group is initialised from ``MASTER_ADDR`` /
        ``MASTER_PORT`` and destroyed on exit, also when the block raises; a group that
        the caller initialised already is used and left open.

    Raises:
        ValueError: inconsistent launch variables, an unknown backend, or more processes
            per node than GPUs.
    """
    env_vars = os.environ if environ is None else environ
    env = launch_env(env_vars)
    if env.world_size == 1:
        ctx = DistContext(env, pick_device(0))
        _CURRENT.append(ctx)
        try:
            yield ctx
        finally:
            _CURRENT.pop()
        return
    import torch.distributed as dist

    if not dist.is_available():
        raise ValueError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    device = pick_device(env.local_rank)
    if dist.is_initialized():  # the caller's own group (e.g. main() inside a training script)
        ctx = DistContext(env, device, str(dist.get_backend()))
        _CURRENT.append(ctx)
        try:
            yield ctx
        finally:
            _CURRENT.pop()
        return
    name = (
        backend
        or env_vars.get("OVDIFF_DIST_BACKEND")
        or ("nccl" if device.type == "cuda" else "gloo")
    )
    if name not in ("gloo", "nccl"):
        raise ValueError(f"distributed backend must be 'gloo' or 'nccl', got {name!r}")
    if name == "nccl" and device.type != "cuda":
        raise ValueError("the nccl backend needs CUDA; use gloo on CPUs")
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if not env_vars.get(var):
            raise ValueError(
                f"WORLD_SIZE={env.world_size} but {var} is not set: start the command with "
                "torchrun or accelerate launch"
            )
    if timeout_s is None:
        timeout_s = float(env_vars.get("OVDIFF_DIST_TIMEOUT_S") or DEFAULT_TIMEOUT_S)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    extra: dict[str, Any] = {"device_id": device} if name == "nccl" else {}
    dist.init_process_group(
        backend=name,
        init_method="env://",
        rank=env.rank,
        world_size=env.world_size,
        timeout=timedelta(seconds=timeout_s),
        **extra,
    )
    ctx = DistContext(env, device, name)
    _CURRENT.append(ctx)
    try:
        yield ctx
    finally:
        _CURRENT.pop()
        if dist.is_initialized():
            dist.destroy_process_group()
