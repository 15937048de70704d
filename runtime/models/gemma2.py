"""Gemma 2: Gemma (1 + w norms, GeGLU, scaled embeddings, tied head) with sandwich layers (each block's output is
normalized before it joins the residual: input, post-attention, pre- and post-feedforward norms), attention scaled by
query_pre_attn_scalar^-0.5 instead of head_dim^-0.5, attention scores soft-capped at `attn_logit_softcapping` and
final logits at `final_logit_softcapping` (c * tanh(x / c)), and a sliding window on every other layer (layers
0, 2, ...; or as `layer_types` says)."""

from __future__ import annotations

import torch
from torch import nn

from runtime.layers.attention import SelfAttention
from runtime.layers.mlp import GatedMLP
from runtime.models.config import ModelConfig
from runtime.models.gemma import GemmaForCausalLM, gemma_activation, gemma_norm
from runtime.models.llama import llama_attention
from runtime.worker.attention.base import AttentionBackend
from runtime.worker.forward_batch import ForwardBatch


class SandwichDecoderLayer(nn.Module):
    """h += post_attention_norm(attn(input_norm(h))); h += post_feedforward_norm(mlp(pre_feedforward_norm(h)))."""

    def __init__(self, self_attn: SelfAttention, mlp: nn.Module, make_norm):
        super().__init__()
        self.input_layernorm = make_norm()
        self.self_attn = self_attn
        self.post_attention_layernorm = make_norm()
        self.pre_feedforward_layernorm = make_norm()
        self.mlp = mlp
        self.post_feedforward_layernorm = make_norm()

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None, batch: ForwardBatch,
                attn: AttentionBackend) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.post_attention_layernorm(self.self_attn(hidden, batch, attn))
        hidden, residual = self.pre_feedforward_layernorm(hidden, residual)
        return self.post_feedforward_layernorm(self.mlp(hidden)), residual


def alternating_layer_types(config: dict, pattern: int) -> dict:
    """transformers' default when config.json has no `layer_types`: layer i slides unless (i + 1) % pattern == 0."""
    if config.get("layer_types"):
        return config
    layers = int(config["num_hidden_layers"])
    return {**config, "layer_types": ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                                      for i in range(layers)]}


class Gemma2ForCausalLM(GemmaForCausalLM):
    @staticmethod
    def standard_config(config: dict) -> dict:
        return alternating_layer_types(config, 2)

    @property
    def attention_scale(self) -> float:
        return float(self.config.hf.get("query_pre_attn_scalar") or self.config.head_dim) ** -0.5

    @property
    def attn_logit_cap(self) -> float | None:
        return self.config.hf.get("attn_logit_softcapping")

    @property
    def final_logit_cap(self) -> float | None:
        return self.config.hf.get("final_logit_softcapping")

    def build_layer(self, layer_id: int) -> nn.Module:
        config = self.config
        return SandwichDecoderLayer(self.build_attention(layer_id), gemma_mlp(config, self.tp, self.dtype),
                                    lambda: gemma_norm(config.hidden_size, config, self.dtype))

    def build_attention(self, layer_id: int) -> SelfAttention:
        return llama_attention(self.config, layer_id, self.rotary, self.tp, self.dtype)


def gemma_mlp(config: ModelConfig, tp, dtype: torch.dtype) -> GatedMLP:
    return GatedMLP(config.hidden_size, config.intermediate_size, gemma_activation(config), False, tp, dtype)
