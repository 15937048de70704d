"""The fused MoE kernel against the per-expert torch loop, and the block alignment it relies on. Interpreter on the
CPU at tiny sizes, the GPU with CUDA."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from kernels.fused_moe import MoeTiles, fused_moe, fused_moe_ref, moe_align_block_size  # noqa: E402
from tests.kernel_fixtures import DEVICE, DTYPES, TOLERANCE, relative_error  # noqa: E402


def routed(num_tokens: int, num_experts: int, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.randn(num_tokens, num_experts, device=DEVICE).softmax(-1)
    weights, ids = probs.topk(top_k, dim=-1)
    return weights, ids


def test_align_groups_every_pair_by_expert_in_whole_blocks(seed):
    ids = torch.randint(0, 6, (37, 2), device=DEVICE)
    ids[:, 1] = (ids[:, 0] + 1) % 6  # distinct experts per token, as top-k gives; expert 5 may stay empty
    sorted_ids, expert_ids, num_padded = moe_align_block_size(ids, 8, 6)
    flat = ids.reshape(-1)
    used = int(num_padded)
    assert used % 8 == 0 and sorted_ids.numel() % 8 == 0 and used <= sorted_ids.numel()
    real = sorted_ids[:used][sorted_ids[:used] < flat.numel()]
    assert sorted(real.tolist()) == list(range(flat.numel())), f"every pair exactly once (seed {seed})"
    for block in range(used // 8):
        pairs = sorted_ids[block * 8:(block + 1) * 8]
        pairs = pairs[pairs < flat.numel()].long()
        assert pairs.numel() > 0 and (flat[pairs] == expert_ids[block]).all(), f"block {block} (seed {seed})"
    assert (sorted_ids[used:] == flat.numel()).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens, num_experts, top_k", [(1, 4, 2), (9, 5, 2), (24, 8, 3)])
def test_fused_moe_matches_the_expert_loop(dtype, num_tokens, num_experts, top_k, seed):
    hidden, inter = 32, 48
    x = torch.randn(num_tokens, hidden, dtype=dtype, device=DEVICE)
    w13 = torch.randn(num_experts, 2 * inter, hidden, dtype=dtype, device=DEVICE) * 0.2
    w2 = torch.randn(num_experts, hidden, inter, dtype=dtype, device=DEVICE) * 0.2
    weights, ids = routed(num_tokens, num_experts, top_k)
    out = fused_moe(x, w13, w2, weights, ids)
    ref = fused_moe_ref(x.float(), w13.float(), w2.float(), weights, ids)
    assert out.dtype == dtype and out.shape == x.shape
    assert relative_error(out, ref) < 2 * TOLERANCE[dtype], f"seed {seed}"


def test_fused_moe_gelu_experts(seed):
    """Grok-1's GeGLU experts (gelu, tanh approximation); the silu result differs."""
    x = torch.randn(9, 32, dtype=torch.float32, device=DEVICE)
    w13 = torch.randn(4, 96, 32, dtype=torch.float32, device=DEVICE) * 0.3
    w2 = torch.randn(4, 32, 48, dtype=torch.float32, device=DEVICE) * 0.3
    weights, ids = routed(9, 4, 2)
    out = fused_moe(x, w13, w2, weights, ids, activation="gelu")
    ref = fused_moe_ref(x, w13, w2, weights, ids, activation="gelu")
    assert relative_error(out, ref) < 2 * TOLERANCE[torch.float32], f"seed {seed}"
    assert relative_error(fused_moe_ref(x, w13, w2, weights, ids), ref) > 0.05


def test_fused_moe_other_tiles(seed):
    """Blocks of 32 rows and K tiles that do not divide the hidden size."""
    x = torch.randn(20, 40, dtype=torch.float16, device=DEVICE)
    w13 = torch.randn(3, 64, 40, dtype=torch.float16, device=DEVICE) * 0.2
    w2 = torch.randn(3, 40, 32, dtype=torch.float16, device=DEVICE) * 0.2
    weights, ids = routed(20, 3, 2)
    out = fused_moe(x, w13, w2, weights, ids, tiles=MoeTiles(32, 32, 32, 4, 2))
    assert relative_error(out, fused_moe_ref(x.float(), w13.float(), w2.float(), weights, ids)) < 4e-3, f"seed {seed}"


