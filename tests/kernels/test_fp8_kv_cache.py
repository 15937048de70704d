"""fp8 KV cache: the store kernel writes what the torch reference writes (x / scale, saturated), and the decode and
extend kernels and both attention backends read fp8 pools as fp8 * scale. Interpreter on the CPU, GPU with CUDA."""

from __future__ import annotations

import re

import pytest
import torch

pytest.importorskip("triton")

from kernels.decode_attention import decode_attention, decode_attention_ref  # noqa: E402
from kernels.extend_attention import extend_attention, extend_attention_ref  # noqa: E402
from kernels.kv_store import store_kv, store_kv_ref  # noqa: E402
from runtime.worker.attention.base import AttentionSpec  # noqa: E402
from runtime.worker.attention.torch_backend import TorchAttentionBackend  # noqa: E402
from runtime.worker.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from runtime.worker.forward_batch import ForwardBatch  # noqa: E402
from runtime.worker.kv_pool import KVPool  # noqa: E402
from tests.kernel_fixtures import (  # noqa: E402
    DEVICE,
    DTYPES,
    TOLERANCE,
    compile_for_sm90,
    facts_without_interpreter,
    relative_error,
)

FP8_DTYPES = [torch.float8_e4m3fn, torch.float8_e5m2]
# Powers of two, so that values made representable (below) stay exact through x * (1 / scale).
K_SCALE, V_SCALE = 0.5, 4.0


def kv_values(shape: tuple[int, ...], pool_dtype: torch.dtype, scale: float, spread: float = 4.0) -> torch.Tensor:
    """Random k or v. On the CPU, values the pool represents exactly (fp8 code * scale): Triton's interpreter
    converts to fp8 without carrying a rounded-up mantissa into the exponent (7.9 becomes 4, not 8), a fault of the
    emulator that the GPU does not share; on CUDA, arbitrary values, so the hardware rounding is checked too."""
    values = torch.randn(shape, device=DEVICE) * spread
    if torch.cuda.is_available():
        return values
    return (values / scale).to(pool_dtype).float() * scale


def same_codes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def fp8_pool(num_slots: int, heads: int, dim: int, dtype: torch.dtype) -> torch.Tensor:
    values = torch.randn(num_slots, heads, dim, device=DEVICE) * 4
    return (values / 2).to(dtype)


@pytest.mark.parametrize("pool_dtype", FP8_DTYPES)
def test_store_kv_quantizes_like_the_reference(pool_dtype, seed):
    k = kv_values((9, 3, 32), pool_dtype, K_SCALE)
    k[0, 0, :4] = torch.tensor([1e4, -1e4, 1e6, -1e6])  # saturated (e4m3 at 448 * scale), not NaN
    v = kv_values((9, 3, 32), pool_dtype, V_SCALE)
    slots = torch.randperm(40, device=DEVICE)[:9] + 1
    pools = [torch.zeros(41, 3, 32, dtype=pool_dtype, device=DEVICE) for _ in range(4)]
    store_kv(pools[0], pools[1], slots, k, v, K_SCALE, V_SCALE)
    store_kv_ref(pools[2], pools[3], slots, k, v, K_SCALE, V_SCALE)
    for ours, ref in ((pools[0], pools[2]), (pools[1], pools[3])):
        assert not ours.float().isnan().any(), f"seed {seed}"
        assert same_codes(ours, ref), f"seed {seed}"
    back = pools[0][slots.long()].float() * K_SCALE
    limit = torch.finfo(pool_dtype).max * K_SCALE
    assert relative_error(back, k.clamp(-limit, limit)) < 0.15, f"seed {seed}"


@pytest.mark.parametrize("pool_dtype", FP8_DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)  # bfloat16 on CUDA only: the interpreter gets bf16 extend wrong
def test_decode_and_extend_read_fp8_pools_with_scales(pool_dtype, dtype, seed):
    num_slots, hq, hkv, dim = 300, 6, 2, 32
    k_pool, v_pool = fp8_pool(num_slots, hkv, dim, pool_dtype), fp8_pool(num_slots, hkv, dim, pool_dtype)
    req_to_token = (torch.randperm(num_slots - 1, device=DEVICE)[:3 * 60] + 1).view(3, 60).to(torch.int32)
    rows = torch.tensor([2, 0, 1], device=DEVICE)
    seq_lens = torch.tensor([1, 33, 60], dtype=torch.int32, device=DEVICE)
    q = torch.randn(3, hq, dim, dtype=dtype, device=DEVICE)
    out = decode_attention(q, k_pool, v_pool, req_to_token, rows, seq_lens, 0.2, 2, k_scale=K_SCALE, v_scale=V_SCALE)
    ref = decode_attention_ref(q, k_pool, v_pool, req_to_token, rows, seq_lens, 0.2, k_scale=K_SCALE,
                               v_scale=V_SCALE)
    assert relative_error(out, ref) < TOLERANCE[dtype], f"decode (seed {seed})"

    prefix_lens = torch.tensor([0, 20, 50], dtype=torch.int32, device=DEVICE)
    extend_lens = torch.tensor([5, 13, 10], dtype=torch.int32, device=DEVICE)
    starts = torch.tensor([0, 5, 18], dtype=torch.int32, device=DEVICE)
    q = torch.randn(28, hq, dim, dtype=dtype, device=DEVICE)
    k, v = torch.randn(28, hkv, dim, dtype=dtype, device=DEVICE), torch.randn(28, hkv, dim, dtype=dtype, device=DEVICE)
    args = (q, k, v, k_pool, v_pool, req_to_token, rows, prefix_lens, extend_lens, starts)
    out = extend_attention(*args, 13, 0.2, k_scale=K_SCALE, v_scale=V_SCALE)
    ref = extend_attention_ref(*args, 0.2, k_scale=K_SCALE, v_scale=V_SCALE)
    assert relative_error(out, ref) < TOLERANCE[dtype], f"extend (seed {seed})"


