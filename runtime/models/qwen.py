"""Qwen (v1: Qwen/Qwen-1_8B, -7B, -14B, -72B and -Chat; QWenLMHeadModel, modeling code in the checkpoint repositories):
a Llama with GPT-2 style names, one `c_attn` q/k/v tensor with biases (and no bias elsewhere unless `no_bias` is
false), and an MLP whose `w2` is the gate: c_proj(w1(x) * silu(w2(x))). config.json's `intermediate_size` counts both
halves (twice the MLP width), `kv_channels` is the head size, `rotary_emb_base` / `rotary_pct` the rope,
`layer_norm_epsilon` the RMSNorm epsilon.

Context: `seq_length`, the trained length. Qwen stretches beyond it with a per-call dynamic NTK base and log-n query
scaling (`use_dynamic_ntk`, `use_logn_attn`); both are identities up to seq_length, where we stop.
Stop tokens: the configs carry none, so <|endoftext|> (151643) and <|im_end|> (151645) of Qwen's vocabulary.

Names: transformer.wte, transformer.h.N.{ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.w1, mlp.w2, mlp.c_proj},
transformer.ln_f, lm_head."""

from __future__ import annotations

import torch

from runtime.model_loader.weight_map import WeightTarget, split_rows
from runtime.models.llama import LlamaForCausalLM

RENAMES = (("transformer.wte.", "model.embed_tokens."), ("transformer.ln_f.", "model.norm."),
           ("transformer.h.", "model.layers."), (".ln_1.", ".input_layernorm."),
           (".ln_2.", ".post_attention_layernorm."), (".attn.c_proj.", ".self_attn.o_proj."),
           (".mlp.w2.", ".mlp.gate_proj."), (".mlp.w1.", ".mlp.up_proj."), (".mlp.c_proj.", ".mlp.down_proj."))
QWEN_STOP_IDS = [151643, 151645]  # <|endoftext|>, <|im_end|>


class QWenLMHeadModel(LlamaForCausalLM):
    @staticmethod
    def standard_config(config: dict) -> dict:
        hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        context = int(config.get("seq_length") or config.get("max_position_embeddings") or 2048)
        eos = config.get("eos_token_id")
        if eos is None and int(config["vocab_size"]) > max(QWEN_STOP_IDS):
            eos = QWEN_STOP_IDS
        with_bias = not config.get("no_bias", True)
        return {**config, "head_dim": int(config.get("kv_channels") or hidden // heads),
                "intermediate_size": int(config["intermediate_size"]) // 2,
                "rms_norm_eps": config.get("layer_norm_epsilon", 1e-6), "hidden_act": "silu",
                "rope_theta": float(config.get("rotary_emb_base", 10000.0)), "rope_scaling": None,
                "partial_rotary_factor": float(config.get("rotary_pct", 1.0)), "max_position_embeddings": context,
                "qkv_bias": True, "attention_bias": with_bias, "mlp_bias": with_bias, "eos_token_id": eos}

    def weight_targets(self, name: str, tensor: torch.Tensor) -> list[WeightTarget]:
        for old, new in RENAMES:
            name = name.replace(old, new)
        if ".attn.c_attn." in name:
            config = self.config
            q_size, kv_size = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
            return split_rows(name.replace(".attn.c_attn.", ".self_attn.qkv_proj."), tensor,
                              [q_size, kv_size, kv_size], ["q", "k", "v"])
        return super().weight_targets(name, tensor)
