"""Multi-head latent attention (MLA, DeepSeek V2/V3) decode over the latent cache, split over the sequence.

The cache holds per token one row [kv_lora_rank + rope_dim]: the compressed latent c, then the rotated rope key.
With the key up-projection absorbed into the query (runtime/layers/mla.py), every query head h attends to that one
row with q_h = [q_latent_h (kv_lora_rank) | q_rope_h (rope_dim)], and its value is the latent c itself: the output
[Hq, kv_lora_rank] is up-projected by the caller. All heads share the cache row, so one program loads a tile of
rows once for a block of BLOCK_H heads: a decode step reads each token's 576 values (DeepSeek-V2) once per head
block, where up-projected keys and values would cost 2 x Hq x 192 values per token.

Stage 1 (`_mla_split_kernel`): one program per (row, head block, kv split); the latent and rope parts of q and of
the keys are separate power-of-two tiles (512 + 64 for DeepSeek, no padding to 1024). It writes a partial output
normalised by its own softmax sum and the log-sum-exp of its scores (base 2). Stage 2 is decode_attention's merge
kernel. An fp8 cache is read as fp8 * k_scale (for the scores and for the values, which are the same numbers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.decode_attention import _decode_merge_kernel, dot_precision

LOG2E = tl.constexpr(1.4426950408889634)


@dataclass(frozen=True)
class MlaTiles:
    """Launch shape of the split kernel: heads per program, cache rows per tile, warps, pipelining depth."""

    block_h: int
    block_n: int
    num_warps: int
    num_stages: int


def default_mla_tiles(latent_dim: int) -> MlaTiles:
    # 16 heads per program: the smallest tile tl.dot takes, and DeepSeek-V2-Lite's head count. At 512 + 64, compiled
    # for sm_90 (triton 3.x, ahead of time): 32 rows x 8 warps x 2 stages uses 140 registers and 66 KB of shared
    # memory; 4 warps need 253 registers, and 64-row tiles with 4 warps spill.
    if latent_dim >= 256:
        return MlaTiles(16, 32, 8, 2)
    return MlaTiles(16, 64, 4, 2)


@triton.jit
def _mla_split_kernel(
    q_ptr, cache_ptr, req_to_token_ptr, rows_ptr, seq_lens_ptr, part_o_ptr, part_lse_ptr,
    sm_scale, v_scale, num_heads, num_splits,
    stride_qb, stride_qh, stride_cs, stride_rtt,
    stride_pob, stride_poh, stride_pos, stride_plb, stride_plh,
    LATENT: tl.constexpr, ROPE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    head_block = tl.program_id(1)
    split = tl.program_id(2)

    row = tl.load(rows_ptr + b).to(tl.int64)
    seq_len = tl.load(seq_lens_ptr + b)
    split_len = tl.cdiv(seq_len, num_splits)
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)

    heads = head_block * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_l = tl.arange(0, BLOCK_L)
    offs_r = tl.arange(0, BLOCK_R)
    mask_h = heads < num_heads
    mask_l = offs_l < LATENT
    mask_r = offs_r < ROPE
    q_rows = q_ptr + b * stride_qb + heads[:, None] * stride_qh
    q_latent = tl.load(q_rows + offs_l[None, :], mask=mask_h[:, None] & mask_l[None, :], other=0.0)
    q_rope = tl.load(q_rows + LATENT + offs_r[None, :], mask=mask_h[:, None] & mask_r[None, :], other=0.0)

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_L], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        slots = tl.load(req_to_token_ptr + row * stride_rtt + offs_n, mask=mask_n, other=0).to(tl.int64)
        cache_rows = cache_ptr + slots[:, None] * stride_cs
        latent = tl.load(cache_rows + offs_l[None, :], mask=mask_n[:, None] & mask_l[None, :],
                         other=0.0).to(q_latent.dtype)
        rope = tl.load(cache_rows + LATENT + offs_r[None, :], mask=mask_n[:, None] & mask_r[None, :],
                       other=0.0).to(q_rope.dtype)
        qk = tl.dot(q_latent, tl.trans(latent), input_precision=PRECISION)
        qk += tl.dot(q_rope, tl.trans(rope), input_precision=PRECISION)
        s = tl.where(mask_n[None, :], qk * (sm_scale * LOG2E), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        acc = acc * alpha[:, None] + tl.dot(p.to(latent.dtype), latent, input_precision=PRECISION)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new

    # An empty split (short row) leaves l_i == 0: a zero partial with lse -inf, which the merge ignores.
    has_keys = l_i > 0
    out = acc * v_scale / tl.where(has_keys, l_i, 1.0)[:, None]
    lse = tl.where(has_keys, m_i + tl.math.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
    tl.store(part_o_ptr + b * stride_pob + heads[:, None] * stride_poh + split * stride_pos + offs_l[None, :],
             out, mask=mask_h[:, None] & mask_l[None, :])
    tl.store(part_lse_ptr + b * stride_plb + heads * stride_plh + split, lse, mask=mask_h)


def mla_decode(q: torch.Tensor, cache: torch.Tensor, req_to_token: torch.Tensor, rows: torch.Tensor,
               seq_lens: torch.Tensor, latent_dim: int, scale: float, num_kv_splits: int,
               out: torch.Tensor | None = None, part_o: torch.Tensor | None = None,
               part_lse: torch.Tensor | None = None, tiles: MlaTiles | None = None,
               k_scale: float = 1.0) -> torch.Tensor:
    """q [B, Hq, latent + rope]; cache [S, 1, latent + rope] (or [S, latent + rope]); req_to_token [R, C] int32;
    rows, seq_lens [B] -> o [B, Hq, latent], in q's dtype.

    Row b attends to the cache rows at slots req_to_token[rows[b], :seq_lens[b]]; the values are their first
    `latent_dim` dimensions. `part_o` [>=B, Hq, num_kv_splits, latent] and `part_lse` [>=B, Hq, num_kv_splits]
    (float32) may be passed preallocated (CUDA graphs). An fp8 cache is read as fp8 * k_scale."""
    batch, num_heads, width = q.shape
    cache = cache.view(cache.shape[0], -1)
    rope_dim = width - latent_dim
    if cache.shape[1] != width or rope_dim < 0:
        raise ValueError(f"cache rows of {cache.shape[1]} values do not match q's {width} (latent {latent_dim})")
    if cache.stride(1) != 1 or q.stride(2) != 1 or req_to_token.stride(1) != 1:
        raise ValueError("q, cache and req_to_token must be contiguous in their last dimension")
    if out is None:
        out = q.new_empty(batch, num_heads, latent_dim)
    if (part_o is None) != (part_lse is None):
        raise ValueError("part_o and part_lse must be passed together")
    if part_o is None:
        part_o = torch.empty(batch, num_heads, num_kv_splits, latent_dim, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(batch, num_heads, num_kv_splits, dtype=torch.float32, device=q.device)
    if part_o.stride(3) != 1 or part_o.shape[1:] != (num_heads, num_kv_splits, latent_dim) or part_o.shape[0] < batch:
        raise ValueError(f"part_o must be float32 [>={batch}, {num_heads}, {num_kv_splits}, {latent_dim}], contiguous "
                         f"in its last dimension; got {tuple(part_o.shape)}")
    if batch == 0:
        return out
    tiles = tiles or default_mla_tiles(latent_dim)
    block_l = max(16, triton.next_power_of_2(latent_dim))
    _mla_split_kernel[(batch, triton.cdiv(num_heads, tiles.block_h), num_kv_splits)](
        q, cache, req_to_token, rows, seq_lens, part_o, part_lse,
        scale * k_scale, k_scale, num_heads, num_kv_splits,
        q.stride(0), q.stride(1), cache.stride(0), req_to_token.stride(0),
        part_o.stride(0), part_o.stride(1), part_o.stride(2), part_lse.stride(0), part_lse.stride(1),
        LATENT=latent_dim, ROPE=rope_dim, BLOCK_H=tiles.block_h, BLOCK_N=tiles.block_n, BLOCK_L=block_l,
        BLOCK_R=max(16, triton.next_power_of_2(max(rope_dim, 1))), PRECISION=dot_precision(q.dtype),
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    _decode_merge_kernel[(batch, num_heads)](
        part_o, part_lse, out, num_kv_splits,
        part_o.stride(0), part_o.stride(1), part_o.stride(2), part_lse.stride(0), part_lse.stride(1),
        out.stride(0), out.stride(1),
        HEAD_DIM=latent_dim, BLOCK_S=triton.next_power_of_2(num_kv_splits), BLOCK_D=block_l, num_warps=4,
    )
    return out


def mla_decode_ref(q: torch.Tensor, cache: torch.Tensor, req_to_token: torch.Tensor, rows: torch.Tensor,
                   seq_lens: torch.Tensor, latent_dim: int, scale: float, k_scale: float = 1.0) -> torch.Tensor:
    """Torch reference of `mla_decode`, one row at a time, in float32."""
    cache = cache.view(cache.shape[0], -1)
    out = q.new_empty(q.shape[0], q.shape[1], latent_dim)
    for b in range(q.shape[0]):
        slots = req_to_token[int(rows[b]), :int(seq_lens[b])].long()
        keys = cache[slots].float() * k_scale  # [L, latent + rope]
        scores = q[b].float() @ keys.T * scale  # [Hq, L]
        out[b] = (scores.softmax(-1) @ keys[:, :latent_dim]).to(q.dtype)
    return out