@pytest.mark.parametrize("pool_dtype", FP8_DTYPES)
@pytest.mark.parametrize("logit_cap", [None, 2.0])
def test_bfloat16_queries_read_fp8_pools_through_float16_products(pool_dtype, logit_cap, seed):
    """With a bfloat16 q the decode kernel moves the score scale into q and multiplies in float16: the same result
    as the float32 reference within bfloat16's tolerance, soft-capped or not, with queries of magnitude 100."""
    num_slots, hq, hkv, dim = 300, 6, 2, 32
    k_pool, v_pool = fp8_pool(num_slots, hkv, dim, pool_dtype), fp8_pool(num_slots, hkv, dim, pool_dtype)
    req_to_token = (torch.randperm(num_slots - 1, device=DEVICE)[:3 * 60] + 1).view(3, 60).to(torch.int32)
    rows = torch.tensor([2, 0, 1], device=DEVICE)
    seq_lens = torch.tensor([1, 33, 60], dtype=torch.int32, device=DEVICE)
    q = (torch.randn(3, hq, dim, device=DEVICE) * 100).to(torch.bfloat16)
    kwargs = {"k_scale": K_SCALE, "v_scale": V_SCALE, "logit_cap": logit_cap}
    out = decode_attention(q, k_pool, v_pool, req_to_token, rows, seq_lens, 0.02, 2, **kwargs)
    ref = decode_attention_ref(q, k_pool, v_pool, req_to_token, rows, seq_lens, 0.02, **kwargs)
    assert out.dtype == torch.bfloat16 and not out.isnan().any()
    assert relative_error(out, ref) < TOLERANCE[torch.bfloat16], f"seed {seed}"


def conversion_counts(ptx: str) -> dict[str, int]:
    """How often each cvt instruction occurs in the PTX."""
    names = re.findall(r"\bcvt\.[\w.]+", ptx)
    return {name: names.count(name) for name in set(names)}


def decode_ptx_conversions() -> dict[str, dict[str, int]]:
    """Conversion instructions, byte loads from shared memory and MMAs in the sm_90 PTX of the decode kernel (bf16 q,
    Llama-3-8B's head shape, 128-key tiles) for a bf16 pool, and for each fp8 pool through Triton's conversion
    ("/cvt", as in the interpreter) and as on CUDA ("/bits": bit placement for V, and for K from an e5m2 pool)."""
    from kernels.decode_attention import DecodeTiles, _decode_split_kernel

    tiles = DecodeTiles(128, 4, 3)
    facts = {}
    for pool, mode in (("bf16", ""), ("fp8e4nv", "cvt"), ("fp8e4nv", "bits"), ("fp8e5", "cvt"), ("fp8e5", "bits")):
        signature = {"q_ptr": "*bf16", "k_pool_ptr": f"*{pool}", "v_pool_ptr": f"*{pool}",
                     **dict.fromkeys(("req_to_token_ptr", "seq_lens_ptr"), "*i32"),
                     "rows_ptr": "*i64", "part_o_ptr": "*fp32", "part_lse_ptr": "*fp32", "alibi_ptr": "*fp32",
                     "o_ptr": "*bf16", "counter_ptr": "*i32",
                     **dict.fromkeys(("sm_scale", "logit_cap", "v_scale"), "fp32"),
                     "sliding_window": "i32", "num_splits": "i32", "q_scale": "fp32",
                     **dict.fromkeys(("stride_qb", "stride_qh", "stride_ks", "stride_kh", "stride_vs", "stride_vh",
                                      "stride_rtt", "stride_pob", "stride_poh", "stride_pos", "stride_plb",
                                      "stride_plh", "stride_ob", "stride_oh"), "i32")}
        constants = {"GROUP": 4, "HEAD_DIM": 128, "SOFTCAP": False, "ALIBI": False, "BLOCK_H": 16,
                     "BLOCK_N": tiles.block_n, "BLOCK_D": 128, "PRECISION": "tf32", "DOT_FP16": pool != "bf16",
                     "FP8_BITS": mode == "bits", "E5M2": pool == "fp8e5", "MERGE": 1, "BLOCK_S": 32}
        aligned = [name for name in signature if name.endswith("_ptr") or name.startswith("stride")]
        ptx = compile_for_sm90(_decode_split_kernel, signature, constants, aligned, tiles)
        facts[f"{pool}/{mode}".rstrip("/")] = {**conversion_counts(ptx), "mma": ptx.count("mma.sync"),
                                               "ld.shared.b8": ptx.count("ld.shared.b8"),
                                               "ldmatrix.trans": ptx.count("ldmatrix.sync.aligned.m8n8.x4.trans")}
    return facts


