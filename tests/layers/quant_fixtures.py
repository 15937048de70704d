"""Quantized checkpoints made here from a tiny random transformers model: each format written the way its
producer writes it, beside a reference folder holding the same weights dequantized (so the two differ only by the
activation quantization that the quantized model does at run time)."""

from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors.torch import load_file, save_file

from runtime.layers.quantization.fp8_ops import FP8, FP8_MAX, expand_blocks, quantize_blocks, quantize_per_channel

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BLOCK = [16, 16]

# format -> config.json quantization_config
CONFIGS = {
    "fp8-static": {"quant_method": "fp8", "activation_scheme": "static"},
    "fp8-dynamic": {"quant_method": "fp8", "activation_scheme": "dynamic", "modules_to_not_convert": ["layers.1.mlp"]},
    "fp8-block": {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": BLOCK},
    "fbgemm_fp8": {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0,
                   "modules_to_not_convert": ["lm_head", "model.layers.0.self_attn.q_proj",
                                              "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"]},
    "compressed-tensors": {
        "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False},
            "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True,
                                  "dynamic": True}}},
        "kv_cache_scheme": {"num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": True,
                            "dynamic": False},
        "ignore": ["lm_head", "re:.*layers\\.1\\.self_attn\\.o_proj$"]},
    "compressed-tensors-tensor": {
        "quant_method": "compressed-tensors", "format": "float-quantized",
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False},
            "input_activations": {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False}}},
        "ignore": ["lm_head"]},
}
KV_SCALES = (0.5, 0.25)  # k, v scales written by the compressed-tensors checkpoint


def _ignored(fmt: str, name: str) -> bool:
    module = name.removesuffix(".weight")
    config = CONFIGS[fmt]
    if fmt.startswith("compressed-tensors"):
        return any(module == p or (p.startswith("re:") and __import__("re").match(p[3:], module))
                   for p in config.get("ignore", []))
    return any(f".{p}." in f".{module}." for p in config.get("modules_to_not_convert", []))


def _quantize(fmt: str, name: str, weight: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The checkpoint tensors of one linear weight in `fmt`, and its dequantized value."""
    base = name.removesuffix("weight")
    if fmt in ("fp8-static", "fp8-dynamic", "compressed-tensors-tensor"):
        scale = weight.abs().amax().float() / FP8_MAX
        q = (weight.float() / scale).to(FP8)
        out = {name: q, base + "weight_scale": scale.reshape(() if fmt.startswith("fp8") else (1,))}
        if fmt != "fp8-dynamic":
            # static activation scales: q/k/v (and gate/up) get different ones, the loader must take the largest
            out[base + "input_scale"] = torch.tensor(16.0 + len(name) % 3, dtype=torch.float32).reshape(
                () if fmt.startswith("fp8") else (1,)) / FP8_MAX
        return out, q.float() * scale
    if fmt == "fp8-block":
        q, scale = quantize_blocks(weight, tuple(BLOCK))
        return {name: q, base + "weight_scale_inv": scale}, q.float() * expand_blocks(scale, tuple(BLOCK), q.shape)
    q, scale = quantize_per_channel(weight)
    return {name: q, base + "weight_scale": scale[:, None]}, q.float() * scale[:, None]


def write_quantized(src: str, fmt: str, dst: str, reference: str) -> None:
    """`dst`: the checkpoint in `fmt`; `reference`: the same weights dequantized, unquantized config."""
    tensors = load_file(os.path.join(src, "model.safetensors"))
    quantized, dequantized = {}, {}
    for name, tensor in tensors.items():
        is_linear = any(name.endswith(f".{linear}.weight") for linear in LINEARS)
        if not is_linear or _ignored(fmt, name):
            quantized[name] = dequantized[name] = tensor
            continue
        parts, value = _quantize(fmt, name, tensor)
        quantized.update(parts)
        dequantized[name] = value.to(tensor.dtype)
    if fmt == "compressed-tensors":
        for layer in range(2):
            quantized[f"model.layers.{layer}.self_attn.k_scale"] = torch.tensor([KV_SCALES[0]])
            quantized[f"model.layers.{layer}.self_attn.v_scale"] = torch.tensor([KV_SCALES[1]])
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    for folder, weights, quant in ((dst, quantized, CONFIGS[fmt]), (reference, dequantized, None)):
        os.makedirs(folder, exist_ok=True)
        for extra in os.listdir(src):
            if extra not in ("model.safetensors", "config.json"):
                shutil.copy(os.path.join(src, extra), folder)
        save_file({k: v.contiguous() for k, v in weights.items()}, os.path.join(folder, "model.safetensors"))
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump({**config, "quantization_config": quant} if quant else config, f)
