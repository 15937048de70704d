"""TritonAttentionBackend: paged attention with the Triton kernels of kernels/.

forward stores the new tokens' k/v with one `store_kv` launch, then:
- a DECODE step (every row has one new token) runs `decode_attention`: split over the sequence, the GQA group of
  each kv head in one program, partial results merged by log-sum-exp;
- an EXTEND step (prefill chunks, possibly mixed with decode rows) runs `decode_attention` on its leading rows of
  one new token (the scheduler puts decode rows first) and `extend_attention` on the rest: new tokens attend to the
  cached prefix through req_to_token and causally to the step's own k/v. The extend kernel runs one program per q
  head and block of 128 new tokens, so a decode row in it would read its whole KV once per q head of its group
  (4x the decode kernel's traffic for Llama-3-8B) to compute one token: with hundreds of decode rows riding in a
  prefill chunk's batch that would dominate the step.
`prepare` makes every host-side decision (kernel, number of kv splits) from the batch's host lists, and `forward`
launches kernels on the ForwardBatch's device tensors and on preallocated scratch only, with no host sync, so a
decode step can be captured in a CUDA graph. An fp8 pool's per-layer scales are host floats fixed at load, passed
as kernel arguments (a captured graph keeps them).
"""

from __future__ import annotations

import torch

from kernels.decode_attention import choose_num_kv_splits, decode_attention
from kernels.extend_attention import extend_attention
from kernels.kv_store import store_kv
from runtime.worker.attention.base import AttentionSpec
from runtime.worker.forward_batch import ForwardBatch, ForwardMode
from runtime.worker.kv_pool import KVPool

# Multiprocessor count assumed off CUDA (Triton's interpreter in tests): an H100's.
DEFAULT_NUM_SMS = 132


class TritonAttentionBackend:
    def __init__(self, spec: AttentionSpec, kv_pool: KVPool, initial_scratch_rows: int = 256):
        if spec.num_q_heads % spec.num_kv_heads:
            raise ValueError(f"num_q_heads ({spec.num_q_heads}) must be a multiple of num_kv_heads "
                             f"({spec.num_kv_heads})")
        self.spec = spec
        self.kv_pool = kv_pool
        device = kv_pool.device
        self.num_sms = (torch.cuda.get_device_properties(device).multi_processor_count
                        if device.type == "cuda" else DEFAULT_NUM_SMS)
        self.decode = False
        self.num_single = 0  # leading rows of one new token, attended by the decode kernel
        self.num_kv_splits = 1
        self.alibi_slopes = None if spec.alibi_slopes is None else \
            torch.tensor(spec.alibi_slopes, dtype=torch.float32, device=device)
        self._allocate_decode_scratch(initial_scratch_rows)
        self.part_o = self.part_lse = None

    def _allocate_decode_scratch(self, rows_times_splits: int) -> None:
        """Flat float32 scratch for the split decode kernel's partial outputs and log-sum-exps. A step views the
        front of it as [B, Hq, splits, D], so the addresses stay the same from step to step (CUDA graphs). And the
        int32 counters with which the split kernel merges its splits itself (zero between calls)."""
        spec, device = self.spec, self.kv_pool.device
        self._part_o_flat = torch.empty(rows_times_splits * spec.num_q_heads * spec.head_dim, dtype=torch.float32,
                                        device=device)
        self._part_lse_flat = torch.empty(rows_times_splits * spec.num_q_heads, dtype=torch.float32, device=device)
        self.merge_counters = torch.zeros(rows_times_splits * spec.num_kv_heads, dtype=torch.int32, device=device)

    def prepare(self, batch: ForwardBatch) -> None:
        self.decode = batch.mode == ForwardMode.DECODE
        if self.decode:
            self._prepare_decode(batch.batch_size, batch.max_seq_len)
            return
        single = 0
        for extend_len in batch.extend_lens_cpu:
            if extend_len != 1:
                break
            single += 1
        self.num_single = single
        if single:
            self._prepare_decode(single, max(batch.seq_lens_cpu[:single]))
            self.single_rows, self.single_seq_lens = batch.rows[:single], batch.seq_lens[:single]
        # The extend rows' tokens follow the single rows' `single` tokens.
        self.extend_rows, self.extend_prefix_lens = batch.rows[single:], batch.prefix_lens[single:]
        self.extend_lens = batch.extend_lens[single:]
        self.extend_start = batch.extend_start_loc[single:] - single if single else batch.extend_start_loc

    def _prepare_decode(self, batch_size: int, max_seq_len: int) -> None:
        spec = self.spec
        splits = choose_num_kv_splits(batch_size, spec.num_kv_heads, max_seq_len, self.num_sms)
        if batch_size * splits * spec.num_q_heads > self._part_lse_flat.numel():
            self._allocate_decode_scratch(1 << (batch_size * splits - 1).bit_length())
        self.num_kv_splits = splits
        self.part_o = self._part_o_flat[:batch_size * spec.num_q_heads * splits * spec.head_dim].view(
            batch_size, spec.num_q_heads, splits, spec.head_dim)
        self.part_lse = self._part_lse_flat[:batch_size * spec.num_q_heads * splits].view(
            batch_size, spec.num_q_heads, splits)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int,
                batch: ForwardBatch) -> torch.Tensor:
        k_pool, v_pool = self.kv_pool.k[layer_id], self.kv_pool.v[layer_id]
        k_scale, v_scale = self.kv_pool.k_scales[layer_id], self.kv_pool.v_scales[layer_id]
        store_kv(k_pool, v_pool, batch.out_slots, k, v, k_scale, v_scale)
        spec = self.spec
        window = spec.window(layer_id)
        if self.decode:
            out = decode_attention(q, k_pool, v_pool, batch.req_to_token, batch.rows, batch.seq_lens, spec.scale,
                                   self.num_kv_splits, window, part_o=self.part_o, part_lse=self.part_lse,
                                   logit_cap=spec.logit_cap, k_scale=k_scale, v_scale=v_scale,
                                   alibi_slopes=self.alibi_slopes, merge_counters=self.merge_counters)
        else:
            out = torch.empty_like(q)
            single = self.num_single
            if single:
                decode_attention(q[:single], k_pool, v_pool, batch.req_to_token, self.single_rows,
                                 self.single_seq_lens, spec.scale, self.num_kv_splits, window, out=out[:single],
                                 part_o=self.part_o, part_lse=self.part_lse, logit_cap=spec.logit_cap,
                                 k_scale=k_scale, v_scale=v_scale, alibi_slopes=self.alibi_slopes,
                                 merge_counters=self.merge_counters)
            extend_attention(q[single:], k[single:], v[single:], k_pool, v_pool, batch.req_to_token,
                             self.extend_rows, self.extend_prefix_lens, self.extend_lens, self.extend_start,
                             batch.max_extend_len, spec.scale, window, out=out[single:], logit_cap=spec.logit_cap,
                             k_scale=k_scale, v_scale=v_scale, alibi_slopes=self.alibi_slopes)
        return out.view(q.shape[0], spec.num_q_heads * spec.head_dim)
