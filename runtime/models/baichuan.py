"""Baichuan and Baichuan 2 (baichuan-inc/Baichuan2-7B/13B-Base/-Chat, Baichuan-13B; BaichuanForCausalLM, and
Baichuan-7B's BaiChuanForCausalLM; modeling code in the checkpoint repositories): Llama layers in Llama's names
except one `W_pack` q/k/v tensor (no biases).

- Position: the 7B models (hidden 4096) use rope; the 13B models use ALiBi instead: no rotation, each head h adds
  slope_h * (key position - query position) to its scores (the geometric slopes of the ALiBi paper; for a head count
  that is no power of two, those of the next lower power then every other one of the next higher). The attention
  backend adds the bias (`AttentionSpec.alibi_slopes`).
- Baichuan 2's `NormHead`: the LM head rows are L2-normalized (once, at load time here; at the first inference call
  in the reference). Baichuan 2 is told from Baichuan 1 by its vocabulary (125696 tokens) or its `z_loss_weight` key.
- Context: `model_max_length` (the 13B configs have no max_position_embeddings)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from runtime.layers.rotary import RotaryEmbedding
from runtime.model_loader.weight_map import WeightTarget, split_rows
from runtime.models.llama import LlamaForCausalLM

BAICHUAN2_VOCAB = 125696


def alibi_slopes(num_heads: int) -> list[float]:
    def powers(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(num_heads).is_integer():
        return powers(num_heads)
    lower = 2 ** math.floor(math.log2(num_heads))
    return powers(lower) + powers(2 * lower)[0::2][:num_heads - lower]


class BaichuanForCausalLM(LlamaForCausalLM):
    ROPE_HIDDEN_SIZE = 4096  # the 7B models; the 13B ones (5120) use ALiBi. The configs say nothing else about it.

    @staticmethod
    def standard_config(config: dict) -> dict:
        context = config.get("max_position_embeddings") or config.get("model_max_length") or 4096
        return {**config, "max_position_embeddings": int(context), "attention_bias": False, "mlp_bias": False}

    @property
    def uses_alibi(self) -> bool:
        return self.config.hidden_size != self.ROPE_HIDDEN_SIZE

    @property
    def norm_head(self) -> bool:
        return self.config.vocab_size == BAICHUAN2_VOCAB or "z_loss_weight" in self.config.hf

    def build_rotary(self) -> RotaryEmbedding | None:
        return None if self.uses_alibi else super().build_rotary()

    @property
    def alibi_slopes(self) -> tuple[float, ...] | None:
        if not self.uses_alibi:
            return None
        attention = self.model.layers[0].self_attn
        first = attention.qkv_proj.head_start["q"]
        return tuple(alibi_slopes(self.config.num_heads)[first:first + attention.num_heads])

    def weight_targets(self, name: str, tensor: torch.Tensor) -> list[WeightTarget]:
        if ".self_attn.W_pack." in name:
            size = self.config.num_heads * self.config.head_dim
            return split_rows(name.replace(".W_pack.", ".qkv_proj."), tensor, [size] * 3, ["q", "k", "v"])
        if name == "lm_head.weight" and self.norm_head:
            tensor = F.normalize(tensor.float(), dim=-1).to(tensor.dtype)
        return super().weight_targets(name, tensor)
