"""fp8 (float8_e4m3fn) building blocks: quantizing weights and activations, and the scaled GEMMs.

Scales are float32 and dequantize: real = fp8 * scale. GEMMs run through `torch._scaled_mm` with row-wise
scales (one per token of the activation, one per output channel of the weight): cuBLAS/CUTLASS on Hopper, and
in this torch also on the CPU, where it gives exactly the dequantized product (tests/layers/test_quantization.py
checks it), so CPU and GPU run the same code. Block-wise weights ([128, 128] blocks, 1 x 128 activation groups)
are dequantized and multiplied in the activation dtype: the same numbers, not yet a fused kernel.

On CUDA, up to WEIGHT_ONLY_MAX_TOKENS tokens (decode), weights with a scale per output channel skip the above: the
weight-only kernel (kernels/fp8_gemm.py) multiplies the activations as they are by the fp8 weight, dequantized in
registers. There the GEMM is bound by reading the weight, and quantizing the activations per token would cost more
than the fp8 GEMM itself; the activations keep their precision, so the result is closer to the unquantized model.
"""

from __future__ import annotations

import torch

try:  # Triton is needed on CUDA only (pyproject's gpu extra); CPU installs run the torch code
    from kernels.fp8_gemm import fp8_weight_only_gemm, split_counters_for
    from kernels.fp8_quant import per_token_quant_fp8
except ImportError:
    fp8_weight_only_gemm = per_token_quant_fp8 = split_counters_for = None

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max
# a scale never below this, so an all-zero row or token does not divide by zero
MIN_AMAX = 1e-12
# Up to this many tokens the weight-only kernel beats quantized activations + torch._scaled_mm: on an H200
# (docs/perf.md, gpu_quant.sh fp8-gemm) the four Llama-3-8B GEMMs take 133 us either way at 32 tokens, and
# _scaled_mm wins at 64 (128 against 156 us).
WEIGHT_ONLY_MAX_TOKENS = 32


def to_fp8(x: torch.Tensor, scale: torch.Tensor | float, dtype: torch.dtype = FP8) -> torch.Tensor:
    """x / scale, saturated to the format's range (a cast alone would turn out-of-range values into NaN)."""
    limit = torch.finfo(dtype).max
    return (x.float() / scale).clamp_(-limit, limit).to(dtype)


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (fp8 [N, K], scale float32 [N]): one scale per output channel (row)."""
    scale = weight.abs().amax(dim=1).float().clamp_(min=MIN_AMAX) / FP8_MAX
    return to_fp8(weight, scale[:, None]), scale


def quantize_per_token(x: torch.Tensor, scale_ub: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, K] -> (fp8 [T, K], scale float32 [T, 1]), dynamically; `scale_ub` caps each token's amax (fbgemm's
    activation_scale_ub, which keeps outlier tokens from wasting the range of the others). On CUDA one Triton kernel
    (kernels/fp8_quant.py) computes the same bits as the torch code below."""
    if per_token_quant_fp8 is not None and x.is_cuda:
        return per_token_quant_fp8(x if x.stride(-1) == 1 else x.contiguous(), scale_ub, MIN_AMAX)
    amax = x.abs().amax(dim=1, keepdim=True).float()
    if scale_ub is not None:
        amax = torch.minimum(amax, scale_ub)
    scale = amax.clamp_(min=MIN_AMAX) / FP8_MAX
    return to_fp8(x, scale), scale


