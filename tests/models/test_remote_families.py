"""The families whose modeling code lives only in their checkpoint repositories (Grok-1, ChatGLM, InternLM2, Baichuan,
MiniCPM / MiniCPM3, XVERSE / XVERSE-MoE, Qwen v1): each case writes a tiny checkpoint in that repository's tensor
names and config.json keys (with its `auto_map`, and a modeling file that leaves a mark if anything runs it), loads it
with trust_remote_code on, and compares prefill logits and batched greedy tokens with a float32 reference:
- where transformers has the same network under another name, that model, built with random weights, whose tensors
  the case renames, splits or folds into the family's layout (InternLM2, XVERSE -> Llama; Qwen v1 -> Qwen2; ChatGLM
  -> GLM; XVERSE-MoE -> Qwen2-MoE with its shared-expert gate at sigmoid(0) = 1/2; MiniCPM -> Llama / Mixtral and
  MiniCPM3 -> DeepSeek-V3 with MiniCPM's scalars folded into the weights; Baichuan 2 7B -> Llama with the
  normalized head);
- otherwise a compact reference written here from the published architecture (Baichuan 13B's ALiBi, Grok-1).
Also: repository Python is never run, for tokenizers either."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from runtime.models import MODEL_REGISTRY, model_config_from_hf
from runtime.models.baichuan import BaichuanForCausalLM, alibi_slopes
from runtime.models.config import ModelConfigError
from runtime.server_args import ServerArgs
from runtime.tokenizer import TokenizerLoadError, load_tokenizer
from runtime.worker.model_runner import ModelRunner, ModelRunnerConfig
from tests.model_fixtures import PlanDriver, relative_max_error, runner_logits

PROMPTS = [[5, 17, 33, 2, 90, 41, 7, 64, 12, 3, 99, 18], [8, 8, 21], [70, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [44]]
NEW_TOKENS = 8
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2, rms_norm_eps=1e-6,
            eos_token_id=1, bos_token_id=0, pad_token_id=0)
MARK = ".ran"  # what the planted modeling file writes beside itself if it is ever executed
Reference = Callable[[list[int]], torch.Tensor]  # token ids -> float32 logits [len, vocab]


def write_checkpoint(folder: str, tensors: dict[str, torch.Tensor], config: dict, module: str) -> None:
    """safetensors + config.json naming `module` in auto_map, as the family's repositories do, and that module."""
    os.makedirs(folder, exist_ok=True)
    save_file({name: t.contiguous() for name, t in tensors.items()}, os.path.join(folder, "model.safetensors"),
              metadata={"format": "pt"})
    auto_map = {"AutoConfig": f"configuration_{module}.Config",
                "AutoModelForCausalLM": f"modeling_{module}.{config['architectures'][0]}"}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({**config, "auto_map": auto_map, "torch_dtype": "float32"}, f)
    with open(os.path.join(folder, f"modeling_{module}.py"), "w") as f:
        f.write(f"open(__file__ + {MARK!r}, 'w').close()\n")


