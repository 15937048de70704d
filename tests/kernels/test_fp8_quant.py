"""The per-token fp8 activation quantization kernel against the torch formula it replaces on CUDA
(runtime/layers/quantization/fp8_ops.quantize_per_token, run on the CPU): the same scales, bit for bit, and the
same fp8 values. Triton's interpreter rounds float32 -> fp8 wrongly in places (a rounding that should carry into the
exponent drops it: 124.3 becomes 64 instead of 128; subnormals land one step off), so on the CPU those elements may
differ by that much; on CUDA none may differ at all."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from kernels.fp8_quant import per_token_quant_fp8  # noqa: E402
from runtime.layers.quantization.fp8_ops import MIN_AMAX, quantize_per_token  # noqa: E402
from tests.kernel_fixtures import CUDA, DEVICE, DTYPES, compile_for_sm90, facts_without_interpreter  # noqa: E402


def assert_same_fp8(q: torch.Tensor, expected: torch.Tensor) -> None:
    q, expected = q.float().cpu(), expected.float().cpu()
    differ = q != expected
    if not CUDA:
        carried = (expected.abs().log2() % 1 == 0) & (q * 2 == expected)  # half the power of two it rounds up to
        magnitude = torch.maximum(q.abs(), expected.abs()).clamp(min=2.0**-9)
        one_step = (q - expected).abs() <= 2.0 ** (magnitude.log2().floor() - 3).clamp(min=-9)
        differ &= ~(carried | one_step)
    assert not differ.any(), f"{int(differ.sum())} values differ, e.g. {q[differ][:4]} vs {expected[differ][:4]}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens, k", [(1, 64), (5, 200), (3, 5000)])  # 5000: more than one 4096 block per row
@pytest.mark.parametrize("with_ub", [False, True])
def test_per_token_quant_matches_the_torch_formula(dtype, tokens, k, with_ub, seed):
    x = (torch.randn(tokens, k, device=DEVICE) * 3).to(dtype)
    x[0, 3] = 1000.0  # an outlier: with the cap, it saturates at the fp8 maximum
    ub = torch.tensor(2.0, device=DEVICE) if with_ub else None
    q, scale = per_token_quant_fp8(x, ub, MIN_AMAX)
    expected_q, expected_scale = quantize_per_token(x.cpu(), None if ub is None else ub.cpu())
    assert q.dtype == torch.float8_e4m3fn and q.shape == (tokens, k) and scale.shape == (tokens, 1)
    assert torch.equal(scale.cpu(), expected_scale), f"seed {seed}"
    assert_same_fp8(q, expected_q)


def test_zero_rows_and_empty_batches():
    q, scale = per_token_quant_fp8(torch.zeros(2, 32, device=DEVICE), None, MIN_AMAX)
    assert (scale > 0).all() and not q.float().isnan().any() and (q.float() == 0).all()
    q, scale = per_token_quant_fp8(torch.zeros(0, 32, device=DEVICE))
    assert q.shape == (0, 32) and scale.shape == (0, 1)


def quant_ptx_facts() -> dict[str, bool]:
    """The sm_90 PTX of the kernel, with and without the cap: IEEE division (the torch formula's bits), the
    saturating fp8 conversion, 16-byte loads."""
    from kernels.fp8_quant import _per_token_quant_kernel

    signature = {"x_ptr": "*bf16", "q_ptr": "*fp8e4nv", "scale_ptr": "*fp32", "ub_ptr": "*fp32", "K": "i32",
                 "stride_x": "i32", "stride_q": "i32", "fp8_max": "fp32", "min_amax": "fp32"}
    facts = {}
    for has_ub in (False, True):
        ptx = compile_for_sm90(_per_token_quant_kernel, signature, {"HAS_UB": has_ub, "BLOCK_K": 4096},
                               ["x_ptr", "q_ptr", "scale_ptr", "ub_ptr", "K", "stride_x", "stride_q"], num_warps=8)
        for instruction in ("div.rn.f32", "cvt.rn.satfinite.e4m3x2.f32", "ld.global.v4"):
            facts[f"ub={has_ub} {instruction}"] = instruction in ptx
    return facts


def test_kernel_compiles_for_hopper():
    facts = facts_without_interpreter("tests.kernels.test_fp8_quant", "quant_ptx_facts")
    assert facts and all(facts.values()), facts
