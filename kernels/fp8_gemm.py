"""Weight-only fp8 GEMM for few tokens (decode): y[M, N] = x[M, K] @ (W[N, K] * scale[N, None])^T.

W is float8_e4m3fn with one float32 scale per output channel (a per-tensor scale is that scale broadcast); x and y are
in the model dtype. At decode (M = 1..64) the GEMM is bound by the bytes of W, so the kernel reads each fp8 weight
byte once, converts it to x's dtype in registers and accumulates in float32: half the bytes of a bf16 GEMM, and no
per-token quantization of the activations (which, with torch._scaled_mm, costs more than the GEMM at these sizes).
Into bf16 on CUDA the conversion is kernels/fp8_convert.py's integer one (FAST_E4M3): Triton's own goes through
float16 one value at a time on the conversion pipe, which capped the kernel near 60% of the copy bandwidth.

Tiling: one program per (BLOCK_N output channels, K split). A decode-sized N alone gives too few programs to keep an
H200's 132 SMs reading (4096 / 64 = 64), so K is split and every split writes a float32 partial [SPLIT_K, M, N] that
a second kernel sums, scales and casts (deterministic, unlike atomics; the partials are small and stay in L2). With
SPLIT_K = 1 the first kernel writes y directly. Three ways to multiply a tile:
- USE_DOT: tl.dot on [BLOCK_M, BLOCK_K] x [BLOCK_K, BLOCK_N] (BLOCK_M >= 16, rows past M masked);
- USE_DOT with SWAP_AB: the transposed product, W [BLOCK_N, BLOCK_K] x x^T [BLOCK_K, BLOCK_M], so the weight is the
  MMA's first operand: with BLOCK_N >= 64 and 4 or 8 warps Hopper runs it as wgmma (64-row instructions, the
  converted weight fed from registers) even at M = 1, where the unswapped tile of 16 rows gets mma.sync;
- GEMV (for M of 1..4): a broadcast product summed over K, no padding of M to 16.
The defaults use tl.dot, whose weight loads Triton pipelines through shared memory (cp.async); the GPU bench's
--sweep times every variant.

With QUANT_X (and SWAP_AB) the activations are quantized too, in the kernel: each K step scales x's tile to e4m3
per row (amax / 448: each row and K step of BLOCK_K columns has its own scale, finer than per token) and multiplies
fp8 by fp8. Triton then feeds the weight from shared memory straight into Hopper's fp8 wgmma (m64n16k32 e4m3.e4m3): no
conversion of the weight at all, only of x's few values. A candidate for the sweep; the weight-only product stays
the default until the H200 measures it.

With REDUCE_IN_KERNEL a K split needs one launch instead of two: each program writes its partial, then counts
itself in with an acq_rel atomic on its N tile's counter, and the program that arrives last sums the tile's
partials in split order (deterministic), scales, casts, writes y and zeroes the counter for the next call. The
counters (int32, one per N tile, zero between calls) belong to the caller, so a CUDA graph replays them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.decode_attention import dot_precision
from kernels.fp8_convert import e4m3_to_bf16, fast_e4m3_applies

E4M3_MAX = tl.constexpr(448.0)
MIN_AMAX = tl.constexpr(1e-12)  # a scale never below this: an all-zero row does not divide by zero


@dataclass(frozen=True)
class Fp8GemmTiles:
    """Launch shape: rows of x per program, output channels per program, K per step, K splits, dot or GEMV."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int
    use_dot: bool = True
    num_warps: int = 4
    num_stages: int = 4
    swap_ab: bool = False  # tl.dot as W x^T (needs use_dot)
    reduce_in_kernel: bool = False  # a K split's last program reduces (one launch; needs split counters)
    quant_x: bool = False  # x quantized to e4m3 per row and K step, fp8 x fp8 products (needs swap_ab)


