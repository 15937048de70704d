"""TensorParallel: which shard of the model this process holds, and the collectives between shards.

At size 1 every collective returns its input untouched, so single-GPU and CPU runs never touch
torch.distributed. At size > 1 the process group must be initialised by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TensorParallel:
    rank: int = 0
    size: int = 1

    def __post_init__(self):
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"tensor parallel rank {self.rank} is not in 0..{self.size - 1}")

    def shard_range(self, total: int) -> tuple[int, int]:
        """[start, end) of this rank's share of `total` items split evenly (total must divide)."""
        if total % self.size:
            raise ValueError(f"{total} cannot be split evenly over tp_size {self.size}")
        per_rank = total // self.size
        return self.rank * per_rank, (self.rank + 1) * per_rank

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        dist.all_reduce(x)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=-1)
