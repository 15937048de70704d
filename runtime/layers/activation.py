"""SiLU-and-multiply for the packed gate_up projection of gated MLPs: silu(gate) * up.
On CUDA one Triton kernel (kernels/activation.py, float32 inside); elsewhere torch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

try:  # Triton is needed on CUDA only
    from kernels.activation import silu_and_mul
except ImportError:
    silu_and_mul = None


class SiluAndMul(nn.Module):
    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        if gate_up.is_cuda and silu_and_mul is not None and gate_up.dim() == 2 and not torch.compiler.is_compiling():
            return silu_and_mul(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up
