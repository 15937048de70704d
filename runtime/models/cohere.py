"""Cohere Command-R / R+ (CohereForCausalLM): parallel layers (h += attn(norm(h)) + mlp(norm(h)), one LayerNorm
without bias), optional per-head LayerNorms of q and k (`use_qk_norm`, weights [heads, head_dim]), rotary over
interleaved pairs (GPT-J style), tied embeddings, and logits multiplied by `logit_scale`.

The interleaved rotation is served by the common "rotate half" rotary: q_proj and k_proj rows (and the q/k norm
weights) are permuted per head at load time (runtime/model_loader/weight_map.py)."""

from __future__ import annotations

import torch
from torch import nn

from runtime.layers.mlp import GatedMLP
from runtime.layers.norm import LayerNorm
from runtime.model_loader.weight_map import WeightTarget, interleaved_qk_to_halves
from runtime.models.llama import LlamaForCausalLM, llama_attention
from runtime.models.stablelm import ParallelDecoderLayer, add_head_layer_norms


class CohereForCausalLM(LlamaForCausalLM):
    @property
    def logit_scale(self) -> float | None:
        return self.config.hf.get("logit_scale")

    def build_layer(self, layer_id: int) -> nn.Module:
        config = self.config
        attention = llama_attention(config, layer_id, self.rotary, self.tp, self.dtype)
        if config.hf.get("use_qk_norm"):
            add_head_layer_norms(attention, config, self.dtype)
        mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act, False, self.tp, self.dtype)
        return ParallelDecoderLayer(self.build_norm(), attention, mlp)

    def build_norm(self) -> nn.Module:
        return LayerNorm(self.config.hidden_size, self.config.norm_eps, False, self.dtype)

    def weight_targets(self, name: str, tensor: torch.Tensor) -> list[WeightTarget]:
        config = self.config
        tensor = interleaved_qk_to_halves(name, tensor, config.num_heads, config.num_kv_heads, config.head_dim,
                                          config.rotary_dim)
        return super().weight_targets(name, tensor)
