"""Decode attention over the token-granular paged KV pool (one new token per row), split over the sequence.

Stage 1 (`_decode_split_kernel`): one program per (row, kv head, kv split). It loads the q heads of its kv-head
group as one [BLOCK_H, D] tile (GQA: each K/V tile is read once for the whole group and fed to the tensor cores),
walks its share of the row's tokens through req_to_token, and writes a partial output normalised by its own softmax
sum plus the log-sum-exp of its scores. Stage 2 (`_decode_merge_kernel`): one program per (row, q head) merges the
splits by their log-sum-exps. Splitting keeps the GPU busy when few rows have long contexts. With one split the
first kernel writes the output itself; with merge counters (int32, one per row and kv head, zero between calls:
the caller's, so CUDA graphs replay them) the split that counts itself in last (an acq_rel atomic, as in
kernels/fp8_gemm.py) merges its group's splits, and the second launch goes (about 2.5 us a layer at batch 1).

Scores are kept in base 2 (scaled by log2(e)) so the inner loop uses exp2. With a logit cap c (Gemma 2), scaled
scores s become c * tanh(s / c) first. With ALiBi slopes (one per q head, Baichuan 13B), head h adds
slope_h * (key position - query position) to its scores.

An fp8 pool is read as fp8 * scale: k_scale is folded into the score scale and v_scale into the partial outputs
(both scales are per layer). With a 16-bit q the products run in float16 (DOT_FP16): fp8 -> float16 is one
conversion instruction per two values on Hopper, fp8 -> bfloat16 three more per value (through float16, unpacked),
and the conversion units, not memory, then bound the kernel. q is scaled by the score scale before its float16 cast,
so a bfloat16 q overflows it only past |q| ~ 65504 / scale (7.4e5 at head_dim 128); every fp8 value is exact in
float16. On CUDA (FP8_BITS) the V tiles, and from an e5m2 pool the K tiles too, reach float16 through
kernels/fp8_convert.py's bit placement (integer instructions); the power of two it leaves goes into the score scale
and v_scale. e4m3 K tiles keep Triton's packed conversion, which the H100 sweep found 2-5% faster than the 4.5
integer instructions a value pair takes there (docs/perf.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.fp8_convert import F16_BITS_SCALE, fp8_bits_to_f16, fp8_bits_to_f16_staged

LOG2E = tl.constexpr(1.4426950408889634)  # a global a @triton.jit function reads must be a constexpr object


@triton.jit
def tanh(x):
    # 2 * sigmoid(2x) - 1: exact in float32 and available everywhere (the interpreter included)
    return 2 * tl.sigmoid(2 * x) - 1


@triton.jit
def scaled_scores(qk, sm_scale, logit_cap, SOFTCAP: tl.constexpr):
    """Raw q.k products -> scores in base 2 (times log2(e)), soft-capped when SOFTCAP."""
    if SOFTCAP:
        return logit_cap * tanh(qk * (sm_scale / logit_cap)) * LOG2E
    return qk * (sm_scale * LOG2E)


@dataclass(frozen=True)
class DecodeTiles:
    """Launch shape of the split kernel: keys per tile, warps, software-pipelining depth."""

    block_n: int
    num_warps: int
    num_stages: int


def default_decode_tiles(head_dim: int, batch: int = 1, fp8_pool: bool = False) -> DecodeTiles:
    # (64, 4, 3) measured best on an H100 at Llama-3-8B shapes (docs/perf.md); wider heads take narrower tiles so
    # three stages of K and V tiles still fit in shared memory. Over an fp8 pool (half the bytes per key) from 128
    # rows on, 128-key tiles: 2-4% faster at 256 and 512 rows, 15% slower at 64 (H100 sweep, docs/perf.md).
    if head_dim > 128:
        return DecodeTiles(32, 4, 2)
    return DecodeTiles(128 if fp8_pool and batch >= 128 else 64, 4, 3)


@triton.jit
def _decode_split_kernel(
    q_ptr, k_pool_ptr, v_pool_ptr, req_to_token_ptr, rows_ptr, seq_lens_ptr,
    part_o_ptr, part_lse_ptr, alibi_ptr, o_ptr, counter_ptr,
    sm_scale, logit_cap, v_scale, sliding_window, num_splits, q_scale,
    stride_qb, stride_qh,
    stride_ks, stride_kh,
    stride_vs, stride_vh,
    stride_rtt,
    stride_pob, stride_poh, stride_pos,
    stride_plb, stride_plh,
    stride_ob, stride_oh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    DOT_FP16: tl.constexpr, FP8_BITS: tl.constexpr, E5M2: tl.constexpr,
    MERGE: tl.constexpr, BLOCK_S: tl.constexpr,  # MERGE: 0 partials only, 1 and the last split merges, 2 one split
):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    row = tl.load(rows_ptr + b).to(tl.int64)
    seq_len = tl.load(seq_lens_ptr + b)
    first = tl.where(sliding_window > 0, tl.maximum(seq_len - sliding_window, 0), 0)
    split_len = tl.cdiv(seq_len - first, num_splits)
    start = first + split * split_len
    end = tl.minimum(start + split_len, seq_len)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask_h = offs_h < GROUP
    mask_d = offs_d < HEAD_DIM
    heads = kv_head * GROUP + offs_h
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=mask_h[:, None] & mask_d[None, :], other=0.0)
    if DOT_FP16:  # the score scale moves into q (sm_scale is 1 then), which keeps q well inside float16's range
        q = (q.to(tl.float32) * q_scale).to(tl.float16)
    if ALIBI:
        slopes = tl.load(alibi_ptr + heads, mask=mask_h, other=0.0) * LOG2E

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        slots = tl.load(req_to_token_ptr + row * stride_rtt + offs_n, mask=mask_n, other=0).to(tl.int64)
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_pool_ptr + slots[:, None] * stride_ks + kv_head * stride_kh + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        k = fp8_bits_to_f16(k, E5M2) if FP8_BITS and E5M2 else k.to(q.dtype)
        s = scaled_scores(tl.dot(q, tl.trans(k), input_precision=PRECISION), sm_scale, logit_cap, SOFTCAP)
        if ALIBI:  # the query is the row's last token, at position seq_len - 1
            s += slopes[:, None] * (offs_n - (seq_len - 1)).to(tl.float32)[None, :]
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        v = tl.load(v_pool_ptr + slots[:, None] * stride_vs + kv_head * stride_vh + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        # seq_len >> 31: a zero the compiler cannot see (fp8_convert's "staged")
        v = fp8_bits_to_f16_staged(v, seq_len >> 31, E5M2) if FP8_BITS else v.to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new

    # An empty split (short row) leaves l_i == 0: it writes a zero partial with lse -inf, which the merge ignores.
    has_keys = l_i > 0
    out = acc * v_scale / tl.where(has_keys, l_i, 1.0)[:, None]
    mask_hd = mask_h[:, None] & mask_d[None, :]
    o_tile = o_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
    if MERGE == 2:
        tl.store(o_tile, out.to(o_ptr.dtype.element_ty), mask=mask_hd)
    else:
        lse = tl.where(has_keys, m_i + tl.math.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        parts = part_o_ptr + b * stride_pob + heads[:, None] * stride_poh + offs_d[None, :]
        tl.store(parts + split * stride_pos, out, mask=mask_hd)
        tl.store(part_lse_ptr + b * stride_plb + heads * stride_plh + split, lse, mask=mask_h)
        if MERGE == 1:
            counter = counter_ptr + b * tl.num_programs(1) + kv_head
            # acq_rel: this split's partial is visible before its count; the last one sees every partial
            if tl.atomic_add(counter, 1, sem="acq_rel") == num_splits - 1:
                offs_s = tl.arange(0, BLOCK_S)
                lses = tl.load(part_lse_ptr + b * stride_plb + heads[:, None] * stride_plh + offs_s[None, :],
                               mask=mask_h[:, None] & (offs_s < num_splits)[None, :], other=float("-inf"),
                               cache_modifier=".cg")
                top = tl.max(lses, 1)
                weights = tl.where(lses > float("-inf"),
                                   tl.math.exp2(lses - tl.where(top > float("-inf"), top, 0.0)[:, None]), 0.0)
                merged = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
                for s in range(0, num_splits):  # split order: deterministic
                    weight = tl.sum(tl.where(offs_s[None, :] == s, weights, 0.0), 1)
                    part = tl.load(parts + s * stride_pos, mask=mask_hd, other=0.0, cache_modifier=".cg")
                    merged += part * weight[:, None]
                total = tl.sum(weights, 1)
                merged = merged / tl.where(total > 0, total, 1.0)[:, None]
                tl.store(o_tile, merged.to(o_ptr.dtype.element_ty), mask=mask_hd)
                tl.store(counter, 0)


@triton.jit
def _decode_merge_kernel(
    part_o_ptr, part_lse_ptr, o_ptr, num_splits,
    stride_pob, stride_poh, stride_pos,
    stride_plb, stride_plh,
    stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_s = offs_s < num_splits
    mask_d = offs_d < HEAD_DIM
    lse = tl.load(part_lse_ptr + b * stride_plb + h * stride_plh + offs_s, mask=mask_s, other=float("-inf"))
    lse_max = tl.max(lse, 0)
    # A row without any key (a padded row with seq_len 0) has every lse -inf: give it a zero output, not NaN.
    weights = tl.where(lse > float("-inf"), tl.math.exp2(lse - tl.where(lse_max > float("-inf"), lse_max, 0.0)), 0.0)
    part = tl.load(part_o_ptr + b * stride_pob + h * stride_poh + offs_s[:, None] * stride_pos + offs_d[None, :],
                   mask=mask_s[:, None] & mask_d[None, :], other=0.0)
    total = tl.sum(weights, 0)
    out = tl.sum(part * weights[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(o_ptr + b * stride_ob + h * stride_oh + offs_d, out.to(o_ptr.dtype.element_ty), mask=mask_d)


def fp8_bits_scale(q: torch.Tensor, pool_dtype: torch.dtype) -> float:
    """0 when attention of q over this pool converts fp8 tiles with Triton, else the power of two that
    kernels/fp8_convert.py's float16 bit placement leaves out (CUDA, fp8 pool, float16 products)."""
    return F16_BITS_SCALE[pool_dtype] if q.is_cuda and fp16_products(q.dtype, pool_dtype) else 0.0


