"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): Qwen2 attention (q/k/v biases) with a sparse MoE MLP on the layers that
`decoder_sparse_step` and `mlp_only_layers` select (the others keep a dense MLP). The MoE adds a shared expert,
itself a SwiGLU MLP, scaled per token by sigmoid(shared_expert_gate(x)). Routing keeps the softmax values
unless `norm_topk_prob`. Checkpoint experts are mlp.experts.E.{gate,up,down}_proj."""

from __future__ import annotations

import re

import torch
from torch import nn

from runtime.layers.linear import ReplicatedLinear
from runtime.layers.mlp import GatedMLP
from runtime.layers.moe import SparseMoeBlock
from runtime.model_loader.weight_map import expert_target
from runtime.models.config import ModelConfig
from runtime.models.llama import LlamaDecoderLayer, Qwen2ForCausalLM, llama_attention

EXPERT_PATTERN = re.compile(r"^(.*\.mlp\.experts\.)(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
EXPERT_PARTS = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}


def num_experts(config: ModelConfig) -> int:
    """transformers 5 saves Qwen MoE configs with `num_local_experts`, the released ones say `num_experts`."""
    return int(config.hf.get("num_experts") or config.hf["num_local_experts"])


def is_sparse_layer(config: ModelConfig, layer_id: int) -> bool:
    hf = config.hf
    step = int(hf.get("decoder_sparse_step", 1) or 1)
    return layer_id not in (hf.get("mlp_only_layers") or []) and num_experts(config) > 0 and (layer_id + 1) % step == 0


def qwen_moe_shape(config: ModelConfig) -> dict:
    hf = config.hf
    return dict(hidden_size=config.hidden_size, num_experts=num_experts(config),
                top_k=int(hf["num_experts_per_tok"]), intermediate_size=int(hf["moe_intermediate_size"]),
                renormalize=bool(hf.get("norm_topk_prob", False)))


def qwen_moe_weight_targets(name: str, tensor: torch.Tensor):
    target = expert_target(name, tensor, EXPERT_PATTERN, EXPERT_PARTS)
    return None if target is None else [target]


class Qwen2MoeSparseBlock(SparseMoeBlock):
    """The routed experts plus the gated shared expert."""

    def __init__(self, config: ModelConfig, tp, dtype: torch.dtype):
        super().__init__(**qwen_moe_shape(config), tp=tp, dtype=dtype)
        self.shared_expert = GatedMLP(config.hidden_size, int(config.hf["shared_expert_intermediate_size"]),
                                      config.hidden_act, False, tp, dtype)
        self.shared_expert_gate = ReplicatedLinear(config.hidden_size, 1, False, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shared = self.shared_expert(x) * torch.sigmoid(self.shared_expert_gate(x))
        return super().forward(x) + shared


class Qwen2MoeForCausalLM(Qwen2ForCausalLM):
    def build_layer(self, layer_id: int) -> nn.Module:
        config = self.config
        if is_sparse_layer(config, layer_id):
            mlp = Qwen2MoeSparseBlock(config, self.tp, self.dtype)
        else:
            mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act, False, self.tp, self.dtype)
        return LlamaDecoderLayer(config, llama_attention(config, layer_id, self.rotary, self.tp, self.dtype), mlp,
                                 self.dtype)

    def weight_targets(self, name: str, tensor: torch.Tensor):
        return qwen_moe_weight_targets(name, tensor) or super().weight_targets(name, tensor)
