"""Dynamic per-token fp8 quantization of activations in one kernel: x [T, K] -> (fp8 [T, K], scale float32 [T, 1]).

Per row: amax = max |x| (capped at `scale_ub` when given, fbgemm's activation_scale_ub), scale = max(amax, min_amax)
/ fp8_max, q = clamp(x / scale, -fp8_max, fp8_max) as float8_e4m3fn. The torch version of the same formula
(runtime/layers/quantization/fp8_ops.py) takes five kernels and as many passes over x; this one reads each row twice
(the second pass from cache) and writes it once. It feeds torch._scaled_mm above the weight-only GEMM's batch sizes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FP8 = torch.float8_e4m3fn


@triton.jit
def _per_token_quant_kernel(
    x_ptr, q_ptr, scale_ptr, ub_ptr, K, stride_x, stride_q, fp8_max, min_amax,
    HAS_UB: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    q_row = q_ptr + row * stride_q
    offs = tl.arange(0, BLOCK_K)
    amax = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    row_amax = tl.max(amax, 0)
    if HAS_UB:
        row_amax = tl.minimum(row_amax, tl.load(ub_ptr))
    # IEEE-rounded divisions (Triton's "/" is approximate on the GPU): the same bits as the torch formula
    scale = tl.math.div_rn(tl.maximum(row_amax, min_amax), fp8_max)
    for k0 in range(0, K, BLOCK_K):
        mask = k0 + offs < K
        x = tl.load(x_row + k0 + offs, mask=mask, other=0.0).to(tl.float32)
        q = tl.clamp(tl.math.div_rn(x, scale), -fp8_max, fp8_max)
        tl.store(q_row + k0 + offs, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_ptr + row, scale)


def per_token_quant_fp8(x: torch.Tensor, scale_ub: torch.Tensor | None = None,
                        min_amax: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, K] -> (float8_e4m3fn [T, K], float32 [T, 1]); `scale_ub` a float32 scalar tensor capping each row's
    amax. No host synchronisation (CUDA-graph safe)."""
    tokens, k = x.shape
    if x.stride(1) != 1:
        raise ValueError("x must be contiguous in its last dimension")
    q = torch.empty(tokens, k, dtype=FP8, device=x.device)
    scale = torch.empty(tokens, 1, dtype=torch.float32, device=x.device)
    if tokens == 0:
        return q, scale
    block_k = min(4096, triton.next_power_of_2(k))
    _per_token_quant_kernel[(tokens,)](
        x, q, scale, scale if scale_ub is None else scale_ub, k, x.stride(0), q.stride(0),
        torch.finfo(FP8).max, min_amax,
        HAS_UB=scale_ub is not None, BLOCK_K=block_k, num_warps=4 if block_k <= 1024 else 8,
    )
    return q, scale
