"""DeepSeek V2 (DeepseekV2ForCausalLM: V2, V2-Lite, V2.5, Coder-V2) and V3 (DeepseekV3ForCausalLM: V3, R1).

Pre-norm layers (as Llama's) whose attention is multi-head latent attention (runtime/layers/mla.py: a latent KV
cache of kv_lora_rank + qk_rope_head_dim values per token, one "head", and the absorbed-weight path) and whose MLP
is dense for the first `first_k_dense_replace` layers and on layers not a multiple of `moe_layer_freq`, else a MoE:
`n_routed_experts` SwiGLU experts of `moe_intermediate_size` chosen by DeepSeek's grouped top-k
(runtime/layers/grouped_topk.py) plus `n_shared_experts` experts every token takes (one SwiGLU MLP of
n_shared_experts x moe_intermediate_size). V2 scores experts by softmax (`topk_method` greedy or
group_limited_greedy), V3 by sigmoid with noaux_tc (the router's `e_score_correction_bias` steers the choice, not
the weights); `norm_topk_prob` renormalizes, `routed_scaling_factor` scales the routed sum.

Rope covers the qk_rope_head_dim dimensions of q and of the shared rope key, in DeepSeek's interleaved-pair layout
(V3: unless `rope_interleave` is false): those rows of q_proj / q_b_proj and kv_a_proj_with_mqa are reordered at load
time so that the common "rotate half" rotary applies. Yarn scaling (DeepSeek's configs: factor 40, mscale and
mscale_all_dim) scales cos/sin by mscale(factor, mscale) / mscale(factor, mscale_all_dim) (runtime/layers/rotary.py)
and the softmax scale by mscale(factor, mscale_all_dim)^2.

Checkpoints quantized in their config (DeepSeek-V3 / R1 as released: fp8 blocks) are refused: the experts have no
quantized path yet. V3 checkpoints carry a multi-token-prediction layer after the last one
(model.layers.{num_hidden_layers}.*, for speculative decoding): it is skipped.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from runtime.layers.grouped_topk import GroupedTopk
from runtime.layers.mla import MlaAttention, MlaShape
from runtime.layers.mlp import GatedMLP
from runtime.layers.moe import FusedMoE
from runtime.model_loader.weight_map import (
    LLAMA_PACKED,
    WeightTarget,
    expert_target,
    packed_target,
    rotary_halves_order,
)
from runtime.models.config import ModelConfig, ModelConfigError
from runtime.models.decoder import CausalLM
from runtime.models.llama import LlamaDecoderLayer
from runtime.worker.attention.base import AttentionSpec

EXPERT_PATTERN = re.compile(r"^(.*\.mlp\.experts\.)(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
EXPERT_PARTS = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
LAYER_INDEX = re.compile(r"^model\.layers\.(\d+)\.")


def mla_shape(config: ModelConfig) -> MlaShape:
    hf = config.hf
    q_lora_rank = hf.get("q_lora_rank")
    return MlaShape(hidden_size=config.hidden_size, num_heads=config.num_heads,
                    q_lora_rank=int(q_lora_rank) if q_lora_rank else None, kv_lora_rank=int(hf["kv_lora_rank"]),
                    qk_nope_head_dim=int(hf["qk_nope_head_dim"]), qk_rope_head_dim=int(hf["qk_rope_head_dim"]),
                    v_head_dim=int(hf["v_head_dim"]), norm_eps=config.norm_eps,
                    bias=bool(hf.get("attention_bias", False)))


class DeepseekRouter(nn.Module):
    """The router's weight [E, hidden] and, for noaux_tc, its correction bias [E]; kept in float32 and applied to
    float32 activations, as the reference does (routing decisions are sensitive to rounding)."""

    def __init__(self, num_experts: int, hidden_size: int, correction_bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=torch.float32), requires_grad=False)
        self.e_score_correction_bias = nn.Parameter(torch.empty(num_experts, dtype=torch.float32),
                                                    requires_grad=False) if correction_bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight)


class DeepseekMoE(nn.Module):
    def __init__(self, config: ModelConfig, routing: GroupedTopk, tp, dtype: torch.dtype):
        super().__init__()
        hf = config.hf
        inter = int(hf["moe_intermediate_size"])
        self.routing = routing
        self.gate = DeepseekRouter(routing.num_experts, config.hidden_size, routing.topk_method == "noaux_tc")
        self.experts = FusedMoE(routing.num_experts, routing.top_k, config.hidden_size, inter, routing.renormalize,
                                tp, dtype)
        shared = int(hf.get("n_shared_experts") or 0)
        self.shared_experts = GatedMLP(config.hidden_size, inter * shared, config.hidden_act, False, tp, dtype) \
            if shared else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.routing.select(self.gate(x), self.gate.e_score_correction_bias)
        out = self.experts.run_routed(x, weights, ids)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out


class DeepseekV2ForCausalLM(CausalLM):
    default_scoring = "softmax"
    default_topk_method = "greedy"

    @staticmethod
    def standard_config(config: dict) -> dict:
        # the rotary layer turns the qk_rope_head_dim dimensions (transformers writes head_dim so, old configs don't)
        quantization = (config.get("quantization_config") or {}).get("quant_method")
        if quantization:
            # DeepSeek-V3 / R1 ship fp8 block-quantized: their experts would need a quantized MoE path
            raise ModelConfigError(f"{config['architectures'][0]} checkpoints quantized with {quantization} are not "
                                   f"served yet (the routed experts have no quantized path); use a bfloat16 "
                                   f"checkpoint (--quantization fp8 then quantizes its dense linear layers)")
        return {**config, "head_dim": int(config["qk_rope_head_dim"])}

    def rope_interleaved(self) -> bool:
        return True

    def routing(self) -> GroupedTopk:
        hf = self.config.hf
        return GroupedTopk(top_k=int(hf["num_experts_per_tok"]), num_experts=int(hf["n_routed_experts"]),
                           scoring=hf.get("scoring_func") or self.default_scoring,
                           topk_method=hf.get("topk_method") or self.default_topk_method,
                           num_groups=int(hf.get("n_group") or 1), topk_groups=int(hf.get("topk_group") or 1),
                           renormalize=bool(hf.get("norm_topk_prob", False)),
                           scaling_factor=float(hf.get("routed_scaling_factor") or 1.0))

    def is_sparse_layer(self, layer_id: int) -> bool:
        hf = self.config.hf
        return bool(hf.get("n_routed_experts")) and layer_id >= int(hf.get("first_k_dense_replace") or 0) and \
            layer_id % int(hf.get("moe_layer_freq") or 1) == 0

    def build_layer(self, layer_id: int) -> nn.Module:
        config = self.config
        attention = MlaAttention(mla_shape(config), layer_id, self.rotary, self.tp, self.dtype)
        if self.is_sparse_layer(layer_id):
            mlp = DeepseekMoE(config, self.routing(), self.tp, self.dtype)
        else:
            mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act, False, self.tp,
                           self.dtype)
        return LlamaDecoderLayer(config, attention, mlp, self.dtype)

    @property
    def attention_scale(self) -> float:
        shape, rope = mla_shape(self.config), self.config.rope
        scale = shape.qk_head_dim ** -0.5
        if rope.rope_type == "yarn" and rope.mscale_all_dim and rope.factor > 1:
            scale *= (0.1 * rope.mscale_all_dim * math.log(rope.factor) + 1.0) ** 2
        return scale

    def attention_spec(self) -> AttentionSpec:
        shape = mla_shape(self.config)
        return AttentionSpec(num_layers=self.config.num_layers, num_q_heads=self.model.layers[0].self_attn.num_heads,
                             num_kv_heads=1, head_dim=shape.cache_dim, scale=self.attention_scale,
                             latent_value_dim=shape.kv_lora_rank)

    def weight_targets(self, name: str, tensor: torch.Tensor) -> list[WeightTarget]:
        layer = LAYER_INDEX.match(name)
        if "rotary_emb.inv_freq" in name or (layer and int(layer.group(1)) >= self.config.num_layers):
            return []  # V3's multi-token-prediction layer
        if ".self_attn." in name:
            return [WeightTarget(name, self._rope_rows_to_halves(name, tensor))]
        expert = expert_target(name, tensor, EXPERT_PATTERN, EXPERT_PARTS)
        if expert is not None:
            return [expert]
        return [packed_target(name, tensor, LLAMA_PACKED)]

    def _rope_rows_to_halves(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """q_proj / q_b_proj rows (per head: nope, then rope) and kv_a_proj_with_mqa rows (latent, then rope) with
        the rope dimensions' interleaved pairs reordered to halves."""
        if not self.rope_interleaved() or not name.endswith((".weight", ".bias")):
            return tensor
        shape = mla_shape(self.config)
        rope = rotary_halves_order(shape.qk_rope_head_dim, shape.qk_rope_head_dim)
        if ".q_proj." in name or ".q_b_proj." in name:
            head = torch.cat([torch.arange(shape.qk_nope_head_dim), shape.qk_nope_head_dim + rope])
            rows = torch.arange(shape.num_heads)[:, None] * shape.qk_head_dim + head[None, :]
            return tensor[rows.reshape(-1)]
        if ".kv_a_proj_with_mqa." in name:
            return tensor[torch.cat([torch.arange(shape.kv_lora_rank), shape.kv_lora_rank + rope])]
        return tensor


class DeepseekV3ForCausalLM(DeepseekV2ForCausalLM):
    """V3's differences are routing defaults (sigmoid scores, noaux_tc) and the optional non-interleaved rope."""

    default_scoring = "sigmoid"
    default_topk_method = "noaux_tc"

    def rope_interleaved(self) -> bool:
        return bool(self.config.hf.get("rope_interleave", True))
