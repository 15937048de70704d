"""Gemma (1): a Llama with Gemma's RMSNorm (scale by 1 + w, in float32), a GeGLU MLP (GELU, tanh approximation:
the released configs' "gelu" means it too), embeddings multiplied by sqrt(hidden_size) and tied to the LM head."""

from __future__ import annotations

import torch
from torch import nn

from runtime.layers.mlp import GatedMLP
from runtime.layers.norm import RMSNorm
from runtime.models.config import ModelConfig
from runtime.models.llama import LlamaDecoderLayer, LlamaForCausalLM, llama_attention


def gemma_norm(size: int, config: ModelConfig, dtype: torch.dtype) -> RMSNorm:
    """Scale by 1 + w (its weight is kept in float32, see runtime/layers/norm.py)."""
    return RMSNorm(size, config.norm_eps, dtype, weight_offset=1.0)


def gemma_activation(config: ModelConfig) -> str:
    act = config.hf.get("hidden_activation") or config.hidden_act
    return "gelu_pytorch_tanh" if act == "gelu" else act


class GemmaForCausalLM(LlamaForCausalLM):
    @property
    def embed_scale(self) -> float:
        return self.config.hidden_size ** 0.5

    def build_layer(self, layer_id: int) -> nn.Module:
        config = self.config
        mlp = GatedMLP(config.hidden_size, config.intermediate_size, gemma_activation(config), False, self.tp,
                       self.dtype)
        return LlamaDecoderLayer(config, llama_attention(config, layer_id, self.rotary, self.tp, self.dtype), mlp,
                                 self.dtype, make_norm=lambda: gemma_norm(config.hidden_size, config, self.dtype))

    def build_norm(self) -> nn.Module:
        return gemma_norm(self.config.hidden_size, self.config, self.dtype)
