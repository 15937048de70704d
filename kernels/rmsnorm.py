"""RMSNorm and fused residual-add + RMSNorm, one program per row, statistics in float32.

`fused_add_rms_norm` follows vLLM's in-place contract: residual <- x + residual (rounded to the residual dtype, as the
unfused model computes it), then x <- rms_norm(residual) * weight. One read and one write of each tensor instead of the
four passes of the unfused add and norm.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, stride_x, stride_r, stride_o, n_cols, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n_cols
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        summed = x + tl.load(residual_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
        summed = summed.to(residual_ptr.dtype.element_ty)
        tl.store(residual_ptr + row * stride_r + offs, summed, mask=mask)
        x = summed.to(tl.float32)
    inv_rms = tl.math.rsqrt(tl.sum(x * x, 0) / n_cols + eps)
    w = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (x * inv_rms * w).to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, out: torch.Tensor, eps: float):
    n_cols = x.shape[-1]
    if weight.shape != (n_cols,):
        raise ValueError(f"weight must have shape ({n_cols},), got {tuple(weight.shape)}")
    for name, t in (("x", x), ("residual", residual), ("out", out)):
        if t is not None and (t.dim() != 2 or t.stride(1) != 1):
            raise ValueError(f"{name} must be 2-D and contiguous in its last dimension")
    if x.shape[0] == 0:
        return
    block = triton.next_power_of_2(n_cols)
    num_warps = min(16, max(1, block // 512))
    _rms_norm_kernel[(x.shape[0],)](
        x, residual if residual is not None else x, weight, out, x.stride(0),
        residual.stride(0) if residual is not None else 0, out.stride(0), n_cols, eps,
        HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=num_warps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [N, H], weight [H] -> x / rms(x) * weight, in the dtype of x."""
    out = torch.empty_like(x) if out is None else out
    _launch(x, None, weight, out, eps)
    return out


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """In place: residual <- x + residual; x <- rms_norm(residual) * weight. Returns (x, residual)."""
    if residual.shape != x.shape:
        raise ValueError(f"residual shape {tuple(residual.shape)} must equal x shape {tuple(x.shape)}")
    _launch(x, residual, weight, x, eps)
    return x, residual


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """As HF's LlamaRMSNorm computes it."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def fused_add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Out of place: returns (rms_norm(x + residual), x + residual)."""
    summed = x + residual
    return rms_norm_ref(summed, weight, eps), summed