def random_hf(config) -> torch.nn.Module:
    """A transformers model with random weights; norms and biases perturbed (their constant initial values would
    hide a norm or bias applied wrongly)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.1)
    return model


def hf_reference(model) -> Reference:
    def logits(tokens: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return model(torch.tensor([tokens])).logits[0].float()
    return logits


def renamed(state: dict[str, torch.Tensor], renames: tuple[tuple[str, str], ...]) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in state.items():
        for old, new in renames:
            name = name.replace(old, new)
        out[name] = tensor.clone()
    return out


def layers(num_layers: int = 2) -> list[tuple[str, int]]:
    return [(f"model.layers.{i}.", i) for i in range(num_layers)]


def llama_config(**overrides):
    import transformers as tf

    return tf.LlamaConfig(**{**TINY, **overrides})


def plain_config(config, keys=("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
                               "num_key_value_heads", "num_hidden_layers", "max_position_embeddings", "rms_norm_eps",
                               "eos_token_id", "bos_token_id")) -> dict:
    return {key: getattr(config, key) for key in keys}


# ---- cases: each writes the checkpoint into `folder` and returns the reference ----

def internlm2(folder: str) -> Reference:
    model = random_hf(llama_config())
    state, group, head_dim = model.state_dict(), 2, 16
    tensors = renamed({k: v for k, v in state.items() if not any(p in k for p in ("q_proj", "k_proj", "v_proj"))}, (
        ("model.embed_tokens.", "model.tok_embeddings."), ("lm_head.", "output."),
        (".input_layernorm.", ".attention_norm."), (".post_attention_layernorm.", ".ffn_norm."),
        (".self_attn.o_proj.", ".attention.wo."), (".mlp.gate_proj.", ".feed_forward.w1."),
        (".mlp.up_proj.", ".feed_forward.w3."), (".mlp.down_proj.", ".feed_forward.w2.")))
    for prefix, _ in layers():
        q = state[prefix + "self_attn.q_proj.weight"].view(2, group, head_dim, 64)
        k = state[prefix + "self_attn.k_proj.weight"].view(2, 1, head_dim, 64)
        v = state[prefix + "self_attn.v_proj.weight"].view(2, 1, head_dim, 64)
        tensors[prefix + "attention.wqkv.weight"] = torch.cat([q, k, v], dim=1).reshape(-1, 64)
    write_checkpoint(folder, tensors, {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2",
                                       **plain_config(model.config), "bias": False, "rope_theta": 10000.0,
                                       "rope_scaling": None, "tie_word_embeddings": False}, "internlm2")
    return hf_reference(model)


def qwen_v1(folder: str) -> Reference:
    import transformers as tf

    model = random_hf(tf.Qwen2Config(**{**TINY, "num_key_value_heads": 4}))
    state = model.state_dict()
    tensors = renamed({k: v for k, v in state.items() if not any(p in k for p in ("q_proj", "k_proj", "v_proj"))}, (
        ("model.embed_tokens.", "transformer.wte."), ("model.norm.", "transformer.ln_f."),
        ("model.layers.", "transformer.h."), (".input_layernorm.", ".ln_1."), (".post_attention_layernorm.", ".ln_2."),
        (".self_attn.o_proj.", ".attn.c_proj."), (".mlp.gate_proj.", ".mlp.w2."), (".mlp.up_proj.", ".mlp.w1."),
        (".mlp.down_proj.", ".mlp.c_proj.")))
    for prefix, i in layers():
        for kind in ("weight", "bias"):
            tensors[f"transformer.h.{i}.attn.c_attn.{kind}"] = torch.cat(
                [state[f"{prefix}self_attn.{p}_proj.{kind}"] for p in "qkv"])
    write_checkpoint(folder, tensors, {
        "architectures": ["QWenLMHeadModel"], "model_type": "qwen", "vocab_size": 128, "hidden_size": 64,
        "intermediate_size": 256, "num_attention_heads": 4, "num_hidden_layers": 2, "kv_channels": 16,
        "layer_norm_epsilon": 1e-6, "rotary_emb_base": 10000, "rotary_pct": 1.0, "seq_length": 256,
        "max_position_embeddings": 256, "no_bias": True, "use_dynamic_ntk": True, "use_logn_attn": True,
        "tie_word_embeddings": False}, "qwen")
    return hf_reference(model)


def xverse(folder: str) -> Reference:
    model = random_hf(llama_config())
    write_checkpoint(folder, model.state_dict(), {"architectures": ["XverseForCausalLM"], "model_type": "xverse",
                                                  **plain_config(model.config), "hidden_act": "silu",
                                                  "rope_theta": 10000.0, "max_tokenizer_truncation": 192}, "xverse")
    return hf_reference(model)


def xverse_moe(folder: str) -> Reference:
    import transformers as tf

    model = random_hf(tf.Qwen2MoeConfig(**TINY, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                        shared_expert_intermediate_size=64, norm_topk_prob=False))
    with torch.no_grad():  # XVERSE-MoE has no q/k/v biases and adds its shared experts unscaled
        for name, param in model.named_parameters():
            if name.endswith("_proj.bias") or "shared_expert_gate" in name:
                param.zero_()
    state, tensors = model.state_dict(), {}
    for name, tensor in state.items():
        if name.endswith("_proj.bias") or "shared_expert_gate" in name:
            continue
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = name[:-len("gate_up_proj")]
            for e, expert in enumerate(tensor):
                tensors[f"{prefix}{e}.gate_proj.weight"], tensors[f"{prefix}{e}.up_proj.weight"] = expert.chunk(2)
        elif name.endswith("mlp.experts.down_proj"):
            for e, expert in enumerate(tensor):
                tensors[f"{name[:-len('down_proj')]}{e}.down_proj.weight"] = expert
        elif ".shared_expert." in name:
            scale = 0.5 if "down_proj" in name else 1.0  # sigmoid(0) of the reference's zeroed gate
            tensors[name.replace(".shared_expert.", ".shared_experts.")] = tensor * scale
        else:
            tensors[name.replace(".mlp.gate.", ".mlp.router.")] = tensor
    write_checkpoint(folder, tensors, {"architectures": ["XverseMoeForCausalLM"], "model_type": "xverse",
                                       **plain_config(model.config), "intermediate_size": 32, "num_experts": 4,
                                       "moe_top_k": 2, "num_shared_experts": 2, "hidden_act": "silu",
                                       "rope_theta": 10000.0}, "xverse")
    return hf_reference(model)


def chatglm(folder: str) -> Reference:
    import transformers as tf

    model = random_hf(tf.GlmConfig(**TINY, head_dim=16))
    state = model.state_dict()
    tensors = renamed({k: v for k, v in state.items() if not any(p in k for p in ("q_proj", "k_proj", "v_proj"))}, (
        ("model.embed_tokens.", "transformer.embedding.word_embeddings."),
        ("model.norm.", "transformer.encoder.final_layernorm."), ("lm_head.", "transformer.output_layer."),
        ("model.layers.", "transformer.encoder.layers."), (".self_attn.o_proj.", ".self_attention.dense."),
        (".mlp.gate_up_proj.", ".mlp.dense_h_to_4h."), (".mlp.down_proj.", ".mlp.dense_4h_to_h.")))
    for prefix, i in layers():
        for kind in ("weight", "bias"):
            tensors[f"transformer.encoder.layers.{i}.self_attention.query_key_value.{kind}"] = torch.cat(
                [state[f"{prefix}self_attn.{p}_proj.{kind}"] for p in "qkv"])
    tensors["transformer.rotary_pos_emb.inv_freq"] = torch.ones(4)  # a buffer the real checkpoints carry
    write_checkpoint(folder, tensors, {
        "architectures": ["ChatGLMModel"], "model_type": "chatglm", "add_bias_linear": False, "add_qkv_bias": True,
        "apply_residual_connection_post_layernorm": False, "ffn_hidden_size": 128, "hidden_size": 64,
        "kv_channels": 16, "layernorm_epsilon": model.config.rms_norm_eps, "multi_query_attention": True,
        "multi_query_group_num": 2, "num_attention_heads": 4, "num_layers": 2, "padded_vocab_size": 128,
        "post_layer_norm": True, "rmsnorm": True, "seq_length": 256, "rope_ratio": 1.0, "original_rope": True,
        "eos_token_id": 1, "pad_token_id": 0, "tie_word_embeddings": False}, "chatglm")
    return hf_reference(model)


def baichuan2_7b(folder: str) -> Reference:
    """Rope (the 7B models) and NormHead: the reference is a Llama whose head rows are unit vectors."""
    model = random_hf(llama_config(num_key_value_heads=4))
    state = model.state_dict()
    tensors = {k: v.clone() for k, v in state.items() if not any(p in k for p in ("q_proj", "k_proj", "v_proj"))}
    for prefix, _ in layers():
        tensors[prefix + "self_attn.W_pack.weight"] = torch.cat([state[f"{prefix}self_attn.{p}_proj.weight"]
                                                                 for p in "qkv"])
    with torch.no_grad():
        model.lm_head.weight.copy_(F.normalize(model.lm_head.weight, dim=-1))
    write_checkpoint(folder, tensors, baichuan_config(plain_config(model.config)), "baichuan")
    return hf_reference(model)


def baichuan_config(plain: dict) -> dict:
    config = {key: value for key, value in plain.items() if key not in ("num_key_value_heads",
                                                                        "max_position_embeddings")}
    return {"architectures": ["BaichuanForCausalLM"], "model_type": "baichuan", **config, "model_max_length": 256,
            "hidden_act": "silu", "z_loss_weight": 0, "tie_word_embeddings": False}


def rms(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rope(x: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """x [heads, L, D] rotated by position, rotate-half pairs."""
    length, dim = x.shape[1], x.shape[2]
    freqs = torch.outer(torch.arange(length).float(), theta ** (-torch.arange(0, dim, 2).float() / dim))
    cos, sin = torch.cat([freqs.cos()] * 2, -1), torch.cat([freqs.sin()] * 2, -1)
    return x * cos + torch.cat([-x[..., dim // 2:], x[..., :dim // 2]], -1) * sin


def attend(q, k, v, scale: float, bias: torch.Tensor | None = None, cap: float | None = None) -> torch.Tensor:
    """q [H, L, D], k/v [Hkv, L, D] -> [L, H * D], causal."""
    repeat = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(repeat, 0), v.repeat_interleave(repeat, 0)
    scores = q @ k.transpose(1, 2) * scale
    if cap is not None:
        scores = cap * torch.tanh(scores / cap)
    if bias is not None:
        scores = scores + bias
    length = q.shape[1]
    scores = scores.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf"))
    return (scores.softmax(-1) @ v).transpose(0, 1).reshape(length, -1)


# Baichuan 13B: ALiBi for 6 heads (no power of two): the 4 slopes of 4 heads, then every other one of 8 heads'
ALIBI_SLOPES_6 = [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3]


def baichuan_13b(folder: str) -> Reference:
    hidden, heads, head_dim, inter, vocab = 96, 6, 16, 128, 128
    gen = torch.Generator().manual_seed(1)

    def rand(*shape, std=0.2):
        return torch.randn(*shape, generator=gen) * std

    tensors = {"model.embed_tokens.weight": rand(vocab, hidden, std=1.0), "model.norm.weight": 1 + rand(hidden),
               "lm_head.weight": rand(vocab, hidden)}
    for i in range(2):
        p = f"model.layers.{i}."
        tensors.update({p + "input_layernorm.weight": 1 + rand(hidden), p + "self_attn.W_pack.weight":
                        rand(3 * hidden, hidden), p + "self_attn.o_proj.weight": rand(hidden, hidden),
                        p + "post_attention_layernorm.weight": 1 + rand(hidden),
                        p + "mlp.gate_proj.weight": rand(inter, hidden), p + "mlp.up_proj.weight": rand(inter, hidden),
                        p + "mlp.down_proj.weight": rand(hidden, inter)})
    write_checkpoint(folder, tensors, baichuan_config({
        "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": inter, "num_attention_heads": heads,
        "num_hidden_layers": 2, "rms_norm_eps": 1e-6, "eos_token_id": 1, "bos_token_id": 0}), "baichuan")

    def reference(tokens: list[int]) -> torch.Tensor:
        length = len(tokens)
        # Baichuan's mask: slope x key position (a per-row constant away from slope x (key - query))
        bias = torch.tensor(ALIBI_SLOPES_6)[:, None, None] * torch.arange(length).float()[None, None, :]
        h = tensors["model.embed_tokens.weight"][tokens]
        for i in range(2):
            p = f"model.layers.{i}."
            x = rms(h, tensors[p + "input_layernorm.weight"])
            q, k, v = (t.view(length, heads, head_dim).transpose(0, 1)
                       for t in (x @ tensors[p + "self_attn.W_pack.weight"].T).chunk(3, -1))
            h = h + attend(q, k, v, head_dim ** -0.5, bias) @ tensors[p + "self_attn.o_proj.weight"].T
            x = rms(h, tensors[p + "post_attention_layernorm.weight"])
            h = h + (F.silu(x @ tensors[p + "mlp.gate_proj.weight"].T) * (x @ tensors[p + "mlp.up_proj.weight"].T)
                     ) @ tensors[p + "mlp.down_proj.weight"].T
        return rms(h, tensors["model.norm.weight"]) @ F.normalize(tensors["lm_head.weight"], dim=-1).T
    return reference


def fold_minicpm(model, scale_emb: float, scale_depth: float, dim_base: int, tied: bool) -> dict[str, torch.Tensor]:
    """A MiniCPM checkpoint from a random transformers model, whose weights then absorb MiniCPM's scalars so that
    it computes what MiniCPM computes: embeddings x scale_emb, o_proj and down projections x scale_depth /
    sqrt(layers), head / (hidden / dim_model_base) (the embedding itself when tied)."""
    config = model.config
    residual = scale_depth / math.sqrt(config.num_hidden_layers)
    tensors = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    if tied:
        del tensors["lm_head.weight"]
    embed = tensors["model.embed_tokens.weight"]
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(scale_emb)
        model.lm_head.weight.copy_((embed if tied else tensors["lm_head.weight"]) * dim_base / config.hidden_size)
        for name, param in model.named_parameters():
            if name.endswith("o_proj.weight") or name.endswith("down_proj.weight") or \
                    name.endswith("experts.down_proj"):
                param.mul_(residual)
    return tensors


MINICPM_SCALARS = {"scale_emb": 3.0, "scale_depth": 1.4, "dim_model_base": 16}


def minicpm(folder: str) -> Reference:
    model = random_hf(llama_config(tie_word_embeddings=False))
    tensors = fold_minicpm(model, 3.0, 1.4, 16, tied=True)
    write_checkpoint(folder, tensors, {"architectures": ["MiniCPMForCausalLM"], "model_type": "minicpm",
                                       **plain_config(model.config), **MINICPM_SCALARS, "hidden_act": "silu",
                                       "rope_theta": 10000.0, "tie_word_embeddings": True}, "minicpm")
    return hf_reference(model)


def minicpm_moe(folder: str) -> Reference:
    import transformers as tf

    model = random_hf(tf.MixtralConfig(**{**TINY, "intermediate_size": 32}, num_local_experts=4,
                                       num_experts_per_tok=2, tie_word_embeddings=False))
    folded = fold_minicpm(model, 3.0, 1.4, 16, tied=True)
    tensors = {}
    for name, tensor in folded.items():
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = name[:-len("gate_up_proj")]
            for e, expert in enumerate(tensor):
                tensors[f"{prefix}{e}.w1.weight"], tensors[f"{prefix}{e}.w3.weight"] = expert.chunk(2)
        elif name.endswith("mlp.experts.down_proj"):
            for e, expert in enumerate(tensor):
                tensors[f"{name[:-len('down_proj')]}{e}.w2.weight"] = expert
        else:
            tensors[name] = tensor
    write_checkpoint(folder, tensors, {"architectures": ["MiniCPMForCausalLM"], "model_type": "minicpm",
                                       **plain_config(model.config), **MINICPM_SCALARS, "num_experts": 4,
                                       "num_experts_per_tok": 2, "hidden_act": "silu",
                                       "rope_theta": model.config.rope_parameters["rope_theta"],
                                       "tie_word_embeddings": True}, "minicpm")
    return hf_reference(model)


MINICPM3_MLA = dict(q_lora_rank=32, kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12)


def minicpm3(folder: str, q_lora_rank: int | None = MINICPM3_MLA["q_lora_rank"]) -> Reference:
    """Without `q_lora_rank`, q comes from one self_attn.q_proj (loaded as is, not as a part of a packed qkv)."""
    import transformers as tf

    mla = {**MINICPM3_MLA, "q_lora_rank": q_lora_rank}
    model = random_hf(tf.DeepseekV3Config(**{**TINY, "num_key_value_heads": 4}, **mla, rope_interleave=False,
                                          first_k_dense_replace=2, n_routed_experts=4, num_experts_per_tok=2,
                                          tie_word_embeddings=False))
    tensors = fold_minicpm(model, 3.0, 1.4, 16, tied=False)
    write_checkpoint(folder, tensors, {"architectures": ["MiniCPM3ForCausalLM"], "model_type": "minicpm3",
                                       **plain_config(model.config), **mla, **MINICPM_SCALARS, "hidden_act": "silu",
                                       "num_key_value_heads": 4, "rope_theta": 10000.0,
                                       "tie_word_embeddings": False}, "minicpm")
    return hf_reference(model)


GROK = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 32, "num_attention_heads": 4,
        "num_key_value_heads": 2, "num_hidden_layers": 2, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": 256, "embedding_multiplier_scale": 4.0, "output_multiplier_scale": 0.5,
        "num_experts_per_tok": 2, "eos_token_id": 1, "bos_token_id": 0}
GROK_HPCAI_NAMES = ((".self_attn.", ".attn."), (".block_sparse_moe.", ".moe_block."), (".w1.", ".linear."),
                    (".w3.", ".linear_v."), (".w2.", ".linear_1."))


def grok(folder: str, hpcai_layout: bool = False) -> Reference:
    """Random weights large enough that the attention cap bends the scores, and the router's when the config asks
    for one (SGLang's layout here; xAI's original routes on the raw logits, as the hpcai-tech port does)."""
    hidden, heads, kv_heads, head_dim, inter, experts = 64, 4, 2, 16, 32, 4
    gen = torch.Generator().manual_seed(2)

    def rand(*shape, std=0.2):
        return torch.randn(*shape, generator=gen) * std

    tensors = {"model.embed_tokens.weight": rand(128, hidden, std=0.5), "model.norm.weight": 1 + rand(hidden),
               "lm_head.weight": rand(128, hidden)}
    for i in range(2):
        p = f"model.layers.{i}."
        tensors.update({p + f"{n}.weight": 1 + rand(hidden)
                        for n in ("pre_attn_norm", "post_attn_norm", "pre_moe_norm", "post_moe_norm")})
        tensors.update({p + "self_attn.q_proj.weight": rand(heads * head_dim, hidden, std=0.6),
                        p + "self_attn.k_proj.weight": rand(kv_heads * head_dim, hidden, std=0.6),
                        p + "self_attn.v_proj.weight": rand(kv_heads * head_dim, hidden),
                        p + "self_attn.o_proj.weight": rand(hidden, heads * head_dim),
                        p + "block_sparse_moe.gate.weight": rand(experts, hidden, std=4.0)})
        for e in range(experts):
            tensors.update({p + f"block_sparse_moe.experts.{e}.w1.weight": rand(inter, hidden),
                            p + f"block_sparse_moe.experts.{e}.w3.weight": rand(inter, hidden),
                            p + f"block_sparse_moe.experts.{e}.w2.weight": rand(hidden, inter)})
    if hpcai_layout:
        config = {"architectures": ["Grok1ModelForCausalLM"], "model_type": "grok-1", **GROK, "num_experts": 4,
                  "max_attn_value": 30.0, "attn_output_multiplier": 0.2}
        write_checkpoint(folder, renamed(tensors, GROK_HPCAI_NAMES), config, "grok1")
    else:
        config = {"architectures": ["Grok1ForCausalLM"], "model_type": "grok-1", **GROK, "num_local_experts": 4,
                  "router_logit_softcapping": 30.0}
        write_checkpoint(folder, tensors, config, "grok1")

    def moe(x: torch.Tensor, p: str) -> torch.Tensor:
        logits = x @ tensors[p + "block_sparse_moe.gate.weight"].T
        if not hpcai_layout:
            logits = 30.0 * torch.tanh(logits / 30.0)
        weights, chosen = logits.softmax(-1).topk(2, dim=-1)  # not renormalized
        dense_weights = torch.zeros_like(logits).scatter(1, chosen, weights)  # [T, E]: 0 for experts not chosen
        out = torch.zeros_like(x)
        for e in range(experts):
            w = p + f"block_sparse_moe.experts.{e}."
            act = F.gelu(x @ tensors[w + "w1.weight"].T, approximate="tanh") * (x @ tensors[w + "w3.weight"].T)
            out += dense_weights[:, e:e + 1] * (act @ tensors[w + "w2.weight"].T)
        return out

    def reference(tokens: list[int]) -> torch.Tensor:
        length = len(tokens)
        h = tensors["model.embed_tokens.weight"][tokens] * GROK["embedding_multiplier_scale"]
        for i in range(2):
            p = f"model.layers.{i}."
            x = rms(h, tensors[p + "pre_attn_norm.weight"], 1e-5)
            q, k, v = ((x @ tensors[p + f"self_attn.{n}_proj.weight"].T).view(length, -1, head_dim).transpose(0, 1)
                       for n in "qkv")
            scale = 0.2 if hpcai_layout else head_dim ** -0.5
            out = attend(rope(q), rope(k), v, scale, cap=30.0) @ tensors[p + "self_attn.o_proj.weight"].T
            h = h + rms(out, tensors[p + "post_attn_norm.weight"], 1e-5)
            x = rms(h, tensors[p + "pre_moe_norm.weight"], 1e-5)
            h = h + rms(moe(x, p), tensors[p + "post_moe_norm.weight"], 1e-5)
        logits = rms(h, tensors["model.norm.weight"], 1e-5) @ tensors["lm_head.weight"].T
        return logits * GROK["output_multiplier_scale"]
    return reference


@dataclass(frozen=True)
class RemoteCase:
    architecture: str
    build: Callable[[str], Reference]
    check: str  # what the reference is
    rope_hidden_size: int | None = None  # Baichuan: the hidden size served with rope (the 7B models' 4096)


CASES = {
    "InternLM2ForCausalLM": RemoteCase("InternLM2ForCausalLM", internlm2, "transformers Llama"),
    "QWenLMHeadModel": RemoteCase("QWenLMHeadModel", qwen_v1, "transformers Qwen2"),
    "XverseForCausalLM": RemoteCase("XverseForCausalLM", xverse, "transformers Llama"),
    "XverseMoeForCausalLM": RemoteCase("XverseMoeForCausalLM", xverse_moe, "transformers Qwen2-MoE"),
    "ChatGLMModel": RemoteCase("ChatGLMModel", chatglm, "transformers GLM"),
    "BaichuanForCausalLM-7b": RemoteCase("BaichuanForCausalLM", baichuan2_7b, "transformers Llama", 64),
    "BaichuanForCausalLM-13b": RemoteCase("BaichuanForCausalLM", baichuan_13b, "reference here (ALiBi)"),
    "MiniCPMForCausalLM": RemoteCase("MiniCPMForCausalLM", minicpm, "transformers Llama"),
    "MiniCPMForCausalLM-moe": RemoteCase("MiniCPMForCausalLM", minicpm_moe, "transformers Mixtral"),
    "MiniCPM3ForCausalLM": RemoteCase("MiniCPM3ForCausalLM", minicpm3, "transformers DeepSeek-V3"),
    "MiniCPM3ForCausalLM-q_proj": RemoteCase("MiniCPM3ForCausalLM", lambda f: minicpm3(f, q_lora_rank=None),
                                             "transformers DeepSeek-V3"),
    "Grok1ForCausalLM": RemoteCase("Grok1ForCausalLM", grok, "reference here"),
    "Grok1ModelForCausalLM": RemoteCase("Grok1ModelForCausalLM", lambda f: grok(f, hpcai_layout=True),
                                        "reference here"),
}
# config `architectures` names of the same classes, for other releases of a family
ALIASES = {"ChatGLMForConditionalGeneration": "ChatGLMModel", "BaiChuanForCausalLM": "BaichuanForCausalLM"}
REMOTE_ARCHITECTURES = {case.architecture for case in CASES.values()} | set(ALIASES)


@pytest.fixture(scope="module", params=sorted(CASES))
def checkpoint(request, tmp_path_factory) -> tuple[RemoteCase, str, Reference]:
    case = CASES[request.param]
    folder = str(tmp_path_factory.mktemp(request.param))
    return case, folder, case.build(folder)


def load(case: RemoteCase, folder: str, **options) -> ModelRunner:
    with pytest.MonkeyPatch.context() as patch:
        if case.rope_hidden_size is not None:
            patch.setattr(BaichuanForCausalLM, "ROPE_HIDDEN_SIZE", case.rope_hidden_size)
        return ModelRunner(ModelRunnerConfig(model_path=folder, max_total_tokens=512, max_running_requests=8,
                                             trust_remote_code=True, **options))


@pytest.fixture(scope="module")
def remote(checkpoint):
    case, folder, reference = checkpoint
    return case, folder, load(case, folder, device="cpu"), reference


def test_loads_without_running_repository_code(remote):
    case, folder, runner, _ = remote
    assert runner.info.architecture == case.architecture
    assert not [name for name in os.listdir(folder) if name.endswith(MARK)]


def test_kv_pool_layout(remote):
    """MiniCPM3 caches one latent row per token and layer, keys only (kv_lora_rank + qk_rope_head_dim values; the
    values are its latent part); every other family caches keys and values per kv head."""
    case, _, runner, _ = remote
    spec, pool = runner.attention_spec, runner.kv_pool
    if case.architecture == "MiniCPM3ForCausalLM":
        row = MINICPM3_MLA["kv_lora_rank"] + MINICPM3_MLA["qk_rope_head_dim"]
        assert (spec.num_kv_heads, spec.head_dim, spec.latent_value_dim) == (1, row, MINICPM3_MLA["kv_lora_rank"])
        assert pool.keys_only and pool.v == []
        assert [tuple(k.shape[1:]) for k in pool.k] == [(1, row)] * spec.num_layers
    else:
        assert not pool.keys_only and len(pool.v) == len(pool.k) == spec.num_layers


def test_prefill_logits_match_reference(remote):
    _, _, runner, reference = remote
    for prompt, logits in zip(PROMPTS, runner_logits(runner, PROMPTS)):
        assert relative_max_error(logits, reference(prompt)) < 1e-4


def test_batched_greedy_decoding_matches_reference(remote):
    """Each greedy token is the reference's argmax after the prompt and our earlier tokens."""
    _, _, runner, reference = remote
    for prompt, output in zip(PROMPTS, PlanDriver(runner).generate(PROMPTS, NEW_TOKENS)):
        assert output == reference(prompt + output[:-1])[len(prompt) - 1:].argmax(-1).tolist()


