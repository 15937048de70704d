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
from runtime.layers.quantization.fp8_ops import (
    new_split_counters,
    quantize_per_channel,
    quantize_per_token,
    scaled_mm,
    weight_only_kernel_applies,
    weight_only_mm,
)


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
    """logits = hidden @ W^T over the vocabulary, W laid out like the embedding (a tied model shares it).

    After `quantize_fp8` (--quantize-lm-head) the product reads an fp8 copy of W with a scale per vocabulary row, as
    the fp8 linear layers do (fp8_linear.Fp8PerChannelMethod): the weight-only kernel at decode, per-token
    activations and torch._scaled_mm above. W itself stays (a tied embedding still reads it)."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TensorParallel, dtype: torch.dtype):
        super().__init__(vocab_size, hidden_size, tp, dtype)
        for name in ("weight_fp8", "weight_scale", "split_counters"):
            self.register_buffer(name, None, persistent=False)

    def quantize_fp8(self, keep_weight: bool) -> None:
        """Quantize W per vocabulary row; keep_weight (a tied embedding reads W) or free it."""
        self.weight_fp8, self.weight_scale = quantize_per_channel(self.weight.data)
        self.split_counters = new_split_counters(self.weight_fp8)
        if not keep_weight:
            self.weight = nn.Parameter(self.weight.data.new_empty((0, self.weight.shape[1])), requires_grad=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, H] -> float32 logits [N, vocab_size]."""
        if self.weight_fp8 is None:
            local = F.linear(hidden, self.weight)
        elif weight_only_kernel_applies(hidden):
            local = weight_only_mm(hidden, self.weight_fp8, self.weight_scale, self.split_counters)
        else:
            x_fp8, x_scale = quantize_per_token(hidden)
            local = scaled_mm(x_fp8, x_scale, self.weight_fp8, self.weight_scale, hidden.dtype)
        logits = self.tp.all_gather_last_dim(local)
        return logits[..., :self.vocab_size].float()
