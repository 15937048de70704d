"""GatedMLP: down(act(gate(x)) * up(x)) with gate and up packed in one column-parallel matmul (gate_up_proj) and
down row parallel. SwiGLU for most families, GeGLU for Gemma (runtime/layers/activation.py)."""

from __future__ import annotations

import torch
from torch import nn

from runtime.layers.activation import gated_activation
from runtime.layers.linear import MergedColumnParallelLinear, RowParallelLinear
from runtime.layers.parallel import TensorParallel


class GatedMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str, bias: bool, tp: TensorParallel,
                 dtype: torch.dtype):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size, intermediate_size], bias, tp,
                                                       dtype)
        self.act = gated_activation(hidden_act)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias, tp, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))
