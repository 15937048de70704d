"""Multi-head latent attention (MLA: DeepSeek V2 and V3) over a latent KV cache, with the absorbed-weight path.

Per token, the keys and values of every head are projections of one compressed latent
c = kv_a_layernorm(kv_a_proj_with_mqa(h)[:kv_lora_rank]) plus a rope key k_rope shared by all heads (the rest of
kv_a_proj_with_mqa's output, rotated). transformers up-projects the latent per head: k_h = [c W_UK_h^T | k_rope],
v_h = c W_UV_h^T (W_UK, W_UV: the rows of kv_b_proj). Since q_h . k_h = (q_nope_h W_UK_h) . c + q_rope_h . k_rope
and the output of head h is (softmax(...) c) W_UV_h^T, the cache only needs [c | k_rope] per token (576 values for
DeepSeek-V2, against 2 x 16 heads x 192 for its up-projected keys and values):
- the query is absorbed: q_h' = [q_nope_h W_UK_h (kv_lora_rank) | q_rope_h (qk_rope_head_dim)];
- attention runs as MQA with one kv head whose keys are the cache rows and whose values are their latent part
  (AttentionSpec.latent_value_dim; the torch backend, or kernels/mla_decode.py for CUDA decode steps);
- the output of each head [kv_lora_rank] is up-projected by W_UV_h, then o_proj.
The same path serves prefill and decode. The softmax scale is (qk_nope + qk_rope)^-0.5, times mscale^2 for yarn
rope with `mscale_all_dim` (DeepSeek's rule). Under tensor parallelism q, kv_b_proj and o_proj split by heads; the
latent and rope key are replicated (every rank caches the same rows).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from runtime.layers.linear import (
    ColumnParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
    WeightShapeError,
    copy_checked,
)
from runtime.layers.norm import RMSNorm
from runtime.layers.parallel import TensorParallel
from runtime.layers.rotary import RotaryEmbedding

if TYPE_CHECKING:
    from runtime.worker.attention.base import AttentionBackend
    from runtime.worker.forward_batch import ForwardBatch


@dataclass(frozen=True)
class MlaShape:
    hidden_size: int
    num_heads: int  # all ranks
    q_lora_rank: int | None  # None: q comes from one q_proj
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    norm_eps: float
    bias: bool  # attention_bias: q_a_proj, kv_a_proj_with_mqa and o_proj

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def cache_dim(self) -> int:
        """Values cached per token and layer: the latent, then the rope key."""
        return self.kv_lora_rank + self.qk_rope_head_dim


class LatentUpProjection(nn.Module):
    """kv_b_proj's weight [heads * (qk_nope + v_head), kv_lora_rank], this rank's heads, kept as a plain tensor (never
    quantized): it is never applied as a linear layer, its per-head W_UK and W_UV blocks are absorbed."""

    def __init__(self, shape: MlaShape, tp: TensorParallel, dtype: torch.dtype):
        super().__init__()
        self.head_start, head_end = tp.shard_range(shape.num_heads)
        self.rows_per_head = shape.qk_nope_head_dim + shape.v_head_dim
        self.num_heads = head_end - self.head_start
        self.total_rows = shape.num_heads * self.rows_per_head
        self.shape = shape
        self.weight = nn.Parameter(torch.empty(self.num_heads * self.rows_per_head, shape.kv_lora_rank, dtype=dtype),
                                   requires_grad=False)
        self.weight.weight_loader = self.load

    def load(self, param: nn.Parameter, loaded: torch.Tensor, name: str) -> None:
        expected = (self.total_rows, self.shape.kv_lora_rank)
        if tuple(loaded.shape) != expected:
            raise WeightShapeError(f"tensor {name}: checkpoint shape {tuple(loaded.shape)} does not match the model's "
                                   f"{expected}")
        start = self.head_start * self.rows_per_head
        copy_checked(param, loaded[start:start + param.shape[0]], name)

    def absorbed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_UK [heads, qk_nope, kv_lora_rank], W_UV [heads, v_head, kv_lora_rank]): views of the weight."""
        per_head = self.weight.view(self.num_heads, self.rows_per_head, self.shape.kv_lora_rank)
        nope = self.shape.qk_nope_head_dim
        return per_head[:, :nope], per_head[:, nope:]


class MlaAttention(nn.Module):
    def __init__(self, shape: MlaShape, layer_id: int, rotary: RotaryEmbedding, tp: TensorParallel,
                 dtype: torch.dtype):
        super().__init__()
        self.shape = shape
        self.layer_id = layer_id
        self.rotary = rotary
        q_out = shape.num_heads * shape.qk_head_dim
        if shape.q_lora_rank is None:
            self.q_proj = ColumnParallelLinear(shape.hidden_size, q_out, False, tp, dtype)
        else:
            self.q_a_proj = ReplicatedLinear(shape.hidden_size, shape.q_lora_rank, shape.bias, dtype)
            self.q_a_layernorm = RMSNorm(shape.q_lora_rank, shape.norm_eps, dtype)
            self.q_b_proj = ColumnParallelLinear(shape.q_lora_rank, q_out, False, tp, dtype)
        self.kv_a_proj_with_mqa = ReplicatedLinear(shape.hidden_size, shape.cache_dim, shape.bias, dtype)
        self.kv_a_layernorm = RMSNorm(shape.kv_lora_rank, shape.norm_eps, dtype)
        self.kv_b_proj = LatentUpProjection(shape, tp, dtype)
        self.o_proj = RowParallelLinear(shape.num_heads * shape.v_head_dim, shape.hidden_size, shape.bias, tp, dtype)
        self.num_heads = self.kv_b_proj.num_heads  # this rank's
        self.num_kv_heads = 1

    def forward(self, hidden: torch.Tensor, batch: ForwardBatch, attn: AttentionBackend) -> torch.Tensor:
        shape, num_tokens = self.shape, hidden.shape[0]
        if shape.q_lora_rank is None:
            q = self.q_proj(hidden)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden)))
        q_nope, q_rope = q.view(num_tokens, self.num_heads, shape.qk_head_dim).split(
            [shape.qk_nope_head_dim, shape.qk_rope_head_dim], dim=-1)
        latent, k_rope = self.kv_a_proj_with_mqa(hidden).split([shape.kv_lora_rank, shape.qk_rope_head_dim], dim=-1)
        latent = self.kv_a_layernorm(latent.contiguous())
        # the CUDA rotary kernel rotates in place: hand it compact copies
        q_rope, k_rope = self.rotary(batch.positions, q_rope.contiguous(), k_rope.reshape(num_tokens, 1, -1))
        w_uk, w_uv = self.kv_b_proj.absorbed()
        q_latent = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)  # [T, H, kv_lora_rank]
        query = torch.cat([q_latent, q_rope], dim=-1)
        cache_row = torch.cat([latent, k_rope.view(num_tokens, -1)], dim=-1).view(num_tokens, 1, shape.cache_dim)
        latent_out = attn.forward(query, cache_row, None, self.layer_id, batch).view(num_tokens, self.num_heads, -1)
        out = torch.bmm(latent_out.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)  # [T, H, v_head]
        return self.o_proj(out.reshape(num_tokens, self.num_heads * shape.v_head_dim))
