"""The weight-only fp8 GEMM against its torch reference: decode-sized M, both ways of multiplying a tile (tl.dot and
GEMV), with and without a K split, ragged N and K (tiny shapes in Triton's interpreter on the CPU; on CUDA, through
scripts/gpu_quant.sh fp8-gemm, the same tests in bf16 plus a CUDA-graph replay at a Llama-3-8B shape)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

triton = pytest.importorskip("triton")

from kernels.fp8_gemm import (  # noqa: E402
    Fp8GemmTiles,
    _fp8_gemm_kernel,
    _split_k_reduce_kernel,
    default_fp8_gemm_tiles,
    fp8_weight_only_gemm,
    fp8_weight_only_gemm_ref,
)
from tests.kernel_fixtures import (  # noqa: E402
    CUDA,
    DEVICE,
    DTYPES,
    TOLERANCE,
    compile_for_sm90,
    facts_without_interpreter,
    relative_error,
)

FP8 = torch.float8_e4m3fn
# K = 200 and N = 72 are multiples of no tile size: the last K step and the last N block are partial
N, K = 72, 200


def fp8_weight(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    weight = torch.randn(n, k, device=DEVICE)
    scale = weight.abs().amax(dim=1) / torch.finfo(FP8).max
    return (weight / scale[:, None]).to(FP8), scale


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m, tiles", [
    (1, None),  # the default: tl.dot, 16 rows with 15 masked
    (5, Fp8GemmTiles(16, 32, 32, split_k=3)),  # K split 3 ways (the last split partial), reduced by the 2nd kernel
    (1, Fp8GemmTiles(1, 16, 64, split_k=2, use_dot=False)),  # GEMV
    (3, Fp8GemmTiles(4, 32, 32, split_k=1, use_dot=False)),  # GEMV writing y directly
    (40, Fp8GemmTiles(64, 32, 64, split_k=2)),
    (1, Fp8GemmTiles(16, 32, 32, split_k=1, swap_ab=True)),  # W x^T, written to y directly
    (5, Fp8GemmTiles(16, 32, 32, split_k=3, swap_ab=True)),  # W x^T, reduced by the 2nd kernel
    (5, Fp8GemmTiles(16, 32, 32, split_k=3, reduce_in_kernel=True)),  # one launch: the last split reduces
    (40, Fp8GemmTiles(64, 32, 64, split_k=2, swap_ab=True, reduce_in_kernel=True)),
], ids=["default-m1", "dot-split3", "gemv-m1", "gemv-m3", "dot-m40", "swap-m1", "swap-split3", "in-kernel-split3",
        "swap-in-kernel-m40"])
def test_fp8_gemm_matches_reference(dtype, m, tiles, seed):
    weight, scale = fp8_weight(N, K)
    x = torch.randn(m, K, dtype=dtype, device=DEVICE)
    out = torch.full((m, N), float("nan"), dtype=dtype, device=DEVICE)
    fp8_weight_only_gemm(x, weight, scale, tiles, out=out)
    assert not out.isnan().any(), f"unwritten or NaN output (seed {seed})"
    err = relative_error(out, fp8_weight_only_gemm_ref(x, weight, scale))
    assert err < TOLERANCE[dtype], f"relative error {err:.2e} (seed {seed})"


def test_in_kernel_reduction_leaves_its_counters_zero_for_the_next_call(seed):
    """The caller's counters are reused call after call (as a CUDA graph replays them): each call must leave them
    as it found them, and every call's y must be complete."""
    weight, scale = fp8_weight(N, K)
    tiles = Fp8GemmTiles(16, 16, 32, split_k=4, reduce_in_kernel=True)
    counters = torch.zeros(8, dtype=torch.int32, device=DEVICE)  # 5 N tiles of 16, and room to spare
    for m in (1, 3, 16):
        x = torch.randn(m, K, device=DEVICE)
        out = fp8_weight_only_gemm(x, weight, scale, tiles, split_counters=counters)
        assert relative_error(out, fp8_weight_only_gemm_ref(x, weight, scale)) < 1e-5
        assert counters.tolist() == [0] * 8
    with pytest.raises(ValueError, match="split_counters"):
        fp8_weight_only_gemm(x, weight, scale, tiles, split_counters=counters[:4])
    with pytest.raises(ValueError, match="use_dot"):
        fp8_weight_only_gemm(x, weight, scale, Fp8GemmTiles(16, 16, 32, 1, use_dot=False, swap_ab=True))


