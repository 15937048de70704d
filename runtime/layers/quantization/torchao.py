"""--torchao-config: quantize the linear layers with the torchao library after loading (SGLang's values).

- `int4wo-<group>`: on CUDA Int4WeightOnlyConfig (tinygemm tile-packed layout, bf16 only); on the CPU
  IntxWeightOnlyConfig(int4, PerGroup(group), asymmetric), torchao's CPU int4 path, with tinygemm's recipe
  (a scale and a zero point per group: SmolLM2's perplexity rises 8.6% at int4wo-128 where the symmetric default
  rises 14%)
- `int8wo`: Int8WeightOnlyConfig; `int8dq`: Int8DynamicActivationInt8WeightConfig; `fp8wo`: Float8WeightOnlyConfig
- `fp8dq-per_tensor`, `fp8dq-per_row`: Float8DynamicActivationFloat8WeightConfig(PerTensor / PerRow), CUDA of
  compute capability >= 8.9 only (torchao refuses it elsewhere)

Every linear layer (q/k/v, o, gate/up, down) is converted; embeddings, norms and lm_head stay in the model dtype.
With int4wo-<group>, layers whose input features are not a multiple of the group stay in the model dtype, as
torchao's own Int4WeightOnlyConfig does (SmolLM2-135M's hidden size 576 leaves only down_proj to int4wo-128); a
warning says how many, and a model with no such layer is refused.
torchao's int4 "plain" CUDA format needs the mslk kernels, so CUDA uses the tinygemm layout, which needs bf16.
"""

from __future__ import annotations

import logging
import re

import torch
from torch import nn

from runtime.layers.quantization.base import QuantizationConfigError

log = logging.getLogger(__name__)

INT4_GROUP_SIZES = (32, 64, 128, 256)
FIXED_VALUES = ("int8wo", "int8dq", "fp8wo", "fp8dq-per_tensor", "fp8dq-per_row")
VALUES_HELP = "int4wo-<group> (group 32, 64, 128 or 256), " + ", ".join(FIXED_VALUES)


def check_torchao_value(value: str) -> None:
    """Syntax only (no torch needed): the server-args check calls it."""
    match = re.fullmatch(r"int4wo-(\d+)", value)
    if match:
        if int(match.group(1)) not in INT4_GROUP_SIZES:
            raise QuantizationConfigError(f"--torchao-config {value}: the group size must be one of "
                                          f"{', '.join(map(str, INT4_GROUP_SIZES))}")
        return
    if value not in FIXED_VALUES:
        raise QuantizationConfigError(f"--torchao-config {value!r} is not one of {VALUES_HELP}")


def torchao_config(value: str, device: torch.device, dtype: torch.dtype):
    """The torchao config object for `value` on `device`, or QuantizationConfigError saying why it cannot run."""
    check_torchao_value(value)
    import torchao.quantization as tq

    cuda = device.type == "cuda"
    if value.startswith("int4wo-"):
        group = int(value.removeprefix("int4wo-"))
        if not cuda:
            from torchao.quantization.quant_primitives import MappingType

            return tq.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=tq.PerGroup(group),
                                           mapping_type=MappingType.ASYMMETRIC)
        if dtype != torch.bfloat16:
            raise QuantizationConfigError(f"--torchao-config {value} on CUDA needs --dtype bfloat16 (torchao's "
                                          f"tinygemm int4 kernel), not {str(dtype).removeprefix('torch.')}")
        return tq.Int4WeightOnlyConfig(group_size=group, int4_packing_format="tile_packed_to_4d")
    if value == "int8wo":
        return tq.Int8WeightOnlyConfig()
    if value == "int8dq":
        return tq.Int8DynamicActivationInt8WeightConfig()
    if value == "fp8wo":
        return tq.Float8WeightOnlyConfig()
    if not cuda or torch.cuda.get_device_capability(device) < (8, 9):
        raise QuantizationConfigError(f"--torchao-config {value} needs a CUDA GPU of compute capability >= 8.9 "
                                      f"(torchao's fp8 dynamic quantization); this run is on {device}")
    granularity = tq.PerTensor() if value == "fp8dq-per_tensor" else tq.PerRow()
    return tq.Float8DynamicActivationFloat8WeightConfig(granularity=granularity)


def apply_torchao(model: nn.Module, value: str, device: torch.device, dtype: torch.dtype) -> None:
    """Quantize every linear layer of the loaded model in place."""
    from torchao.quantization import quantize_

    from runtime.layers.linear import LinearBase

    config = torchao_config(value, device, dtype)
    group = int(value.removeprefix("int4wo-")) if value.startswith("int4wo-") else 1
    linears = [m for m in model.modules() if isinstance(m, LinearBase)]
    chosen = {id(m) for m in linears if m.in_features % group == 0}
    if not chosen:
        raise QuantizationConfigError(f"--torchao-config {value}: no linear layer's input features are a multiple of "
                                      f"{group}; choose a smaller group")
    if len(chosen) < len(linears):
        log.warning("--torchao-config %s: %d of %d linear layers have input features that are not a multiple of %d "
                    "and stay in %s", value, len(linears) - len(chosen), len(linears), group, dtype)
    quantize_(model, config, filter_fn=lambda module, _name: id(module) in chosen)
