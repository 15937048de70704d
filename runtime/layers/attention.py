"""SelfAttention: the attention block of a decoder layer over the paged KV cache.

q/k/v come from one packed projection (split by heads over tensor-parallel ranks), are optionally clamped
(`clip_qkv`: DBRX, OLMoE) and normalized per head (`qk_norm`: Qwen3, Gemma 3, Cohere, StableLM), rotated, and handed
to the step's attention backend, which stores k/v in the pool and attends; the output projection is row parallel.
Families with another q/k normalization override `normalize_qk`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from runtime.layers.linear import QKVParallelLinear, RowParallelLinear
from runtime.layers.parallel import TensorParallel
from runtime.layers.rotary import RotaryEmbedding

if TYPE_CHECKING:
    from runtime.worker.attention.base import AttentionBackend
    from runtime.worker.forward_batch import ForwardBatch


class SelfAttention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, layer_id: int,
                 rotary: RotaryEmbedding | None, tp: TensorParallel, dtype: torch.dtype, qkv_bias: bool = False,
                 o_bias: bool = False, qk_norm: Callable[[int], nn.Module] | None = None,
                 clip_qkv: float | None = None):
        """`qk_norm(num_heads_on_this_rank)` builds one per-head norm (called for q, then for k)."""
        super().__init__()
        self.layer_id = layer_id
        self.rotary = rotary
        self.clip_qkv = clip_qkv
        self.qkv_proj = QKVParallelLinear(hidden_size, head_dim, num_heads, num_kv_heads, qkv_bias, tp, dtype)
        self.o_proj = RowParallelLinear(num_heads * head_dim, hidden_size, o_bias, tp, dtype)
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.head_dim = head_dim
        if qk_norm is not None:
            self.q_norm = qk_norm(self.num_heads)
            self.k_norm = qk_norm(self.num_kv_heads)

    def normalize_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, Hq, D], k [T, Hkv, D] before the rotation."""
        if not hasattr(self, "q_norm"):
            return q, k
        return self.q_norm(q), self.k_norm(k)

    def forward(self, hidden: torch.Tensor, batch: ForwardBatch, attn: AttentionBackend) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)
        if self.clip_qkv is not None:
            qkv = qkv.clamp_(-self.clip_qkv, self.clip_qkv)
        q, k, v = self.qkv_proj.split(qkv)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        q, k = self.normalize_qk(q, k)
        if self.rotary is not None:
            q, k = self.rotary(batch.positions if batch.rope_positions is None else batch.rope_positions, q, k)
        return self.o_proj(attn.forward(q, k, v, self.layer_id, batch))
