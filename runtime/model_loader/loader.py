"""load_model: find the checkpoint, read its config, build the model on the device, fill the weights.

Formats (`load_format`):
- "safetensors": an HF folder with config.json, *.safetensors (sharded via model.safetensors.index.json)
  and optionally generation_config.json (its eos ids count as stop tokens too).
- "gguf": a .gguf file, or a folder holding one; config and eos ids from the metadata.
- "dummy": the architecture from config.json (or GGUF metadata), random weights (see dummy.py).
- "auto": gguf for a .gguf path or a folder with a .gguf and no safetensors; else safetensors.

dtype "auto": float32 on the CPU; on a GPU the checkpoint's torch_dtype when it is float16 or
bfloat16, else bfloat16 (float32 checkpoints and GGUF files, whose weights dequantize to float32).

Quantization (docs/quantization.md): the checkpoint's `quantization_config` (or --quantization) gives each linear
layer its method before the weights are read; after reading, the methods prepare their tensors (online fp8
quantizes here) and --torchao-config converts the layers with torchao. KV-cache scales found in the checkpoint are
taken out of the stream into the caller's KVCacheScales.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from runtime.default_model import default_model_path
from runtime.layers import quantization
from runtime.layers.parallel import TensorParallel
from runtime.layers.quantization.kv_cache import KVCacheScales
from runtime.layers.quantization.torchao import apply_torchao
from runtime.model_loader.dummy import init_dummy_weights
from runtime.model_loader.gguf_file import gguf_model_config, iterate_gguf_weights, open_gguf
from runtime.model_loader.safetensors_files import iterate_safetensors, safetensors_files
from runtime.models import model_class, model_config_from_hf
from runtime.models.config import ModelConfig, read_hf_folder

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Checkpoint:
    """Where the weights are and how to read them."""

    format: str  # "safetensors" | "gguf"
    path: str  # the folder (safetensors) or the .gguf file
    _gguf: list = field(default_factory=list, repr=False, compare=False)  # the parsed GGUF file, once opened

    def gguf_reader(self):
        """The GGUF file, parsed once for the config and the weights: parsing its metadata (the whole
        vocabulary is in it) is most of a small model's start-up."""
        if not self._gguf:
            self._gguf.append(open_gguf(self.path))
        return self._gguf[0]


def locate_checkpoint(model_path: str | None, load_format: str) -> Checkpoint:
    """Resolve the path and the format (for "dummy", the format the config is read from)."""
    if load_format not in ("auto", "safetensors", "gguf", "dummy"):
        raise ValueError(f"load_format must be one of auto, safetensors, gguf, dummy; got {load_format!r}")
    path = model_path or default_model_path()
    if not os.path.exists(path):
        raise FileNotFoundError(f"model path {path} does not exist")
    if os.path.isfile(path):
        if path.endswith(".gguf") and load_format in ("auto", "gguf", "dummy"):
            return Checkpoint("gguf", path)
        raise ValueError(f"model path {path} is a file: only .gguf files are loaded directly "
                         f"(with load_format auto or gguf); pass the folder of an HF checkpoint")
    gguf_files = sorted(glob.glob(os.path.join(path, "*.gguf")))
    has_config = os.path.isfile(os.path.join(path, "config.json"))
    if load_format == "auto":
        use_gguf = bool(gguf_files) and not safetensors_files(path)
    elif load_format == "dummy":
        use_gguf = bool(gguf_files) and not has_config
    else:
        use_gguf = load_format == "gguf"
    if use_gguf:
        if len(gguf_files) != 1:
            raise FileNotFoundError(f"expected exactly one .gguf file in {path}, found {len(gguf_files)}; "
                                    f"pass the file itself as the model path")
        return Checkpoint("gguf", gguf_files[0])
    if not has_config:
        raise FileNotFoundError(f"no config.json in model folder {path}")
    if load_format != "dummy" and not safetensors_files(path):
        raise FileNotFoundError(f"no *.safetensors weights in model folder {path}")
    return Checkpoint("safetensors", path)


def read_model_config(checkpoint: Checkpoint, override: dict | None = None) -> ModelConfig:
    """The model's facts; `override` (--json-model-override-args) replaces config.json's keys, as SGLang does."""
    if checkpoint.format == "gguf":
        if override:
            raise ValueError("--json-model-override-args applies to config.json; a GGUF checkpoint has none")
        return gguf_model_config(checkpoint.gguf_reader())
    config, generation_config = read_hf_folder(checkpoint.path)
    return model_config_from_hf({**config, **(override or {})}, generation_config)


def resolve_dtype(dtype: str, config: ModelConfig, device: torch.device) -> torch.dtype:
    if dtype != "auto":
        aliases = {"half": "float16", "fp16": "float16", "bf16": "bfloat16", "float": "float32", "fp32": "float32"}
        name = aliases.get(dtype, dtype)
        if name not in DTYPES:
            raise ValueError(f"dtype must be auto or one of {', '.join(DTYPES)}; got {dtype!r}")
        return DTYPES[name]
    if device.type == "cpu":
        return torch.float32
    return DTYPES[config.torch_dtype] if config.torch_dtype in ("float16", "bfloat16") else torch.bfloat16


def read_quantization_config(checkpoint: Checkpoint) -> dict | None:
    """config.json's quantization_config (compression_config in older compressed-tensors checkpoints)."""
    if checkpoint.format == "gguf":
        return None
    with open(os.path.join(checkpoint.path, "config.json")) as f:
        config = json.load(f)
    return config.get("quantization_config") or config.get("compression_config")


def load_model(checkpoint: Checkpoint, config: ModelConfig, load_format: str, dtype: torch.dtype,
               device: torch.device, max_positions: int, tp: TensorParallel, seed: int, *,
               quantization_flag: str | None = None, torchao_config: str = "",
               kv_scales: KVCacheScales | None = None) -> nn.Module:
    model = model_class(config.architecture)(config, max_positions, tp, dtype, device)
    quant_config = quantization.quant_config_for(quantization_flag, read_quantization_config(checkpoint))
    if quant_config is not None and torchao_config:
        raise quantization.QuantizationConfigError(
            f"--torchao-config {torchao_config} cannot convert a model already quantized ({quant_config.name}"
            f"{' from its checkpoint' if quantization_flag is None else ' by --quantization'})")
    if quant_config is not None:
        quantization.attach(model, quant_config)
    if load_format == "dummy":
        init_dummy_weights(model, seed)
    else:
        if checkpoint.format == "gguf":
            weights = iterate_gguf_weights(checkpoint.gguf_reader(), config)
        else:
            weights = iterate_safetensors(safetensors_files(checkpoint.path))
        loaded = model.load_weights((kv_scales or KVCacheScales.ones(config.num_layers)).take_from(weights))
        missing = sorted(set(dict(model.named_parameters())) - loaded)
        if missing:
            shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
            raise ValueError(f"checkpoint {checkpoint.path} lacks tensors for: {shown}")
    quantization.finish(model)
    if torchao_config:
        apply_torchao(model, torchao_config, device, dtype)
    if device.type == "cuda" and (quant_config is not None or torchao_config):
        torch.cuda.empty_cache()  # the replaced 16-bit weights' memory goes back to the KV pool's sizing
    return model.eval()
