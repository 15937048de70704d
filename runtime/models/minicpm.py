"""MiniCPM (openbmb/MiniCPM-2B-sft/-dpo, MiniCPM-1B, MiniCPM-2B-128k; MiniCPMForCausalLM, modeling code in the
checkpoint repositories): a Llama in Llama's names whose three scalars keep activations in range (muP):
- `scale_emb`: token embeddings are multiplied by it;
- `scale_depth`: each attention and MLP output joins the residual times scale_depth / sqrt(num_hidden_layers);
- `dim_model_base`: the final hidden state is divided by hidden_size / dim_model_base before the (usually tied) head,
  here as logits x dim_model_base / hidden_size (the head is linear).
MiniCPM-MoE-8x2B (`num_experts`): the MLP is a top-`num_experts_per_tok` softmax MoE, weights renormalized, experts
mlp.experts.E.{w1 (gate), w3 (up), w2 (down)} and router mlp.gate, as Mixtral stores them."""

from __future__ import annotations

import math

import torch
from torch import nn

from runtime.layers.mlp import GatedMLP
from runtime.layers.moe import SparseMoeBlock
from runtime.model_loader.weight_map import expert_target
from runtime.models.config import ModelConfig
from runtime.models.llama import LlamaDecoderLayer, LlamaForCausalLM, llama_attention
from runtime.models.mixtral import EXPERT_PARTS, EXPERT_PATTERN
from runtime.worker.attention.base import AttentionBackend
from runtime.worker.forward_batch import ForwardBatch


class ScaledResidualLayer(LlamaDecoderLayer):
    """h += s * attn(norm(h)); h += s * mlp(norm(h))."""

    def __init__(self, config: ModelConfig, self_attn: nn.Module, mlp: nn.Module, dtype: torch.dtype,
                 residual_scale: float):
        super().__init__(config, self_attn, mlp, dtype)
        self.residual_scale = residual_scale

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None, batch: ForwardBatch,
                attn: AttentionBackend) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(hidden, batch, attn) * self.residual_scale
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden) * self.residual_scale, residual


def residual_scale(config: ModelConfig) -> float:
    return float(config.hf.get("scale_depth", 1.0)) / math.sqrt(config.num_layers)


class MiniCPMForCausalLM(LlamaForCausalLM):
    @staticmethod
    def standard_config(config: dict) -> dict:
        # MiniCPM's configuration code ties the head by default; released configs may leave it implicit
        return {**config, "tie_word_embeddings": config.get("tie_word_embeddings", True)}

    @property
    def embed_scale(self) -> float:
        return float(self.config.hf.get("scale_emb", 1.0))

    @property
    def logit_scale(self) -> float:
        config = self.config
        return float(config.hf.get("dim_model_base") or config.hidden_size) / config.hidden_size

    def build_layer(self, layer_id: int) -> nn.Module:
        config = self.config
        return ScaledResidualLayer(config, self.build_attention(layer_id), self.build_mlp(), self.dtype,
                                   residual_scale(config))

    def build_attention(self, layer_id: int) -> nn.Module:
        return llama_attention(self.config, layer_id, self.rotary, self.tp, self.dtype)

    def build_mlp(self) -> nn.Module:
        config, hf = self.config, self.config.hf
        if hf.get("num_experts"):
            return SparseMoeBlock(config.hidden_size, int(hf["num_experts"]), int(hf["num_experts_per_tok"]),
                                  config.intermediate_size, True, self.tp, self.dtype)
        return GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act, False, self.tp, self.dtype)

    def weight_targets(self, name: str, tensor: torch.Tensor):
        target = expert_target(name, tensor, EXPERT_PATTERN, EXPERT_PARTS)
        return [target] if target is not None else super().weight_targets(name, tensor)
