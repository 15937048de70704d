"""GLM-4-0414 (Glm4ForCausalLM): GLM's attention (q/k/v biases, interleaved partial rotary) and fused gate_up MLP
in sandwich layers: the attention and MLP outputs are normalized (post_self_attn_layernorm, post_mlp_layernorm)
before they join the residual, and post_attention_layernorm is the MLP's input norm."""

from __future__ import annotations

import torch
from torch import nn

from runtime.layers.norm import RMSNorm
from runtime.model_loader.weight_map import WeightTarget
from runtime.models.gemma2 import SandwichDecoderLayer
from runtime.models.glm import GlmForCausalLM
from runtime.models.llama import llama_attention

# GLM-4's norm names -> the sandwich layer's (Gemma 2's); the order matters (post_attention is renamed first)
RENAMES = ((".post_attention_layernorm.", ".pre_feedforward_layernorm."),
           (".post_self_attn_layernorm.", ".post_attention_layernorm."),
           (".post_mlp_layernorm.", ".post_feedforward_layernorm."))


class Glm4ForCausalLM(GlmForCausalLM):
    def build_layer(self, layer_id: int) -> nn.Module:
        config = self.config
        return SandwichDecoderLayer(llama_attention(config, layer_id, self.rotary, self.tp, self.dtype),
                                    self.build_mlp(), lambda: RMSNorm(config.hidden_size, config.norm_eps, self.dtype))

    def weight_targets(self, name: str, tensor: torch.Tensor) -> list[WeightTarget]:
        for old, new in RENAMES:
            name = name.replace(old, new)
        return super().weight_targets(name, tensor)
