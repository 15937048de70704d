"""fbgemm_fp8: Meta's Llama-3.1-*-FP8 checkpoints. Weights fp8 with one scale per output channel (`weight_scale`
[out, 1]); activations quantized per token at run time, each token's amax capped at `activation_scale_ub`.
`modules_to_not_convert` lists the layers kept in bf16 (lm_head, and in the 405B the first and last layers)."""

from __future__ import annotations

from dataclasses import dataclass, field

from runtime.layers.linear import LinearBase
from runtime.layers.quantization.base import LinearMethod, QuantizationConfigError, is_skipped
from runtime.layers.quantization.fp8 import matches_prefix
from runtime.layers.quantization.fp8_linear import Fp8PerChannelMethod

KNOWN_KEYS = {"quant_method", "activation_scale_ub", "modules_to_not_convert"}


@dataclass(frozen=True)
class FbgemmFp8Config:
    activation_scale_ub: float | None
    ignored: list[str] = field(default_factory=list)
    name: str = "fbgemm_fp8"

    @classmethod
    def from_checkpoint(cls, config: dict) -> FbgemmFp8Config:
        unknown = set(config) - KNOWN_KEYS
        if unknown:
            raise QuantizationConfigError(f"fbgemm_fp8 quantization_config has keys this server does not "
                                          f"understand: {', '.join(sorted(unknown))}")
        ub = config.get("activation_scale_ub")
        if ub is not None and not (isinstance(ub, (int, float)) and ub > 0):
            raise QuantizationConfigError(f"fbgemm_fp8 activation_scale_ub {ub!r} must be a positive number")
        return cls(activation_scale_ub=None if ub is None else float(ub),
                   ignored=list(config.get("modules_to_not_convert") or []))

    def linear_method(self, prefix: str, layer: LinearBase,
                      packed_modules: dict[str, list[str]]) -> LinearMethod | None:
        if is_skipped(prefix, packed_modules, lambda name: matches_prefix(name, self.ignored)):
            return None
        return Fp8PerChannelMethod(activation_scale_ub=self.activation_scale_ub)
