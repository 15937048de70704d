"""ModelConfig: the facts about a checkpoint that model execution needs, from a HF config.json dict
(plus generation_config.json) or from GGUF metadata (see gguf_file.py), validated in one place."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from runtime.layers.rotary import RopeConfig

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "LlamaModel", "MistralModel",
                           "Qwen2Model")
# The bare decoder (no LM head) of each causal LM: what --is-embedding serves, and what bare checkpoints name.
EMBEDDING_ARCHITECTURES = {"LlamaForCausalLM": "LlamaModel", "MistralForCausalLM": "MistralModel",
                           "Qwen2ForCausalLM": "Qwen2Model"}


class ModelConfigError(ValueError):
    pass


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_proj_bias: bool
    mlp_bias: bool
    sliding_window: int | None
    torch_dtype: str | None  # the checkpoint's dtype name, e.g. "bfloat16"
    eos_token_ids: tuple[int, ...]

    @classmethod
    def from_hf(cls, config: dict, generation_config: dict | None = None) -> ModelConfig:
        architectures = config.get("architectures") or []
        supported = [a for a in architectures if a in SUPPORTED_ARCHITECTURES]
        if not supported:
            raise ModelConfigError(f"unsupported architecture {architectures or '(none in config.json)'}; "
                                   f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        architecture = supported[0]
        family = {bare: causal for causal, bare in EMBEDDING_ARCHITECTURES.items()}.get(architecture, architecture)
        if config.get("hidden_act", "silu") != "silu":
            raise ModelConfigError(f"hidden_act {config['hidden_act']!r} is not supported (only silu)")
        try:
            num_heads = int(config["num_attention_heads"])
            hidden_size = int(config["hidden_size"])
            head_dim = int(config.get("head_dim") or hidden_size // num_heads)
            fields = dict(
                architecture=architecture,
                vocab_size=int(config["vocab_size"]),
                hidden_size=hidden_size,
                intermediate_size=int(config["intermediate_size"]),
                num_layers=int(config["num_hidden_layers"]),
                num_heads=num_heads,
                num_kv_heads=int(config.get("num_key_value_heads") or num_heads),
                head_dim=head_dim,
                rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
                rope=RopeConfig.from_hf(config),
                max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
                qkv_bias=family == "Qwen2ForCausalLM" or bool(config.get("attention_bias", False)),
                o_proj_bias=family != "Qwen2ForCausalLM" and bool(config.get("attention_bias", False)),
                mlp_bias=bool(config.get("mlp_bias", False)),
                sliding_window=_sliding_window(family, config),
                torch_dtype=config.get("torch_dtype") or config.get("dtype"),
                eos_token_ids=_eos_ids(config, generation_config),
            )
        except KeyError as missing:
            raise ModelConfigError(f"config.json lacks {missing.args[0]!r}") from None
        return cls(**fields)

    @classmethod
    def from_hf_folder(cls, folder: str) -> ModelConfig:
        config_path = os.path.join(folder, "config.json")
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"no config.json in model folder {folder}")
        with open(config_path) as f:
            config = json.load(f)
        generation_config = None
        generation_path = os.path.join(folder, "generation_config.json")
        if os.path.isfile(generation_path):
            with open(generation_path) as f:
                generation_config = json.load(f)
        return cls.from_hf(config, generation_config)


def _eos_ids(config: dict, generation_config: dict | None) -> tuple[int, ...]:
    """Union of the config's and the generation config's eos ids (either may be an int or a list)."""
    ids: list[int] = []
    for source in (config, generation_config or {}):
        value = source.get("eos_token_id")
        for token_id in value if isinstance(value, list) else [value]:
            if token_id is not None and token_id not in ids:
                ids.append(int(token_id))
    return tuple(ids)


def _sliding_window(architecture: str, config: dict) -> int | None:
    if architecture == "MistralForCausalLM":
        window = config.get("sliding_window")
        return int(window) if window else None
    if architecture == "Qwen2ForCausalLM" and config.get("use_sliding_window"):
        # Qwen2 applies its window only to layers >= max_window_layers; no released checkpoint enables it.
        raise ModelConfigError("Qwen2 with use_sliding_window=true is not supported")
    return None
