"""Fused mixture-of-experts MLP: every token through its top-k experts in two grouped GEMM launches.

1. `moe_align_block_size` sorts the (token, choice) pairs by expert and pads each expert's run to a multiple of
   BLOCK_M, so that every BLOCK_M-row block of the sorted list belongs to one expert. It is plain torch with no host
   sync (scatter-add counts, a stable argsort, cumulative sums) and sizes its outputs for the worst case, so a decode
   step can be captured in a CUDA graph; blocks past the padded total exit at once.
2. `_fused_moe_kernel` (launched twice): each program takes one block of sorted rows and one BLOCK_N slice of the
   output features, loads the rows of A they name (the token's hidden state for the first GEMM, the pair's
   intermediate row for the second), and multiplies by that block's expert weight [N, K]. The first GEMM writes
   gate|up for every pair, SiLU-and-mul shrinks it to the intermediate, and the second GEMM multiplies by the pair's
   routing weight before storing, so the final sum over the k choices of a token is one reduction.

Weights are laid out as the layer holds them: w13 [E, 2I, H] (gate rows, then up rows), w2 [E, H, I]. fp8 weights
(float8_e4m3fn, `--quantization fp8`) come with one float32 scale per expert and output channel (w13_scale [E, 2I],
w2_scale [E, H]): the kernel converts each fp8 B tile to A's dtype in registers (exact: e4m3 fits in fp16 and bf16;
into bf16 on CUDA through kernels/fp8_convert.py's integer instructions)
and scales each output column of the float32 accumulator, before the routing weight.
`fused_moe_ref` is the per-expert torch loop (transformers' order of operations), the reference and the CPU path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.activation import silu_and_mul
from kernels.decode_attention import dot_precision
from kernels.fp8_convert import e4m3_to_bf16, fast_e4m3_applies


@dataclass(frozen=True)
class MoeTiles:
    """Launch shape of the grouped GEMMs: sorted rows per block (the alignment), output features and reduction
    depth per tile, warps, software-pipelining depth."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def default_moe_tiles(num_tokens: int, top_k: int, num_experts: int, dtype: torch.dtype) -> MoeTiles:
    """Few rows per expert (decode) want thin row blocks and deep K tiles: the GEMM is a weight stream. Many rows
    (prefill) want square tiles that reuse each weight tile over 64 rows."""
    rows_per_expert = num_tokens * top_k / num_experts
    if dtype == torch.float32:
        return MoeTiles(16, 32, 32, 4, 2)
    if rows_per_expert <= 16:
        return MoeTiles(16, 64, 128, 4, 4)
    if rows_per_expert <= 64:
        return MoeTiles(32, 64, 128, 4, 3)
    return MoeTiles(64, 128, 64, 8, 3)


