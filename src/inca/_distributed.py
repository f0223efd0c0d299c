"""The process group inca runs in: one process, or N started by ``torchrun``.

``torchrun --nproc-per-node N -m inca extract|fit ...`` sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``; :func:`context` joins the group they describe once per process (Gloo for
CPU tensors; NCCL for CUDA tensors when each local rank has a GPU of its own, else Gloo;
``INCA_DIST_BACKEND`` overrides) and
returns the same :class:`Dist` every time. Without those variables it is a group of one,
and every collective below is a no-op: the code that calls them is the same for 1 and N
processes.
"""

from __future__ import annotations

import atexit
import datetime as _dt
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from inca.errors import DistributedError


@dataclass(frozen=True)
class Dist:
    """Where this process stands in its group."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        """Whether there are several processes."""
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that prints, writes reports and saves tasks."""
        return self.rank == 0

    def device(self, requested: str | torch.device | None) -> torch.device | str | None:
        """This rank's device: when several ranks ask for CUDA (or ``auto`` finds it),
        GPU ``LOCAL_RANK`` modulo the GPUs this node has (ranks beyond them share GPUs, as
        ``INCA_DIST_BACKEND=gloo`` allows), made the current device; else what was asked.

        Raises:
            DistributedError: the GPU cannot be selected.
        """
        if not self.active or requested is None:
            return requested
        name = str(requested)
        if name in ("cuda", "auto") and torch.cuda.is_available():
            dev = torch.device("cuda", self.local_rank % torch.cuda.device_count())
            try:
                torch.cuda.set_device(dev)
            except (RuntimeError, AssertionError) as e:
                raise DistributedError(
                    f"rank {self.rank} could not select {dev} ({e}); check "
                    "CUDA_VISIBLE_DEVICES and --nproc-per-node") from None
            return dev
        return requested

    def agree(self, value: Any, what: str, fix: str) -> None:
        """Check that every rank holds the same ``value`` (one collective).

        Raises:
            DistributedError: on every rank, when any rank's value differs from rank 0's.
        """
        if not self.active:
            return
        values: list[Any] = [None] * self.world
        dist.all_gather_object(values, value)
        differ = [r for r, v in enumerate(values) if v != values[0]]
        if differ:
            raise DistributedError(
                f"rank(s) {differ} hold other {what} than rank 0 ({values[differ[0]]!r} "
                f"vs {values[0]!r}); {fix}")

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def all_ok(self, ok: bool) -> bool:
        """Whether every rank is ``ok`` (one collective): a rank that failed makes every
        rank stop instead of waiting for it forever."""
        if not self.active:
            return ok
        flag = torch.tensor([0 if ok else 1], device=_collective_device())
        dist.all_reduce(flag)
        return int(flag) == 0

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the ranks (a new tensor on ``t``'s device)."""
        if not self.active:
            return t
        out = t.to(_collective_device(), copy=True)
        dist.all_reduce(out)
        return out.to(t.device)

    def gather_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Every rank's rows (first dimension; ranks may hold different counts),
        concatenated in rank order, on every rank, on the CPU."""
        if not self.active:
            return rows.cpu()
        dev = _collective_device()
        n = torch.tensor([rows.shape[0]], device=dev)
        counts = [torch.zeros_like(n) for _ in range(self.world)]
        dist.all_gather(counts, n)
        most = int(max(int(c) for c in counts))
        pad = torch.zeros((most, *rows.shape[1:]), dtype=rows.dtype, device=dev)
        pad[:rows.shape[0]] = rows.to(dev)
        parts = [torch.empty_like(pad) for _ in range(self.world)]
        dist.all_gather(parts, pad)
        return torch.cat([p[:int(c)] for p, c in zip(parts, counts, strict=True)]).cpu()

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def share(self, n: int) -> np.ndarray:
        """This rank's contiguous share of ``n`` items (sizes differ by at most one)."""
        return np.array_split(np.arange(n), self.world)[self.rank]

    def split(self, items: np.ndarray) -> np.ndarray:
        """This rank's part of one batch of items (sizes differ by at most one)."""
        return np.array_split(items, self.world)[self.rank]


_CONTEXT: Dist | None = None


def _collective_device() -> torch.device:
    """Where collectives' tensors live: the rank's GPU under NCCL, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _default_backend() -> str:
    """Gloo for CPU tensors, and NCCL for CUDA tensors when every local rank has a GPU of
    its own (NCCL refuses two ranks on one GPU; Gloo handles CUDA tensors there). The
    device is chosen later (:meth:`Dist.device`), so a ``--device cpu`` run on a GPU
    machine works too."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if (torch.cuda.is_available() and dist.is_nccl_available()
            and local_world <= torch.cuda.device_count()):
        return "cpu:gloo,cuda:nccl"
    return "gloo"


def context() -> Dist:
    """This process's place in its group, joining the group on first use.

    Raises:
        DistributedError: ``torchrun``'s variables are set but the group cannot be joined.
    """
    global _CONTEXT
    if _CONTEXT is not None:
        return _CONTEXT
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        _CONTEXT = Dist()
        return _CONTEXT
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = os.environ.get("INCA_DIST_BACKEND") or _default_backend()
        try:
            dist.init_process_group(backend, timeout=_dt.timedelta(minutes=30))
        except (RuntimeError, ValueError) as e:
            raise DistributedError(
                f"rank {rank} of {world} could not join the process group ({e}); start the "
                "ranks with torchrun and check --rdzv-endpoint / MASTER_ADDR and the "
                "network between nodes") from None
        atexit.register(shutdown)
    _CONTEXT = Dist(rank, world, local)
    return _CONTEXT


def shutdown() -> None:
    """Leave the process group (idempotent): on success, on errors and at exit."""
    global _CONTEXT
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _CONTEXT = None