def fp16_products(q_dtype: torch.dtype, pool_dtype: torch.dtype) -> bool:
    """Whether attention over an fp8 pool multiplies in float16 (DOT_FP16; why: the module docstring)."""
    return pool_dtype.itemsize == 1 and q_dtype in (torch.bfloat16, torch.float16)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact fp32 products (Triton would use tf32); 16-bit inputs ignore the setting."""
    return "ieee" if dtype == torch.float32 else "tf32"


def choose_num_kv_splits(batch_size: int, num_kv_heads: int, max_seq_len: int, num_sms: int = 132,
                         max_splits: int = 64, min_tokens_per_split: int = 64) -> int:
    """Enough splits that (rows x kv heads x splits) fills the SMs about twice, but no split shorter than
    `min_tokens_per_split` tokens. A power of two, so CUDA-graph buckets see few distinct values."""
    want = max(1, math.ceil(2 * num_sms / max(1, batch_size * num_kv_heads)))
    by_length = max(1, max_seq_len // min_tokens_per_split)
    splits = min(want, by_length, max_splits)
    return 1 << (splits.bit_length() - 1)


def decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, req_to_token: torch.Tensor,
                     rows: torch.Tensor, seq_lens: torch.Tensor, scale: float, num_kv_splits: int,
                     sliding_window: int | None = None, out: torch.Tensor | None = None,
                     part_o: torch.Tensor | None = None, part_lse: torch.Tensor | None = None,
                     tiles: DecodeTiles | None = None, logit_cap: float | None = None, k_scale: float = 1.0,
                     v_scale: float = 1.0, alibi_slopes: torch.Tensor | None = None,
                     merge_counters: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, Hq, D]; k_pool/v_pool [S, Hkv, D]; req_to_token [R, C] int32; rows, seq_lens [B] -> o [B, Hq, D].
    Pools may be fp8 (read as fp8 * k_scale, fp8 * v_scale). `merge_counters`: int32, at least B x Hkv entries, all
    zero (and left zero): the splits are merged in the first kernel.

    Row b attends to the keys at slots req_to_token[rows[b], :seq_lens[b]] (the last `sliding_window` of them when
    given); `logit_cap` soft-caps the scaled scores; `alibi_slopes` (float32 [Hq]) adds slope * (key position - query
    position). `part_o` [>=B, Hq, num_kv_splits, D]
    and `part_lse` [>=B, Hq, num_kv_splits] (float32) may be passed preallocated (CUDA graphs)."""
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads = k_pool.shape[1]
    if num_q_heads % num_kv_heads:
        raise ValueError(f"q heads ({num_q_heads}) must be a multiple of kv heads ({num_kv_heads})")
    if k_pool.stride(2) != 1 or v_pool.stride(2) != 1 or q.stride(2) != 1 or req_to_token.stride(1) != 1:
        raise ValueError("q, k_pool, v_pool and req_to_token must be contiguous in their last dimension")
    group = num_q_heads // num_kv_heads
    if out is None:
        out = torch.empty_like(q)
    if (part_o is None) != (part_lse is None):
        raise ValueError("part_o and part_lse must be passed together")
    if part_o is None:
        part_o = torch.empty(batch, num_q_heads, num_kv_splits, head_dim, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(batch, num_q_heads, num_kv_splits, dtype=torch.float32, device=q.device)
    if part_o.stride(3) != 1 or part_o.shape[1:] != (num_q_heads, num_kv_splits, head_dim) or part_o.shape[0] < batch:
        raise ValueError(f"part_o must be float32 [>={batch}, {num_q_heads}, {num_kv_splits}, {head_dim}], contiguous "
                         f"in its last dimension; got {tuple(part_o.shape)}")
    if merge_counters is not None and (merge_counters.dtype != torch.int32
                                       or merge_counters.numel() < batch * num_kv_heads):
        raise ValueError(f"merge_counters must be int32 with at least {batch * num_kv_heads} entries")
    if batch == 0:
        return out
    merge = 2 if num_kv_splits == 1 else int(merge_counters is not None)
    block_d = max(16, triton.next_power_of_2(head_dim))
    tiles = tiles or default_decode_tiles(block_d, batch, k_pool.dtype.itemsize == 1)
    dot_fp16 = fp16_products(q.dtype, k_pool.dtype)
    bits_scale = fp8_bits_scale(q, k_pool.dtype)
    e5m2 = k_pool.dtype == torch.float8_e5m2
    score_scale = scale * k_scale
    _decode_split_kernel[(batch, num_kv_heads, num_kv_splits)](
        q, k_pool, v_pool, req_to_token, rows, seq_lens, part_o, part_lse,
        alibi_slopes if alibi_slopes is not None else part_lse, out,
        merge_counters if merge_counters is not None else part_lse,
        # K tiles take bit placement only from e5m2 pools, exact (scale 1); V's e4m3 power of two joins v_scale
        1.0 if dot_fp16 else score_scale, logit_cap or 1.0, v_scale * (bits_scale or 1.0), sliding_window or 0,
        num_kv_splits,
        score_scale,
        q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), v_pool.stride(0), v_pool.stride(1),
        req_to_token.stride(0),
        part_o.stride(0), part_o.stride(1), part_o.stride(2), part_lse.stride(0), part_lse.stride(1),
        out.stride(0), out.stride(1),
        GROUP=group, HEAD_DIM=head_dim, SOFTCAP=bool(logit_cap), ALIBI=alibi_slopes is not None,
        BLOCK_H=max(16, triton.next_power_of_2(group)), BLOCK_N=tiles.block_n, BLOCK_D=block_d,
        PRECISION=dot_precision(q.dtype), DOT_FP16=dot_fp16, FP8_BITS=bool(bits_scale), E5M2=e5m2,
        MERGE=merge, BLOCK_S=triton.next_power_of_2(num_kv_splits),
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    if merge:
        return out
    _decode_merge_kernel[(batch, num_q_heads)](
        part_o, part_lse, out, num_kv_splits,
        part_o.stride(0), part_o.stride(1), part_o.stride(2), part_lse.stride(0), part_lse.stride(1),
        out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, BLOCK_S=triton.next_power_of_2(num_kv_splits),
        BLOCK_D=block_d, num_warps=4,
    )
    return out


def decode_attention_ref(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, req_to_token: torch.Tensor,
                         rows: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                         sliding_window: int | None = None, logit_cap: float | None = None, k_scale: float = 1.0,
                         v_scale: float = 1.0, alibi_slopes: torch.Tensor | None = None) -> torch.Tensor:
    """Torch reference of `decode_attention`, one row at a time, in float32."""
    group = q.shape[1] // k_pool.shape[1]
    out = torch.empty_like(q)
    for b in range(q.shape[0]):
        seq_len = int(seq_lens[b])
        first = max(seq_len - sliding_window, 0) if sliding_window else 0
        slots = req_to_token[int(rows[b]), first:seq_len].long()
        k = (k_pool[slots].float() * k_scale).repeat_interleave(group, dim=1)  # [L, Hq, D]
        v = (v_pool[slots].float() * v_scale).repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,lhd->hl", q[b].float(), k) * scale
        if logit_cap:
            scores = logit_cap * torch.tanh(scores / logit_cap)
        if alibi_slopes is not None:
            distance = torch.arange(first, seq_len, device=q.device) - (seq_len - 1)
            scores = scores + alibi_slopes.float()[:, None] * distance[None, :]
        out[b] = torch.einsum("hl,lhd->hd", scores.softmax(-1), v).to(q.dtype)
    return out
