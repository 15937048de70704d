"""TritonAttentionBackend against TorchAttentionBackend over a sequence of steps that share one request table:
prefills, a prefix-cache hit, pure decode steps and a mixed step, with GQA and a sliding window. Both backends get
the same q/k/v and their own copy of the pool; outputs and pools must agree. Interpreter on the CPU, GPU with CUDA."""

from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("triton")

from runtime.worker.attention.base import AttentionSpec  # noqa: E402
from runtime.worker.attention.torch_backend import TorchAttentionBackend  # noqa: E402
from runtime.worker.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from runtime.worker.forward_batch import ForwardBatch, ForwardMode  # noqa: E402
from runtime.worker.kv_pool import KVPool  # noqa: E402
from tests.kernel_fixtures import CUDA, DEVICE, TOLERANCE, relative_error  # noqa: E402

# fp16 rather than bf16 on the CPU: the interpreter mishandles bf16 dot products (see test_kernels_attention.py).
DTYPES = [torch.float32, torch.bfloat16] if CUDA else [torch.float32, torch.float16]


class Steps:
    """Drives both backends through plans the way ModelRunner does: slots from a free list, req_to_token rows
    written before the forward."""

    def __init__(self, spec: AttentionSpec, dtype: torch.dtype, num_layers: int = 2):
        self.spec, self.dtype = spec, dtype
        pool_args = (400, num_layers, spec.num_kv_heads, spec.head_dim, dtype, DEVICE)
        self.backends = [TorchAttentionBackend(spec, KVPool(*pool_args)),
                         TritonAttentionBackend(spec, KVPool(*pool_args), initial_scratch_rows=2)]
        self.req_to_token = torch.zeros(6, 128, dtype=torch.int32, device=DEVICE)
        self.free_slots = list(range(1, 401))
        random.shuffle(self.free_slots)
        self.lengths: dict[int, int] = {}

    def share_prefix(self, row: int, source: int, length: int) -> None:
        """A radix-cache hit: `row` starts with the first `length` cached slots of `source`."""
        self.req_to_token[row, :length] = self.req_to_token[source, :length]
        self.lengths[row] = length

    def step(self, rows: list[int], extend_lens: list[int], seed: int) -> ForwardMode:
        prefix_lens = [self.lengths.get(r, 0) for r in rows]
        num_tokens = sum(extend_lens)
        out_slots = torch.tensor([self.free_slots.pop() for _ in range(num_tokens)], device=DEVICE)
        batch = ForwardBatch.build(input_ids=torch.zeros(num_tokens, dtype=torch.int64, device=DEVICE),
                                   out_slots=out_slots, rows=rows, prefix_lens=prefix_lens, extend_lens=extend_lens,
                                   req_to_token=self.req_to_token)
        self.req_to_token[batch.rows[batch.token_batch_index], batch.positions] = out_slots.to(torch.int32)
        for row, extend in zip(rows, extend_lens):
            self.lengths[row] = self.lengths.get(row, 0) + extend
        for backend in self.backends:
            backend.prepare(batch)
        spec = self.spec
        for layer in range(self.backends[0].kv_pool.num_layers):
            q = torch.randn(num_tokens, spec.num_q_heads, spec.head_dim, dtype=self.dtype, device=DEVICE)
            k = torch.randn(num_tokens, spec.num_kv_heads, spec.head_dim, dtype=self.dtype, device=DEVICE)
            v = torch.randn_like(k)
            ref, out = (b.forward(q, k, v, layer, batch) for b in self.backends)
            assert out.shape == (num_tokens, spec.num_q_heads * spec.head_dim) and out.dtype == self.dtype
            assert not out.isnan().any(), f"layer {layer}: NaN output (seed {seed})"
            err = relative_error(out, ref)
            assert err < TOLERANCE[self.dtype], f"{batch.mode} layer {layer}: relative error {err:.2e} (seed {seed})"
            pools = [b.kv_pool for b in self.backends]
            assert torch.equal(pools[0].k[layer], pools[1].k[layer]), f"k pools differ (seed {seed})"
            assert torch.equal(pools[0].v[layer], pools[1].v[layer]), f"v pools differ (seed {seed})"
        return batch.mode


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_q_heads, num_kv_heads, sliding_window", [(9, 3, None), (4, 2, 6)])
def test_triton_backend_matches_torch_backend_over_steps(dtype, num_q_heads, num_kv_heads, sliding_window):
    seed = random.randrange(2**31)
    torch.manual_seed(seed)
    random.seed(seed)
    spec = AttentionSpec(num_layers=2, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=32,
                         scale=32**-0.5, sliding_window=sliding_window)
    steps = Steps(spec, dtype)
    assert steps.step([0, 3], [12, 5], seed) == ForwardMode.EXTEND  # two fresh prefills
    assert steps.step([3, 0], [1, 1], seed) == ForwardMode.DECODE
    steps.share_prefix(1, source=0, length=8)  # prefix-cache hit on the first 8 tokens of row 0
    assert steps.step([0, 1, 3], [1, 6, 1], seed) == ForwardMode.EXTEND  # mixed: decode rows beside a chunk
    # mixed as the scheduler plans it: decode rows first (the decode kernel), then chunks (the extend kernel)
    assert steps.step([3, 0, 1, 4], [1, 1, 5, 7], seed) == ForwardMode.EXTEND
    for _ in range(2):  # four decode rows: more than the backend's initial scratch (2 rows) holds
        assert steps.step([1, 3, 0, 4], [1, 1, 1, 1], seed) == ForwardMode.DECODE


