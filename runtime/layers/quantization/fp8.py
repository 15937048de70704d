"""fp8: `--quantization fp8` on a checkpoint in 16/32-bit (online: every linear weight quantized after loading,
per output channel, activations per token), and checkpoints whose config.json says `"quant_method": "fp8"`
(read with no flag): per-tensor weight scales with `"activation_scheme": "static"` (input_scale in the
checkpoint) or `"dynamic"`, or block-wise weights with `"weight_block_size": [128, 128]`. Layers named in
`modules_to_not_convert` / `ignored_layers` stay in the model dtype (their names may be prefixes, as HF writes
them). Embeddings, norms and lm_head are never quantized.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from runtime.layers.linear import LinearBase
from runtime.layers.quantization.base import LinearMethod, QuantizationConfigError, is_skipped
from runtime.layers.quantization.fp8_linear import Fp8BlockMethod, Fp8PerChannelMethod, Fp8PerTensorMethod

ACTIVATION_SCHEMES = ("static", "dynamic")
KNOWN_KEYS = {"quant_method", "activation_scheme", "weight_block_size", "modules_to_not_convert", "ignored_layers",
              "fmt", "kv_cache_scheme"}


def matches_prefix(name: str, patterns: list[str]) -> bool:
    """HF's modules_to_not_convert: a pattern names a module or any module under it ("lm_head", "model.layers.0")."""
    return any(f".{p}." in f".{name}." for p in patterns)


@dataclass(frozen=True)
class Fp8Config:
    online: bool  # True: --quantization fp8 on an unquantized checkpoint
    activation_scheme: str = "dynamic"
    weight_block_size: tuple[int, int] | None = None
    ignored: list[str] = field(default_factory=list)
    name: str = "fp8"

    @classmethod
    def online_config(cls) -> Fp8Config:
        return cls(online=True)

    @classmethod
    def from_checkpoint(cls, config: dict) -> Fp8Config:
        unknown = set(config) - KNOWN_KEYS
        if unknown:
            raise QuantizationConfigError(f"fp8 quantization_config has keys this server does not understand: "
                                          f"{', '.join(sorted(unknown))}")
        if config.get("fmt", "e4m3") != "e4m3":
            raise QuantizationConfigError(f"fp8 quantization_config fmt {config['fmt']!r}: only e4m3 weights are "
                                          f"supported")
        scheme = config.get("activation_scheme", "dynamic")
        if scheme not in ACTIVATION_SCHEMES:
            raise QuantizationConfigError(f"fp8 quantization_config activation_scheme {scheme!r} is not one of "
                                          f"{', '.join(ACTIVATION_SCHEMES)}")
        block = config.get("weight_block_size")
        if block is not None:
            if len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block):
                raise QuantizationConfigError(f"fp8 quantization_config weight_block_size {block!r} must be two "
                                              f"positive integers")
            if scheme != "dynamic":
                raise QuantizationConfigError("fp8 quantization_config: block-wise weights (weight_block_size) need "
                                              "activation_scheme dynamic")
            block = (int(block[0]), int(block[1]))
        ignored = list(config.get("modules_to_not_convert") or []) + list(config.get("ignored_layers") or [])
        return cls(online=False, activation_scheme=scheme, weight_block_size=block, ignored=ignored)

    def linear_method(self, prefix: str, layer: LinearBase,
                      packed_modules: dict[str, list[str]]) -> LinearMethod | None:
        if is_skipped(prefix, packed_modules, lambda name: matches_prefix(name, self.ignored)):
            return None
        if self.online:
            return Fp8PerChannelMethod(online=True)
        if self.weight_block_size is not None:
            return Fp8BlockMethod(self.weight_block_size)
        return Fp8PerTensorMethod(static_activations=self.activation_scheme == "static")
