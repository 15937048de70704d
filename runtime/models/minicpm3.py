"""MiniCPM3 (openbmb/MiniCPM3-4B; MiniCPM3ForCausalLM, modeling code in the checkpoint repository): MiniCPM's scaled
embeddings, residuals and logits (minicpm.py) around DeepSeek-V2's multi-head latent attention, dense MLPs.

The attention is runtime/layers/mla.py, DeepSeek's: q from q_b_proj(rmsnorm(q_a_proj(h))) (or q_proj(h) without
`q_lora_rank`), the latent and the shared rope key from kv_a_proj_with_mqa, kv_b_proj's per-head blocks absorbed, and
a latent KV cache of kv_lora_rank + qk_rope_head_dim values per token and layer (288 for MiniCPM3-4B, against 7,680
for its 40 heads' up-projected keys and values). What differs from DeepSeek: the rope pairs are already in "rotate
half" layout (MiniCPM3's code rotates halves; no rows are reordered at load), its `rope_scaling` is longrope or none
(runtime/layers/rotary.py), and the softmax scale is always (qk_nope + qk_rope)^-0.5 (no yarn mscale)."""

from __future__ import annotations

import torch
from torch import nn

from runtime.layers.mla import MlaAttention
from runtime.model_loader.weight_map import WeightTarget
from runtime.models.deepseek_v2 import mla_shape
from runtime.models.minicpm import MiniCPMForCausalLM, ScaledResidualLayer, residual_scale
from runtime.worker.attention.base import AttentionSpec


class MiniCPM3ForCausalLM(MiniCPMForCausalLM):
    @staticmethod
    def standard_config(config: dict) -> dict:
        # the shared rotary table turns the qk_rope_head_dim dimensions, as DeepSeek's
        return {**MiniCPMForCausalLM.standard_config(config), "head_dim": int(config["qk_rope_head_dim"]),
                "num_key_value_heads": config["num_attention_heads"]}

    @property
    def attention_scale(self) -> float:
        return mla_shape(self.config).qk_head_dim ** -0.5

    def attention_spec(self) -> AttentionSpec:
        shape = mla_shape(self.config)
        return AttentionSpec(num_layers=self.config.num_layers, num_q_heads=self.model.layers[0].self_attn.num_heads,
                             num_kv_heads=1, head_dim=shape.cache_dim, scale=self.attention_scale,
                             latent_value_dim=shape.kv_lora_rank)

    def build_layer(self, layer_id: int) -> nn.Module:
        config = self.config
        attention = MlaAttention(mla_shape(config), layer_id, self.rotary, self.tp, self.dtype)
        return ScaledResidualLayer(config, attention, self.build_mlp(), self.dtype, residual_scale(config))

    def weight_targets(self, name: str, tensor: torch.Tensor) -> list[WeightTarget]:
        if ".self_attn." in name:
            return [WeightTarget(name, tensor)]  # q_proj is MLA's own, not a part of a packed qkv_proj
        return super().weight_targets(name, tensor)
