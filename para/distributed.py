"""Data parallelism under `torchrun`, on PyTorch's own distributed engine.

Each rank reads its share of every batch and computes gradients for it; only the adapter's
gradients (a few MB) are summed across ranks, since the base weights are frozen and identical
everywhere. Rank 0 alone logs and writes files. With `shard_blocks` (train.py --fsdp) each
block, frozen weights and adapter alike, is sharded across ranks by FSDP, which then does the
gradient reduction itself. Without torchrun this is a one-process world and every call below
is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    sharded: bool = False   # blocks sharded by FSDP, which reduces their gradients itself

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, requested: str | None) -> str | None:
        """Under torchrun on CUDA, each process takes the GPU of its local rank."""
        if self.size > 1 and (requested or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda":
            torch.cuda.set_device(self.local_rank)
            return f"cuda:{self.local_rank}"
        return requested

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of a few numbers over all ranks."""
        if self.size == 1:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self._device())
        dist.all_reduce(tensor)
        return tensor.tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank if it is true on one (a signal seen by one rank stops all)."""
        return bool(self.sum([float(flag)])[0]) if self.size > 1 else flag

    @property
    def gradient_scale(self) -> int:
        """The loss is divided by the whole batch's token count, so the ranks' gradients must be
        summed; FSDP averages them instead, which this factor undoes."""
        return self.size if self.sharded else 1

    def sum_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Add up the adapter gradients of all ranks, in one flat buffer (one collective)."""
        if self.size == 1 or self.sharded:
            return
        for p in params:  # a rank whose share of the batch was empty still takes part
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def _device(self) -> str:
        return f"cuda:{self.local_rank}" if dist.get_backend() == "nccl" else "cpu"


def init_world(requested_device: str | None = None) -> World:
    """Join the process group torchrun describes in the environment (nccl on CUDA, gloo on CPU)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    cuda = (requested_device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo")
    return World(dist.get_rank(), size, int(os.environ.get("LOCAL_RANK", "0")))


def shard_blocks(model, world: World) -> None:
    """FSDP2 over each block: a rank keeps 1/size of every block's weights and gathers a block
    just before it runs. The embedding and final norm stay whole on every rank (the tied output
    projection reads the embedding outside its module). FSDP averages the ranks' gradients,
    so the trainer scales its loss by the number of ranks (see `gradient_scale`)."""
    from torch.distributed.fsdp import fully_shard
    for block in model.layers:
        fully_shard(block)
    world.sharded = True


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly FSDP-sharded) parameter; a collective for a shard."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def close_world(world: World) -> None:
    if world.size > 1:
        dist.barrier()  # leave together: gloo aborts a rank whose peer is still talking to it
        dist.destroy_process_group()
