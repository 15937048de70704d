"""Grok-1 (xai-org/grok-1, 314B; released as JAX code, served from HF-format checkpoints whose code lives in their
repositories): a 64-layer top-2-of-8 MoE with sandwich norms and three scalars.

- Layers: h += post_attn_norm(attn(pre_attn_norm(h))); h += post_moe_norm(moe(pre_moe_norm(h))), all RMSNorm.
- Attention: GQA, rope, scores scaled by `attn_output_multiplier` (head_dim^-0.5) and soft-capped: 30 tanh(s / 30)
  (`attn_logit_softcapping`, `max_attn_value`).
- MoE: softmax of the router logits (xAI's code; soft-capped first when the config names `router_logit_softcapping`),
  top `num_experts_per_tok`, weights not renormalized; GeGLU experts (gelu, tanh approximation): w2(gelu(w1 x) * w3 x).
- Scalars: embeddings x `embedding_multiplier_scale`, logits x `output_multiplier_scale`.
Grok-2's additions (a dense MLP beside the MoE, `residual_moe`) are refused.

Names (SGLang's Grok1ForCausalLM layout): model.embed_tokens, model.layers.N.{pre_attn_norm, self_attn.{q,k,v,o}_proj,
post_attn_norm, pre_moe_norm, block_sparse_moe.gate, block_sparse_moe.experts.E.{w1, w3, w2}, post_moe_norm},
model.norm, lm_head. The hpcai-tech port (Grok1ModelForCausalLM) names attention `attn`, the MoE `moe_block` and
the experts {linear (w1), linear_v (w3), linear_1 (w2)}, and counts experts in `num_experts`."""

from __future__ import annotations

import re

import torch
from torch import nn

from runtime.layers.moe import SparseMoeBlock
from runtime.layers.norm import RMSNorm
from runtime.model_loader.weight_map import expert_target
from runtime.models.config import ModelConfigError
from runtime.models.gemma2 import SandwichDecoderLayer
from runtime.models.llama import LlamaForCausalLM, llama_attention

EXPERT_PATTERN = re.compile(r"^(.*\.mlp\.experts\.)(\d+)\.(w1|w2|w3)\.weight$")
EXPERT_PARTS = {"w1": "gate", "w3": "up", "w2": "down"}
RENAMES = ((".attn.", ".self_attn."), (".moe_block.", ".block_sparse_moe."), (".linear_v.", ".w3."),
           (".linear_1.", ".w2."), (".linear.", ".w1."), (".block_sparse_moe.", ".mlp."),
           (".pre_attn_norm.", ".input_layernorm."), (".post_attn_norm.", ".post_attention_layernorm."),
           (".pre_moe_norm.", ".pre_feedforward_layernorm."), (".post_moe_norm.", ".post_feedforward_layernorm."))


class GrokMoeBlock(SparseMoeBlock):
    def __init__(self, *args, router_logit_cap: float | None, **kwargs):
        super().__init__(*args, **kwargs)
        self.router_logit_cap = router_logit_cap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.gate(x).float()
        if self.router_logit_cap:
            logits = torch.tanh(logits / self.router_logit_cap) * self.router_logit_cap
        return self.experts(x, logits)


class Grok1ForCausalLM(LlamaForCausalLM):
    @staticmethod
    def standard_config(config: dict) -> dict:
        if config.get("residual_moe"):
            raise ModelConfigError("Grok residual_moe (Grok-2's dense MLP beside the experts) is not supported")
        return {**config, "num_local_experts": config.get("num_local_experts") or config["num_experts"],
                "attention_bias": False, "mlp_bias": False}

    @property
    def embed_scale(self) -> float:
        return float(self.config.hf.get("embedding_multiplier_scale", 1.0))

    @property
    def logit_scale(self) -> float:
        return float(self.config.hf.get("output_multiplier_scale", 1.0))

    @property
    def attention_scale(self) -> float:
        return float(self.config.hf.get("attn_output_multiplier") or self.config.head_dim ** -0.5)

    @property
    def attn_logit_cap(self) -> float | None:
        hf = self.config.hf
        cap = float(hf.get("attn_logit_softcapping", hf.get("max_attn_value", 30.0)))
        return cap if cap > 0 else None

    def build_layer(self, layer_id: int) -> nn.Module:
        config, hf = self.config, self.config.hf
        moe = GrokMoeBlock(config.hidden_size, int(hf["num_local_experts"]), int(hf["num_experts_per_tok"]),
                           int(hf.get("moe_intermediate_size") or config.intermediate_size), False, self.tp,
                           self.dtype, activation="gelu", router_logit_cap=hf.get("router_logit_softcapping"))
        return SandwichDecoderLayer(llama_attention(config, layer_id, self.rotary, self.tp, self.dtype), moe,
                                    lambda: RMSNorm(config.hidden_size, config.norm_eps, self.dtype))

    def weight_targets(self, name: str, tensor: torch.Tensor):
        for old, new in RENAMES:
            name = name.replace(old, new)
        target = expert_target(name, tensor, EXPERT_PATTERN, EXPERT_PARTS)
        if target is not None:
            return [target]
        return super().weight_targets(name, tensor)
