"""Data parallelism on torch.distributed, for runs started by `accelerate launch` or `torchrun`.

Each process holds the whole (4-bit) model and a LoRA adapter initialised from the same seed. A global micro-batch
of per_device_train_batch_size × world_size pairs is dealt out in a snake order, one shard per process (batches grouped
by length are sorted inside, so every process gets a similar share of short and long pairs); after backward the
adapter gradients (a few MB) are averaged with one all-reduce, so every process takes the same optimizer step and
the run equals a single process with the global batch. Only rank 0 prints and writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def print(self, *args, **kwargs) -> None:
        if self.main:
            print(*args, **kwargs, flush=True)

    def shard(self, items: list) -> list:
        """This process's share of a global micro-batch (len(items) is a multiple of world), dealt like cards in a
        snake: ranks 0..w-1, then w-1..0, … so in a length-sorted batch each process gets short and long pairs alike."""
        w = self.world
        return [x for i, x in enumerate(items) if (i % w if (i // w) % 2 == 0 else w - 1 - i % w) == self.rank]

    def average_grads(self, params: list[torch.nn.Parameter]) -> None:
        if not self.enabled:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p, g in zip(params, grads):
            p.grad = flat[offset: offset + g.numel()].view_as(g).clone()
            offset += g.numel()

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def setup(device: torch.device) -> Context:
    """Join the process group when launched with WORLD_SIZE > 1 (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Context()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
    return Context(rank, world, local_rank)
