"""RMSNorm, with the residual add fused in (as in Llama blocks: h = x + residual; out = norm(h)).

On CUDA the Triton kernels of kernels/rmsnorm.py run (one pass; with a residual, in place on x and residual);
elsewhere the torch code below, which is also the reference.
"""

from __future__ import annotations

import torch
from torch import nn

try:  # Triton is needed on CUDA only (pyproject's gpu extra); CPU installs run the torch code
    from kernels.rmsnorm import fused_add_rms_norm, rms_norm
except ImportError:
    fused_add_rms_norm = rms_norm = None


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size, dtype=dtype), requires_grad=False)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        # statistics in float32, scale in the model dtype: the order transformers uses
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """norm(x); or, with `residual`, (norm(x + residual), x + residual). On CUDA the second form overwrites
        x and residual with its two results: callers must not reuse them."""
        if x.is_cuda and rms_norm is not None and not torch.compiler.is_compiling():
            if residual is None:
                return rms_norm(x, self.weight, self.eps)
            return fused_add_rms_norm(x, residual, self.weight, self.eps)
        if residual is None:
            return self.normalize(x)
        summed = x + residual
        return self.normalize(summed), summed
