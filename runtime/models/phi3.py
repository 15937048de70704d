"""Phi-3 / Phi-3.5 / Phi-4-mini (Phi3ForCausalLM): a Llama with fused qkv_proj and gate_up_proj tensors, optional
partial rotary, longrope scaling for the 128k variants (runtime/layers/rotary.py) and the config's sliding window."""

from __future__ import annotations

import torch

from runtime.model_loader.weight_map import WeightTarget, split_rows
from runtime.models.llama import LlamaForCausalLM


class Phi3ForCausalLM(LlamaForCausalLM):
    def weight_targets(self, name: str, tensor: torch.Tensor) -> list[WeightTarget]:
        config = self.config
        if ".self_attn.qkv_proj." in name:
            q_size, kv_size = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
            return split_rows(name, tensor, [q_size, kv_size, kv_size], ["q", "k", "v"])
        if ".mlp.gate_up_proj." in name:
            size = config.intermediate_size
            return split_rows(name, tensor, [size, size], [0, 1])
        return super().weight_targets(name, tensor)
