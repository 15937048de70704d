"""XVERSE (xverse/XVERSE-7B, -13B, -65B and their chat models; modeling code lives in the checkpoint repositories):
a Llama in Llama's tensor names (model.layers.N.self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj), MHA or GQA, no
biases, untied head.

XVERSE-MoE (xverse/XVERSE-MoE-A4.2B, XverseMoeForCausalLM): the same attention; each MLP is `num_experts` SwiGLU
experts (mlp.experts.E.{gate,up,down}_proj, `intermediate_size` each) picked top-`moe_top_k` by a softmax router
(mlp.router), weights renormalized only with `norm_topk_prob`, plus `num_shared_experts` shared experts that every
token passes through, stored as one MLP of num_shared_experts x intermediate_size (mlp.shared_experts.*) and added
unscaled."""

from __future__ import annotations

import re

import torch
from torch import nn

from runtime.layers.mlp import GatedMLP
from runtime.layers.moe import SparseMoeBlock
from runtime.model_loader.weight_map import expert_target
from runtime.models.config import ModelConfig
from runtime.models.llama import LlamaDecoderLayer, LlamaForCausalLM, llama_attention

EXPERT_PATTERN = re.compile(r"^(.*\.mlp\.experts\.)(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
EXPERT_PARTS = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}


class XverseForCausalLM(LlamaForCausalLM):
    @staticmethod
    def standard_config(config: dict) -> dict:
        return {**config, "attention_bias": False, "mlp_bias": False}


class XverseMoeBlock(SparseMoeBlock):
    def __init__(self, config: ModelConfig, tp, dtype: torch.dtype):
        hf = config.hf
        super().__init__(config.hidden_size, int(hf["num_experts"]), int(hf["moe_top_k"]), config.intermediate_size,
                         bool(hf.get("norm_topk_prob", False)), tp, dtype)
        shared = int(hf.get("num_shared_experts") or 0)
        self.shared_experts = GatedMLP(config.hidden_size, config.intermediate_size * shared, config.hidden_act,
                                       False, tp, dtype) if shared else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return out if self.shared_experts is None else out + self.shared_experts(x)


class XverseMoeForCausalLM(XverseForCausalLM):
    def build_layer(self, layer_id: int) -> nn.Module:
        config = self.config
        return LlamaDecoderLayer(config, llama_attention(config, layer_id, self.rotary, self.tp, self.dtype),
                                 XverseMoeBlock(config, self.tp, self.dtype), self.dtype)

    def weight_targets(self, name: str, tensor: torch.Tensor):
        name = name.replace(".mlp.router.", ".mlp.gate.")
        target = expert_target(name, tensor, EXPERT_PATTERN, EXPERT_PARTS)
        return [target] if target is not None else super().weight_targets(name, tensor)
