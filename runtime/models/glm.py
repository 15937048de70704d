"""GLM-4 (GlmForCausalLM: THUDM/glm-4-9b-hf and -chat-hf): a Llama with q/k/v biases (no o_proj bias), rotary over
interleaved pairs of the first half of each head (`partial_rotary_factor` 0.5), and a fused gate_up_proj tensor.
The interleaved rotation is served by the common "rotate half" rotary: q/k rows are permuted per head at load time
(runtime/model_loader/weight_map.py). ChatGLM (the remote-code THUDM/chatglm* checkpoints) is another architecture."""

from __future__ import annotations

import torch
from torch import nn

from runtime.layers.mlp import GatedMLP
from runtime.model_loader.weight_map import WeightTarget, interleaved_qk_to_halves, split_rows
from runtime.models.llama import LlamaDecoderLayer, LlamaForCausalLM, llama_attention


class GlmForCausalLM(LlamaForCausalLM):
    @staticmethod
    def standard_config(config: dict) -> dict:
        return {**config, "qkv_bias": bool(config.get("attention_bias", True)), "attention_bias": False}

    def build_layer(self, layer_id: int) -> nn.Module:
        config = self.config
        return LlamaDecoderLayer(config, llama_attention(config, layer_id, self.rotary, self.tp, self.dtype),
                                 self.build_mlp(), self.dtype)

    def build_mlp(self) -> GatedMLP:
        config = self.config
        return GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act, False, self.tp, self.dtype)

    def weight_targets(self, name: str, tensor: torch.Tensor) -> list[WeightTarget]:
        if ".mlp.gate_up_proj." in name:
            size = self.config.intermediate_size
            return split_rows(name, tensor, [size, size], [0, 1])
        config = self.config
        tensor = interleaved_qk_to_halves(name, tensor, config.num_heads, config.num_kv_heads, config.head_dim,
                                          config.rotary_dim)
        return super().weight_targets(name, tensor)
