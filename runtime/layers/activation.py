"""Gated activations on the packed gate_up projection of gated MLPs: act(gate) * up.
SiluAndMul (SwiGLU): on CUDA one Triton kernel (kernels/activation.py, float32 inside); elsewhere torch.
GeluAndMul (GeGLU, Gemma: the tanh approximation) in torch."""

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


class GeluAndMul(nn.Module):
    def __init__(self, approximate: str = "tanh"):
        super().__init__()
        self.approximate = approximate

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.gelu(gate, approximate=self.approximate) * up


# config.json `hidden_act` / `hidden_activation` names -> the gated activation
GATED_ACTIVATIONS = {
    "silu": SiluAndMul,
    "swish": SiluAndMul,
    "gelu_pytorch_tanh": lambda: GeluAndMul("tanh"),
    "gelu_new": lambda: GeluAndMul("tanh"),
    "gelu_fast": lambda: GeluAndMul("tanh"),
    "gelu": lambda: GeluAndMul("none"),
}


def gated_activation(name: str) -> nn.Module:
    try:
        return GATED_ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"activation {name!r} is not supported (supported: {', '.join(GATED_ACTIVATIONS)})") from None