def extend_ptx_conversions() -> dict[str, dict[str, int]]:
    """Conversion instructions in the sm_90 PTX of the extend kernel (bf16 q and new k/v, default tiles at
    Llama-3-8B's head shape) for a bf16 pool and for each fp8 pool."""
    from kernels.extend_attention import _extend_kernel, default_extend_tiles

    tiles = default_extend_tiles(torch.bfloat16, 128)
    facts = {}
    for pool in ("bf16", "fp8e4nv", "fp8e5"):
        signature = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "o_ptr": "*bf16", "k_pool_ptr": f"*{pool}",
                     "v_pool_ptr": f"*{pool}", "req_to_token_ptr": "*i32", "rows_ptr": "*i64",
                     "prefix_lens_ptr": "*i32", "extend_lens_ptr": "*i32", "extend_start_ptr": "*i32",
                     "alibi_ptr": "*fp32", **dict.fromkeys(("sm_scale", "logit_cap", "k_scale", "v_scale"), "fp32"),
                     "sliding_window": "i32",
                     **dict.fromkeys(("stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh",
                                      "stride_ot", "stride_oh", "stride_ks", "stride_kph", "stride_vs", "stride_vph",
                                      "stride_rtt"), "i32")}
        constants = {"GROUP": 4, "HEAD_DIM": 128, "WINDOW": False, "SOFTCAP": False, "ALIBI": False,
                     "BLOCK_M": tiles.block_m, "BLOCK_N": tiles.block_n, "BLOCK_D": 128, "PRECISION": "tf32",
                     "DOT_FP16": pool != "bf16"}
        aligned = [name for name in signature if name.endswith("_ptr") or name.startswith("stride")]
        ptx = compile_for_sm90(_extend_kernel, signature, constants, aligned, tiles)
        facts[pool] = {**conversion_counts(ptx), "mma": ptx.count("mma.sync") + ptx.count("wgmma.mma_async")}
    return facts