def test_triton_backend_matches_torch_backend_with_layer_windows_and_soft_capping():
    """Gemma 2's attention: a window on layer 0 only, soft-capped scores on both layers."""
    seed = random.randrange(2**31)
    torch.manual_seed(seed)
    random.seed(seed)
    spec = AttentionSpec(num_layers=2, num_q_heads=4, num_kv_heads=2, head_dim=32, scale=0.5, sliding_window=5,
                         window_layers=(0,), logit_cap=3.0)
    assert [spec.window(layer) for layer in range(2)] == [5, None]
    steps = Steps(spec, torch.float32)
    assert steps.step([0, 3], [12, 4], seed) == ForwardMode.EXTEND
    steps.share_prefix(1, source=0, length=8)
    assert steps.step([0, 1, 3], [1, 6, 1], seed) == ForwardMode.EXTEND
    assert steps.step([1, 3, 0], [1, 1, 1], seed) == ForwardMode.DECODE


def test_triton_backend_rejects_a_spec_with_uneven_groups():
    spec = AttentionSpec(num_layers=1, num_q_heads=6, num_kv_heads=4, head_dim=16, scale=0.25)
    with pytest.raises(ValueError, match="num_q_heads"):
        TritonAttentionBackend(spec, KVPool(10, 1, 4, 16, torch.float32, DEVICE))


def test_triton_backend_matches_torch_backend_with_alibi():
    """Baichuan 13B's ALiBi (GQA here, so the torch backend's folded head order is checked too)."""
    seed = random.randrange(2**31)
    torch.manual_seed(seed)
    random.seed(seed)
    spec = AttentionSpec(num_layers=2, num_q_heads=4, num_kv_heads=2, head_dim=32, scale=0.5,
                         alibi_slopes=(0.5, 0.25, 0.125, 0.0625))
    steps = Steps(spec, torch.float32)
    assert steps.step([0, 3], [12, 4], seed) == ForwardMode.EXTEND
    steps.share_prefix(1, source=0, length=8)
    assert steps.step([0, 1, 3], [1, 6, 1], seed) == ForwardMode.EXTEND
    assert steps.step([1, 3, 0], [1, 1, 1], seed) == ForwardMode.DECODE
