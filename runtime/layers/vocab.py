"""Token embedding and LM head, split over ranks along the vocabulary.

Each rank holds rows [start, end) of the (padded) vocabulary. The embedding zeroes ids outside its
range and all-reduces; the LM head computes its slice of the logits and all-gathers them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from runtime.layers.linear import WeightShapeError, copy_checked
from runtime.layers.parallel import TensorParallel


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, tp: TensorParallel, dtype: torch.dtype):
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.per_rank = -(-vocab_size // tp.size)  # the last rank's slice is padded
        self.vocab_start = tp.rank * self.per_rank
        self.vocab_end = min(vocab_size, self.vocab_start + self.per_rank)
        self.weight = nn.Parameter(torch.empty((self.per_rank, hidden_size), dtype=dtype), requires_grad=False)
        self.weight.weight_loader = self.load_sharded

    def load_sharded(self, param: nn.Parameter, loaded: torch.Tensor, name: str, shard_id=None) -> None:
        if tuple(loaded.shape) != (self.vocab_size, param.shape[1]):
            raise WeightShapeError(f"tensor {name}: checkpoint shape {tuple(loaded.shape)} does not match the model's "
                                   f"{(self.vocab_size, param.shape[1])}")
        part = loaded[self.vocab_start:self.vocab_end]
        param.data[part.shape[0]:].zero_()
        copy_checked(param.data[:part.shape[0]], part, name)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        outside = (input_ids < self.vocab_start) | (input_ids >= self.vocab_end)
        local = torch.where(outside, 0, input_ids - self.vocab_start)
        out = F.embedding(local, self.weight).masked_fill_(outside.unsqueeze(-1), 0)
        return self.tp.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """logits = hidden @ W^T over the vocabulary, W laid out like the embedding (a tied model shares it)."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, H] -> float32 logits [N, vocab_size]."""
        logits = self.tp.all_gather_last_dim(F.linear(hidden, self.weight))
        return logits[..., :self.vocab_size].float()
