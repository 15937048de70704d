"""Llama-family decoder (Llama 1/2/3/3.1, SmolLM, Mistral and Mistral NeMo, Qwen2) over the paged KV cache.

Pre-norm layers: h += attn(norm(h)); h += mlp(norm(h)). The architectures differ only in config facts that
ModelConfig resolves: attention and MLP biases, the sliding window (Mistral), tied embeddings, the rope variant,
a head_dim that is not hidden / heads (NeMo). Qwen2 always has q/k/v biases and no o_proj bias, which
`Qwen2ForCausalLM.standard_config` states. Weights use the HF names; q/k/v and gate/up are packed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from runtime.layers.attention import SelfAttention
from runtime.layers.mlp import GatedMLP
from runtime.layers.norm import RMSNorm
from runtime.layers.parallel import TensorParallel
from runtime.layers.rotary import RotaryEmbedding
from runtime.models.config import ModelConfig, ModelConfigError
from runtime.models.decoder import CausalLM
from runtime.worker.attention.base import AttentionBackend
from runtime.worker.forward_batch import ForwardBatch


def llama_attention(config: ModelConfig, layer_id: int, rotary: RotaryEmbedding, tp: TensorParallel,
                    dtype: torch.dtype, **options) -> SelfAttention:
    return SelfAttention(config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim, layer_id, rotary,
                         tp, dtype, qkv_bias=config.qkv_bias, o_bias=config.o_proj_bias, **options)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, self_attn: SelfAttention, mlp: nn.Module, dtype: torch.dtype,
                 make_norm: Callable[[], nn.Module] | None = None):
        super().__init__()
        make_norm = make_norm or (lambda: RMSNorm(config.hidden_size, config.norm_eps, dtype))
        self.input_layernorm = make_norm()
        self.self_attn = self_attn
        self.post_attention_layernorm = make_norm()
        self.mlp = mlp

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None, batch: ForwardBatch,
                attn: AttentionBackend) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(hidden, batch, attn)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaForCausalLM(CausalLM):
    def build_layer(self, layer_id: int) -> nn.Module:
        config = self.config
        return LlamaDecoderLayer(config, llama_attention(config, layer_id, self.rotary, self.tp, self.dtype),
                                 GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act,
                                          config.mlp_bias, self.tp, self.dtype), self.dtype)


class Qwen2ForCausalLM(LlamaForCausalLM):
    @staticmethod
    def standard_config(config: dict) -> dict:
        if config.get("use_sliding_window") and not config.get("layer_types"):
            # transformers: layers from max_window_layers on use the window
            start = int(config.get("max_window_layers", 0))
            config = {**config, "layer_types": ["full_attention" if i < start else "sliding_attention"
                                                for i in range(int(config["num_hidden_layers"]))]}
        return {**config, "qkv_bias": True, "attention_bias": False}


class ExaoneForCausalLM(LlamaForCausalLM):
    """EXAONE 3 / 3.5 (LG AI; its modeling code lives in the checkpoint repository): a Llama with GPT-2 style names.
    The config names layers `num_layers` and the epsilon `layer_norm_epsilon`; tensors are transformer.wte,
    transformer.h.N.{ln_1, attn.attention.{q,k,v,out}_proj, ln_2, mlp.{c_fc_0 (gate), c_fc_1 (up), c_proj}},
    transformer.ln_f and lm_head."""

    RENAMES = (("transformer.wte.", "model.embed_tokens."), ("transformer.ln_f.", "model.norm."),
               ("transformer.h.", "model.layers."), (".ln_1.", ".input_layernorm."),
               (".ln_2.", ".post_attention_layernorm."), (".attn.attention.out_proj.", ".self_attn.o_proj."),
               (".attn.attention.", ".self_attn."), (".mlp.c_fc_0.", ".mlp.gate_proj."),
               (".mlp.c_fc_1.", ".mlp.up_proj."), (".mlp.c_proj.", ".mlp.down_proj."))

    @staticmethod
    def standard_config(config: dict) -> dict:
        activation = config.get("activation_function", "silu")
        if activation != "silu":
            raise ModelConfigError(f"EXAONE activation_function {activation!r} is not supported (only silu)")
        return {**config, "num_hidden_layers": config.get("num_hidden_layers", config.get("num_layers")),
                "rms_norm_eps": config.get("layer_norm_epsilon", 1e-5), "hidden_act": "silu"}

    def weight_targets(self, name: str, tensor: torch.Tensor):
        for old, new in self.RENAMES:
            name = name.replace(old, new)
        return super().weight_targets(name, tensor)
