"""RMSNorm (plain and fused with the residual add), rotary embedding, SiLU-and-mul and the KV store kernels against
their torch references (HF Llama's formulas). Interpreter on the CPU, GPU when CUDA is present; fresh random inputs,
outputs poisoned with NaN where the kernel writes a fresh tensor."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from kernels.activation import silu_and_mul, silu_and_mul_ref  # noqa: E402
from kernels.kv_store import store_kv, store_kv_ref  # noqa: E402
from kernels.rmsnorm import fused_add_rms_norm, fused_add_rms_norm_ref, rms_norm, rms_norm_ref  # noqa: E402
from kernels.rotary import apply_rotary, apply_rotary_ref, build_cos_sin_cache  # noqa: E402
from tests.kernel_fixtures import DEVICE, DTYPES, TOLERANCE, relative_error  # noqa: E402


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 576, 1000])  # SmolLM2's 576 and a width that is no power of two
def test_rms_norm(dtype, hidden, seed):
    x = torch.randn(5, hidden, dtype=dtype, device=DEVICE) * 3
    weight = torch.randn(hidden, dtype=dtype, device=DEVICE)
    out = torch.full_like(x, float("nan"))
    rms_norm(x, weight, 1e-5, out=out)
    assert not out.isnan().any(), f"seed {seed}"
    err = relative_error(out, rms_norm_ref(x, weight, 1e-5))
    assert err < TOLERANCE[dtype], f"relative error {err:.2e} (seed {seed})"


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rms_norm_updates_both_in_place(dtype, seed):
    x = torch.randn(7, 576, dtype=dtype, device=DEVICE)
    residual = torch.randn_like(x)
    weight = torch.rand(576, dtype=dtype, device=DEVICE) + 0.5
    ref_out, ref_residual = fused_add_rms_norm_ref(x, residual, weight, 1e-6)
    x_ptr, residual_ptr = x.data_ptr(), residual.data_ptr()
    out, new_residual = fused_add_rms_norm(x, residual, weight, 1e-6)
    assert out.data_ptr() == x_ptr and new_residual.data_ptr() == residual_ptr
    assert torch.equal(residual, ref_residual), f"residual must be x + residual rounded as torch does (seed {seed})"
    err = relative_error(x, ref_out)
    assert err < TOLERANCE[dtype], f"relative error {err:.2e} (seed {seed})"


def test_rms_norm_rejects_a_wrong_weight():
    with pytest.raises(ValueError, match="weight"):
        rms_norm(torch.randn(2, 8, device=DEVICE), torch.ones(7, device=DEVICE), 1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rotary_fraction", [1, 2])  # full rotary (Llama) and partial rotary of half the dims
def test_rotary_in_place_matches_hf_rotate_half(dtype, rotary_fraction, seed):
    head_dim, max_position = 64, 300
    rotary_dim = head_dim // rotary_fraction
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32, device=DEVICE) / rotary_dim))
    cache = build_cos_sin_cache(inv_freq, max_position)
    positions = torch.randint(0, max_position, (11,), device=DEVICE)
    q = torch.randn(11, 9, head_dim, dtype=dtype, device=DEVICE)
    k = torch.randn(11, 3, head_dim, dtype=dtype, device=DEVICE)
    ref_q, ref_k = apply_rotary_ref(positions, q, k, cache)
    apply_rotary(positions, q, k, cache)
    for name, out, ref in (("q", q, ref_q), ("k", k, ref_k)):
        err = relative_error(out, ref)
        assert err < TOLERANCE[dtype], f"{name}: relative error {err:.2e} (seed {seed})"
    if rotary_fraction > 1:
        assert torch.equal(q[..., rotary_dim:], ref_q[..., rotary_dim:]), "dims past rotary_dim must be untouched"


def test_rotary_matches_transformers_llama(seed):
    """Against HF's own apply_rotary_pos_emb and rotary embedding, not only our reference."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    head_dim, positions = 32, torch.tensor([0, 5, 99, 3], device=DEVICE)
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=DEVICE) / head_dim))
    q = torch.randn(4, 4, head_dim, device=DEVICE)
    k = torch.randn(4, 2, head_dim, device=DEVICE)
    angles = torch.outer(positions.float(), inv_freq)
    emb = torch.cat([angles, angles], dim=-1)
    # HF layout: [batch, heads, seq, dim]; unsqueeze_dim=1 broadcasts cos/sin [batch, seq, dim] over heads.
    hf_q, hf_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], emb.cos()[None],
                                      emb.sin()[None])
    apply_rotary(positions, q, k, build_cos_sin_cache(inv_freq, 100))
    assert relative_error(q, hf_q[0].transpose(0, 1)) < 1e-5, f"seed {seed}"
    assert relative_error(k, hf_k[0].transpose(0, 1)) < 1e-5, f"seed {seed}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [96, 1536, 1100])  # 1536 spans two blocks of 1024
def test_silu_and_mul(dtype, inter, seed):
    x = torch.randn(6, 2 * inter, dtype=dtype, device=DEVICE) * 2
    out = torch.full((6, inter), float("nan"), dtype=dtype, device=DEVICE)
    silu_and_mul(x, out=out)
    assert not out.isnan().any(), f"seed {seed}"
    err = relative_error(out, silu_and_mul_ref(x))
    assert err < TOLERANCE[dtype], f"relative error {err:.2e} (seed {seed})"


@pytest.mark.parametrize("dtype", DTYPES)
def test_store_kv_writes_exactly_the_given_slots(dtype, seed):
    num_slots, num_heads, head_dim = 50, 3, 40
    k_pool = torch.randn(num_slots, num_heads, head_dim, dtype=dtype, device=DEVICE)
    v_pool = torch.randn_like(k_pool)
    ref_k, ref_v = k_pool.clone(), v_pool.clone()
    slots = (torch.randperm(num_slots - 1)[:9] + 1).to(DEVICE)
    # k and v as the strided views a fused qkv projection yields
    qkv = torch.randn(9, (4 + 2 * num_heads) * head_dim, dtype=dtype, device=DEVICE)
    k = qkv[:, 4 * head_dim:(4 + num_heads) * head_dim].view(9, num_heads, head_dim)
    v = qkv[:, (4 + num_heads) * head_dim:].view(9, num_heads, head_dim)
    store_kv(k_pool, v_pool, slots.to(torch.int32), k, v)
    store_kv_ref(ref_k, ref_v, slots, k, v)
    assert torch.equal(k_pool, ref_k) and torch.equal(v_pool, ref_v), f"seed {seed}"


def test_store_kv_rejects_mismatched_slots():
    pool = torch.zeros(10, 2, 8, device=DEVICE)
    k = torch.randn(3, 2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="slots"):
        store_kv(pool, pool.clone(), torch.zeros(4, dtype=torch.int64, device=DEVICE), k, k)