def quantize_per_tensor(x: torch.Tensor, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x -> (fp8, scale float32 []): with `scale` given (a static activation scale) it is used as is, else the
    tensor's amax sets it (dynamic per-tensor)."""
    if scale is None:
        scale = x.abs().amax().float().clamp(min=MIN_AMAX) / FP8_MAX
    return to_fp8(x, scale), scale


def quantize_per_token_group(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, K] -> (fp8 [T, K], scale float32 [T, ceil(K / group)]): one scale per token and group of columns."""
    tokens, k = x.shape
    groups = -(-k // group)
    padded = torch.nn.functional.pad(x.float(), (0, groups * group - k)).view(tokens, groups, group)
    scale = padded.abs().amax(dim=2).clamp_(min=MIN_AMAX) / FP8_MAX
    q = to_fp8(padded, scale[:, :, None]).view(tokens, groups * group)[:, :k]
    return q, scale


def expand_blocks(scale: torch.Tensor, block: tuple[int, int], shape: tuple[int, int]) -> torch.Tensor:
    """Block scales [ceil(N / bn), ceil(K / bk)] -> one scale per element [N, K]."""
    return scale.repeat_interleave(block[0], dim=0).repeat_interleave(block[1], dim=1)[:shape[0], :shape[1]]


def quantize_blocks(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (fp8 [N, K], scale float32 [ceil(N / bn), ceil(K / bk)]), one scale per block."""
    n, k = weight.shape
    bn, bk = block
    rows, cols = -(-n // bn), -(-k // bk)
    padded = torch.nn.functional.pad(weight.float(), (0, cols * bk - k, 0, rows * bn - n))
    scale = padded.view(rows, bn, cols, bk).abs().amax(dim=(1, 3)).clamp_(min=MIN_AMAX) / FP8_MAX
    return to_fp8(weight, expand_blocks(scale, block, (n, k))), scale


def scaled_mm(x_fp8: torch.Tensor, x_scale: torch.Tensor, weight_fp8: torch.Tensor, weight_scale: torch.Tensor,
              out_dtype: torch.dtype) -> torch.Tensor:
    """(x_fp8 * x_scale) @ (weight_fp8 * weight_scale[:, None])^T with x_scale [T, 1] and weight_scale [N]."""
    # cuBLAS's row-wise fp8 GEMM writes only bf16; the CPU kernel writes any float dtype.
    gemm_dtype = torch.bfloat16 if x_fp8.is_cuda else out_dtype
    out = torch._scaled_mm(x_fp8, weight_fp8.t(), scale_a=x_scale, scale_b=weight_scale[None, :],
                           out_dtype=gemm_dtype)
    return out if gemm_dtype == out_dtype else out.to(out_dtype)


def block_scaled_mm(x: torch.Tensor, weight_fp8: torch.Tensor, weight_scale: torch.Tensor,
                    block: tuple[int, int]) -> torch.Tensor:
    """x [T, K] times a block-quantized weight: activations quantized per token and group of block[1] columns
    (as DeepSeek-V3's recipe), both sides dequantized, multiplied in x's dtype."""
    x_fp8, x_scale = quantize_per_token_group(x, block[1])
    x_real = (x_fp8.float() * x_scale.repeat_interleave(block[1], dim=1)[:, :x.shape[1]]).to(x.dtype)
    weight = (weight_fp8.float() * expand_blocks(weight_scale, block, tuple(weight_fp8.shape))).to(x.dtype)
    return torch.nn.functional.linear(x_real, weight)


def weight_only_kernel_applies(x: torch.Tensor) -> bool:
    """Whether a per-channel fp8 linear runs the weight-only kernel on x [T, K] (CUDA, at most
    WEIGHT_ONLY_MAX_TOKENS tokens) rather than quantizing x for torch._scaled_mm."""
    return fp8_weight_only_gemm is not None and x.is_cuda and x.shape[0] <= WEIGHT_ONLY_MAX_TOKENS


def weight_only_mm(x: torch.Tensor, weight_fp8: torch.Tensor, weight_scale: torch.Tensor,
                   split_counters: torch.Tensor) -> torch.Tensor:
    """x [T, K] @ (weight_fp8 * weight_scale[:, None])^T in x's dtype, x unquantized (the weight-only kernel).
    split_counters: the layer's own (new_split_counters), so a K split reduced in the kernel needs no memset."""
    return fp8_weight_only_gemm(x if x.stride(-1) == 1 else x.contiguous(), weight_fp8, weight_scale,
                                split_counters=split_counters)


def new_split_counters(weight_fp8: torch.Tensor) -> torch.Tensor | None:
    """Zeroed int32 counters for the weight-only kernel's in-kernel K-split reduction (which leaves them zero);
    None without Triton, where the kernel never runs."""
    if split_counters_for is None:
        return None
    return torch.zeros(split_counters_for(weight_fp8.shape[0]), dtype=torch.int32, device=weight_fp8.device)
