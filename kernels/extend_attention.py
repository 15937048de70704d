"""Extend (prefill) attention over the paged KV pool, for ragged batches.

New token t of batch row i attends to the row's cached prefix (pool slots req_to_token[rows[i], :prefix_lens[i]])
and, causally, to the row's new tokens up to itself, read from the contiguous k/v of the step. One program handles
BLOCK_M new tokens of one row for one q head: first the prefix tiles (gathered through req_to_token, no mask but the
sliding window), then the new-token tiles up to the diagonal. Decode rows are rows with extend_len 1, so one launch
serves mixed batches. With a logit cap c (Gemma 2), scaled scores s become c * tanh(s / c) first. With ALiBi slopes
(one per q head, Baichuan 13B), the head adds slope * (key position - query position) to its scores.

An fp8 pool is read as fp8 * scale: prefix tiles are converted to q's dtype, k_scale folded into their score scale
and v_scale into their probabilities; the step's own k/v are read unquantized. With a 16-bit q the prefix products
run in float16 (DOT_FP16), as in kernels/decode_attention.py: fp8 -> bf16 goes through float16 one value at a time
on the conversion pipe, which would cost about as many clocks per tile as the tile's MMAs; q's float16 copy carries
the score scale, so a bfloat16 q overflows it only past |q| ~ 65504 / scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.decode_attention import LOG2E, dot_precision, fp16_products, scaled_scores


@dataclass(frozen=True)
class ExtendTiles:
    """Launch shape: query tokens and keys per tile (block_m a multiple of block_n), warps, pipelining depth."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def default_extend_tiles(dtype: torch.dtype, head_dim: int) -> ExtendTiles:
    # 16-bit, heads up to 128: (128, 64, 4, 3) measured best on an H100 at Llama-3-8B shapes (docs/perf.md).
    # Smaller tiles for fp32 (twice the registers per element) and wide heads (shared memory).
    if dtype != torch.float32 and head_dim <= 128:
        return ExtendTiles(128, 64, 4, 3)
    return ExtendTiles(32, 32, 4, 2)


