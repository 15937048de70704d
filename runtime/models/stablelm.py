"""StableLM (Stability AI: StableLM 2, Zephyr, Code): LayerNorm with bias, optional q/k/v biases (`use_qkv_bias`),
rotary on the leading `partial_rotary_factor` of each head, optional per-head LayerNorms of q and k (`qk_layernorm`,
checkpoint tensors q_layernorm.norms.H) and optionally parallel residual layers (`use_parallel_residual`:
h += attn(norm(h)) + mlp(norm(h)), one norm)."""

from __future__ import annotations

import re

import torch
from torch import nn

from runtime.layers.attention import SelfAttention
from runtime.layers.mlp import GatedMLP
from runtime.layers.norm import LayerNorm
from runtime.model_loader.weight_map import WeightTarget
from runtime.models.config import ModelConfig
from runtime.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from runtime.worker.attention.base import AttentionBackend
from runtime.worker.forward_batch import ForwardBatch

HEAD_NORM = re.compile(r"^(.*\.self_attn\.)(q|k)_layernorm\.norms\.(\d+)\.(weight|bias)$")


class ParallelDecoderLayer(nn.Module):
    """h += attn(norm(h)) + mlp(norm(h)) (Cohere, StableLM with use_parallel_residual, GPT-J)."""

    def __init__(self, input_layernorm: nn.Module, self_attn: SelfAttention, mlp: nn.Module):
        super().__init__()
        self.input_layernorm = input_layernorm
        self.self_attn = self_attn
        self.mlp = mlp

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None, batch: ForwardBatch,
                attn: AttentionBackend) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        return self.self_attn(hidden, batch, attn) + self.mlp(hidden), residual


def add_head_layer_norms(attention: SelfAttention, config: ModelConfig, dtype: torch.dtype) -> None:
    """Per-head LayerNorms (no bias) of q and k, each head with its own weights (StableLM 2 12B, Command-R+)."""
    starts = attention.qkv_proj.head_start
    attention.q_norm = LayerNorm(config.head_dim, config.norm_eps, False, dtype,
                                 heads=(starts["q"], attention.num_heads))
    attention.k_norm = LayerNorm(config.head_dim, config.norm_eps, False, dtype,
                                 heads=(starts["k"], attention.num_kv_heads))


class StableLmForCausalLM(LlamaForCausalLM):
    @staticmethod
    def standard_config(config: dict) -> dict:
        return {**config, "qkv_bias": bool(config.get("use_qkv_bias", False)), "attention_bias": False}

    def build_layer(self, layer_id: int) -> nn.Module:
        config = self.config
        attention = SelfAttention(config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim,
                                  layer_id, self.rotary, self.tp, self.dtype, qkv_bias=config.qkv_bias)
        if config.hf.get("qk_layernorm"):
            add_head_layer_norms(attention, config, self.dtype)
        mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act, False, self.tp, self.dtype)
        if config.hf.get("use_parallel_residual"):
            return ParallelDecoderLayer(self.build_norm(), attention, mlp)
        return LlamaDecoderLayer(config, attention, mlp, self.dtype, make_norm=self.build_norm)

    def build_norm(self) -> nn.Module:
        return LayerNorm(self.config.hidden_size, self.config.norm_eps, True, self.dtype)

    def weight_targets(self, name: str, tensor: torch.Tensor) -> list[WeightTarget]:
        match = HEAD_NORM.match(name)
        if match is not None:
            prefix, which, head, kind = match.groups()
            return [WeightTarget(f"{prefix}{which}_norm.{kind}", tensor, int(head))]
        return super().weight_targets(name, tensor)