def choose_split_k(m: int, n: int, k: int, block_n: int, block_k: int, num_sms: int = 132) -> int:
    """K splits (a power of two) until the grid holds about two programs per SM, keeping at least four K steps per
    split (fewer would spend more on the partials and their reduction than the extra programs gain) and the float32
    partials' traffic (m x n x 4 bytes, written and read, per split) under half the fp8 weight's bytes."""
    n_tiles = triton.cdiv(n, block_n)
    max_split = max(1, min(triton.cdiv(k, block_k) // 4, k // (16 * max(1, m))))
    split_k = 1
    while n_tiles * split_k < 2 * num_sms and split_k * 2 <= max_split:
        split_k *= 2
    return split_k


def default_fp8_gemm_tiles(m: int, n: int, k: int, num_sms: int = 132) -> Fp8GemmTiles:
    """tl.dot tiles with BLOCK_M = 16/32/64 (the smallest that holds M). Up to 16 rows: 32 output channels, 256 of
    K per step and three stages when K is split (reduced in the kernel, one launch), 128 and four stages when not;
    the H100 sweep with the integer conversion (docs/perf.md) found these the fastest at M = 1 and 8 for every
    Llama-3-8B shape, 4-9% under the 64-channel tiles. From 32 rows the tiles widen to 128 channels: every program
    reads all of x's rows over its K range, and with 64 channels x's bytes re-read from L2 would reach twice the
    weight's. Compiled for sm_90 (Triton 3.x, ahead of time): cp.async-pipelined 16-byte loads of the weight,
    mma.sync up to 32 rows and wgmma at 64, no spills."""
    block_m = max(16, triton.next_power_of_2(m))
    if block_m > 16:
        split_k = choose_split_k(m, n, k, 128, 64, num_sms)
        return Fp8GemmTiles(block_m, 128, 64, split_k, use_dot=True, num_warps=8, num_stages=4)
    split_k = choose_split_k(m, n, k, 32, 256, num_sms)
    if split_k == 1:
        return Fp8GemmTiles(16, 32, 128, 1, use_dot=True, num_warps=4, num_stages=4)
    return Fp8GemmTiles(16, 32, 256, split_k, use_dot=True, num_warps=4, num_stages=3, reduce_in_kernel=True)


def split_counters_for(n: int) -> int:
    """How many int32 split counters cover an [*, n] output under any tiles (one per N tile, tiles >= 16 wide)."""
    return triton.cdiv(n, 16)


@triton.jit
def _fp8_gemm_kernel(
    x_ptr, w_ptr, scale_ptr, out_ptr, y_ptr, counter_ptr,
    M, N, K, steps_per_split,
    stride_xm, stride_wn, stride_os, stride_om, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr,
    SWAP_AB: tl.constexpr, APPLY_SCALE: tl.constexpr, REDUCE_IN_KERNEL: tl.constexpr, PRECISION: tl.constexpr,
    FAST_E4M3: tl.constexpr, QUANT_X: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    # a multiple of BLOCK_K by construction, so Triton can prove the loads aligned and vectorize them
    k_start = split * steps_per_split * BLOCK_K

    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn
    if SWAP_AB:
        acc_t = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for step in range(0, steps_per_split):
        ks = k_start + step * BLOCK_K + offs_k
        mask_k = ks < K
        x = tl.load(x_rows + ks[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_rows + ks[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        if QUANT_X:
            xf = x.to(tl.float32)
            x_scale = tl.maximum(tl.max(tl.abs(xf), 1), MIN_AMAX) / E4M3_MAX
            x_fp8 = tl.clamp(xf / x_scale[:, None], -E4M3_MAX, E4M3_MAX).to(w.dtype)
            acc_t += tl.dot(w, tl.trans(x_fp8)) * x_scale[None, :]
        else:
            if FAST_E4M3:
                w_x = e4m3_to_bf16(w)
            else:
                w_x = w.to(x.dtype)
            if SWAP_AB:
                acc_t += tl.dot(w_x, tl.trans(x), input_precision=PRECISION)
            elif USE_DOT:
                acc += tl.dot(x, tl.trans(w_x), input_precision=PRECISION)
            else:
                acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    if SWAP_AB:
        acc = tl.trans(acc_t)

    if APPLY_SCALE:
        acc = acc * tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
    out = out_ptr + split * stride_os + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])

    if REDUCE_IN_KERNEL:
        # acq_rel: this program's partial is visible before its count; the last one sees every partial
        arrived = tl.atomic_add(counter_ptr + pid_n, 1, sem="acq_rel")
        if arrived == tl.num_programs(1) - 1:
            total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            parts = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
            for s in range(0, tl.num_programs(1)):  # split order, whatever the arrival order: deterministic
                total += tl.load(parts + s * stride_os, mask=mask_m[:, None] & mask_n[None, :], other=0.0,
                                 cache_modifier=".cg")
            total = total * tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
            y = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
            tl.store(y, total.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
            tl.store(counter_ptr + pid_n, 0)


@triton.jit
def _split_k_reduce_kernel(
    part_ptr, scale_ptr, out_ptr, N, SPLIT_K,
    stride_ps, stride_pm, stride_om,
    BLOCK_N: tl.constexpr,
):
    m = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for s in range(0, SPLIT_K):
        acc += tl.load(part_ptr + s * stride_ps + m * stride_pm + offs_n, mask=mask_n, other=0.0)
    acc = acc * tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0)
    tl.store(out_ptr + m * stride_om + offs_n, acc.to(out_ptr.dtype.element_ty), mask=mask_n)


def fp8_weight_only_gemm(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                         tiles: Fp8GemmTiles | None = None, out: torch.Tensor | None = None,
                         split_counters: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] (float32/16-bit), weight [N, K] float8_e4m3fn, weight_scale [N] float32 -> y [M, N] in x's dtype.

    split_counters: int32, at least one per N tile, all zero (and left zero), for tiles that reduce a K split in
    the kernel; without them such tiles get fresh zeros (one memset more). Allocates only through torch (the
    output and, with a K split, the float32 partials), so it can be captured in a CUDA graph; no host
    synchronisation."""
    m, k = x.shape
    n = weight.shape[0]
    if weight.shape[1] != k or weight_scale.shape != (n,):
        raise ValueError(f"x [{m}, {k}], weight {tuple(weight.shape)} and weight_scale {tuple(weight_scale.shape)} "
                         f"do not form y = x @ (weight * scale[:, None])^T")
    if x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError("x and weight must be contiguous in their last dimension")
    tiles = tiles or default_fp8_gemm_tiles(m, n, k)
    if m > tiles.block_m:
        raise ValueError(f"{m} rows exceed the tile's block_m {tiles.block_m}")
    if tiles.swap_ab and not tiles.use_dot:
        raise ValueError("swap_ab is a way to use tl.dot: it needs use_dot")
    if tiles.quant_x and not (tiles.swap_ab and weight.dtype == torch.float8_e4m3fn):
        raise ValueError("quant_x multiplies e4m3 by e4m3 as W x^T: it needs swap_ab and a float8_e4m3fn weight")
    if out is None:
        out = x.new_empty(m, n)
    if out.shape != (m, n) or out.stride(1) != 1:
        raise ValueError(f"out must be [{m}, {n}], contiguous in its last dimension; got {tuple(out.shape)}")
    if m == 0:
        return out
    n_tiles = triton.cdiv(n, tiles.block_n)
    steps_per_split = triton.cdiv(triton.cdiv(k, tiles.block_k), tiles.split_k)
    split_k = triton.cdiv(k, steps_per_split * tiles.block_k)  # never an empty split
    target = out if split_k == 1 else torch.empty(split_k, m, n, dtype=torch.float32, device=x.device)
    stride_os = 0 if split_k == 1 else target.stride(0)
    reduce_in_kernel = split_k > 1 and tiles.reduce_in_kernel
    counters = out  # an unused pointer unless the kernel reduces
    if reduce_in_kernel:
        counters = split_counters if split_counters is not None else torch.zeros(n_tiles, dtype=torch.int32,
                                                                                 device=x.device)
        if counters.dtype != torch.int32 or counters.numel() < n_tiles:
            raise ValueError(f"split_counters must be int32 with at least {n_tiles} entries")
    _fp8_gemm_kernel[(n_tiles, split_k)](
        x, weight, weight_scale, target, out, counters,
        m, n, k, steps_per_split,
        x.stride(0), weight.stride(0), stride_os, target.stride(-2), out.stride(0),
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, USE_DOT=tiles.use_dot,
        SWAP_AB=tiles.swap_ab, APPLY_SCALE=split_k == 1, REDUCE_IN_KERNEL=reduce_in_kernel,
        PRECISION=dot_precision(x.dtype), FAST_E4M3=x.is_cuda and fast_e4m3_applies(x.dtype, weight.dtype),
        QUANT_X=tiles.quant_x,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    if split_k > 1 and not reduce_in_kernel:
        block_n = 1024
        _split_k_reduce_kernel[(m, triton.cdiv(n, block_n))](
            target, weight_scale, out, n, split_k,
            target.stride(0), target.stride(1), out.stride(0),
            BLOCK_N=block_n, num_warps=4,
        )
    return out


def fp8_weight_only_gemm_ref(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """Torch reference: the dequantized weight, the product in float32, cast to x's dtype."""
    return (x.float() @ (weight.float() * weight_scale.float()[:, None]).t()).to(x.dtype)
