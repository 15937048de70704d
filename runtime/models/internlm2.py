"""InternLM2 / InternLM2.5 (internlm/internlm2-*, internlm2_5-*; modeling code in the checkpoint repositories): a
Llama whose tensors have their own names and whose q/k/v projection is one `wqkv` tensor grouped by kv head:
for each of the `num_key_value_heads` groups, its `num_attention_heads / num_key_value_heads` q heads, then its k
head, then its v head ([Hkv, G + 2, head_dim, hidden]). `bias` puts biases on wqkv and wo.

Names: model.tok_embeddings, model.layers.N.{attention_norm, attention.wqkv, attention.wo, ffn_norm,
feed_forward.w1 (gate), feed_forward.w3 (up), feed_forward.w2 (down)}, model.norm, output."""

from __future__ import annotations

import torch

from runtime.model_loader.weight_map import WeightTarget
from runtime.models.llama import LlamaForCausalLM

RENAMES = (("model.tok_embeddings.", "model.embed_tokens."), (".attention_norm.", ".input_layernorm."),
           (".ffn_norm.", ".post_attention_layernorm."), (".attention.wo.", ".self_attn.o_proj."),
           (".feed_forward.w1.", ".mlp.gate_proj."), (".feed_forward.w3.", ".mlp.up_proj."),
           (".feed_forward.w2.", ".mlp.down_proj."))


def split_grouped_qkv(name: str, tensor: torch.Tensor, num_heads: int, num_kv_heads: int,
                      head_dim: int) -> list[WeightTarget]:
    """A wqkv weight [Hkv * (G + 2) * D, hidden] or bias, grouped per kv head, -> q, k, v targets (heads in order)."""
    group = num_heads // num_kv_heads
    grouped = tensor.reshape(num_kv_heads, group + 2, head_dim, *tensor.shape[1:])
    q = grouped[:, :group].reshape(num_heads * head_dim, *tensor.shape[1:])
    k = grouped[:, group].reshape(num_kv_heads * head_dim, *tensor.shape[1:])
    v = grouped[:, group + 1].reshape(num_kv_heads * head_dim, *tensor.shape[1:])
    target = name.replace(".attention.wqkv.", ".self_attn.qkv_proj.")
    return [WeightTarget(target, q, "q"), WeightTarget(target, k, "k"), WeightTarget(target, v, "v")]


class InternLM2ForCausalLM(LlamaForCausalLM):
    @staticmethod
    def standard_config(config: dict) -> dict:
        bias = bool(config.get("bias", False))
        return {**config, "qkv_bias": bias, "attention_bias": bias, "mlp_bias": False}

    def weight_targets(self, name: str, tensor: torch.Tensor) -> list[WeightTarget]:
        if name == "output.weight":
            name = "lm_head.weight"
        if ".attention.wqkv." in name:
            config = self.config
            return split_grouped_qkv(name, tensor, config.num_heads, config.num_kv_heads, config.head_dim)
        for old, new in RENAMES:
            name = name.replace(old, new)
        return super().weight_targets(name, tensor)
