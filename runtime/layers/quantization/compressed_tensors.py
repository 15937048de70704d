"""compressed-tensors checkpoints (llm-compressor's output, `"quant_method": "compressed-tensors"`), read with the
`compressed-tensors` library: its pydantic QuantizationConfig parses and validates the config, and its matcher
decides which scheme targets a layer and which layers are ignored ("re:" patterns included).

Served: fp8 (float, 8 bits) weights per tensor, per channel or per block, with fp8 activations that are static per
tensor or dynamic (per token or per tensor); `kv_cache_scheme` fp8 (its k_scale / v_scale are read by the loader).
Anything else (int4/int8 weights, weight-only fp8, sparse formats) is refused naming the scheme.
"""

from __future__ import annotations

from dataclasses import dataclass

from runtime.layers.linear import LinearBase
from runtime.layers.quantization.base import (
    LinearMethod,
    QuantizationConfigError,
    checkpoint_names,
    is_skipped,
)
from runtime.layers.quantization.fp8_linear import Fp8BlockMethod, Fp8PerChannelMethod, Fp8PerTensorMethod

FORMATS = ("float-quantized", "naive-quantized")


def _name(value) -> str:
    """An enum field's value (the library's models may keep enums or their string values)."""
    return str(getattr(value, "value", value))


def _describe(args) -> str:
    return "none" if args is None else (f"{_name(args.type)} {args.num_bits}-bit {_name(args.strategy)} "
                                        f"{'dynamic' if args.dynamic else 'static'}")


def method_for_scheme(scheme) -> LinearMethod:
    """The fp8 linear method of one compressed-tensors QuantizationScheme."""
    weights, inputs = scheme.weights, scheme.input_activations
    why = f"weights {_describe(weights)}, input activations {_describe(inputs)}"

    def is_fp8(args) -> bool:
        return args is not None and _name(args.type) == "float" and args.num_bits == 8

    if not is_fp8(weights) or not is_fp8(inputs) or scheme.output_activations is not None:
        raise QuantizationConfigError(f"compressed-tensors scheme ({why}) is not served: only fp8 weights with fp8 "
                                      f"input activations are")
    strategy, dynamic = _name(weights.strategy), bool(inputs.dynamic)
    if strategy == "tensor":
        if not dynamic and _name(inputs.strategy) != "tensor":
            raise QuantizationConfigError(f"compressed-tensors scheme ({why}): static activation scales must be "
                                          f"per tensor")
        return Fp8PerTensorMethod(static_activations=not dynamic)
    if strategy == "channel" and dynamic:
        return Fp8PerChannelMethod()
    if strategy == "block" and dynamic and weights.block_structure and len(weights.block_structure) == 2:
        return Fp8BlockMethod(tuple(weights.block_structure), scale_name="weight_scale")
    raise QuantizationConfigError(f"compressed-tensors scheme ({why}) is not served: per-channel and block-wise "
                                  f"weights need dynamic activations")


@dataclass(frozen=True)
class CompressedTensorsConfig:
    config: object  # compressed_tensors.QuantizationConfig
    name: str = "compressed-tensors"

    @classmethod
    def from_checkpoint(cls, raw: dict) -> CompressedTensorsConfig:
        from compressed_tensors.quantization import QuantizationConfig
        from pydantic import ValidationError

        try:
            config = QuantizationConfig.model_validate(raw)
        except ValidationError as err:
            raise QuantizationConfigError(f"compressed-tensors quantization_config is invalid: {err}") from None
        if config.format not in FORMATS:
            raise QuantizationConfigError(f"compressed-tensors format {config.format!r} is not served (only "
                                          f"{', '.join(FORMATS)})")
        kv = config.kv_cache_scheme
        if kv is not None and not (_name(kv.type) == "float" and kv.num_bits == 8):
            raise QuantizationConfigError(f"compressed-tensors kv_cache_scheme ({_describe(kv)}) is not served: only "
                                          f"fp8")
        for scheme in config.config_groups.values():
            method_for_scheme(scheme)  # refuse unserved schemes at start-up, not at the first matching layer
        return cls(config)

    def linear_method(self, prefix: str, layer: LinearBase,
                      packed_modules: dict[str, list[str]]) -> LinearMethod | None:
        from compressed_tensors.utils.match import is_match, match_name

        ignore = self.config.ignore or []
        if is_skipped(prefix, packed_modules, lambda name: any(match_name(name, i) for i in ignore)):
            return None
        names = checkpoint_names(prefix, packed_modules)
        for group, scheme in self.config.config_groups.items():
            hits = [is_match(name, layer, scheme.targets) for name in names]
            if all(hits):
                return method_for_scheme(scheme)
            if any(hits):
                raise QuantizationConfigError(f"compressed-tensors group {group} targets only some parts of {prefix}")
        return None
