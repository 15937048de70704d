"""Qwen3 (dense): a Llama with an RMSNorm over each head of q and k before the rotation, and no q/k/v biases
(unless `attention_bias`)."""

from __future__ import annotations

from torch import nn

from runtime.layers.mlp import GatedMLP
from runtime.layers.norm import RMSNorm
from runtime.models.llama import LlamaDecoderLayer, LlamaForCausalLM, llama_attention


class Qwen3ForCausalLM(LlamaForCausalLM):
    def build_layer(self, layer_id: int) -> nn.Module:
        config = self.config
        attention = llama_attention(config, layer_id, self.rotary, self.tp, self.dtype,
                                    qk_norm=lambda heads: RMSNorm(config.head_dim, config.norm_eps, self.dtype))
        mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act, config.mlp_bias, self.tp,
                       self.dtype)
        return LlamaDecoderLayer(config, attention, mlp, self.dtype)
