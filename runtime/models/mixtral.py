"""Mixtral: a Mistral whose MLP is a sparse mixture of experts (`block_sparse_moe`): a router picks the top
`num_experts_per_tok` of `num_local_experts` SwiGLU experts per token, weights renormalized to sum to one.
Checkpoint experts are block_sparse_moe.experts.E.{w1 (gate), w3 (up), w2 (down)}."""

from __future__ import annotations

import re

import torch
from torch import nn

from runtime.layers.moe import SparseMoeBlock
from runtime.model_loader.weight_map import expert_target
from runtime.models.llama import LlamaDecoderLayer, LlamaForCausalLM, llama_attention

EXPERT_PATTERN = re.compile(r"^(.*\.mlp\.experts\.)(\d+)\.(w1|w2|w3)\.weight$")
EXPERT_PARTS = {"w1": "gate", "w3": "up", "w2": "down"}


class MixtralForCausalLM(LlamaForCausalLM):
    def build_layer(self, layer_id: int) -> nn.Module:
        config, hf = self.config, self.config.hf
        moe = SparseMoeBlock(config.hidden_size, int(hf["num_local_experts"]), int(hf["num_experts_per_tok"]),
                             config.intermediate_size, True, self.tp, self.dtype)
        return LlamaDecoderLayer(config, llama_attention(config, layer_id, self.rotary, self.tp, self.dtype), moe,
                                 self.dtype)

    def weight_targets(self, name: str, tensor: torch.Tensor):
        name = name.replace(".block_sparse_moe.", ".mlp.")
        target = expert_target(name, tensor, EXPERT_PATTERN, EXPERT_PARTS)
        if target is not None:
            return [target]
        return super().weight_targets(name, tensor)
