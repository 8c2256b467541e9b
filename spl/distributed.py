"""The process group of a run: torchrun's environment, rank-0 output, and ranks agreeing on outcomes.

Every rank of a torchrun job runs the same program. Where only one rank can decide something (whether
a shared cache file matches, whether an output directory may be reused) rank 0 decides and the others
follow (``decide_on_rank0``); where any rank can fail (a full disk while writing its shard) all ranks
learn of it together (``raise_together``). Either way every rank raises the same ``TrainingError``,
instead of some ranks waiting forever in a collective that the failed one never reaches.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from tqdm import tqdm

T = TypeVar("T")


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss, an incompatible checkpoint); the message says why."""


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 and dist.is_initialized()


def world_size_from_env() -> int:
    """torchrun's WORLD_SIZE, readable before the process group starts (for checks that need no weights)."""
    return int(os.environ.get("WORLD_SIZE", 1))


def exit_process(code: int) -> None:
    """End a torchrun worker with ``code``, skipping interpreter finalization when it has ranks.

    Call it last, after the process group is destroyed and every file is written. Gloo worker
    threads can still release tensors during finalization and abort the process (SIGABRT,
    "terminate called without an active exception"; pytorch/pytorch#179291), which torchrun then
    reports as a failed run after a successful one. A single process exits normally.
    """
    if world_size_from_env() > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def init_distributed() -> DistEnv:
    """Read torchrun's environment once; start the process group when there is more than one rank."""
    rank, world = int(os.environ.get("RANK", 0)), world_size_from_env()
    local = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistEnv(rank, world, local, device)


def print0(env: DistEnv, *args) -> None:
    if env.is_main:
        tqdm.write(" ".join(str(a) for a in args))


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def decide_on_rank0(env: DistEnv, decide: Callable[[], T]) -> T:
    """Run ``decide`` on rank 0 and hand its result (or its ``TrainingError``) to every rank."""
    result: list = [None]
    if env.is_main:
        try:
            result[0] = ("ok", decide())
        except TrainingError as err:
            result[0] = ("error", str(err))
    if env.distributed:
        dist.broadcast_object_list(result, src=0)  # pickles between our own ranks only
    status, value = result[0]
    if status == "error":
        raise TrainingError(value)
    return value


def raise_together(env: DistEnv, error: str | None) -> None:
    """Collective: raise ``TrainingError`` on every rank if any rank passes an error (the lowest
    failing rank's message wins); return on all ranks otherwise."""
    errors = [error]
    if env.distributed:
        errors = [None] * env.world_size
        dist.all_gather_object(errors, error)
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise TrainingError(first)
