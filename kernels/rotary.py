"""Rotary position embedding applied in place to q and k, NeoX / HF "rotate_half" layout (the first and second halves
of the rotated dimensions are the pair), from a cos/sin cache indexed by each token's position.

The cache is [max_position, rotary_dim] float32: cos of the rotary_dim/2 frequencies, then their sin. Dimensions past
rotary_dim (partial rotary) are left as they are. One program rotates every head of one token.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(x_ptr, t, stride_t, stride_h, num_heads, cos, sin, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
                  BLOCK_HALF: tl.constexpr):
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_HALF)
    mask = (offs_h[:, None] < num_heads) & (offs_d[None, :] < HALF)
    first = x_ptr + t * stride_t + offs_h[:, None] * stride_h + offs_d[None, :]
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(first, (x1 * cos - x2 * sin).to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(first + HALF, (x2 * cos + x1 * sin).to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(positions_ptr, q_ptr, k_ptr, cos_sin_ptr, stride_qt, stride_qh, stride_kt, stride_kh, stride_cache,
                   num_q_heads, num_kv_heads, HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
                   BLOCK_HALF: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + t).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_HALF)
    cos = tl.load(cos_sin_ptr + pos * stride_cache + offs_d, mask=offs_d < HALF, other=0.0)[None, :]
    sin = tl.load(cos_sin_ptr + pos * stride_cache + HALF + offs_d, mask=offs_d < HALF, other=0.0)[None, :]
    _rotate_heads(q_ptr, t, stride_qt, stride_qh, num_q_heads, cos, sin, HALF, BLOCK_HQ, BLOCK_HALF)
    _rotate_heads(k_ptr, t, stride_kt, stride_kh, num_kv_heads, cos, sin, HALF, BLOCK_HK, BLOCK_HALF)


def build_cos_sin_cache(inv_freq: torch.Tensor, max_position: int) -> torch.Tensor:
    """inv_freq [rotary_dim/2] (any rope scaling already folded in) -> [max_position, rotary_dim] float32."""
    angles = torch.outer(torch.arange(max_position, dtype=torch.float32, device=inv_freq.device), inv_freq.float())
    return torch.cat([angles.cos(), angles.sin()], dim=-1).contiguous()


def apply_rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor) -> None:
    """In place. positions [T]; q [T, Hq, D]; k [T, Hkv, D]; cos_sin_cache [P, rotary_dim] with rotary_dim <= D."""
    num_tokens, num_q_heads, head_dim = q.shape
    rotary_dim = cos_sin_cache.shape[1]
    if rotary_dim % 2 or rotary_dim > head_dim:
        raise ValueError(f"cos_sin_cache width {rotary_dim} must be even and at most head_dim {head_dim}")
    if k.shape[0] != num_tokens or positions.shape != (num_tokens,):
        raise ValueError("positions, q and k must have the same number of tokens")
    if q.stride(2) != 1 or k.stride(2) != 1 or cos_sin_cache.stride(1) != 1:
        raise ValueError("q, k and cos_sin_cache must be contiguous in their last dimension")
    if num_tokens == 0:
        return
    half = rotary_dim // 2
    _rotary_kernel[(num_tokens,)](
        positions, q, k, cos_sin_cache, q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin_cache.stride(0),
        num_q_heads, k.shape[1], HALF=half, BLOCK_HQ=triton.next_power_of_2(num_q_heads),
        BLOCK_HK=triton.next_power_of_2(k.shape[1]), BLOCK_HALF=triton.next_power_of_2(half), num_warps=4)


def apply_rotary_ref(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                     cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Out of place, as HF Llama computes it (rotate_half), in float32."""
    rotary_dim = cos_sin_cache.shape[1]
    cos, sin = cos_sin_cache[positions.long()].chunk(2, dim=-1)
    cos = torch.cat([cos, cos], dim=-1)[:, None, :]
    sin = torch.cat([sin, sin], dim=-1)[:, None, :]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        rot, rest = x[..., :rotary_dim].float(), x[..., rotary_dim:]
        x1, x2 = rot.chunk(2, dim=-1)
        rotated = rot * cos + torch.cat([-x2, x1], dim=-1) * sin
        return torch.cat([rotated.to(x.dtype), rest], dim=-1)

    return rotate(q), rotate(k)
