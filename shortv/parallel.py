"""Data parallelism over torchrun, with torch.distributed: one model per process, each
process (rank) takes a shard of the work, rank 0 writes the results. The workflows that
run data-parallel share it: `shortv eval`, `shortv lc`, and the lmms-eval model's LC sums.

`torchrun --nproc-per-node N -m shortv eval ...` (or `lc ...`) sets RANK / WORLD_SIZE /
LOCAL_RANK; the process group is nccl on CUDA (device cuda:LOCAL_RANK) and gloo on the
CPU. A failure on one rank is shared with all of them at the next collective step, so
every rank stops instead of waiting for a peer that is gone. One rank speaks for the
failure: the lowest failing one raises its error as `RankError` "rank N: ..." (the CLI
prints it and exits 2); the others raise a RankError marked `relayed`, on which the CLI
stays silent and exits 0. So the error is printed once, and torchrun's failure report
blames rank N: had the others exited non-zero too, whichever exited first would be
reported as the root cause, and torchrun would stop the rest, maybe rank N before it
printed. (torchrun itself exits 1 whenever a worker fails.)
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch

from .errors import ConfigError, ShortVError

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run: rank, world size and its device (None: the
    command's --device / default)."""

    rank: int = 0
    world: int = 1
    device: str | None = None

    @property
    def main(self) -> bool:
        """Whether this process writes files and prints (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's share: every world-th item, starting at its rank (keeps the order)."""
        return list(items[self.rank::self.world])

    def steps(self, n_items: int, batch_size: int) -> int:
        """Batches every rank runs, the same count on all ranks (some get empty ones), so
        that their collective calls pair up."""
        per_rank = -(-n_items // self.world)
        return -(-per_rank // batch_size)


def start(device: str | None = None) -> Ranks:
    """Join the torchrun process group if this process was started by torchrun (a
    single-process run when WORLD_SIZE is unset or 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks(device=device)
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    if device is not None and device not in ("cpu", "cuda"):
        raise ConfigError(f"--device {device} with torchrun: give cpu or cuda, and each process "
                          "takes its own device (cuda:LOCAL_RANK)")
    if use_cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(minutes=30))
    return Ranks(rank, world, f"cuda:{local}" if use_cuda else "cpu")


def stop(ranks: Ranks) -> None:
    """Leave the process group (after the last collective)."""
    if ranks.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def leave_at_exit() -> None:
    """Leave the process group when the interpreter exits, for a group this process did not
    make (lmms-eval's, through accelerate). Python runs atexit handlers while the
    interpreter is whole; a gloo group still alive at finalization can abort the process
    (SIGABRT, "terminate called without an active exception") after all its work is done,
    which torchrun then reports as a failed run."""
    atexit.register(_leave_if_joined)


def _leave_if_joined() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def gather(ranks: Ranks, value: Any, error: BaseException | None = None) -> list[Any] | None:
    """Every rank's `value` on rank 0 (None elsewhere), in rank order. A rank that failed
    passes its exception as `error`: then every rank raises (see `_raise_failure`)."""
    if not ranks.distributed:
        if error is not None:
            raise error
        return [value]
    import torch.distributed as dist

    message = None if error is None else f"rank {ranks.rank}: {_describe(error)}"
    outcomes: list[Any] = [None] * ranks.world
    dist.all_gather_object(outcomes, (message, value))
    _raise_failure(ranks, error, [m for m, _ in outcomes])
    return [v for _, v in outcomes] if ranks.main else None


def on_main(ranks: Ranks, action: Callable[[], T]) -> T | None:
    """`action()` on rank 0 alone (reading or writing the files), its value there (None
    elsewhere); if it raises, every rank stops with that failure."""
    value, error = None, None
    if ranks.main:
        try:
            value = action()
        except Exception as e:  # shared with the other ranks before anyone raises
            if not ranks.distributed:
                raise
            error = e
    gather(ranks, None, error)
    return value


def _raise_failure(ranks: Ranks, error: BaseException | None, messages: list[str | None]) -> None:
    """After every rank shared its failure message (None: it did not fail): nothing if
    none failed; else the lowest failing rank raises its error as a RankError (a bug, not
    a ShortVError, as itself, for its traceback) and the others a relayed RankError."""
    failed = [(rank, m) for rank, m in enumerate(messages) if m is not None]
    if not failed:
        return
    if error is not None and not isinstance(error, ShortVError):
        raise error  # a bug on this rank: keep its traceback
    speaker, message = failed[0]
    if speaker == ranks.rank:
        raise RankError(message, rank=speaker) from error
    raise RankError(message, rank=speaker, relayed=True)


def broadcast(ranks: Ranks, value: Any) -> Any:
    """Rank 0's `value` on every rank."""
    if not ranks.distributed:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_sum(ranks: Ranks, tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of `tensor` over ranks (on the CPU, in its dtype)."""
    if not ranks.distributed:
        return tensor
    import torch.distributed as dist

    work = tensor.detach().clone()
    if dist.get_backend() == "nccl":
        work = work.cuda()
    dist.all_reduce(work)
    return work.cpu()


class RankError(ShortVError):
    """A rank of a torchrun run failed: "rank N: why". `rank` is N; `relayed` is True on
    the other ranks, which learnt of it (the CLI prints it on rank N only)."""

    def __init__(self, message: str, *, rank: int, relayed: bool = False) -> None:
        super().__init__(message)
        self.rank = rank
        self.relayed = relayed


def _describe(error: BaseException) -> str:
    if isinstance(error, ShortVError):
        return str(error)
    return f"internal error: {error.__class__.__name__}: {error}"