def exactly_quantizable_x(m: int, k: int, block_k: int) -> torch.Tensor:
    """x whose every row and K step of block_k columns holds e4m3 codes times one power of two, the step's largest
    at 448 x that power: quantizing it per row and step (quant_x) is exact."""
    codes = torch.randn(m, k, device=DEVICE).mul(100).to(FP8).float()
    codes[:, ::block_k] = 448.0
    powers = 2.0 ** torch.randint(-12, -4, (m, -(-k // block_k)), device=DEVICE).float()
    return codes * powers.repeat_interleave(block_k, dim=1)[:, :k]


@pytest.mark.parametrize("m, tiles", [
    (1, Fp8GemmTiles(16, 64, 64, split_k=1, swap_ab=True, quant_x=True)),
    (5, Fp8GemmTiles(16, 32, 32, split_k=3, swap_ab=True, quant_x=True, reduce_in_kernel=True)),
    (12, Fp8GemmTiles(16, 32, 64, split_k=2, swap_ab=True, quant_x=True)),
], ids=["m1", "m5-in-kernel", "m12-split2"])
def test_quantized_activations_are_exact_where_quantization_is(m, tiles, seed):
    """quant_x: x scaled to e4m3 per row and K step inside the kernel, fp8 x fp8 products. With x exactly
    representable that way the result is the dequantized product (float32 sums); with any x it stays close."""
    weight, scale = fp8_weight(N, K)
    x = exactly_quantizable_x(m, K, tiles.block_k)
    out = torch.full((m, N), float("nan"), device=DEVICE)
    fp8_weight_only_gemm(x, weight, scale, tiles, out=out)
    assert relative_error(out, fp8_weight_only_gemm_ref(x, weight, scale)) < 1e-5, f"seed {seed}"
    x = torch.randn(m, K, dtype=torch.bfloat16, device=DEVICE)
    err = relative_error(fp8_weight_only_gemm(x, weight, scale, tiles), fp8_weight_only_gemm_ref(x, weight, scale))
    assert 0 < err < 0.1, f"relative error {err:.2e} (seed {seed})"
    with pytest.raises(ValueError, match="quant_x"):
        fp8_weight_only_gemm(x, weight, scale, replace(tiles, swap_ab=False))


def test_per_tensor_scale_is_a_broadcast_channel_scale(seed):
    weight, _ = fp8_weight(N, K)
    x = torch.randn(2, K, device=DEVICE)
    out = fp8_weight_only_gemm(x, weight, torch.full((N,), 0.05, device=DEVICE))
    assert relative_error(out, x @ (weight.float() * 0.05).t()) < 1e-5


def test_strided_rows_and_empty_batch(seed):
    weight, scale = fp8_weight(N, K)
    wide = torch.randn(3, 2 * K, device=DEVICE)
    x = wide[:, :K]  # rows 2K apart
    assert relative_error(fp8_weight_only_gemm(x, weight, scale), fp8_weight_only_gemm_ref(x, weight, scale)) < 1e-5
    assert fp8_weight_only_gemm(x[:0], weight, scale).shape == (0, N)


def test_mismatched_shapes_are_refused():
    weight, scale = fp8_weight(N, K)
    with pytest.raises(ValueError, match="do not form"):
        fp8_weight_only_gemm(torch.randn(2, K + 1, device=DEVICE), weight, scale)
    with pytest.raises(ValueError, match="block_m"):
        fp8_weight_only_gemm(torch.randn(20, K, device=DEVICE), weight, scale, Fp8GemmTiles(16, 32, 32, 1))


@pytest.mark.parametrize("k, n", [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)])
@pytest.mark.parametrize("m", [1, 8, 16, 24, 64])
def test_default_tiles_fill_the_gpu(m, k, n):
    """At Llama-3-8B's decode shapes: every row in one tile; K split until the grid holds about two programs per SM,
    but never into splits of fewer than four K steps, nor so many that the float32 partials move more than half
    the weight's bytes."""
    tiles = default_fp8_gemm_tiles(m, n, k, num_sms=132)
    assert tiles.block_m >= m and tiles.block_m >= 16 and tiles.block_m & (tiles.block_m - 1) == 0
    programs = -(-n // tiles.block_n) * tiles.split_k
    k_steps_per_split = k // tiles.block_k // tiles.split_k
    partial_bytes = 2 * tiles.split_k * m * n * 4 if tiles.split_k > 1 else 0
    assert k_steps_per_split >= 4 and partial_bytes <= n * k / 2, tiles
    capped = k_steps_per_split < 8 or 2 * partial_bytes > n * k / 2
    assert programs >= 2 * 132 or capped, tiles


GEMM_SIGNATURE = {"x_ptr": "*bf16", "w_ptr": "*fp8e4nv", "scale_ptr": "*fp32", "out_ptr": "*fp32", "y_ptr": "*bf16",
                  "counter_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32", "steps_per_split": "i32",
                  "stride_xm": "i32", "stride_wn": "i32", "stride_os": "i32", "stride_om": "i32", "stride_ym": "i32"}
ALIGNED = ["x_ptr", "w_ptr", "scale_ptr", "out_ptr", "y_ptr", "counter_ptr", "N", "K", "stride_xm", "stride_wn",
           "stride_os", "stride_om", "stride_ym"]


def gemm_ptx(tiles: Fp8GemmTiles, split: bool) -> str:
    signature = {**GEMM_SIGNATURE, "out_ptr": "*fp32" if split else "*bf16"}
    constants = {"BLOCK_M": tiles.block_m, "BLOCK_N": tiles.block_n, "BLOCK_K": tiles.block_k,
                 "USE_DOT": tiles.use_dot, "SWAP_AB": tiles.swap_ab, "APPLY_SCALE": not split,
                 "REDUCE_IN_KERNEL": split and tiles.reduce_in_kernel, "PRECISION": "tf32", "FAST_E4M3": True,
                 "QUANT_X": tiles.quant_x}
    return compile_for_sm90(_fp8_gemm_kernel, signature, constants, ALIGNED, tiles)


def default_tiles_ptx_facts() -> dict[str, dict[str, bool]]:
    """For the default tiles at M = 1, 16, 32, 64 (K = N = 4096), written to y or to split partials, and for the
    sweep's variants at M = 1 (the weight as the MMA's first operand; the K split reduced in the kernel): whether
    the sm_90 PTX has cp.async (pipelined, vectorized weight loads), tensor-core instructions, wgmma, and an
    atomic."""
    facts = {}

    def record(name: str, ptx: str) -> None:
        facts[name] = {"cp.async": "cp.async" in ptx, "tensor cores": "wgmma" in ptx or "mma.sync" in ptx,
                       "wgmma": "wgmma" in ptx, "atomic": "atom." in ptx,
                       "conversion pipe": "cvt.bf16.f16" in ptx or "e4m3x2" in ptx}

    for m in (1, 16, 32, 64):
        tiles = default_fp8_gemm_tiles(m, 4096, 4096)
        for split in (False, True):
            record(f"m={m} split={split}", gemm_ptx(tiles, split))
    swapped = replace(default_fp8_gemm_tiles(1, 4096, 4096), swap_ab=True, block_n=64)  # wgmma needs 64 rows
    record("swap_ab m=1", gemm_ptx(swapped, split=False))
    record("swap_ab m=1 reduce_in_kernel", gemm_ptx(replace(swapped, reduce_in_kernel=True), split=True))
    reduce_signature = {"part_ptr": "*fp32", "scale_ptr": "*fp32", "out_ptr": "*bf16", "N": "i32", "SPLIT_K": "i32",
                        "stride_ps": "i32", "stride_pm": "i32", "stride_om": "i32"}
    compile_for_sm90(_split_k_reduce_kernel, reduce_signature, {"BLOCK_N": 1024}, list(reduce_signature), None)
    return facts


def test_default_tiles_compile_for_hopper_with_pipelined_loads():
    """What Triton's interpreter accepts and the GPU compiler refuses (Python globals in a kernel, dtype mixes)
    shows here, and so does a weight read by single-byte loads instead of cp.async-pipelined 16-byte copies (the
    K offsets must stay provably aligned). The swapped product of 64 channels reaches wgmma at M = 1 (the unswapped
    16-row tile cannot), and only the in-kernel reduction (the default up to 16 rows) has an atomic."""
    facts = facts_without_interpreter("tests.kernels.test_fp8_gemm", "default_tiles_ptx_facts")
    assert len(facts) == 10, facts
    assert all(found["cp.async"] and found["tensor cores"] for found in facts.values()), facts
    # the weight reaches bf16 through integer instructions (kernels/fp8_convert.py), not the conversion pipe
    assert not any(found["conversion pipe"] for found in facts.values()), facts
    assert facts["swap_ab m=1"]["wgmma"] and not facts["m=1 split=False"]["wgmma"], facts
    assert [name for name, found in facts.items() if found["atomic"]] == [
        "m=1 split=True", "m=16 split=True", "swap_ab m=1 reduce_in_kernel"], facts


def quantized_activation_ptx_facts() -> dict[str, int]:
    """The sm_90 PTX of a quant_x tile at M = 1 (split, reduced in the kernel): fp8 wgmma instructions, and the
    instructions that would convert the weight (Triton's e4m3 conversions, the integer path's bf16 FMAs)."""
    import re

    tiles = Fp8GemmTiles(16, 64, 256, split_k=4, swap_ab=True, reduce_in_kernel=True, quant_x=True, num_stages=3)
    ptx = gemm_ptx(tiles, split=True)
    return {"fp8 wgmma": len(re.findall(r"wgmma\.mma_async[\w.]*\.e4m3\.e4m3", ptx)),
            "weight conversions": len(re.findall(r"cvt\.rn\.f16x2\.e4m3x2|fma\.rn\.bf16x2|cvt\.bf16\.f16", ptx)),
            "x to e4m3": len(re.findall(r"cvt\.rn\.satfinite\.e4m3x2\.f32", ptx))}


def test_quantized_activations_feed_fp8_tensor_cores_without_converting_the_weight():
    facts = facts_without_interpreter("tests.kernels.test_fp8_gemm", "quantized_activation_ptx_facts")
    assert facts["fp8 wgmma"] > 0 and facts["x to e4m3"] > 0 and facts["weight conversions"] == 0, facts


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_graph_replay_at_a_llama_shape(seed):
    """Captured in a CUDA graph (as decode steps run), with a K split: replays give the reference on new inputs."""
    weight, scale = fp8_weight(4096, 4096)
    x = torch.randn(8, 4096, dtype=torch.bfloat16, device="cuda")
    assert default_fp8_gemm_tiles(8, 4096, 4096).split_k > 1
    fp8_weight_only_gemm(x, weight, scale)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fp8_weight_only_gemm(x, weight, scale)
    for _ in range(2):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        assert relative_error(out, fp8_weight_only_gemm_ref(x, weight, scale)) < TOLERANCE[torch.bfloat16]
