"""ModelConfig: the facts about a checkpoint that model execution needs, from a HF config.json dict
(plus generation_config.json) or from GGUF metadata (see gguf_file.py), validated in one place.

The fields are the ones every decoder has. Facts of one family (experts, soft-capping, norm placement...) are read
by that family's model file from `hf`, the config.json dict itself, so adding an architecture never widens this
class. Families whose config.json names the common facts differently (DBRX's d_model, Exaone's num_layers) rename
them in their `standard_config` hook before this parser runs (runtime/models/__init__.py).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from runtime.layers.rotary import RopeConfig

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
    norm_eps: float  # RMSNorm's or LayerNorm's epsilon
    rope: RopeConfig
    rotary_dim: int  # leading dimensions of each head that rotate (partial rotary: < head_dim)
    max_position_embeddings: int  # the default context (RopeConfig.default_context_length)
    longest_context_length: int  # the most an explicit context length may be (RopeConfig.longest_context_length)
    tie_word_embeddings: bool
    qkv_bias: bool
    o_proj_bias: bool
    mlp_bias: bool
    hidden_act: str
    sliding_window: int | None
    sliding_window_layers: tuple[int, ...] | None  # the layers that use the window; None: all of them
    torch_dtype: str | None  # the checkpoint's dtype name, e.g. "bfloat16"
    eos_token_ids: tuple[int, ...]
    hf: dict = field(default_factory=dict, compare=False, repr=False)  # config.json, for family-specific facts

    @classmethod
    def from_hf(cls, config: dict, generation_config: dict | None = None,
                architecture: str | None = None) -> ModelConfig:
        architecture = architecture or (config.get("architectures") or [None])[0]
        if architecture is None:
            raise ModelConfigError("config.json names no architecture (its `architectures` list is empty)")
        try:
            num_heads = int(config["num_attention_heads"])
            hidden_size = int(config["hidden_size"])
            head_dim = int(config.get("head_dim") or hidden_size // num_heads)
            rope = RopeConfig.from_hf(config)
            max_positions = int(config.get("max_position_embeddings", 2048))
            fields = dict(
                architecture=architecture,
                vocab_size=int(config["vocab_size"]),
                hidden_size=hidden_size,
                intermediate_size=int(config.get("intermediate_size") or 0),
                num_layers=int(config["num_hidden_layers"]),
                num_heads=num_heads,
                num_kv_heads=int(config.get("num_key_value_heads") or num_heads),
                head_dim=head_dim,
                norm_eps=float(_first(config, ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon"), 1e-6)),
                rope=rope,
                rotary_dim=_rotary_dim(config, head_dim),
                max_position_embeddings=rope.default_context_length(max_positions),
                longest_context_length=rope.longest_context_length(max_positions),
                tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
                qkv_bias=bool(_first(config, ("qkv_bias", "attention_bias"), False)),
                o_proj_bias=bool(config.get("attention_bias", False)),
                mlp_bias=bool(config.get("mlp_bias", False)),
                hidden_act=str(_first(config, ("hidden_act", "hidden_activation"), "silu")),
                **_sliding_window(config, int(config["num_hidden_layers"])),
                torch_dtype=config.get("torch_dtype") or config.get("dtype"),
                eos_token_ids=_eos_ids(config, generation_config),
                hf=config,
            )
        except KeyError as missing:
            raise ModelConfigError(f"config.json lacks {missing.args[0]!r}") from None
        return cls(**fields)


def read_hf_folder(folder: str) -> tuple[dict, dict | None]:
    """(config.json, generation_config.json or None) of an HF checkpoint folder."""
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
    return config, generation_config


def _first(config: dict, keys: tuple[str, ...], default):
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    return default


def _rotary_dim(config: dict, head_dim: int) -> int:
    """transformers 5 puts partial_rotary_factor in rope_parameters, older configs at the top level."""
    params = config.get("rope_parameters") or {}
    factor = params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    return int(head_dim * float(factor or 1.0))


def _sliding_window(config: dict, num_layers: int) -> dict:
    """`sliding_window` (unless `use_sliding_window` is false, as in Qwen2 configs); with `layer_types`, only the
    "sliding_attention" layers use it."""
    window = config.get("sliding_window") if config.get("use_sliding_window", True) else None
    layer_types = config.get("layer_types")
    if not window:
        return {"sliding_window": None, "sliding_window_layers": None}
    if layer_types is None:
        return {"sliding_window": int(window), "sliding_window_layers": None}
    if len(layer_types) != num_layers:
        raise ModelConfigError(f"config.json lists {len(layer_types)} layer_types for {num_layers} layers")
    sliding = tuple(i for i, kind in enumerate(layer_types) if kind == "sliding_attention")
    if not sliding:
        return {"sliding_window": None, "sliding_window_layers": None}
    return {"sliding_window": int(window), "sliding_window_layers": None if len(sliding) == num_layers else sliding}


def _eos_ids(config: dict, generation_config: dict | None) -> tuple[int, ...]:
    """Union of the config's and the generation config's eos ids (either may be an int or a list)."""
    ids: list[int] = []
    for source in (config, generation_config or {}):
        value = source.get("eos_token_id")
        for token_id in value if isinstance(value, list) else [value]:
            if token_id is not None and token_id not in ids:
                ids.append(int(token_id))
    return tuple(ids)
