"""Normalization layers, with the residual add fused in (as in pre-norm blocks: h = x + residual; out = norm(h)).

- RMSNorm: Llama's. With `weight_offset=1` it is Gemma's (scale by 1 + w, computed in float32): the weight is then kept
  in float32 with the offset added at load time, so the kernels below serve both.
- LayerNorm: mean and variance, optional bias (StableLM has one; Cohere, DBRX and OLMo do not).
Both normalize over the last dimension, so per-head q/k norms are the same layers applied to [T, heads, head_dim].

On CUDA the Triton kernels of kernels/rmsnorm.py run for 2-D RMSNorm inputs (one pass; with a residual, in place on x
and residual); elsewhere the torch code below, which is also the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from runtime.layers.linear import copy_checked

try:  # Triton is needed on CUDA only (pyproject's gpu extra); CPU installs run the torch code
    from kernels.rmsnorm import fused_add_rms_norm, rms_norm
except ImportError:
    fused_add_rms_norm = rms_norm = None


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype, weight_offset: float = 0.0):
        super().__init__()
        self.eps = eps
        self.weight_offset = weight_offset
        # Gemma's 1 + w is formed in float32: 1 + a small w rounded to bf16 would lose most of w's bits
        weight_dtype = torch.float32 if weight_offset else dtype
        self.weight = nn.Parameter(torch.empty(hidden_size, dtype=weight_dtype), requires_grad=False)
        if weight_offset:
            self.weight.weight_loader = self.load_offset

    def load_offset(self, param: nn.Parameter, loaded: torch.Tensor, name: str, shard_id=None) -> None:
        copy_checked(param, loaded.float() + self.weight_offset, name)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight_offset:  # Gemma: scale in float32, then round
            return (x32 * self.weight).to(x.dtype)
        # statistics in float32, scale in the model dtype: the order transformers uses for Llama
        return self.weight * x32.to(x.dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """norm(x); or, with `residual`, (norm(x + residual), x + residual). On CUDA the second form overwrites
        x and residual with its two results: callers must not reuse them."""
        if x.is_cuda and rms_norm is not None and x.dim() == 2 and x.stride(1) == 1 and \
                not torch.compiler.is_compiling():
            if residual is None:
                return rms_norm(x, self.weight, self.eps)
            return fused_add_rms_norm(x, residual, self.weight, self.eps)
        if residual is None:
            return self.normalize(x)
        summed = x + residual
        return self.normalize(summed), summed


class LayerNorm(nn.Module):
    """LayerNorm over the last dimension, statistics in float32, with the same residual contract as RMSNorm.

    Per-head q/k norms with their own weights per head (Cohere, StableLM) pass `heads=(first, count)`: the weight is
    [count, head_dim] for this rank's heads, loaded from a checkpoint tensor of all heads [H, head_dim] or, with
    shard_id h, from head h's own [head_dim] tensor (heads of other ranks are skipped)."""

    def __init__(self, size: int, eps: float, bias: bool, dtype: torch.dtype, heads: tuple[int, int] | None = None):
        super().__init__()
        self.eps = eps
        self.heads = heads
        shape = (size,) if heads is None else (heads[1], size)
        self.weight = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False) if bias else None
        if heads is not None:
            for param in (self.weight, self.bias):
                if param is not None:
                    param.weight_loader = self.load_heads

    def load_heads(self, param: nn.Parameter, loaded: torch.Tensor, name: str, shard_id: int | None = None) -> None:
        first, count = self.heads
        if shard_id is None:
            copy_checked(param, loaded[first:first + count], name)
        elif first <= shard_id < first + count:
            copy_checked(param.data[shard_id - first], loaded, name)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        out = F.layer_norm(x.float(), x.shape[-1:], eps=self.eps) * self.weight.float()
        if self.bias is not None:
            out = out + self.bias.float()
        return out.to(x.dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return self.normalize(x)
        summed = x + residual
        return self.normalize(summed), summed
