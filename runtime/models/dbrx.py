"""DBRX (Databricks): pre-norm layers with LayerNorm without bias, a fused Wqkv projection whose output is clamped
to +-clip_qkv, and a 16-expert top-4 MoE (weights renormalized by their `moe_normalize_expert_weights`-norm; 1, the
released value, is the sum).

The config nests its facts (d_model, n_heads, n_layers, attn_config.kv_n_heads, ffn_config...), renamed by
`standard_config`. Tensors: transformer.wte, transformer.blocks.N.norm_attn_norm.{norm_1, attn.Wqkv, attn.out_proj,
norm_2}, transformer.blocks.N.ffn.router.layer, transformer.blocks.N.ffn.experts.mlp.{w1, v1, w2} (all experts
stacked: [E * ffn_hidden, d_model], w2 stored transposed), transformer.norm_f, lm_head."""

from __future__ import annotations

import re

import torch
from torch import nn

from runtime.layers.moe import SparseMoeBlock
from runtime.layers.norm import LayerNorm
from runtime.model_loader.weight_map import WeightTarget, split_rows
from runtime.models.config import ModelConfigError
from runtime.models.llama import LlamaDecoderLayer, LlamaForCausalLM, llama_attention

RENAMES = (("transformer.wte.", "model.embed_tokens."), ("transformer.norm_f.", "model.norm."),
           ("transformer.blocks.", "model.layers."), (".norm_attn_norm.norm_1.", ".input_layernorm."),
           (".norm_attn_norm.norm_2.", ".post_attention_layernorm."),
           (".norm_attn_norm.attn.out_proj.", ".self_attn.o_proj."),
           (".norm_attn_norm.attn.Wqkv.", ".self_attn.qkv_proj."), (".ffn.router.layer.", ".mlp.gate."))
EXPERTS = re.compile(r"^(model\.layers\.\d+\.)ffn\.experts\.mlp\.(w1|v1|w2)$")


class DbrxForCausalLM(LlamaForCausalLM):
    @staticmethod
    def standard_config(config: dict) -> dict:
        attn, ffn = config.get("attn_config") or {}, config.get("ffn_config") or {}
        normalize = ffn.get("moe_normalize_expert_weights", 1.0)
        if normalize not in (None, 1, 1.0):
            raise ModelConfigError(f"DBRX moe_normalize_expert_weights {normalize} is not supported (1 or null)")
        activation = (ffn.get("ffn_act_fn") or {}).get("name", "silu")
        if activation != "silu":
            raise ModelConfigError(f"DBRX ffn_act_fn {activation!r} is not supported (only silu)")
        rope = config.get("rope_parameters") or {"rope_type": "default", "rope_theta": attn.get("rope_theta", 10000.0)}
        return {**config, "hidden_size": config["d_model"], "num_attention_heads": config["n_heads"],
                "num_hidden_layers": config["n_layers"], "max_position_embeddings": config.get("max_seq_len", 2048),
                "num_key_value_heads": attn.get("kv_n_heads", 1), "intermediate_size": ffn["ffn_hidden_size"],
                "rope_parameters": rope, "layer_norm_eps": 1e-5, "hidden_act": "silu",
                "num_experts": ffn.get("moe_num_experts", 4), "num_experts_per_tok": ffn.get("moe_top_k", 1),
                "norm_topk_prob": normalize is not None, "clip_qkv": attn.get("clip_qkv")}

    def build_layer(self, layer_id: int) -> nn.Module:
        config, hf = self.config, self.config.hf
        attention = llama_attention(config, layer_id, self.rotary, self.tp, self.dtype, clip_qkv=hf["clip_qkv"])
        moe = SparseMoeBlock(config.hidden_size, int(hf["num_experts"]), int(hf["num_experts_per_tok"]),
                             config.intermediate_size, hf["norm_topk_prob"], self.tp, self.dtype)
        return LlamaDecoderLayer(config, attention, moe, self.dtype,
                                 make_norm=lambda: LayerNorm(config.hidden_size, config.norm_eps, False, self.dtype))

    def build_norm(self) -> nn.Module:
        return LayerNorm(self.config.hidden_size, self.config.norm_eps, False, self.dtype)

    def weight_targets(self, name: str, tensor: torch.Tensor) -> list[WeightTarget]:
        config = self.config
        for old, new in RENAMES:
            name = name.replace(old, new)
        if ".self_attn.qkv_proj." in name:
            q_size, kv_size = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
            return split_rows(name, tensor, [q_size, kv_size, kv_size], ["q", "k", "v"])
        match = EXPERTS.match(name)
        if match is None:
            return super().weight_targets(name, tensor)
        prefix, projection = match.groups()
        per_expert = tensor.view(-1, config.intermediate_size, config.hidden_size)
        if projection == "w2":
            return [WeightTarget(f"{prefix}mlp.experts.w2_weight", w.t(), (e, "down"))
                    for e, w in enumerate(per_expert)]
        part = "gate" if projection == "w1" else "up"
        return [WeightTarget(f"{prefix}mlp.experts.w13_weight", w, (e, part)) for e, w in enumerate(per_expert)]
