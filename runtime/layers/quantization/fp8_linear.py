"""The fp8 linear methods, one per way of storing scales. Every quantization config maps a layer onto one of them.

- `Fp8PerChannelMethod`: fp8 weight with one scale per output channel, activations quantized per token at run
  time (fbgemm_fp8, compressed-tensors channel/token, and online --quantization fp8, which loads the weight in the
  model dtype and quantizes it after loading).
- `Fp8PerTensorMethod`: fp8 weight with one scale per packed part (q, k, v ...), activations with one static scale
  from the checkpoint or one computed per call (HF fp8 and compressed-tensors tensor strategy). The per-part
  weight scales become per-channel ones, so the GEMM is the same row-wise one.
- `Fp8BlockMethod`: fp8 weight with one scale per [bn, bk] block (`weight_scale_inv`), activations quantized per
  token and group of bk columns (DeepSeek-V3 / Qwen3 FP8 checkpoints).
The per-channel and per-tensor methods run the weight-only kernel instead at decode sizes on CUDA (fp8_ops.py says
when); the block method keeps its path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from runtime.layers.linear import LinearBase, RowParallelLinear, new_param
from runtime.layers.quantization.fp8_ops import (
    FP8,
    block_scaled_mm,
    new_split_counters,
    quantize_per_channel,
    quantize_per_tensor,
    quantize_per_token,
    scaled_mm,
    weight_only_kernel_applies,
    weight_only_mm,
)


def _input_unit(layer: LinearBase, unit: int | None) -> int | None:
    """Row-parallel layers split parameters along the input; per-output ones are not split there."""
    return unit if isinstance(layer, RowParallelLinear) else 1


def _replace(layer: LinearBase, name: str, value: torch.Tensor) -> None:
    setattr(layer, name, nn.Parameter(value, requires_grad=False))


def _to_buffer(layer: LinearBase, name: str, value: torch.Tensor) -> None:
    """Replace a loaded parameter by the tensor `apply` reads (a buffer: nothing loads it any more)."""
    delattr(layer, name)
    layer.register_buffer(name, value, persistent=False)


@dataclass(frozen=True)
class Fp8PerChannelMethod:
    online: bool = False  # the checkpoint holds the weight in the model dtype: quantize it after loading
    activation_scale_ub: float | None = None

    def create_weights(self, layer: LinearBase, device: torch.device) -> None:
        dtype = layer.params_dtype if self.online else FP8
        layer.register_quant_param("weight", new_param((layer.out_features, layer.in_features), dtype, device))
        if not self.online:
            layer.register_quant_param("weight_scale", new_param((layer.out_features, 1), torch.float32, device,
                                                                 input_unit=_input_unit(layer, None)))

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        if self.online:
            weight, scale = quantize_per_channel(layer.weight.data)
            _replace(layer, "weight", weight)
            layer.register_buffer("weight_scale", scale, persistent=False)
        else:
            _to_buffer(layer, "weight_scale", layer.weight_scale.data.float().reshape(-1))
        layer.register_buffer("split_counters", new_split_counters(layer.weight), persistent=False)
        ub = self.activation_scale_ub
        layer.register_buffer("activation_scale_ub",
                              None if ub is None else torch.tensor(ub, dtype=torch.float32,
                                                                   device=layer.weight.device), persistent=False)

    def apply(self, layer: LinearBase, x: torch.Tensor) -> torch.Tensor:
        if weight_only_kernel_applies(x):
            return weight_only_mm(x, layer.weight, layer.weight_scale, layer.split_counters)
        x_fp8, x_scale = quantize_per_token(x, layer.activation_scale_ub)
        return scaled_mm(x_fp8, x_scale, layer.weight, layer.weight_scale, x.dtype)


@dataclass(frozen=True)
class Fp8PerTensorMethod:
    static_activations: bool  # input_scale from the checkpoint; else one scale per call from the activation

    def create_weights(self, layer: LinearBase, device: torch.device) -> None:
        parts = len(layer.shard_ids)
        layer.register_quant_param("weight", new_param((layer.out_features, layer.in_features), FP8, device))
        layer.register_quant_param("weight_scale", new_param((parts,), torch.float32, device, per_shard=True))
        if self.static_activations:
            layer.register_quant_param("input_scale", new_param((parts,), torch.float32, device, per_shard=True))

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        per_part = layer.weight_scale.data
        sizes = torch.tensor(layer.part_sizes, device=per_part.device)
        _to_buffer(layer, "weight_scale", per_part.repeat_interleave(sizes))
        layer.register_buffer("split_counters", new_split_counters(layer.weight), persistent=False)
        if self.static_activations:
            # the parts share one input, quantized once: with the largest of their scales, as the checkpoint's
            # calibration saw no larger value for any of them
            _to_buffer(layer, "input_scale", layer.input_scale.data.max())

    def apply(self, layer: LinearBase, x: torch.Tensor) -> torch.Tensor:
        if weight_only_kernel_applies(x):  # the static input scale goes unused: x keeps its precision
            return weight_only_mm(x, layer.weight, layer.weight_scale, layer.split_counters)
        x_fp8, x_scale = quantize_per_tensor(x, layer.input_scale if self.static_activations else None)
        return scaled_mm(x_fp8, x_scale.expand(x.shape[0], 1).contiguous(), layer.weight, layer.weight_scale, x.dtype)


@dataclass(frozen=True)
class Fp8BlockMethod:
    block: tuple[int, int]  # [output rows, input columns] per scale
    scale_name: str = "weight_scale_inv"  # HF fp8 checkpoints' name; compressed-tensors says weight_scale

    def create_weights(self, layer: LinearBase, device: torch.device) -> None:
        bn, bk = self.block
        layer.register_quant_param("weight", new_param((layer.out_features, layer.in_features), FP8, device))
        shape = (-(-layer.out_features // bn), -(-layer.in_features // bk))
        layer.register_quant_param(self.scale_name, new_param(shape, torch.float32, device, output_unit=bn,
                                                              input_unit=_input_unit(layer, bk)))

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        scale = getattr(layer, self.scale_name).data
        delattr(layer, self.scale_name)
        layer.register_buffer("block_scale", scale, persistent=False)

    def apply(self, layer: LinearBase, x: torch.Tensor) -> torch.Tensor:
        return block_scaled_mm(x, layer.weight, layer.block_scale, self.block)
