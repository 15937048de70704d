"""Decode and extend attention kernels against their torch references, on ragged paged batches.

On a machine without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set before anything imports
triton) at tiny sizes; with CUDA the same tests run on the GPU (scripts/gpu_check.sh). Inputs are fresh random draws
for every test (the seed is in each failure message); outputs are poisoned with NaN first, so an element the kernel
fails to write fails the test.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from kernels.decode_attention import (  # noqa: E402
    DecodeTiles,  # noqa: E402
    choose_num_kv_splits,
    decode_attention,
    decode_attention_ref,
)
from kernels.extend_attention import ExtendTiles, extend_attention, extend_attention_ref  # noqa: E402
from tests.kernel_fixtures import DEVICE, DTYPES, TOLERANCE, relative_error  # noqa: E402


def random_table(num_rows: int, context: int, num_slots: int) -> torch.Tensor:
    """A request table whose rows point at distinct random slots (1..num_slots-1; slot 0 is padding)."""
    slots = torch.randperm(num_slots - 1)[: num_rows * context] + 1
    return slots.view(num_rows, context).to(torch.int32).to(DEVICE)


# (q heads, kv heads), sliding window: MHA, GQA, SmolLM2's odd group of 3
SHAPES = [((4, 4), None), ((6, 2), 7), ((9, 3), None), ((9, 3), 7)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads, sliding_window", SHAPES)
def test_decode_attention_matches_reference(dtype, heads, sliding_window, seed):
    num_q_heads, num_kv_heads = heads
    head_dim, num_slots = 64, 500
    rows = torch.tensor([3, 0, 1, 4], device=DEVICE)
    seq_lens = torch.tensor([1, 17, 70, 33], dtype=torch.int32, device=DEVICE)  # 1: a row's very first token
    req_to_token = random_table(5, 80, num_slots)
    q = torch.randn(4, num_q_heads, head_dim, dtype=dtype, device=DEVICE)
    k_pool = torch.randn(num_slots, num_kv_heads, head_dim, dtype=dtype, device=DEVICE)
    v_pool = torch.randn_like(k_pool)
    scale = head_dim**-0.5
    ref = decode_attention_ref(q, k_pool, v_pool, req_to_token, rows, seq_lens, scale, sliding_window)
    counters = torch.zeros(4 * num_kv_heads, dtype=torch.int32, device=DEVICE)
    # 1 split: the output written directly; 4 splits (some of the short rows' empty) merged by the second kernel,
    # and in the first one on merge counters, which it leaves zero for the next call
    for num_kv_splits, merge_counters in ((1, None), (4, None), (4, counters), (4, counters)):
        out = torch.full_like(q, float("nan"))
        decode_attention(q, k_pool, v_pool, req_to_token, rows, seq_lens, scale, num_kv_splits,
                         sliding_window=sliding_window, out=out, merge_counters=merge_counters)
        assert not out.isnan().any(), f"unwritten or NaN output (seed {seed})"
        err = relative_error(out, ref)
        assert err < TOLERANCE[dtype], f"splits={num_kv_splits}: relative error {err:.2e} (seed {seed})"
        assert not counters.any(), f"merge counters left non-zero (seed {seed})"


def test_decode_attention_reads_only_the_row_own_slots(seed):
    """Poisoning every slot the batch does not own must not change the result."""
    num_slots = 200
    req_to_token = random_table(3, 40, num_slots)
    rows = torch.tensor([2, 0], device=DEVICE)
    seq_lens = torch.tensor([40, 9], dtype=torch.int32, device=DEVICE)
    q = torch.randn(2, 4, 32, device=DEVICE)
    k_pool = torch.randn(num_slots, 2, 32, device=DEVICE)
    v_pool = torch.randn_like(k_pool)
    owned = torch.zeros(num_slots, dtype=torch.bool, device=DEVICE)
    for row, length in zip(rows.tolist(), seq_lens.tolist()):
        owned[req_to_token[row, :length].long()] = True
    clean = decode_attention(q, k_pool, v_pool, req_to_token, rows, seq_lens, 0.2, 2)
    k_pool[~owned] = float("nan")
    v_pool[~owned] = float("nan")
    poisoned = decode_attention(q, k_pool, v_pool, req_to_token, rows, seq_lens, 0.2, 2)
    assert torch.equal(clean, poisoned), f"seed {seed}"


def test_choose_num_kv_splits_fills_the_gpu_without_tiny_splits():
    assert choose_num_kv_splits(1, 8, 4096) == 32  # one long row: 8 kv heads x 32 splits fill 132 SMs twice
    assert choose_num_kv_splits(1, 8, 300) == 4  # short row: no split under 64 tokens
    assert choose_num_kv_splits(1, 8, 100) == 1
    assert choose_num_kv_splits(256, 8, 4096) == 1  # the batch alone fills the GPU
    for batch in (1, 3, 17, 64):
        splits = choose_num_kv_splits(batch, 8, 1 << 20)
        assert splits & (splits - 1) == 0 and 1 <= splits <= 64
        assert batch * 8 * splits >= 132 or splits == 64  # at least one program per SM


def extend_inputs(dtype, num_q_heads, num_kv_heads, head_dim, prefix_lens, extend_lens, num_slots=800):
    batch = len(prefix_lens)
    req_to_token = random_table(batch + 1, max(p + e for p, e in zip(prefix_lens, extend_lens)), num_slots)
    rows = torch.randperm(batch + 1)[:batch].to(DEVICE)
    starts = [sum(extend_lens[:i]) for i in range(batch)]
    num_tokens = sum(extend_lens)

    def rand(n, h):
        return torch.randn(n, h, head_dim, dtype=dtype, device=DEVICE)

    meta = [torch.tensor(x, dtype=torch.int32, device=DEVICE) for x in (prefix_lens, extend_lens, starts)]
    return (rand(num_tokens, num_q_heads), rand(num_tokens, num_kv_heads), rand(num_tokens, num_kv_heads),
            rand(num_slots, num_kv_heads), rand(num_slots, num_kv_heads), req_to_token, rows, *meta)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads, sliding_window", SHAPES)
def test_extend_attention_matches_reference_on_ragged_mixed_batches(dtype, heads, sliding_window, seed):
    # fresh prefill, prefix-cache hit, a decode row (extend 1) with whole prefix tiles, a chunk longer than one tile,
    # an empty-prefix decode
    prefix_lens = [0, 23, 130, 5, 0]
    extend_lens = [13, 9, 1, 70, 1]
    args = extend_inputs(dtype, *heads, 32, prefix_lens, extend_lens)
    scale = 32**-0.5
    out = torch.full_like(args[0], float("nan"))
    extend_attention(*args, max(extend_lens), scale, sliding_window=sliding_window, out=out)
    ref = extend_attention_ref(*args, scale, sliding_window=sliding_window)
    assert not out.isnan().any(), f"unwritten or NaN output (seed {seed})"
    err = relative_error(out, ref)
    assert err < TOLERANCE[dtype], f"relative error {err:.2e} (seed {seed})"


@pytest.mark.parametrize("tiles", [ExtendTiles(64, 16, 4, 2), ExtendTiles(32, 32, 4, 3)])
def test_extend_attention_other_tiles(tiles, seed):
    """Several key tiles per diagonal block, and pipelining depth 3."""
    args = extend_inputs(torch.float16, 6, 2, 32, [40, 0, 3], [50, 33, 1])
    out = torch.full_like(args[0], float("nan"))
    extend_attention(*args, 50, 0.2, sliding_window=20, out=out, tiles=tiles)
    err = relative_error(out, extend_attention_ref(*args, 0.2, sliding_window=20))
    assert err < TOLERANCE[torch.float16], f"relative error {err:.2e} (seed {seed})"
    with pytest.raises(ValueError, match="multiple of block_n"):
        extend_attention(*args, 50, 0.2, tiles=ExtendTiles(32, 64, 4, 2))


def test_decode_attention_other_tiles(seed):
    q = torch.randn(2, 6, 32, dtype=torch.float16, device=DEVICE)
    pool = torch.randn(300, 2, 32, dtype=torch.float16, device=DEVICE)
    table = random_table(2, 100, 300)
    rows = torch.tensor([1, 0], device=DEVICE)
    seq_lens = torch.tensor([100, 45], dtype=torch.int32, device=DEVICE)
    ref = decode_attention_ref(q, pool, pool, table, rows, seq_lens, 0.3)
    out = decode_attention(q, pool, pool, table, rows, seq_lens, 0.3, 3, tiles=DecodeTiles(32, 4, 3))
    err = relative_error(out, ref)
    assert err < TOLERANCE[torch.float16], f"relative error {err:.2e} (seed {seed})"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sliding_window", [None, 7])
def test_soft_capped_scores_match_reference(dtype, sliding_window, seed):
    """Gemma 2's soft-capping (c * tanh(s / c) of the scaled scores) in both kernels; scores of unit q and k times 1.0
    reach several times the cap, so the cap shapes the result."""
    args = extend_inputs(dtype, 4, 2, 32, [0, 20, 9], [11, 1, 6])
    out = torch.full_like(args[0], float("nan"))
    extend_attention(*args, 11, 1.0, sliding_window=sliding_window, out=out, logit_cap=2.0)
    ref = extend_attention_ref(*args, 1.0, sliding_window=sliding_window, logit_cap=2.0)
    uncapped = extend_attention_ref(*args, 1.0, sliding_window=sliding_window)
    assert relative_error(out, ref) < TOLERANCE[dtype], f"extend (seed {seed})"
    assert relative_error(uncapped, ref) > 10 * TOLERANCE[dtype]
    q, k_pool, v_pool, table = args[0][:3], args[3], args[4], args[5]
    rows, seq_lens = args[6], torch.tensor([40, 21, 15], dtype=torch.int32, device=DEVICE)
    table = random_table(int(rows.max()) + 1, 40, k_pool.shape[0])
    out = decode_attention(q, k_pool, v_pool, table, rows, seq_lens, 1.0, 2, sliding_window=sliding_window,
                           logit_cap=2.0)
    ref = decode_attention_ref(q, k_pool, v_pool, table, rows, seq_lens, 1.0, sliding_window, logit_cap=2.0)
    assert relative_error(out, ref) < TOLERANCE[dtype], f"decode (seed {seed})"


@pytest.mark.parametrize("dtype", DTYPES)
def test_alibi_scores_match_reference(dtype, seed):
    """ALiBi (Baichuan 13B): slope_h * (key position - query position) added to head h's scores, in both kernels, with
    slopes steep enough that the result differs from plain attention."""
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625], device=DEVICE)
    args = extend_inputs(dtype, 4, 2, 32, [0, 20, 9], [11, 1, 6])
    out = torch.full_like(args[0], float("nan"))
    extend_attention(*args, 11, 0.2, out=out, alibi_slopes=slopes)
    ref = extend_attention_ref(*args, 0.2, alibi_slopes=slopes)
    assert relative_error(out, ref) < TOLERANCE[dtype], f"extend (seed {seed})"
    assert relative_error(extend_attention_ref(*args, 0.2), ref) > 10 * TOLERANCE[dtype]
    q, k_pool, v_pool, rows = args[0][:3], args[3], args[4], args[6]
    seq_lens = torch.tensor([40, 21, 15], dtype=torch.int32, device=DEVICE)
    table = random_table(int(rows.max()) + 1, 40, k_pool.shape[0])
    out = decode_attention(q, k_pool, v_pool, table, rows, seq_lens, 0.2, 2, alibi_slopes=slopes)
    ref = decode_attention_ref(q, k_pool, v_pool, table, rows, seq_lens, 0.2, alibi_slopes=slopes)
    assert relative_error(out, ref) < TOLERANCE[dtype], f"decode (seed {seed})"


def test_extend_attention_non_power_of_two_head_dim(seed):
    args = extend_inputs(torch.float32, 4, 2, 48, [6, 0], [5, 12])
    out = torch.full_like(args[0], float("nan"))
    extend_attention(*args, 12, 0.15, out=out)
    err = relative_error(out, extend_attention_ref(*args, 0.15))
    assert err < TOLERANCE[torch.float32], f"relative error {err:.2e} (seed {seed})"


def test_attention_kernels_reject_bad_head_counts():
    q = torch.randn(2, 5, 16, device=DEVICE)
    pool = torch.randn(10, 2, 16, device=DEVICE)
    table = torch.zeros(2, 4, dtype=torch.int32, device=DEVICE)
    index = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        decode_attention(q, pool, pool, table, index, index, 1.0, 1)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        extend_attention(q, pool[:2], pool[:2], pool, pool, table, index, index, index, index, 1, 1.0)