def test_fp8_pools_reach_float16_without_byte_loads_on_hopper():
    """Decode over an fp8 pool, compiled for sm_90. Through Triton's conversion the V tile (the k-major operand of
    p @ V) is read out of shared memory one byte per instruction, and every two values take a conversion
    instruction. With bit placement V goes through shared memory as float16 (ldmatrix.trans); e4m3 K tiles keep
    half of the packed conversions, e5m2 pools need none (on the H200 an fp8 pool had decoded at 64% of the copy
    bandwidth)."""
    facts = facts_without_interpreter("tests.kernels.test_fp8_kv_cache", "decode_ptx_conversions")
    for pool, packed in (("fp8e4nv", "cvt.rn.f16x2.e4m3x2"), ("fp8e5", "cvt.rn.f16x2.e5m2x2")):
        cvt, bits = facts[f"{pool}/cvt"], facts[f"{pool}/bits"]
        assert cvt.get(packed, 0) > 0 and cvt["ld.shared.b8"] > 0, facts
        assert bits["ld.shared.b8"] == 0 and bits["ldmatrix.trans"] > 0, facts
        assert bits["mma"] == facts["bf16"]["mma"], facts
    e4m3, e5m2 = facts["fp8e4nv/bits"], facts["fp8e5/bits"]
    assert 2 * e4m3["cvt.rn.f16x2.e4m3x2"] == facts["fp8e4nv/cvt"]["cvt.rn.f16x2.e4m3x2"], facts
    assert not any(name.startswith("cvt") and "e5m2" in name for name in e5m2), facts
    # the extend kernel's prefix tiles convert through float16 (its new tokens are bf16 and need no conversion)
    facts = facts_without_interpreter("tests.kernels.test_fp8_kv_cache", "extend_ptx_conversions")
    for pool, packed in (("fp8e4nv", "cvt.rn.f16x2.e4m3x2"), ("fp8e5", "cvt.rn.f16x2.e5m2x2")):
        assert facts[pool].get(packed, 0) > 0 and facts[pool]["mma"] > 0, facts
        assert not any(name.startswith("cvt.bf16") for name in facts[pool]), facts


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the bit placement is inline PTX: CUDA only")
@pytest.mark.parametrize("pool_dtype", FP8_DTYPES)
@pytest.mark.parametrize("batch", [3, 130])  # both default tile widths over an fp8 pool
def test_decode_reads_every_fp8_code_through_bit_placement_on_cuda(pool_dtype, batch, seed):
    """Pools of random finite codes (subnormals and both signs included) at Llama-3-8B's head shape, K and V
    scales that are not powers of two: the bit-placement decode matches the float32 reference."""
    num_slots, hq, hkv, dim = 700, 8, 2, 128
    finite = [c for c in range(256) if not torch.tensor([c], dtype=torch.uint8).view(pool_dtype).float().isinf()
              and not torch.tensor([c], dtype=torch.uint8).view(pool_dtype).float().isnan()]
    codes = torch.tensor(finite, dtype=torch.uint8, device="cuda")
    k_pool, v_pool = (codes[torch.randint(len(finite), (num_slots, hkv, dim), device="cuda")].view(pool_dtype)
                      for _ in range(2))
    req_to_token = torch.randint(1, num_slots, (batch, 200), device="cuda", dtype=torch.int32)
    rows = torch.randperm(batch, device="cuda")
    seq_lens = torch.randint(1, 201, (batch,), device="cuda", dtype=torch.int32)
    seq_lens[:3] = torch.tensor([200, 1, 137])
    q = torch.randn(batch, hq, dim, device="cuda").to(torch.bfloat16)
    kwargs = {"k_scale": 0.003, "v_scale": 0.7}
    out = decode_attention(q, k_pool, v_pool, req_to_token, rows, seq_lens, dim**-0.5, 4, **kwargs)
    ref = decode_attention_ref(q, k_pool, v_pool, req_to_token, rows, seq_lens, dim**-0.5, **kwargs)
    assert relative_error(out, ref) < TOLERANCE[torch.bfloat16], f"seed {seed}"


@pytest.mark.parametrize("pool_dtype", FP8_DTYPES)
def test_backends_read_the_same_fp8_pool_alike(pool_dtype, seed):
    """A prefill then a decode step through the torch backend with an fp8 pool (scales != 1) must equal the torch
    backend on a float pool holding the dequantized values; the Triton backend's decode must agree with both."""
    spec = AttentionSpec(num_layers=1, num_q_heads=4, num_kv_heads=2, head_dim=32, scale=32**-0.5)
    scales = dict(k_scales=[K_SCALE], v_scales=[V_SCALE])
    fp8_torch = TorchAttentionBackend(spec, KVPool(64, 1, 2, 32, pool_dtype, DEVICE, **scales))
    fp8_triton = TritonAttentionBackend(spec, KVPool(64, 1, 2, 32, pool_dtype, DEVICE, **scales))
    plain = TorchAttentionBackend(spec, KVPool(64, 1, 2, 32, torch.float32, DEVICE))
    req_to_token = torch.zeros(2, 32, dtype=torch.int32, device=DEVICE)
    for step, (prefix, extend) in enumerate(((0, 7), (7, 1))):
        slots = torch.arange(1 + prefix, 1 + prefix + extend, device=DEVICE)
        batch = ForwardBatch.build(input_ids=torch.zeros(extend, dtype=torch.int64, device=DEVICE), out_slots=slots,
                                   rows=[1], prefix_lens=[prefix], extend_lens=[extend], req_to_token=req_to_token)
        req_to_token[1, prefix:prefix + extend] = slots.to(torch.int32)
        q = torch.randn(extend, 4, 32, device=DEVICE)
        k, v = kv_values((extend, 2, 32), pool_dtype, K_SCALE), kv_values((extend, 2, 32), pool_dtype, V_SCALE)
        for backend in (fp8_torch, fp8_triton, plain):
            backend.prepare(batch)
        out = fp8_torch.forward(q, k, v, 0, batch)
        new = slots.long()
        k_seen = fp8_torch.kv_pool.k[0][new].float() * K_SCALE
        v_seen = fp8_torch.kv_pool.v[0][new].float() * V_SCALE
        expected = plain.forward(q, k_seen, v_seen, 0, batch)
        assert relative_error(out, expected) < 1e-5, f"step {step} (seed {seed})"
        triton_out = fp8_triton.forward(q, k, v, 0, batch)
        assert same_codes(fp8_triton.kv_pool.k[0][new], fp8_torch.kv_pool.k[0][new]), f"seed {seed}"
        if step == 1:  # decode reads only the pool: the same fp8 values
            assert relative_error(triton_out, out) < 1e-4, f"triton decode (seed {seed})"