def moe_align_block_size(topk_ids: torch.Tensor, block_m: int, num_experts: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """topk_ids [T, k] -> (sorted_ids [P] int32, expert_ids [P / block_m] int32, num_padded [1] int32).

    sorted_ids lists the flat pair index (token * k + choice) of every pair grouped by expert, each expert's run
    padded with the value T * k to a multiple of block_m; expert_ids[b] is the expert of block b; num_padded is the
    used length. P = T * k + E * (block_m - 1) rounded up to block_m, the most any routing can need."""
    device = topk_ids.device
    flat = topk_ids.reshape(-1).long()
    num_pairs = flat.numel()
    capacity = triton.cdiv(num_pairs + num_experts * (block_m - 1), block_m) * block_m
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = padded.cumsum(0)
    order = torch.argsort(flat, stable=True)
    sorted_experts = flat[order]
    rank = torch.arange(num_pairs, device=device) - (counts.cumsum(0) - counts)[sorted_experts]
    sorted_ids = torch.full((capacity,), num_pairs, dtype=torch.int32, device=device)
    sorted_ids[(padded_end - padded)[sorted_experts] + rank] = order.to(torch.int32)
    block_starts = torch.arange(0, capacity, block_m, device=device)
    expert_ids = torch.searchsorted(padded_end, block_starts, right=True).clamp_(max=num_experts - 1)
    return sorted_ids, expert_ids.to(torch.int32), padded_end[-1:].to(torch.int32)


@triton.jit
def _fused_moe_kernel(
    a_ptr, b_ptr, c_ptr, weights_ptr, b_scale_ptr, sorted_ids_ptr, expert_ids_ptr, num_padded_ptr,
    N, K, num_pairs,
    stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_cn, stride_se,
    A_ROWS_PER_ROW: tl.constexpr, MUL_WEIGHT: tl.constexpr, B_SCALED: tl.constexpr, FAST_E4M3: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_ids_ptr + offs_m).to(tl.int64)
    valid = pairs < num_pairs
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # The first GEMM reads token rows (pair // k), the second the pair's own intermediate row.
    a_ptrs = a_ptr + (pairs // A_ROWS_PER_ROW)[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + expert * stride_be + offs_n[None, :] * stride_bn + offs_k[:, None] * stride_bk
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k0
        a = tl.load(a_ptrs, mask=valid[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & (offs_n[None, :] < N), other=0.0)
        if FAST_E4M3:
            b = e4m3_to_bf16(b)
        elif B_SCALED:
            b = b.to(a_ptr.dtype.element_ty)
        acc += tl.dot(a, b, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if B_SCALED:
        acc = acc * tl.load(b_scale_ptr + expert * stride_se + offs_n, mask=offs_n < N, other=0.0)[None, :]
    if MUL_WEIGHT:
        acc = acc * tl.load(weights_ptr + pairs, mask=valid, other=0.0).to(tl.float32)[:, None]
    c_ptrs = c_ptr + pairs[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=valid[:, None] & (offs_n[None, :] < N))


def _grouped_gemm(a: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor | None, c: torch.Tensor,
                  weights: torch.Tensor | None, sorted_ids: torch.Tensor, expert_ids: torch.Tensor,
                  num_padded: torch.Tensor, num_pairs: int, a_rows_per_row: int, tiles: MoeTiles) -> None:
    """c[pair] = a[pair // a_rows_per_row] @ (b[expert of pair] * b_scale[expert of pair][:, None])^T (b_scale when
    given), times the pair's weight when given."""
    n, k = b.shape[1], b.shape[2]
    grid = (sorted_ids.numel() // tiles.block_m, triton.cdiv(n, tiles.block_n))
    _fused_moe_kernel[grid](
        a, b, c, weights if weights is not None else c, b_scale if b_scale is not None else c,
        sorted_ids, expert_ids, num_padded,
        n, k, num_pairs,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2), c.stride(0), c.stride(1),
        b_scale.stride(0) if b_scale is not None else 0,
        A_ROWS_PER_ROW=a_rows_per_row, MUL_WEIGHT=weights is not None, B_SCALED=b_scale is not None,
        FAST_E4M3=a.is_cuda and fast_e4m3_applies(a.dtype, b.dtype),
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, PRECISION=dot_precision(a.dtype),
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, tiles: MoeTiles | None = None, activation: str = "silu",
              w13_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, H]; w13 [E, 2I, H]; w2 [E, H, I]; topk_weights [T, k] (float32), topk_ids [T, k] -> [T, H] in x's dtype:
    sum over the k choices of weight * w2 @ (act(gate) * up); act silu, or "gelu" (tanh approximation: Grok-1).
    fp8 w13 / w2 need their scales, float32 w13_scale [E, 2I] and w2_scale [E, H] (real = fp8 * scale)."""
    num_tokens, hidden = x.shape
    num_experts, two_inter, _ = w13.shape
    top_k = topk_ids.shape[1]
    if w13.shape[2] != hidden or w2.shape != (num_experts, hidden, two_inter // 2):
        raise ValueError(f"w13 {tuple(w13.shape)} and w2 {tuple(w2.shape)} do not fit x {tuple(x.shape)}")
    if x.stride(1) != 1 or w13.stride(2) != 1 or w2.stride(2) != 1:
        raise ValueError("x, w13 and w2 must be contiguous in their last dimension")
    for weight, scale, name in ((w13, w13_scale, "w13"), (w2, w2_scale, "w2")):
        is_fp8 = weight.dtype == torch.float8_e4m3fn
        if (scale is not None) != is_fp8 or (scale is not None and (
                scale.shape != weight.shape[:2] or scale.dtype != torch.float32 or scale.stride(1) != 1)):
            raise ValueError(f"{name} {weight.dtype} takes a contiguous float32 scale {tuple(weight.shape[:2])} if "
                             f"and only if it is float8_e4m3fn; got "
                             f"{None if scale is None else (scale.dtype, tuple(scale.shape))}")
    if num_tokens == 0:
        return torch.zeros_like(x)
    tiles = tiles or default_moe_tiles(num_tokens, top_k, num_experts, x.dtype)
    sorted_ids, expert_ids, num_padded = moe_align_block_size(topk_ids, tiles.block_m, num_experts)
    num_pairs = num_tokens * top_k
    gate_up = torch.empty(num_pairs, two_inter, dtype=x.dtype, device=x.device)
    _grouped_gemm(x, w13, w13_scale, gate_up, None, sorted_ids, expert_ids, num_padded, num_pairs, top_k, tiles)
    inter = silu_and_mul(gate_up) if activation == "silu" else gelu_and_mul(gate_up)
    out = torch.empty(num_pairs, hidden, dtype=x.dtype, device=x.device)
    _grouped_gemm(inter, w2, w2_scale, out, topk_weights.reshape(-1).float().contiguous(), sorted_ids, expert_ids,
                  num_padded, num_pairs, 1, tiles)
    return out.view(num_tokens, top_k, hidden).sum(dim=1)


def gelu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


def fused_moe_ref(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, activation: str = "silu", w13_scale: torch.Tensor | None = None,
                  w2_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The per-expert loop: for each expert with tokens, gather them, gate/up, activation, down, scale by the routing
    weight and add into the output (transformers' MoE blocks). fp8 weights are dequantized (w.float() * scale)."""
    out = torch.zeros_like(x)
    num_experts = w13.shape[0]
    for expert in range(num_experts):
        token_index, choice = torch.where(topk_ids == expert)
        if token_index.numel() == 0:
            continue
        gate, up = F.linear(x[token_index], dequantized(w13, w13_scale, expert, x.dtype)).chunk(2, dim=-1)
        act = F.silu(gate) if activation == "silu" else F.gelu(gate, approximate="tanh")
        down = F.linear(act * up, dequantized(w2, w2_scale, expert, x.dtype))
        expert_out = down * topk_weights[token_index, choice, None]
        out.index_add_(0, token_index, expert_out.to(out.dtype))
    return out


def dequantized(weight: torch.Tensor, scale: torch.Tensor | None, expert: int, dtype: torch.dtype) -> torch.Tensor:
    """One expert's weight in `dtype`: as it is, or fp8 times its per-output-channel scale."""
    if scale is None:
        return weight[expert]
    return (weight[expert].float() * scale[expert][:, None]).to(dtype)
