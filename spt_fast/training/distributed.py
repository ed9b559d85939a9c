"""Data-parallel training under torchrun: which process this is, and the global batch's totals.

`torchrun --nproc-per-node N -m spt_fast train ...` starts N processes; each holds a full frozen
base on its own device and its part of every global batch (per-rank batch x world size). The
trainable parameters are wrapped in DistributedDataParallel, which averages their gradients; the
losses use the global batch's totals (tokens, samples, every contrastive pair, gathered with
gradient), so N processes with batch b compute what one process computes with batch N·b.
"""
from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import SPTError


@dataclass
class Shard:
    """This process's part of a global batch, for SPTModel.forward."""
    world: int
    total_tokens: torch.Tensor  # response tokens of the global batch (a scalar on this device)
    total_samples: int
    persona_keys: list  # of the whole global batch, in order
    gather: Callable[[torch.Tensor], torch.Tensor]  # [b, ...] per rank -> [world * b, ...], with gradient


class Distributed:
    """The process group of a torchrun launch, or a world of one."""

    def __init__(self, timeout_s: float = 600.0):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device(f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu")
        if self.world > 1 and not torch.distributed.is_initialized():
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            torch.distributed.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def part(self, items: list) -> list:
        """This rank's slice of a global batch's items (equal parts, in rank order)."""
        per = len(items) // self.world
        return items[self.rank * per:(self.rank + 1) * per]

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.active:
            value = value.clone()
            self._collective(torch.distributed.all_reduce, value)
        return value

    def any(self, flag: bool) -> bool:
        """True on every rank when it is True on any (a stop request must stop all at one step)."""
        if not self.active:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        self._collective(torch.distributed.all_reduce, t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item() > 0)

    def gather(self, value: torch.Tensor) -> torch.Tensor:
        import torch.distributed.nn.functional as dist_fn

        try:
            return torch.cat(dist_fn.all_gather(value), dim=0)
        except RuntimeError as exc:
            raise self.failure(exc) from None

    def barrier(self) -> None:
        if self.active:
            self._collective(torch.distributed.barrier)

    def shard(self, total_tokens: torch.Tensor, total_samples: int, persona_keys: list) -> Shard:
        return Shard(self.world, total_tokens, total_samples, persona_keys, self.gather)

    def _collective(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RuntimeError as exc:  # a peer died, closed its connection, or timed out
            raise self.failure(exc) from None

    def failure(self, exc: Exception) -> SPTError:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        message = f"rank {self.rank} of {self.world}: another rank stopped or did not answer ({first[:200]})"
        # Said at once: the launcher may stop this process before the error reaches the top.
        print(f"spt-fast train: error: {message}", file=sys.stderr, flush=True)
        return SPTError(message)

    def close(self) -> None:
        """End the process group once every rank is done. Drop the DistributedDataParallel wrapper
        first: a DDP reducer that outlives its group aborts the process at exit ('terminate called
        without an active exception')."""
        import gc

        if self.active and torch.distributed.is_initialized():
            self.barrier()
            gc.collect()
            torch.distributed.destroy_process_group()

class TrainableParts(torch.nn.Module):
    """What DistributedDataParallel wraps: the prompts and the retriever (the trained parameters),
    not the frozen base, which every rank loads itself and which must not be broadcast. Calling
    it runs the whole SPT model's forward."""

    def __init__(self, spt):
        super().__init__()
        self.prompts, self.retriever = spt.prompts, spt.retriever
        self._spt = (spt,)  # a plain reference: not a submodule, so DDP never sees the base

    def forward(self, batch, shard=None):
        return self._spt[0](batch, shard)


def data_parallel(spt, dist: Distributed):
    """A callable (batch, shard) -> losses: the model itself, or wrapped in DDP across ranks."""
    if not dist.active:
        return spt
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [dist.device.index] if dist.device.type == "cuda" else None
    # Without a loss that reaches the retriever (PT, or every extra loss off) its parameters get no
    # gradient at all, which DDP must be told.
    cfg = spt.config
    trained_retriever = cfg.uses_retriever and (cfg.use_sel or cfg.use_fus or cfg.use_ctr)
    return DistributedDataParallel(TrainableParts(spt), device_ids=device_ids,
                                   find_unused_parameters=not trained_retriever)
