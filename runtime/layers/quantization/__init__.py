"""Quantization: one method per file, chosen per linear layer.

- fp8.py: `--quantization fp8` (online) and `"quant_method": "fp8"` checkpoints (per-tensor, block-wise)
- fbgemm_fp8.py: Meta's Llama-3.1-FP8 checkpoints
- compressed_tensors.py: llm-compressor checkpoints, read with the compressed-tensors library
- torchao.py: `--torchao-config`, applied after loading with the torchao library
- kv_cache.py: `--kv-cache-dtype` and the per-layer k/v scales
- fp8_moe.py: `--quantization fp8` on MoE experts (FusedMoE)
- fp8_linear.py / fp8_ops.py: the fp8 linear methods and the quantize / GEMM primitives they share

The loader calls `quant_config_for(flag, checkpoint config)`, then `attach(model, config)` before reading the
weights and `finish(model)` after.
"""

from __future__ import annotations

from torch import nn

from runtime.layers.quantization.base import DEFAULT_PACKED_MODULES, QuantConfig, QuantizationConfigError

QUANTIZATION_METHODS = ("fp8", "fbgemm_fp8", "compressed-tensors")

__all__ = ["QUANTIZATION_METHODS", "QuantConfig", "QuantizationConfigError", "attach", "finish", "quant_config_for"]


def quant_config_for(flag: str | None, checkpoint_config: dict | None) -> QuantConfig | None:
    """The quantization of this run, from --quantization and the checkpoint's quantization_config.

    No flag: whatever the checkpoint says (None for an unquantized one). `fp8` on an unquantized checkpoint
    quantizes online; on a quantized one the flag must name the checkpoint's own method."""
    from runtime.layers.quantization.compressed_tensors import CompressedTensorsConfig
    from runtime.layers.quantization.fbgemm_fp8 import FbgemmFp8Config
    from runtime.layers.quantization.fp8 import Fp8Config

    if flag is not None and flag not in QUANTIZATION_METHODS:
        raise QuantizationConfigError(f"--quantization must be one of {', '.join(QUANTIZATION_METHODS)}; got {flag!r}")
    if checkpoint_config is None:
        if flag is None:
            return None
        if flag != "fp8":
            raise QuantizationConfigError(f"--quantization {flag} needs a checkpoint quantized with {flag}; this "
                                          f"one has no quantization_config (use --quantization fp8 to quantize it "
                                          f"at load)")
        return Fp8Config.online_config()
    method = checkpoint_config.get("quant_method")
    if flag is not None and flag != method:
        raise QuantizationConfigError(f"--quantization {flag} does not match the checkpoint's quantization_config "
                                      f"quant_method {method!r}")
    parsers = {"fp8": Fp8Config.from_checkpoint, "fbgemm_fp8": FbgemmFp8Config.from_checkpoint,
               "compressed-tensors": CompressedTensorsConfig.from_checkpoint}
    if method not in parsers:
        raise QuantizationConfigError(f"checkpoint quantization_config quant_method {method!r} is not supported; "
                                      f"supported: {', '.join(parsers)}")
    return parsers[method](checkpoint_config)


def attach(model: nn.Module, config: QuantConfig) -> None:
    """Give each linear layer its method (before the weights are loaded): its parameters take the checkpoint's
    quantized shapes and dtypes. MoE experts are quantized by online fp8 only; checkpoints with quantized experts
    are refused."""
    from runtime.layers.linear import LinearBase
    from runtime.layers.moe import FusedMoE
    from runtime.layers.quantization.fp8 import Fp8Config

    packed = getattr(model, "packed_modules_mapping", DEFAULT_PACKED_MODULES)
    for name, module in model.named_modules():
        if isinstance(module, LinearBase):
            method = config.linear_method(name, module, packed)
            if method is not None:
                module.set_quant_method(method)
        elif isinstance(module, FusedMoE):
            if not (isinstance(config, Fp8Config) and config.online):
                raise QuantizationConfigError(f"{config.name} checkpoints of mixture-of-experts models are not "
                                              f"supported ({name} would need quantized experts); serve the "
                                              f"16-bit checkpoint with --quantization fp8 instead")
            module.quantize_online = True


def finish(model: nn.Module) -> None:
    """After loading: let each quantized layer prepare what its matmul reads."""
    from runtime.layers.linear import LinearBase
    from runtime.layers.moe import FusedMoE
    from runtime.layers.quantization.fp8_moe import quantize_experts

    for module in model.modules():
        if isinstance(module, LinearBase) and module.quant_method is not None:
            module.quant_method.process_weights_after_loading(module)
        elif isinstance(module, FusedMoE) and module.quantize_online:
            quantize_experts(module)
