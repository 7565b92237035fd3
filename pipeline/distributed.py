"""The processes of one command under torchrun: which share of the images each takes, and how they wait.

Every rank makes the per-image results of the images whose index `i % world == rank`; rank 0 alone holds
the workdir lock, commits the entries and runs the dataset-level steps while the others wait at a
barrier. Outside torchrun (WORLD_SIZE unset or 1) there is one share, every image, and nothing waits.
A barrier may wait for hours (rank 0 clustering a million objects, a slow rank's saliency), so the
process group's timeout is large: `$OBJSEG_BARRIER_TIMEOUT` seconds, one day by default. A rank that
dies is noticed by torchrun, which stops the others, so the timeout only bounds a true hang.
"""
from __future__ import annotations

import dataclasses
import datetime
import os

import torch
import torch.distributed as dist

from pipeline import torchrun
from pipeline.errors import ConfigError, PipelineError, StoppedWithRankZero

BARRIER_TIMEOUT_ENV = "OBJSEG_BARRIER_TIMEOUT"
DEFAULT_BARRIER_TIMEOUT_S = 24 * 3600


@dataclasses.dataclass(frozen=True)
class Share:
    """The images one process takes: those whose index in the folder's listing is `rank` modulo `world`."""
    rank: int = 0
    world: int = 1

    def holds(self, index: int) -> bool:
        return index % self.world == self.rank


WHOLE = Share()


def barrier_timeout() -> datetime.timedelta:
    text = os.environ.get(BARRIER_TIMEOUT_ENV, str(DEFAULT_BARRIER_TIMEOUT_S))
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1
    if seconds <= 0:
        raise ConfigError(f"{BARRIER_TIMEOUT_ENV}={text!r}: give the barrier timeout in seconds (> 0)")
    return datetime.timedelta(seconds=seconds)


def join(device: torch.device) -> Share:
    """Under torchrun (WORLD_SIZE > 1), join the process group (gloo on the CPU, nccl on GPUs, each rank on
    its LOCAL_RANK's GPU) and return this process's share; else the whole."""
    if torchrun.world_size() <= 1:
        return WHOLE
    if not dist.is_initialized():
        timeout = barrier_timeout()
        if device.type == "cuda":
            torch.cuda.set_device(torchrun.local_rank())
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    return Share(dist.get_rank(), dist.get_world_size())


def joined() -> bool:
    """Whether this process is in a process group (a caller's, which a callee must not leave)."""
    return dist.is_available() and dist.is_initialized()


def leave() -> None:
    """Leave the process group before the process ends: a group torn down at exit, while a peer's
    connection closes, aborts the process (gloo: "terminate called without an active exception")."""
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def from_rank_zero(compute):
    """`compute()` on rank 0, its result on every rank. A PipelineError there is raised on rank 0 and ends
    the others with StoppedWithRankZero, so it is printed once."""
    if not dist.is_initialized():
        return compute()
    payload = [None]
    if dist.get_rank() == 0:
        try:
            payload = [("result", compute())]
        except PipelineError as exc:
            dist.broadcast_object_list([("error", str(exc))], src=0)
            raise
    dist.broadcast_object_list(payload, src=0)
    kind, value = payload[0]
    if kind == "error":
        raise StoppedWithRankZero(value)
    return value


def gathered_on_rank_zero(value) -> list:
    """Every rank's `value`, in rank order, on rank 0 (an empty list elsewhere); a barrier too."""
    if not dist.is_initialized():
        return [value]
    values = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(value, values, dst=0)
    return values or []
