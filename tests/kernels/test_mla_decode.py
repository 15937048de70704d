"""The MLA decode kernel against its torch reference on ragged paged batches of a latent cache (tiny shapes in Triton's
interpreter on the CPU; the same tests on the GPU in scripts/gpu_check.sh), and against plain attention over the
up-projected keys and values: absorbing W_UK into q and applying W_UV to the output is the same attention."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from kernels.mla_decode import MlaTiles, mla_decode, mla_decode_ref  # noqa: E402
from tests.kernel_fixtures import DEVICE, DTYPES, TOLERANCE, relative_error  # noqa: E402
from tests.kernels.test_attention import random_table  # noqa: E402

LATENT, ROPE = 32, 16


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_heads", [4, 20])  # fewer heads than a block; more than one block (a partial second)
def test_mla_decode_matches_reference(dtype, num_heads, seed):
    num_slots = 400
    rows = torch.tensor([3, 0, 1], device=DEVICE)
    seq_lens = torch.tensor([1, 45, 70], dtype=torch.int32, device=DEVICE)  # 1: a row's very first token
    req_to_token = random_table(4, 80, num_slots)
    q = torch.randn(3, num_heads, LATENT + ROPE, dtype=dtype, device=DEVICE)
    cache = torch.randn(num_slots, 1, LATENT + ROPE, dtype=dtype, device=DEVICE)
    scale = 0.15
    ref = mla_decode_ref(q, cache, req_to_token, rows, seq_lens, LATENT, scale)
    for num_kv_splits, block_n in ((1, 16), (4, 32)):  # 4 splits leave some splits of the short rows empty
        out = torch.full((3, num_heads, LATENT), float("nan"), dtype=dtype, device=DEVICE)
        mla_decode(q, cache, req_to_token, rows, seq_lens, LATENT, scale, num_kv_splits, out=out,
                   tiles=MlaTiles(16, block_n, 4, 1))
        assert not out.isnan().any(), f"unwritten or NaN output (seed {seed})"
        err = relative_error(out, ref)
        assert err < TOLERANCE[dtype], f"splits={num_kv_splits}: relative error {err:.2e} (seed {seed})"


def test_absorbed_attention_equals_up_projected_attention(seed):
    """The reference itself: softmax((q_nope W_UK . c + q_rope . k_rope) * s) c W_UV^T equals attention with
    k = [c W_UK^T | k_rope] and v = c W_UV^T per head."""
    heads, nope, value, length = 3, 8, 12, 9
    w_uk = torch.randn(heads, nope, LATENT, dtype=torch.float64)
    w_uv = torch.randn(heads, value, LATENT, dtype=torch.float64)
    latent = torch.randn(length, LATENT, dtype=torch.float64)
    k_rope = torch.randn(length, ROPE, dtype=torch.float64)
    q_nope = torch.randn(heads, nope, dtype=torch.float64)
    q_rope = torch.randn(heads, ROPE, dtype=torch.float64)
    scale = 0.2
    keys = torch.cat([torch.einsum("hnl,tl->htn", w_uk, latent), k_rope.expand(heads, -1, -1)], dim=-1)
    values = torch.einsum("hvl,tl->htv", w_uv, latent)
    query = torch.cat([q_nope, q_rope], dim=-1)
    expected = torch.einsum("ht,htv->hv", (torch.einsum("hd,htd->ht", query, keys) * scale).softmax(-1), values)

    absorbed_q = torch.cat([torch.einsum("hn,hnl->hl", q_nope, w_uk), q_rope], dim=-1)[None]
    cache = torch.cat([latent, k_rope], dim=-1)
    table = torch.arange(length, dtype=torch.int32)[None]
    latent_out = mla_decode_ref(absorbed_q, cache, table, torch.tensor([0]), torch.tensor([length]), LATENT, scale)
    # the reference computes in float32
    assert relative_error(torch.einsum("hl,hvl->hv", latent_out[0], w_uv), expected) < 1e-6


def test_mla_decode_reads_only_the_row_own_slots(seed):
    """Poisoning every cache row the batch does not own must not change the result."""
    num_slots = 200
    req_to_token = random_table(3, 40, num_slots)
    rows = torch.tensor([2, 0], device=DEVICE)
    seq_lens = torch.tensor([40, 9], dtype=torch.int32, device=DEVICE)
    q = torch.randn(2, 4, LATENT + ROPE, device=DEVICE)
    cache = torch.randn(num_slots, 1, LATENT + ROPE, device=DEVICE)
    owned = torch.zeros(num_slots, dtype=torch.bool, device=DEVICE)
    for row, length in zip(rows.tolist(), seq_lens.tolist()):
        owned[req_to_token[row, :length].long()] = True
    clean = mla_decode(q, cache, req_to_token, rows, seq_lens, LATENT, 0.2, 2)
    cache[~owned] = float("nan")
    poisoned = mla_decode(q, cache, req_to_token, rows, seq_lens, LATENT, 0.2, 2)
    assert torch.equal(clean, poisoned), f"seed {seed}"
