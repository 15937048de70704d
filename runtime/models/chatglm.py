"""ChatGLM2 / ChatGLM3 / GLM-4 in their original layout (THUDM/chatglm2-6b, chatglm3-6b(-32k), glm-4-9b-chat;
config `architectures` ChatGLMModel or ChatGLMForConditionalGeneration, modeling code in the checkpoint
repositories). The same network as transformers' GlmForCausalLM (glm.py), which was converted from it: pre-norm
RMSNorm layers, multi-query attention (`multi_query_group_num` kv heads) with q/k/v biases (`add_qkv_bias`), rotary on
interleaved pairs of the first half of each head with base 10000 x `rope_ratio`, a fused SwiGLU MLP.

Config keys: num_layers, kv_channels, ffn_hidden_size, layernorm_epsilon, padded_vocab_size, seq_length. Names:
transformer.embedding.word_embeddings, transformer.encoder.layers.N.{input_layernorm,
self_attention.query_key_value, self_attention.dense, post_attention_layernorm, mlp.dense_h_to_4h,
mlp.dense_4h_to_h}, transformer.encoder.final_layernorm, transformer.output_layer.
The first ChatGLM (chatglm-6b: 2D positions, GLM-130B layout) is another architecture and is refused."""

from __future__ import annotations

import torch

from runtime.model_loader.weight_map import WeightTarget
from runtime.models.config import ModelConfigError
from runtime.models.glm import GlmForCausalLM

RENAMES = (("transformer.embedding.word_embeddings.", "model.embed_tokens."),
           ("transformer.encoder.final_layernorm.", "model.norm."), ("transformer.output_layer.", "lm_head."),
           ("transformer.encoder.layers.", "model.layers."), (".self_attention.dense.", ".self_attn.o_proj."),
           (".mlp.dense_h_to_4h.", ".mlp.gate_up_proj."), (".mlp.dense_4h_to_h.", ".mlp.down_proj."))


class ChatGLMForCausalLM(GlmForCausalLM):
    @staticmethod
    def standard_config(config: dict) -> dict:
        if config.get("position_encoding_2d") or "kv_channels" not in config:
            raise ModelConfigError("the first ChatGLM (chatglm-6b, 2D position encoding) is not supported; ChatGLM2, "
                                   "ChatGLM3 and GLM-4 checkpoints are")
        for key, supported in (("rmsnorm", True), ("apply_residual_connection_post_layernorm", False),
                               ("post_layer_norm", True), ("add_bias_linear", False)):
            if config.get(key, supported) != supported:
                raise ModelConfigError(f"ChatGLM {key}={config[key]} is not supported (only {supported})")
        heads = int(config["num_attention_heads"])
        kv_heads = int(config["multi_query_group_num"]) if config.get("multi_query_attention") else heads
        return {**config, "num_hidden_layers": config["num_layers"], "head_dim": config["kv_channels"],
                "num_key_value_heads": kv_heads, "intermediate_size": config["ffn_hidden_size"],
                "rms_norm_eps": config.get("layernorm_epsilon", 1e-5),
                "vocab_size": config.get("padded_vocab_size") or config["vocab_size"],
                "max_position_embeddings": config.get("seq_length", 2048), "hidden_act": "silu",
                "rope_theta": 10000.0 * float(config.get("rope_ratio", 1.0)), "rope_scaling": None,
                "partial_rotary_factor": 0.5, "qkv_bias": bool(config.get("add_qkv_bias", True)),
                "attention_bias": False}

    def weight_targets(self, name: str, tensor: torch.Tensor) -> list[WeightTarget]:
        if "rotary_pos_emb.inv_freq" in name:
            return []
        for old, new in RENAMES:
            name = name.replace(old, new)
        if ".self_attention.query_key_value." in name:
            config = self.config
            q_size, kv_size = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
            name = name.replace(".self_attention.query_key_value.", ".self_attn.q_proj.")
            q, k, v = tensor.split([q_size, kv_size, kv_size])
            return (super().weight_targets(name, q) + super().weight_targets(name.replace(".q_proj.", ".k_proj."), k)
                    + super().weight_targets(name.replace(".q_proj.", ".v_proj."), v))
        return super().weight_targets(name, tensor)