def test_minicpm3_decodes_through_the_mla_kernel(tmp_path):
    """MiniCPM3's decode steps through the MLA backend (kernels/mla_decode.py over the latent cache, in Triton's
    interpreter on the CPU; the path CUDA takes): batched greedy tokens are the reference's."""
    pytest.importorskip("triton")
    from runtime.worker.attention.mla_backend import MlaAttentionBackend

    case, folder = CASES["MiniCPM3ForCausalLM"], str(tmp_path / "model")
    reference = case.build(folder)
    runner = load(case, folder, device="cpu")
    runner.attention = MlaAttentionBackend(runner.attention_spec, runner.kv_pool)
    for prompt, output in zip(PROMPTS, PlanDriver(runner).generate(PROMPTS, NEW_TOKENS)):
        assert output == reference(prompt + output[:-1])[len(prompt) - 1:].argmax(-1).tolist()


def worst_prefill_error(runner: ModelRunner, reference: Reference) -> float:
    return max(relative_max_error(logits.float().cpu(), reference(prompt))
               for prompt, logits in zip(PROMPTS, runner_logits(runner, PROMPTS)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bfloat16_follows_reference(checkpoint):
    """The CUDA path (Triton kernels, fused MoE, Triton attention, CUDA-graph decode) in bfloat16 is as close to the
    float32 reference as the torch path in bfloat16 on the CPU (twice its error, plus 1e-2): prefill logits, and each
    greedy token's reference logit within that of the reference's best."""
    case, folder, reference = checkpoint
    tolerance = 2 * worst_prefill_error(load(case, folder, device="cpu", dtype="bfloat16"), reference) + 1e-2
    runner = load(case, folder, device="cuda", dtype="bfloat16")
    assert worst_prefill_error(runner, reference) < tolerance
    for prompt, output in zip(PROMPTS, PlanDriver(runner).generate(PROMPTS, NEW_TOKENS)):
        expected = reference(prompt + output[:-1])[len(prompt) - 1:]
        chosen = expected.gather(1, torch.tensor(output)[:, None])[:, 0]
        assert (chosen >= expected.max(-1).values - tolerance * expected.abs().max()).all()


@pytest.mark.parametrize("name", ["BaichuanForCausalLM-13b", "MiniCPM3ForCausalLM", "Grok1ForCausalLM"])
def test_two_rank_logits_equal_the_reference(name, tmp_path):
    """Tensor parallelism over two CPU processes (tests/models/test_tp.py's worker): ALiBi slopes of each rank's
    heads, latent attention's per-head projections, GeGLU experts split by their intermediate dimension."""
    from tests.models.test_tp import PROMPTS as TP_PROMPTS
    from tests.models.test_tp import REPO_ROOT

    folder, out = str(tmp_path / "model"), str(tmp_path / "logits.safetensors")
    reference = CASES[name].build(folder)
    env = {**os.environ, "PYTHONPATH": REPO_ROOT, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "tests.models.test_tp", str(rank), folder, str(tmp_path / "store"),
                               out], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for rank in range(2)]
    for proc in procs:
        output, _ = proc.communicate(timeout=180)
        assert proc.returncode == 0, output.decode()[-3000:]
    expected = torch.cat([reference(prompt) for prompt in TP_PROMPTS])
    assert relative_max_error(load_file(out)["logits"], expected) < 1e-4


def test_every_remote_architecture_is_registered():
    assert REMOTE_ARCHITECTURES <= set(MODEL_REGISTRY)
    for alias, name in ALIASES.items():
        assert MODEL_REGISTRY[alias] is MODEL_REGISTRY[name]


def test_alibi_slopes():
    assert alibi_slopes(8) == [2.0 ** -i for i in range(1, 9)]
    assert alibi_slopes(6) == ALIBI_SLOPES_6


def test_unsupported_variants_are_refused_by_name():
    with pytest.raises(ModelConfigError, match="first ChatGLM"):
        model_config_from_hf({"architectures": ["ChatGLMModel"], "position_encoding_2d": True, "hidden_size": 64,
                              "num_attention_heads": 4, "num_layers": 2, "vocab_size": 128})
    with pytest.raises(ModelConfigError, match="residual_moe"):
        model_config_from_hf({"architectures": ["Grok1ForCausalLM"], **GROK, "num_local_experts": 4,
                              "residual_moe": True})


def write_remote_tokenizer(folder: str, with_tokenizer_json: bool, words: int = 5) -> None:
    """A tokenizer whose class is repository code (as ChatGLM's and Qwen's are), that code leaving a mark if run; with
    a tokenizer.json of specials <unk> <s> </s> and words w3, w4, ... (one token each)."""
    os.makedirs(folder, exist_ok=True)
    if with_tokenizer_json:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        vocab = {"<unk>": 0, "</s>": 1, "<s>": 2, **{f"w{i}": i for i in range(3, words)}}
        tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
        tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
        tokenizer.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "ChatGLMTokenizer", "eos_token": "</s>", "unk_token": "<unk>",
                   "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]}}, f)
    with open(os.path.join(folder, "tokenization_chatglm.py"), "w") as f:
        f.write(f"open(__file__ + {MARK!r}, 'w').close()\n")


def test_remote_tokenizer_is_read_from_tokenizer_json_without_its_code(tmp_path):
    folder = str(tmp_path / "tok")
    write_remote_tokenizer(folder, with_tokenizer_json=True)
    tokenizer = load_tokenizer(ServerArgs(model_path=folder, trust_remote_code=True))
    assert tokenizer.encode("w3 w4", add_special_tokens=False) == [3, 4]
    assert tokenizer.eos_token_id == 1
    assert not [name for name in os.listdir(folder) if name.endswith(MARK)]


def test_remote_tokenizer_without_tokenizer_json_is_refused(tmp_path):
    folder = str(tmp_path / "tok")
    write_remote_tokenizer(folder, with_tokenizer_json=False)
    with pytest.raises(TokenizerLoadError, match="tokenization_chatglm.ChatGLMTokenizer.*never runs"):
        load_tokenizer(ServerArgs(model_path=folder, trust_remote_code=True))
    assert not [name for name in os.listdir(folder) if name.endswith(MARK)]


@pytest.fixture(scope="module")
def served_chatglm(tmp_path_factory):
    """`python -m runtime --trust-remote-code` on the tiny ChatGLM with its repository-code tokenizer."""
    from tests.e2e.test_server import Server

    folder = str(tmp_path_factory.mktemp("chatglm-served"))
    reference = chatglm(folder)
    write_remote_tokenizer(folder, with_tokenizer_json=True, words=128)
    server = Server(tmp_path_factory.mktemp("server") / "server.log", "--model-path", folder, "--trust-remote-code",
                    "--device", "cpu", "--max-running-requests", "8", "--max-total-tokens", "1024",
                    ready_line=f"Ready: serving {folder} at ")
    try:
        server.wait_ready()
        yield server, folder, reference
        server.proc.send_signal(signal.SIGTERM)  # a clean stop frees the shared memory
        assert server.proc.wait(60) == 0, server.output()[-3000:]
    finally:
        server.kill()


def test_served_from_text_with_reference_greedy_tokens_and_no_repository_code(served_chatglm):
    server, folder, reference = served_chatglm
    prompts = ["w5 w17 w33 w9 w90", "w8 w8 w21"]  # words only (ids 0-2 are the specials)
    status, out = server.post("/generate", {"text": prompts, "sampling_params": {
        "temperature": 0, "max_new_tokens": 6, "ignore_eos": True}})
    assert status == 200, out
    for prompt, answer in zip(prompts, out):
        ids = [int(word[1:]) for word in prompt.split()]
        output = answer["output_ids"]
        assert output == reference(ids + output[:-1])[len(ids) - 1:].argmax(-1).tolist()
        assert answer["text"].split() == [f"w{i}" for i in output if i >= 3]
    assert not [name for name in os.listdir(folder) if name.endswith(MARK)]
