"""TorchAttentionBackend: paged attention with plain torch ops (scaled_dot_product_attention).

The reference backend, and the CPU one. Each step, `prepare` gathers for every batch row the KV slot
of each of its tokens (req_to_token[row, :max_seq_len], slot 0 past the row's end) and builds
boolean masks. Rows are split in two groups:
- single-token rows (decode rows, or extends of one token): one batched SDPA call with one query per
  row against the row's whole sequence;
- multi-token rows (prefill chunks): their queries padded to [rows, max_extend_len], one SDPA call
  with a causal mask offset by each row's prefix length.
GQA without copying K/V: the G = Hq / Hkv query heads that share a kv head are folded into the
query-length dimension, so SDPA sees Hkv heads of G * L queries each.
Models whose layers differ in sliding window get one mask per distinct window. ALiBi models (spec.alibi_slopes) get
float masks instead: slope_h * (key position - query position) where attention is allowed, -inf elsewhere.
Soft-capped scores (Gemma 2) are computed with explicit matmuls and a float32 softmax, as transformers' eager
attention does: SDPA cannot cap them.
An fp8 pool is gathered, converted to q's dtype, and its per-layer scales applied outside the gather: k_scale in the
softmax scale, v_scale on the output.
Multi-head latent attention (spec.latent_value_dim, base.py) is the one-kv-head case whose values are the first
latent_value_dim dimensions of the gathered keys (SDPA takes a value width other than the key width).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from runtime.worker.attention.base import AttentionSpec
from runtime.worker.forward_batch import ForwardBatch
from runtime.worker.kv_pool import KVPool


@dataclass
class _RowGroup:
    """Rows of the batch that share one SDPA call."""

    token_index: torch.Tensor  # int64 [N]: for each new token of the group, its index in the step's [T] tensors
    query_index: torch.Tensor  # int64 [N]: where that token sits in the padded [rows * max_queries] layout
    kv_slots: torch.Tensor  # int64 [rows * max_keys]: pool slot of each key position, row-major
    # per sliding window (None: no window): bool [rows, 1, G * max_queries, max_keys], True where attention is
    # allowed, or None where nothing needs masking; with ALiBi float32 [rows, Hkv, G * max_queries, max_keys] biases
    masks: dict[int | None, torch.Tensor | None]
    num_rows: int
    max_queries: int
    max_keys: int


class TorchAttentionBackend:
    def __init__(self, spec: AttentionSpec, kv_pool: KVPool):
        self.spec = spec
        self.kv_pool = kv_pool
        self.group_size = spec.num_q_heads // spec.num_kv_heads
        self.windows = spec.distinct_windows()
        self.groups: list[_RowGroup] = []
        self.alibi_slopes = None if spec.alibi_slopes is None else \
            torch.tensor(spec.alibi_slopes, dtype=torch.float32, device=kv_pool.device).view(spec.num_kv_heads,
                                                                                             self.group_size)

    def prepare(self, batch: ForwardBatch) -> None:
        extend_cpu = batch.extend_lens_cpu
        single = [i for i, e in enumerate(extend_cpu) if e == 1]
        multi = [i for i, e in enumerate(extend_cpu) if e > 1]
        self.groups = [self._group(batch, rows) for rows in (single, multi) if rows]

    def _group(self, batch: ForwardBatch, rows: list[int]) -> _RowGroup:
        device = batch.input_ids.device
        starts = batch.extend_start_loc.long()
        extend = batch.extend_lens.long()
        index = torch.tensor(rows, device=device) if len(rows) < batch.batch_size else \
            torch.arange(batch.batch_size, device=device)
        max_queries = max(batch.extend_lens_cpu[i] for i in rows)
        max_keys = max(batch.seq_lens_cpu[i] for i in rows)
        extend_g, start_g = extend[index], starts[index]
        prefix_g, seq_g = batch.prefix_lens[index].long(), batch.seq_lens[index].long()

        query_offset = torch.arange(max_queries, device=device)
        query_valid = query_offset[None, :] < extend_g[:, None]  # [n, Q]
        token_index = (start_g[:, None] + query_offset[None, :])[query_valid]
        query_index = (torch.arange(len(rows), device=device)[:, None] * max_queries + query_offset)[query_valid]

        key_pos = torch.arange(max_keys, device=device)
        query_pos = prefix_g[:, None] + query_offset[None, :]  # [n, Q]
        all_keys_visible = max_queries == 1 and all(batch.seq_lens_cpu[i] == max_keys for i in rows)
        masks = {}
        for window in self.windows:
            if self.alibi_slopes is not None:
                masks[window] = self._alibi_mask(key_pos, query_pos, query_valid, window)
                continue
            if all_keys_visible and (window is None or max_keys <= window):
                masks[window] = None  # one query per row, every row sees all max_keys keys: nothing to mask
                continue
            mask = key_pos[None, None, :] <= query_pos[:, :, None]  # causal; implies key_pos < seq_len
            if window is not None:
                mask &= key_pos[None, None, :] > query_pos[:, :, None] - window
            mask |= ~query_valid[:, :, None]  # padded queries attend to everything instead of nothing (no NaN)
            masks[window] = mask[:, None, None].expand(-1, 1, self.group_size, -1, -1).reshape(
                len(rows), 1, self.group_size * max_queries, max_keys)

        slots = batch.req_to_token[batch.rows[index], :max_keys].long()
        slots = torch.where(key_pos[None, :] < seq_g[:, None], slots, 0)
        return _RowGroup(token_index, query_index, slots.reshape(-1), masks, len(rows), max_queries, max_keys)

    def _alibi_mask(self, key_pos: torch.Tensor, query_pos: torch.Tensor, query_valid: torch.Tensor,
                    window: int | None) -> torch.Tensor:
        """float32 [n, Hkv, G * Q, L]: slope * (key - query position) where allowed (causal, window), else -inf."""
        allowed = key_pos[None, None, :] <= query_pos[:, :, None]
        if window is not None:
            allowed &= key_pos[None, None, :] > query_pos[:, :, None] - window
        allowed |= ~query_valid[:, :, None]
        distance = (key_pos[None, None, :] - query_pos[:, :, None]).float()  # [n, Q, L]
        bias = self.alibi_slopes[None, :, :, None, None] * distance[:, None, None]  # [n, Hkv, G, Q, L]
        bias = bias.masked_fill(~allowed[:, None, None], float("-inf"))
        n, Q, L = distance.shape
        return bias.reshape(n, self.spec.num_kv_heads, self.group_size * Q, L)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int,
                batch: ForwardBatch) -> torch.Tensor:
        self.kv_pool.store(layer_id, batch.out_slots, k, v)
        k_pool = self.kv_pool.k[layer_id]
        v_pool = None if self.kv_pool.keys_only else self.kv_pool.v[layer_id]
        window = self.spec.window(layer_id)
        scales = (self.kv_pool.k_scales[layer_id], self.kv_pool.v_scales[layer_id])
        num_tokens, num_heads, value_dim = q.shape[0], q.shape[1], self.spec.value_dim
        if len(self.groups) == 1 and self.groups[0].num_rows == batch.batch_size and \
                self.groups[0].max_queries == 1:
            return self._attend(q, k_pool, v_pool, self.groups[0], window, scales).reshape(num_tokens,
                                                                                          num_heads * value_dim)
        out = q.new_empty(num_tokens, num_heads, value_dim)
        for group in self.groups:
            out[group.token_index] = self._attend(q[group.token_index], k_pool, v_pool, group, window, scales)
        return out.view(num_tokens, num_heads * value_dim)

    def _attend(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor | None, group: _RowGroup,
                window: int | None, scales: tuple[float, float]) -> torch.Tensor:
        """q [N, Hq, D] of the group's tokens -> attention output [N, Hq, Dv] (v_pool None: values are the first Dv
        dimensions of the keys)."""
        n, Q, G = group.num_rows, group.max_queries, self.group_size
        Hkv, D, Dv = self.spec.num_kv_heads, self.spec.head_dim, self.spec.value_dim
        if Q == 1:
            queries = q.view(n, Hkv, G, D)
        else:
            padded = q.new_zeros(n * Q, Hkv * G, D)
            padded[group.query_index] = q
            queries = padded.view(n, Q, Hkv, G, D).permute(0, 2, 3, 1, 4).reshape(n, Hkv, G * Q, D)
        # index_select is several times faster than advanced indexing on the CPU; it has no fp8 kernel there, so an
        # fp8 pool is gathered as bytes
        k_scale, v_scale = scales
        keys = self._gather(k_pool, group.kv_slots, q.dtype).view(n, group.max_keys, Hkv, D).transpose(1, 2)
        if v_pool is None:
            values = keys[..., :Dv]  # [n, Hkv, L, Dv]
            v_scale = k_scale
        else:
            values = self._gather(v_pool, group.kv_slots, q.dtype).view(n, group.max_keys, Hkv, Dv).transpose(1, 2)
        mask = group.masks[window]
        if mask is not None and mask.is_floating_point():
            mask = mask.to(queries.dtype)
        scale = self.spec.scale * k_scale
        if self.spec.logit_cap is None:
            out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=scale)
        else:
            out = self._capped_attention(queries, keys, values, mask, scale)
        if v_scale != 1.0:
            out = out * v_scale
        if Q == 1:
            return out.reshape(n, Hkv * G, Dv)
        out = out.view(n, Hkv, G, Q, Dv).permute(0, 3, 1, 2, 4).reshape(n * Q, Hkv * G, Dv)
        return out[group.query_index]

    def _gather(self, pool: torch.Tensor, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.kv_pool.quantized:
            return pool.view(torch.uint8).index_select(0, slots).view(pool.dtype).to(dtype)
        return pool.index_select(0, slots)

    def _capped_attention(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                          mask: torch.Tensor | None, scale: float) -> torch.Tensor:
        cap = self.spec.logit_cap
        scores = torch.tanh(queries @ keys.transpose(-1, -2) * (scale / cap)) * cap
        if mask is not None:
            scores = scores + mask if mask.is_floating_point() else scores.masked_fill(~mask, float("-inf"))
        return torch.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype) @ values
