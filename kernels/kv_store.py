"""Write the k and v of new tokens into the paged pool at their slots, both in one launch.

An fp8 pool (--kv-cache-dtype fp8_e4m3 / fp8_e5m2) stores k / k_scale and v / v_scale, saturated to the format's
range (a plain cast would make out-of-range values NaN in e4m3); readers multiply the scales back."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, k_pool_ptr, v_pool_ptr, slots_ptr,
                     stride_kt, stride_kh, stride_vt, stride_vh, stride_ks, stride_kph, stride_vs, stride_vph,
                     num_heads, inv_k_scale, inv_v_scale, fp8_max,
                     HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, QUANTIZE: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + t).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)[:, None]
    offs_d = tl.arange(0, BLOCK_D)[None, :]
    mask = (offs_h < num_heads) & (offs_d < HEAD_DIM)
    k = tl.load(k_ptr + t * stride_kt + offs_h * stride_kh + offs_d, mask=mask)
    v = tl.load(v_ptr + t * stride_vt + offs_h * stride_vh + offs_d, mask=mask)
    if QUANTIZE:
        k = tl.minimum(tl.maximum(k.to(tl.float32) * inv_k_scale, -fp8_max), fp8_max)
        v = tl.minimum(tl.maximum(v.to(tl.float32) * inv_v_scale, -fp8_max), fp8_max)
    tl.store(k_pool_ptr + slot * stride_ks + offs_h * stride_kph + offs_d, k.to(k_pool_ptr.dtype.element_ty), mask=mask)
    tl.store(v_pool_ptr + slot * stride_vs + offs_h * stride_vph + offs_d, v.to(v_pool_ptr.dtype.element_ty), mask=mask)


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in (torch.float8_e4m3fn, torch.float8_e5m2)


def store_kv(k_pool: torch.Tensor, v_pool: torch.Tensor, slots: torch.Tensor, k: torch.Tensor,
             v: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """k_pool[slots] = k; v_pool[slots] = v. Pools [S, Hkv, D]; k, v [T, Hkv, D]; slots [T] (int32 or int64).
    fp8 pools get k / k_scale and v / v_scale, saturated."""
    num_tokens, num_heads, head_dim = k.shape
    if v.shape != k.shape or k_pool.shape[1:] != k.shape[1:] or v_pool.shape != k_pool.shape:
        raise ValueError(f"k {tuple(k.shape)}, v {tuple(v.shape)} and pools {tuple(k_pool.shape)} disagree")
    if slots.shape != (num_tokens,):
        raise ValueError(f"slots must have shape ({num_tokens},), got {tuple(slots.shape)}")
    if min(k.stride(2), v.stride(2), k_pool.stride(2), v_pool.stride(2)) != 1:
        raise ValueError("k, v and the pools must be contiguous in their last dimension")
    if num_tokens == 0:
        return
    _store_kv_kernel[(num_tokens,)](
        k, v, k_pool, v_pool, slots, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_pool.stride(0), k_pool.stride(1), v_pool.stride(0), v_pool.stride(1), num_heads,
        1.0 / k_scale, 1.0 / v_scale, torch.finfo(k_pool.dtype).max,
        HEAD_DIM=head_dim, BLOCK_H=triton.next_power_of_2(num_heads), BLOCK_D=triton.next_power_of_2(head_dim),
        QUANTIZE=is_fp8(k_pool.dtype), num_warps=4)


def store_kv_ref(k_pool: torch.Tensor, v_pool: torch.Tensor, slots: torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    k_pool[slots.long()] = to_pool_dtype(k, k_scale, k_pool.dtype)
    v_pool[slots.long()] = to_pool_dtype(v, v_scale, v_pool.dtype)


def to_pool_dtype(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """What a pool of `dtype` stores for x: x itself, or x / scale saturated to fp8."""
    if not is_fp8(dtype):
        return x.to(dtype)
    limit = torch.finfo(dtype).max
    return (x.float() * (1.0 / scale)).clamp_(-limit, limit).to(dtype)