@triton.jit
def _online_softmax_tile(q, k, v, m_i, l_i, acc, visible, sm_scale, logit_cap, v_scale, bias,
                         SOFTCAP: tl.constexpr, PRECISION: tl.constexpr, MASKED: tl.constexpr, ALIBI: tl.constexpr):
    """Fold one key tile into the running max, sum and output of the query block (scores in base 2); v_scale
    multiplies the tile's values (an fp8 pool's scale); with ALIBI, `bias` [BLOCK_M, BLOCK_N] (base 2) is added."""
    s = scaled_scores(tl.dot(q, tl.trans(k), input_precision=PRECISION), sm_scale, logit_cap, SOFTCAP)
    if ALIBI:
        s += bias
    if MASKED:
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if MASKED:  # a query row may see no key of this tile yet (window, causal edge): keep it finite
        m_new_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
    else:
        m_new_safe = m_new
    p = tl.math.exp2(s - m_new_safe[:, None])
    alpha = tl.math.exp2(m_i - m_new_safe)
    acc = acc * alpha[:, None] + tl.dot((p * v_scale).to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i * alpha + tl.sum(p, 1), acc


@triton.jit
def _extend_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, k_pool_ptr, v_pool_ptr, req_to_token_ptr,
    rows_ptr, prefix_lens_ptr, extend_lens_ptr, extend_start_ptr, alibi_ptr,
    sm_scale, logit_cap, k_scale, v_scale, sliding_window,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    stride_ks, stride_kph, stride_vs, stride_vph, stride_rtt,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    DOT_FP16: tl.constexpr,
):
    b = tl.program_id(0)
    head = tl.program_id(1)
    m_block = tl.program_id(2)
    kv_head = head // GROUP

    row = tl.load(rows_ptr + b).to(tl.int64)
    prefix_len = tl.load(prefix_lens_ptr + b)
    extend_len = tl.load(extend_lens_ptr + b)
    extend_start = tl.load(extend_start_ptr + b).to(tl.int64)
    # Programs past the row's last new token run empty loops and store nothing.
    active = m_block * BLOCK_M < extend_len

    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < extend_len
    mask_d = offs_d < HEAD_DIM
    q = tl.load(q_ptr + (extend_start + offs_m[:, None]) * stride_qt + head * stride_qh + offs_d[None, :],
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    q_pos = prefix_len + offs_m  # position of each query token in its sequence
    slope = 0.0
    if ALIBI:
        slope = tl.load(alibi_ptr + head) * LOG2E

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    if DOT_FP16:  # the prefix's score scale moves into a float16 copy of q
        q_prefix = (q.to(tl.float32) * (sm_scale * k_scale)).to(tl.float16)
        prefix_scale = 1.0
    else:
        q_prefix = q
        prefix_scale = sm_scale * k_scale

    # Cached prefix, gathered through req_to_token: whole tiles unmasked (but for a window), then the ragged tail.
    # With a sliding window the tiles wholly before the block's first visible key are skipped.
    first = tl.where(WINDOW, tl.maximum(prefix_len + m_block * BLOCK_M - sliding_window + 1, 0), 0)
    first = (first // BLOCK_N) * BLOCK_N
    full_end = tl.where(active, (prefix_len // BLOCK_N) * BLOCK_N, 0)
    prefix_end = tl.where(active, prefix_len, 0)
    for n0 in range(first, prefix_end, BLOCK_N):
        k_pos = n0 + offs_n
        mask_n = k_pos < prefix_len
        slots = tl.load(req_to_token_ptr + row * stride_rtt + k_pos, mask=mask_n, other=0).to(tl.int64)
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_pool_ptr + slots[:, None] * stride_ks + kv_head * stride_kph + offs_d[None, :],
                    mask=kv_mask, other=0.0).to(q_prefix.dtype)
        v = tl.load(v_pool_ptr + slots[:, None] * stride_vs + kv_head * stride_vph + offs_d[None, :],
                    mask=kv_mask, other=0.0).to(q_prefix.dtype)
        visible = mask_n[None, :]
        if WINDOW:
            visible = visible & (k_pos[None, :] > q_pos[:, None] - sliding_window)
        bias = 0.0
        if ALIBI:
            bias = slope * (k_pos[None, :] - q_pos[:, None]).to(tl.float32)
        if n0 < full_end:
            m_i, l_i, acc = _online_softmax_tile(q_prefix, k, v, m_i, l_i, acc, visible, prefix_scale, logit_cap,
                                                 v_scale, bias, SOFTCAP, PRECISION, WINDOW, ALIBI)
        else:
            m_i, l_i, acc = _online_softmax_tile(q_prefix, k, v, m_i, l_i, acc, visible, prefix_scale, logit_cap,
                                                 v_scale, bias, SOFTCAP, PRECISION, True, ALIBI)

    # New tokens of the step: tiles left of the block's diagonal need no causal mask, the diagonal ones do.
    diagonal = m_block * BLOCK_M  # a multiple of BLOCK_N
    first = tl.where(WINDOW, tl.maximum(m_block * BLOCK_M - sliding_window + 1, 0), 0)
    first = (first // BLOCK_N) * BLOCK_N
    new_end = tl.where(active, tl.minimum((m_block + 1) * BLOCK_M, extend_len), 0)
    for n0 in range(first, new_end, BLOCK_N):
        k_idx = n0 + offs_n
        mask_n = k_idx < extend_len
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_ptr + (extend_start + k_idx[:, None]) * stride_kt + kv_head * stride_kh + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + (extend_start + k_idx[:, None]) * stride_vt + kv_head * stride_vh + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        visible = mask_n[None, :] & (k_idx[None, :] <= offs_m[:, None])
        if WINDOW:
            visible = visible & (k_idx[None, :] > offs_m[:, None] - sliding_window)
        bias = 0.0
        if ALIBI:  # key and query positions share the row's prefix length
            bias = slope * (k_idx[None, :] - offs_m[:, None]).to(tl.float32)
        if n0 < diagonal:
            m_i, l_i, acc = _online_softmax_tile(q, k, v, m_i, l_i, acc, visible, sm_scale, logit_cap, 1.0, bias,
                                                 SOFTCAP, PRECISION, WINDOW, ALIBI)
        else:
            m_i, l_i, acc = _online_softmax_tile(q, k, v, m_i, l_i, acc, visible, sm_scale, logit_cap, 1.0, bias,
                                                 SOFTCAP, PRECISION, True, ALIBI)

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(o_ptr + (extend_start + offs_m[:, None]) * stride_ot + head * stride_oh + offs_d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


def extend_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                     req_to_token: torch.Tensor, rows: torch.Tensor, prefix_lens: torch.Tensor,
                     extend_lens: torch.Tensor, extend_start_loc: torch.Tensor, max_extend_len: int, scale: float,
                     sliding_window: int | None = None, out: torch.Tensor | None = None,
                     tiles: ExtendTiles | None = None, logit_cap: float | None = None, k_scale: float = 1.0,
                     v_scale: float = 1.0, alibi_slopes: torch.Tensor | None = None) -> torch.Tensor:
    """q [T, Hq, D], k/v [T, Hkv, D] of the new tokens; pools [S, Hkv, D] (may be fp8, read as fp8 * k_scale and
    fp8 * v_scale); req_to_token [R, C] int32; rows, prefix_lens, extend_lens, extend_start_loc [B];
    max_extend_len (host int) sizes the grid -> o [T, Hq, D]. `logit_cap` soft-caps the scaled scores;
    `alibi_slopes` (float32 [Hq]) adds slope * (key position - query position)."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if num_q_heads % num_kv_heads:
        raise ValueError(f"q heads ({num_q_heads}) must be a multiple of kv heads ({num_kv_heads})")
    for name, t in (("q", q), ("k", k), ("v", v), ("k_pool", k_pool), ("v_pool", v_pool)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension")
    if out is None:
        out = torch.empty_like(q)
    batch = rows.shape[0]
    if batch == 0 or num_tokens == 0:
        return out
    block_d = max(16, triton.next_power_of_2(head_dim))
    tiles = tiles or default_extend_tiles(q.dtype, block_d)
    if tiles.block_m % tiles.block_n:
        raise ValueError(f"block_m ({tiles.block_m}) must be a multiple of block_n ({tiles.block_n})")
    grid = (batch, num_q_heads, triton.cdiv(max_extend_len, tiles.block_m))
    _extend_kernel[grid](
        q, k, v, out, k_pool, v_pool, req_to_token, rows, prefix_lens, extend_lens, extend_start_loc,
        alibi_slopes if alibi_slopes is not None else prefix_lens,
        scale, logit_cap or 1.0, k_scale, v_scale, sliding_window or 0,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        k_pool.stride(0), k_pool.stride(1), v_pool.stride(0), v_pool.stride(1), req_to_token.stride(0),
        GROUP=num_q_heads // num_kv_heads, HEAD_DIM=head_dim, WINDOW=bool(sliding_window), SOFTCAP=bool(logit_cap),
        ALIBI=alibi_slopes is not None, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_D=block_d,
        PRECISION=dot_precision(q.dtype),
        DOT_FP16=fp16_products(q.dtype, k_pool.dtype),
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    return out


def extend_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pool: torch.Tensor,
                         v_pool: torch.Tensor, req_to_token: torch.Tensor, rows: torch.Tensor,
                         prefix_lens: torch.Tensor, extend_lens: torch.Tensor, extend_start_loc: torch.Tensor,
                         scale: float, sliding_window: int | None = None,
                         logit_cap: float | None = None, k_scale: float = 1.0, v_scale: float = 1.0,
                         alibi_slopes: torch.Tensor | None = None) -> torch.Tensor:
    """Torch reference of `extend_attention`, one row at a time, in float32."""
    group = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    for b in range(rows.shape[0]):
        prefix_len, extend_len, start = int(prefix_lens[b]), int(extend_lens[b]), int(extend_start_loc[b])
        slots = req_to_token[int(rows[b]), :prefix_len].long()
        keys = torch.cat([k_pool[slots].float() * k_scale, k[start:start + extend_len].float()])
        values = torch.cat([v_pool[slots].float() * v_scale, v[start:start + extend_len].float()])
        keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
        q_pos = prefix_len + torch.arange(extend_len)[:, None]
        k_pos = torch.arange(prefix_len + extend_len)[None, :]
        visible = k_pos <= q_pos
        if sliding_window:
            visible &= k_pos > q_pos - sliding_window
        scores = torch.einsum("thd,lhd->htl", q[start:start + extend_len].float(), keys) * scale
        if logit_cap:
            scores = logit_cap * torch.tanh(scores / logit_cap)
        if alibi_slopes is not None:
            scores = scores + alibi_slopes.float()[:, None, None] * (k_pos - q_pos).to(scores.device)[None]
        scores = scores.masked_fill(~visible.to(scores.device), float("-inf"))
        out[start:start + extend_len] = torch.einsum("htl,lhd->thd", scores.softmax(-1), values).to(q.dtype)
    return out
