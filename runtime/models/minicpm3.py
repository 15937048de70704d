"""MiniCPM3 (openbmb/MiniCPM3-4B; MiniCPM3ForCausalLM, modeling code in the checkpoint repository): MiniCPM's scaled
embeddings, residuals and logits (minicpm.py) around DeepSeek-V2-style multi-head latent attention, dense MLPs.

Attention, per token: q = q_b_proj(rmsnorm(q_a_proj(h))) (or q_proj(h) without `q_lora_rank`) split per head into
a non-rotated part (`qk_nope_head_dim`) and a rotated part (`qk_rope_head_dim`); kv_a_proj_with_mqa(h) gives the
latent (`kv_lora_rank`) and one rotated key part shared by all heads; kv_b_proj(rmsnorm(latent)) gives each head's
non-rotated key part and its value (`v_head_dim`). Rotary ("rotate half" pairs) on the rotated parts only; scores
scaled by (nope + rope dims)^-0.5.

Served on the common paged cache, in plain torch: each head's full key (nope | rope) and its value zero-padded to
the key width are stored, and the padding is cut from the output, so every attention backend serves it as is. This
caches the expanded keys and values, not the latent (DeepSeek's absorbed-weight decode stores only the latent):
simple and exact, with a larger cache per token."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from runtime.layers.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear
from runtime.layers.norm import RMSNorm
from runtime.layers.parallel import TensorParallel
from runtime.layers.rotary import RotaryEmbedding
from runtime.models.config import ModelConfig
from runtime.models.minicpm import MiniCPMForCausalLM, ScaledResidualLayer, residual_scale
from runtime.worker.attention.base import AttentionBackend
from runtime.worker.forward_batch import ForwardBatch


class LatentAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int, rotary: RotaryEmbedding, tp: TensorParallel,
                 dtype: torch.dtype):
        super().__init__()
        hf = config.hf
        self.layer_id = layer_id
        self.rotary = rotary
        self.nope_dim, self.rope_dim = int(hf["qk_nope_head_dim"]), int(hf["qk_rope_head_dim"])
        self.v_dim, self.kv_lora_rank = int(hf["v_head_dim"]), int(hf["kv_lora_rank"])
        self.head_dim = self.nope_dim + self.rope_dim
        if config.num_heads % tp.size:
            raise ValueError(f"num_attention_heads {config.num_heads} cannot be split over tp_size {tp.size}")
        self.num_heads = self.num_kv_heads = config.num_heads // tp.size
        heads, hidden = config.num_heads, config.hidden_size
        q_lora_rank = hf.get("q_lora_rank")
        if q_lora_rank:
            self.q_a_proj = ReplicatedLinear(hidden, int(q_lora_rank), False, dtype)
            self.q_a_layernorm = RMSNorm(int(q_lora_rank), config.norm_eps, dtype)
            self.q_b_proj = ColumnParallelLinear(int(q_lora_rank), heads * self.head_dim, False, tp, dtype)
        else:
            self.q_proj = ColumnParallelLinear(hidden, heads * self.head_dim, False, tp, dtype)
        self.kv_a_proj_with_mqa = ReplicatedLinear(hidden, self.kv_lora_rank + self.rope_dim, False, dtype)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, config.norm_eps, dtype)
        self.kv_b_proj = ColumnParallelLinear(self.kv_lora_rank, heads * (self.nope_dim + self.v_dim), False, tp,
                                              dtype)
        self.o_proj = RowParallelLinear(heads * self.v_dim, hidden, False, tp, dtype)

    def forward(self, hidden: torch.Tensor, batch: ForwardBatch, attn: AttentionBackend) -> torch.Tensor:
        tokens, heads = hidden.shape[0], self.num_heads
        if hasattr(self, "q_a_proj"):
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden)))
        else:
            q = self.q_proj(hidden)
        q = q.view(tokens, heads, self.head_dim)
        latent, k_rope = self.kv_a_proj_with_mqa(hidden).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(latent.contiguous())).view(tokens, heads, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        q_rope, k_rope = self.rotary(batch.positions, q[..., self.nope_dim:].contiguous(),
                                     k_rope.reshape(tokens, 1, self.rope_dim).contiguous())
        q = torch.cat([q[..., :self.nope_dim], q_rope], dim=-1)
        k = torch.cat([k_nope, k_rope.expand(tokens, heads, self.rope_dim)], dim=-1)
        v = F.pad(v, (0, self.head_dim - self.v_dim))
        out = attn.forward(q, k, v, self.layer_id, batch).view(tokens, heads, self.head_dim)[..., :self.v_dim]
        return self.o_proj(out.reshape(tokens, heads * self.v_dim))


class MiniCPM3ForCausalLM(MiniCPMForCausalLM):
    @staticmethod
    def standard_config(config: dict) -> dict:
        head_dim = int(config["qk_nope_head_dim"]) + int(config["qk_rope_head_dim"])
        return {**MiniCPMForCausalLM.standard_config(config), "head_dim": head_dim,
                "num_key_value_heads": config["num_attention_heads"]}

    @property
    def attention_scale(self) -> float:
        return self.config.head_dim ** -0.5

    def build_rotary(self) -> RotaryEmbedding:
        rope_dim = int(self.config.hf["qk_rope_head_dim"])
        return RotaryEmbedding(rope_dim, self.max_positions, self.config.rope, self.device)

    def build_layer(self, layer_id: int) -> nn.Module:
        config = self.config
        return ScaledResidualLayer(config, LatentAttention(config, layer_id, self.rotary, self.tp, self.dtype),
                                   self.build_mlp(), self.dtype, residual_scale(config))
