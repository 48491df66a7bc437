"""torchrun support: read RANK / WORLD_SIZE / LOCAL_RANK, start and stop the process group, and
the few collectives training and scoring use (each a no-op in one process).

    torchrun --nproc_per_node=2 main.py --c bottle --device cpu    # gloo on CPU, nccl on CUDA
    torchrun --nproc_per_node=2 inference_concatenation.py --category bottle --device cpu

A process of the run that stops (killed, out of memory) makes the others' collectives fail, or
torchrun stops them with SIGTERM: both end as :class:`RunStopped`, a :class:`UserError`, so the
command line prints one line and what a run was writing is removed (see ``scoring.outputs.folders.run_folder``).
"""

from __future__ import annotations

import datetime
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from common.errors import UserError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# Scoring's processes wait for rank 0 while it builds (and caches) a bank, and for a sharded
# coreset: far longer than the 30-minute default (a 1M-row coreset takes 15 minutes on 2 cores).
SCORING_TIMEOUT = datetime.timedelta(hours=12)


def init_distributed(device_type: str, backend: str | None = None,
                     timeout: datetime.timedelta | None = None) -> DistInfo:
    """Join the process group when launched by torchrun (``backend``: nccl on CUDA, else gloo, unless
    given; scoring uses gloo on every device; each process on the GPU of its local rank); a no-op
    for a single process. ``timeout``: how long a collective waits for the others."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend=backend or ("nccl" if device_type == "cuda" else "gloo"),
                                **({"timeout": timeout} if timeout else {}))
    return info


def barrier(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        collective(dist.barrier)


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        collective(lambda: dist.all_reduce(tensor, op=dist.ReduceOp.SUM))
    return tensor


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


class RunStopped(UserError):
    """Another process of a torchrun run stopped, so this one cannot finish its part."""


STOPPED = ("another process of this torchrun run stopped (its own message says why); this one stops too "
           "and leaves no partial result")
TERMINATED = ("stopped by SIGTERM (torchrun sends it when another process of the run failed; or a scheduler); "
              "no partial result is left")
# What gloo's errors say when a peer is gone (closed sockets, resets, timeouts).
PEER_GONE = ("connection closed", "connection reset", "broken pipe", "read error", "write error", "timed out",
             "timeout", "peer")
T = TypeVar("T")


def collective(call: Callable[[], T]) -> T:
    """``call()`` (a collective), with a peer that is gone worded as :class:`RunStopped`; other
    errors (a wrong backend, a bad tensor) stay what they are."""
    try:
        return call()
    except (RuntimeError, ConnectionError) as exc:
        if isinstance(exc, ConnectionError) or any(word in str(exc).lower() for word in PEER_GONE):
            raise RunStopped(STOPPED) from exc
        raise


def stop_on_sigterm(info: DistInfo) -> None:
    """Under torchrun, SIGTERM (sent when another process failed) raises :class:`RunStopped`, so
    ``finally`` / cleanup code runs; one process keeps the default."""
    if info.enabled:
        def stopped(signum, frame):
            raise RunStopped(TERMINATED)

        signal.signal(signal.SIGTERM, stopped)


def block(count: int, info: DistInfo, align: int = 1) -> range:
    """The contiguous share of ``range(count)`` of rank ``info.rank``: whole units of ``align``
    items (a batch: each rank's batches are then the one process's), as even as they can be;
    ranks in order, so the shares concatenated are ``range(count)``."""
    units = -(-count // max(1, align))
    start = info.rank * units // info.world_size * align
    stop = (info.rank + 1) * units // info.world_size * align
    return range(min(start, count), min(stop, count))


def gather_to_main(obj: T, info: DistInfo) -> list[T] | None:
    """Every rank's ``obj`` (picklable) in rank order on rank 0, ``None`` on the others."""
    if not info.enabled:
        return [obj]
    out: list | None = [None] * info.world_size if info.is_main else None
    collective(lambda: dist.gather_object(obj, out, dst=0))
    return out


def all_gather(tensor: torch.Tensor, info: DistInfo) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (the same shape on every rank), in rank order, on every rank."""
    if not info.enabled:
        return [tensor]
    # Through the host: scoring's group is gloo on every device (its messages are small).
    host = tensor.detach().cpu().contiguous()
    out = [torch.empty_like(host) for _ in range(info.world_size)]
    collective(lambda: dist.all_gather(out, host))
    return [t.to(tensor.device) for t in out]


def part_offset(count: int, info: DistInfo | None) -> tuple[int, int]:
    """For parts of ``count`` items per rank, in rank order: where this rank's starts, and the total."""
    if info is None or not info.enabled:
        return 0, count
    sizes = [int(n) for n in all_gather(torch.tensor([count]), info)]
    return sum(sizes[:info.rank]), sum(sizes)
