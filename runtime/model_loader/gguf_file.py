"""GGUF checkpoints (llama.cpp's format): model config from the metadata, weights dequantized with the
`gguf` package and renamed to the HF names our models load.

llama.cpp stores the Q and K projections of Llama models with the rows of every head interleaved
for its own rope layout (the two halves of each head alternate). `_unpermute_rows` restores the HF
order, in which the first half of a head's rows are the "real" parts and the second half the
"imaginary" parts.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import numpy as np
import torch
from tqdm import tqdm

from runtime.models import model_config_from_hf
from runtime.models.config import ModelConfig, ModelConfigError

GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}

GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
BLOCK_PATTERN = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")


def open_gguf(path: str):
    import gguf

    return gguf.GGUFReader(path)


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_model_config(reader) -> ModelConfig:
    return model_config_from_hf(gguf_hf_config(reader))


def gguf_hf_config(reader) -> dict:
    """The file's metadata as an HF config.json dict (what ModelConfig.from_hf reads)."""
    arch = _field(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ModelConfigError(f"unsupported GGUF architecture {arch!r}; supported: {', '.join(GGUF_ARCHITECTURES)}")
    num_heads = _field(reader, f"{arch}.attention.head_count")
    hidden_size = _field(reader, f"{arch}.embedding_length")
    vocab_size = _field(reader, f"{arch}.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    config = {
        "architectures": [GGUF_ARCHITECTURES[arch]],
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": _field(reader, f"{arch}.feed_forward_length"),
        "num_hidden_layers": _field(reader, f"{arch}.block_count"),
        "num_attention_heads": num_heads,
        "num_key_value_heads": _field(reader, f"{arch}.attention.head_count_kv", num_heads),
        "head_dim": _field(reader, f"{arch}.attention.key_length", hidden_size // num_heads),
        "rms_norm_eps": _field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": _field(reader, f"{arch}.rope.freq_base", 10000.0),
        "max_position_embeddings": _field(reader, f"{arch}.context_length", 2048),
        "tie_word_embeddings": not any(t.name == "output.weight" for t in reader.tensors),
        "eos_token_id": [token_id for key in ("eos_token_id", "eot_token_id", "eom_token_id")
                         if (token_id := _field(reader, f"tokenizer.ggml.{key}")) is not None],
    }
    scaling_type = _field(reader, f"{arch}.rope.scaling.type")
    if scaling_type not in (None, "none"):
        config["rope_scaling"] = {"rope_type": scaling_type, "factor": _field(reader, f"{arch}.rope.scaling.factor")}
    if any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise ModelConfigError("GGUF tensor rope_freqs.weight (Llama 3.1 rope scaling) is not supported; "
                               "load the HF safetensors checkpoint instead")
    return config


def gguf_weight_name(name: str) -> str:
    if name in GLOBAL_NAMES:
        return GLOBAL_NAMES[name]
    match = BLOCK_PATTERN.match(name)
    if match is None or match.group(2) not in BLOCK_NAMES:
        raise KeyError(f"GGUF tensor {name} is not understood")
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{BLOCK_NAMES[part]}.{kind}"


def _unpermute_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    # llama.cpp: w.reshape(H, 2, D/2, ...).swapaxes(1, 2); this is the inverse
    shape = w.shape
    return w.reshape(num_heads, shape[0] // num_heads // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def iterate_gguf_weights(reader, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, float32 CPU tensor) for every tensor of the file, dequantized, in file order."""
    from gguf.quants import dequantize

    permuted_heads = {}
    if config.architecture == "LlamaForCausalLM":
        permuted_heads = {"self_attn.q_proj": config.num_heads, "self_attn.k_proj": config.num_kv_heads}
    for tensor in tqdm(reader.tensors, desc="Loading GGUF weights", unit="tensor"):
        name = gguf_weight_name(tensor.name)
        values = dequantize(tensor.data, tensor.tensor_type)
        values = values.reshape(tuple(int(d) for d in reversed(tensor.shape)))  # ggml lists dims innermost first
        for module, heads in permuted_heads.items():
            if f".{module}." in name:
                values = _unpermute_rows(values, heads)
        yield name, torch.from_numpy(np.array(values, dtype=np.float32))
