"""Qwen3-MoE: Qwen3 attention (per-head q/k RMSNorm) with Qwen's sparse MoE MLP, without a shared expert; routing
weights renormalized when `norm_topk_prob` (as released)."""

from __future__ import annotations

import torch
from torch import nn

from runtime.layers.mlp import GatedMLP
from runtime.layers.moe import SparseMoeBlock
from runtime.layers.norm import RMSNorm
from runtime.models.llama import LlamaDecoderLayer, LlamaForCausalLM, llama_attention
from runtime.models.qwen2_moe import is_sparse_layer, qwen_moe_shape, qwen_moe_weight_targets


class Qwen3MoeForCausalLM(LlamaForCausalLM):
    def build_layer(self, layer_id: int) -> nn.Module:
        config = self.config
        attention = llama_attention(config, layer_id, self.rotary, self.tp, self.dtype,
                                    qk_norm=lambda heads: RMSNorm(config.head_dim, config.norm_eps, self.dtype))
        if is_sparse_layer(config, layer_id):
            mlp = SparseMoeBlock(**qwen_moe_shape(config), tp=self.tp, dtype=self.dtype)
        else:
            mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act, False, self.tp, self.dtype)
        return LlamaDecoderLayer(config, attention, mlp, self.dtype)

    def weight_targets(self, name: str, tensor: torch.Tensor):
        return qwen_moe_weight_targets(name, tensor) or super().weight_targets(name, tensor)