def quantized_experts(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, N, K] -> (fp8 [E, N, K], float32 scale [E, N]), as FusedMoE quantizes its experts."""
    scale = weight.abs().amax(dim=2).float() / torch.finfo(torch.float8_e4m3fn).max
    return (weight.float() / scale[..., None]).to(torch.float8_e4m3fn), scale


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens, num_experts, top_k", [(1, 4, 2), (24, 8, 3)])
def test_fp8_experts_match_the_dequantized_loop(dtype, num_tokens, num_experts, top_k, seed):
    """fp8 weights with a scale per expert and output channel: the kernel converts the tiles in registers and scales
    the accumulator; the loop multiplies by the dequantized weights. The scales are far from 1 so a missing or
    misplaced one shows."""
    hidden, inter = 32, 48
    x = torch.randn(num_tokens, hidden, dtype=dtype, device=DEVICE)
    w13, w13_scale = quantized_experts(torch.randn(num_experts, 2 * inter, hidden, device=DEVICE) * 0.02)
    w2, w2_scale = quantized_experts(torch.randn(num_experts, hidden, inter, device=DEVICE) * 3.0)
    weights, ids = routed(num_tokens, num_experts, top_k)
    out = fused_moe(x, w13, w2, weights, ids, w13_scale=w13_scale, w2_scale=w2_scale)
    ref = fused_moe_ref(x.float(), w13, w2, weights, ids, w13_scale=w13_scale, w2_scale=w2_scale)
    assert out.dtype == dtype and out.shape == x.shape
    assert relative_error(out, ref) < 2 * TOLERANCE[dtype], f"seed {seed}"
    unscaled = fused_moe_ref(x.float(), w13.float(), w2.float(), weights, ids)
    assert relative_error(unscaled, ref) > 0.5


def test_fp8_experts_without_scales_are_refused():
    x = torch.randn(2, 32, device=DEVICE)
    w13, _ = quantized_experts(torch.randn(2, 64, 32, device=DEVICE))
    w2, w2_scale = quantized_experts(torch.randn(2, 32, 32, device=DEVICE))
    weights, ids = routed(2, 2, 1)
    with pytest.raises(ValueError, match="w13"):
        fused_moe(x, w13, w2, weights, ids, w2_scale=w2_scale)


def fp8_kernel_ptx_facts() -> dict[str, bool]:
    """Compile the fp8 variant (bf16 activations, fp8 weights with scales) for sm_90 at the decode and prefill tiles:
    whether the PTX multiplies on tensor cores."""
    from kernels.fused_moe import _fused_moe_kernel, default_moe_tiles
    from tests.kernel_fixtures import compile_for_sm90

    signature = {"a_ptr": "*bf16", "b_ptr": "*fp8e4nv", "c_ptr": "*bf16", "weights_ptr": "*fp32",
                 "b_scale_ptr": "*fp32", "sorted_ids_ptr": "*i32", "expert_ids_ptr": "*i32", "num_padded_ptr": "*i32",
                 "N": "i32", "K": "i32", "num_pairs": "i32", "stride_am": "i32", "stride_ak": "i32",
                 "stride_be": "i32", "stride_bn": "i32", "stride_bk": "i32", "stride_cm": "i32", "stride_cn": "i32",
                 "stride_se": "i32"}
    aligned = ["a_ptr", "b_ptr", "c_ptr", "weights_ptr", "b_scale_ptr", "sorted_ids_ptr", "N", "K", "stride_am",
               "stride_be", "stride_bn", "stride_cm", "stride_se"]
    facts = {}
    for num_tokens in (1, 4096):
        tiles = default_moe_tiles(num_tokens, 8, 64, torch.bfloat16)
        constants = {"A_ROWS_PER_ROW": 8, "MUL_WEIGHT": True, "B_SCALED": True, "BLOCK_M": tiles.block_m,
                     "BLOCK_N": tiles.block_n, "BLOCK_K": tiles.block_k, "PRECISION": "tf32", "FAST_E4M3": True}
        ptx = compile_for_sm90(_fused_moe_kernel, signature, constants, aligned, tiles)
        facts[f"tokens={num_tokens}"] = "wgmma" in ptx or "mma.sync" in ptx
        facts[f"tokens={num_tokens}, no conversion pipe"] = "cvt.bf16.f16" not in ptx and "e4m3x2" not in ptx
    return facts


def test_fp8_kernel_compiles_for_hopper():
    """What the interpreter accepts and the GPU compiler refuses (Python globals, fp8 -> bf16 dot mixes) shows here."""
    from tests.kernel_fixtures import facts_without_interpreter

    facts = facts_without_interpreter("tests.kernels.test_fused_moe", "fp8_kernel_ptx_facts")
    assert facts and all(facts.values()), facts
