"""MlaAttentionBackend: multi-head latent attention (spec.latent_value_dim; base.py) on CUDA.

A DECODE step runs kernels/mla_decode.py over the latent cache: every q head of a block reads each cache row once,
the values being the rows' latent part; the kernel's split scratch is preallocated as in the Triton backend, and
`forward` makes no host decision, so decode steps are captured in CUDA graphs. An EXTEND step (prefill chunks,
possibly with decode rows) runs the torch backend's paged SDPA over the gathered latent rows, the same absorbed
attention: a prefill is computed once per prompt, the decode steps are what repeat.
"""

from __future__ import annotations

import torch

from kernels.decode_attention import choose_num_kv_splits
from kernels.mla_decode import mla_decode
from runtime.worker.attention.base import AttentionSpec
from runtime.worker.attention.torch_backend import TorchAttentionBackend
from runtime.worker.attention.triton_backend import DEFAULT_NUM_SMS
from runtime.worker.forward_batch import ForwardBatch, ForwardMode
from runtime.worker.kv_pool import KVPool


class MlaAttentionBackend:
    def __init__(self, spec: AttentionSpec, kv_pool: KVPool, initial_scratch_rows: int = 256):
        if spec.latent_value_dim is None or spec.num_kv_heads != 1 or not kv_pool.keys_only:
            raise ValueError("MlaAttentionBackend serves latent attention only (one kv head, a keys-only pool)")
        self.spec = spec
        self.kv_pool = kv_pool
        self.extend_backend = TorchAttentionBackend(spec, kv_pool)
        device = kv_pool.device
        self.num_sms = (torch.cuda.get_device_properties(device).multi_processor_count
                        if device.type == "cuda" else DEFAULT_NUM_SMS)
        self.decode = False
        self.num_kv_splits = 1
        self._allocate_decode_scratch(initial_scratch_rows)
        self.part_o = self.part_lse = None

    def _allocate_decode_scratch(self, rows_times_splits: int) -> None:
        """Flat float32 scratch viewed per step as [B, Hq, splits, latent]: same addresses step to step."""
        spec, device = self.spec, self.kv_pool.device
        self._part_o_flat = torch.empty(rows_times_splits * spec.num_q_heads * spec.value_dim, dtype=torch.float32,
                                        device=device)
        self._part_lse_flat = torch.empty(rows_times_splits * spec.num_q_heads, dtype=torch.float32, device=device)

    def prepare(self, batch: ForwardBatch) -> None:
        self.decode = batch.mode == ForwardMode.DECODE
        if not self.decode:
            self.extend_backend.prepare(batch)
            return
        spec, batch_size = self.spec, batch.batch_size
        # the kernel's programs are (row, block of 16 heads, split): count head blocks as kv heads
        head_blocks = -(-spec.num_q_heads // 16)
        splits = choose_num_kv_splits(batch_size, head_blocks, batch.max_seq_len, self.num_sms)
        if batch_size * splits * spec.num_q_heads > self._part_lse_flat.numel():
            self._allocate_decode_scratch(1 << (batch_size * splits - 1).bit_length())
        self.num_kv_splits = splits
        self.part_o = self._part_o_flat[:batch_size * spec.num_q_heads * splits * spec.value_dim].view(
            batch_size, spec.num_q_heads, splits, spec.value_dim)
        self.part_lse = self._part_lse_flat[:batch_size * spec.num_q_heads * splits].view(
            batch_size, spec.num_q_heads, splits)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, layer_id: int,
                batch: ForwardBatch) -> torch.Tensor:
        if not self.decode:
            return self.extend_backend.forward(q, k, v, layer_id, batch)
        self.kv_pool.store(layer_id, batch.out_slots, k, None)
        spec = self.spec
        out = mla_decode(q, self.kv_pool.k[layer_id], batch.req_to_token, batch.rows, batch.seq_lens,
                         spec.value_dim, spec.scale, self.num_kv_splits, part_o=self.part_o, part_lse=self.part_lse,
                         k_scale=self.kv_pool.k_scales[layer_id])
        return out.view(q.shape[0], spec.num_q_heads * spec.value_dim)
