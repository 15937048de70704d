"""Online fp8 MoE experts (`--quantization fp8`): after loading, each expert's w13 and w2 become float8_e4m3fn with
one float32 scale per output channel, and the 16-bit parameters are dropped. The fused kernel (kernels/fused_moe.py)
reads them as they are; the CPU loop dequantizes. Checkpoints with quantized experts are not read (quantization.attach
refuses them)."""

from __future__ import annotations

import torch
from torch import nn

from runtime.layers.moe import FusedMoE
from runtime.layers.quantization.fp8_ops import FP8, quantize_per_channel


def quantize_experts(layer: FusedMoE) -> None:
    """One expert at a time, so the float32 temporaries stay one expert large."""
    for name in ("w13", "w2"):
        weight = getattr(layer, f"{name}_weight").data
        quantized = torch.empty_like(weight, dtype=FP8)
        scale = torch.empty(weight.shape[:2], dtype=torch.float32, device=weight.device)
        for expert in range(layer.num_experts):
            quantized[expert], scale[expert] = quantize_per_channel(weight[expert])
        del weight
        setattr(layer, f"{name}_weight", nn.Parameter(quantized, requires_grad=False))
        setattr(layer, f"{name}_scale", scale)
