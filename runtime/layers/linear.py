"""Linear layers sharded for tensor parallelism (Megatron style) with their weight loaders.

Column parallel: the output features are split over ranks (no communication in forward).
Row parallel: the input features are split; partial outputs are summed with an all-reduce.
Each parameter carries a `weight_loader(param, loaded, name, shard_id=None)` that copies this rank's
part of a full checkpoint tensor into it, checking shapes and naming the tensor on mismatch.

Quantization (runtime/layers/quantization/) swaps a layer's `weight` for the parameters of its
`LinearMethod` (an fp8 weight and its scales, say) before the checkpoint is read, and computes the
layer's matmul through `method.apply`. The loaders below serve those parameters too, from three
attributes each parameter may carry:
- `output_unit` / `input_unit`: how many output (input) features one row (column) of the parameter
  covers: 1 for a weight or a per-channel scale, 128 for the scales of [128, 128] weight blocks;
  `input_unit = None` on a row-parallel layer means the parameter is not split along the input
  (its bias, a per-output-channel scale);
- `per_shard`: one scalar per packed part (q, k, v; gate, up), as per-tensor fp8 scales are stored.
Packed parameters also carry `expected_shards`, the shard ids that must all arrive
(runtime/model_loader/weight_map.py checks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from runtime.layers.parallel import TensorParallel


class WeightShapeError(ValueError):
    pass


def copy_checked(param: torch.Tensor, loaded: torch.Tensor, name: str) -> None:
    if tuple(param.shape) != tuple(loaded.shape):
        raise WeightShapeError(f"tensor {name}: checkpoint shape {tuple(loaded.shape)} does not match the model's "
                               f"{tuple(param.shape)}")
    param.data.copy_(loaded)


def new_param(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | None = None, *,
              output_unit: int = 1, input_unit: int | None = 1, per_shard: bool = False) -> nn.Parameter:
    param = nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)
    param.output_unit, param.input_unit, param.per_shard = output_unit, input_unit, per_shard
    return param


class ReplicatedLinear(nn.Module):
    """y = x W^T (+ b) with the whole W on every rank (MoE routers, small gates; never quantized)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype):
        super().__init__()
        self.weight = new_param((out_features, in_features), dtype)
        self.bias = new_param((out_features,), dtype) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


@dataclass(frozen=True)
class OutputShard:
    """Where one packed part of a column-parallel layer comes from and goes, in output features."""

    source_start: int  # first row of the checkpoint tensor that this rank takes
    size: int  # rows this rank takes
    offset: int  # where they go in the layer's packed output
    source_total: int  # rows of the checkpoint tensor


class LinearMethod(Protocol):
    """How a quantized layer stores its weight and computes its matmul (runtime/layers/quantization/)."""

    def create_weights(self, layer: LinearBase, device: torch.device) -> None:
        """Register the layer's parameters (layer.register_quant_param) in their checkpoint shapes."""
        ...

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        """Turn the loaded parameters into what `apply` reads (quantize online, merge per-shard scales)."""
        ...

    def apply(self, layer: LinearBase, x: torch.Tensor) -> torch.Tensor:
        """x [T, in] -> x W^T [T, out] in x's dtype, without bias."""
        ...


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class LinearBase(nn.Module):
    """What every linear layer shares: its per-rank shape, its packed parts, and the quantization hook."""

    in_features: int  # per rank
    out_features: int  # per rank
    params_dtype: torch.dtype  # the model dtype
    part_sizes: list[int]  # output features of each packed part on this rank
    shard_ids: list  # the packed parts' shard ids ([None] when the layer is not packed)
    tp: TensorParallel
    quant_method: LinearMethod | None = None

    def set_quant_method(self, method: LinearMethod) -> None:
        """Replace the plain weight with the method's parameters (called before the weights are loaded)."""
        device = self.weight.device
        del self.weight
        self.quant_method = method
        method.create_weights(self, device)

    def register_quant_param(self, name: str, param: nn.Parameter) -> None:
        self._set_loader(param)
        self.register_parameter(name, param)

    def _set_loader(self, param: nn.Parameter) -> None:
        param.weight_loader = self.load_weight
        if self.shard_ids != [None]:
            param.expected_shards = frozenset(self.shard_ids)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x W^T of this rank, without bias and without any collective."""
        if self.quant_method is None:
            return F.linear(x, self.weight)
        flat = x.reshape(-1, x.shape[-1])
        return self.quant_method.apply(self, flat).view(*x.shape[:-1], self.out_features)

    def load_weight(self, param: nn.Parameter, loaded: torch.Tensor, name: str, shard_id=None) -> None:
        raise NotImplementedError

    def _load_per_shard(self, param: nn.Parameter, loaded: torch.Tensor, name: str, shard_id) -> None:
        if loaded.numel() != 1:
            raise WeightShapeError(f"tensor {name}: expected one value (a per-tensor scale), got shape "
                                   f"{tuple(loaded.shape)}")
        param.data[self.shard_ids.index(shard_id)] = loaded.reshape(()).to(param.dtype)


class ColumnParallelLinear(LinearBase):
    """y = x W^T (+ b) with W's rows (output features) split over ranks; y holds this rank's features."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TensorParallel, dtype: torch.dtype):
        super().__init__()
        self.tp = tp
        self.out_start, self.out_end = tp.shard_range(out_features)
        self._init_params(in_features, [self.out_end - self.out_start], [None], bias, dtype)

    def _init_params(self, in_features: int, part_sizes: list[int], shard_ids: list, bias: bool,
                     dtype: torch.dtype) -> None:
        self.in_features = in_features
        self.params_dtype = dtype
        self.part_sizes = part_sizes  # per rank
        self.out_features = sum(part_sizes)
        self.shard_ids = shard_ids
        self.weight = new_param((self.out_features, in_features), dtype)
        self.bias = new_param((self.out_features,), dtype) if bias else None
        for param in (self.weight, self.bias):
            if param is not None:
                self._set_loader(param)

    def output_shard(self, shard_id) -> OutputShard:
        size = self.out_end - self.out_start
        return OutputShard(self.out_start, size, 0, size * self.tp.size)

    def load_weight(self, param: nn.Parameter, loaded: torch.Tensor, name: str, shard_id=None) -> None:
        if param.per_shard:
            self._load_per_shard(param, loaded, name, shard_id)
            return
        unit = param.output_unit
        shard = self.output_shard(shard_id)
        if (shard.source_start % unit or shard.offset % unit) and unit > 1:
            raise WeightShapeError(f"tensor {name}: this rank's rows {shard.source_start}.. of the packed part do not "
                                   f"start on a block of {unit}")
        start, size, offset = shard.source_start // unit, _ceil_div(shard.size, unit), shard.offset // unit
        expected = (_ceil_div(shard.source_total, unit),) + tuple(param.shape[1:])
        if tuple(loaded.shape) != expected:
            raise WeightShapeError(f"tensor {name}: checkpoint shape {tuple(loaded.shape)} does not match the model's "
                                   f"{expected}")
        copy_checked(param.data[offset:offset + size], loaded[start:start + size], name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul(x)
        return y if self.bias is None else y + self.bias


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input packed in one matmul (gate_up of the MLP).
    Each rank holds its slice of every part: [part0 slice, part1 slice, ...]."""

    def __init__(self, in_features: int, part_sizes: list[int], bias: bool, tp: TensorParallel, dtype: torch.dtype):
        LinearBase.__init__(self)
        self.tp = tp
        for size in part_sizes:
            tp.shard_range(size)  # checks divisibility
        self._init_params(in_features, [size // tp.size for size in part_sizes], list(range(len(part_sizes))), bias,
                          dtype)

    def output_shard(self, shard_id) -> OutputShard:
        per_rank = self.part_sizes[shard_id]
        return OutputShard(self.tp.rank * per_rank, per_rank, sum(self.part_sizes[:shard_id]), per_rank * self.tp.size)


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections packed in one matmul, split by heads over ranks. When there are fewer kv
    heads than ranks, each kv head is replicated on tp_size / num_kv_heads ranks."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool,
                 tp: TensorParallel, dtype: torch.dtype):
        LinearBase.__init__(self)
        if num_heads % tp.size:
            raise ValueError(f"num_attention_heads {num_heads} cannot be split over tp_size {tp.size}")
        if num_kv_heads % tp.size and tp.size % num_kv_heads:
            raise ValueError(f"num_key_value_heads {num_kv_heads} cannot be split over tp_size {tp.size}")
        self.tp = tp
        self.head_dim = head_dim
        self.total_heads = {"q": num_heads, "k": num_kv_heads, "v": num_kv_heads}
        self.num_heads = num_heads // tp.size
        self.num_kv_heads = max(1, num_kv_heads // tp.size)
        self.q_size = self.num_heads * head_dim
        self.kv_size = self.num_kv_heads * head_dim
        # first head of this rank; with fewer kv heads than ranks, rank r holds kv head r * Hkv // tp_size
        self.head_start = {"q": tp.rank * self.num_heads, "k": tp.rank * num_kv_heads // tp.size,
                           "v": tp.rank * num_kv_heads // tp.size}
        self.offset = {"q": 0, "k": self.q_size, "v": self.q_size + self.kv_size}
        self._init_params(hidden_size, [self.q_size, self.kv_size, self.kv_size], ["q", "k", "v"], bias, dtype)

    def output_shard(self, shard_id) -> OutputShard:
        size = self.q_size if shard_id == "q" else self.kv_size
        return OutputShard(self.head_start[shard_id] * self.head_dim, size, self.offset[shard_id],
                           self.total_heads[shard_id] * self.head_dim)

    def split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)


class RowParallelLinear(LinearBase):
    """y = x W^T + b with W's columns (input features) split over ranks; partial sums are all-reduced,
    then the (unsharded) bias is added once."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TensorParallel, dtype: torch.dtype):
        super().__init__()
        self.tp = tp
        self.in_start, self.in_end = tp.shard_range(in_features)
        self.in_features = self.in_end - self.in_start
        self.out_features = out_features
        self.params_dtype = dtype
        self.part_sizes = [out_features]
        self.shard_ids = [None]
        self.weight = new_param((out_features, self.in_features), dtype)
        self.weight.weight_loader = self.load_weight
        self.bias = new_param((out_features,), dtype, input_unit=None) if bias else None
        if bias:
            self.bias.weight_loader = self.load_weight

    def load_weight(self, param: nn.Parameter, loaded: torch.Tensor, name: str, shard_id=None) -> None:
        if param.per_shard:
            self._load_per_shard(param, loaded, name, shard_id)
            return
        unit = param.input_unit
        if unit is None:
            copy_checked(param, loaded, name)
            return
        if (self.in_start % unit) and unit > 1:
            raise WeightShapeError(f"tensor {name}: this rank's input columns {self.in_start}.. do not start on a "
                                   f"block of {unit}")
        total = self.in_features * self.tp.size
        expected = (param.shape[0], _ceil_div(total, unit))
        if loaded.ndim != 2 or tuple(loaded.shape) != expected:
            raise WeightShapeError(f"tensor {name}: checkpoint shape {tuple(loaded.shape)} does not match the model's "
                                   f"{expected}")
        start = self.in_start // unit
        copy_checked(param, loaded[:, start:start + param.shape[1]], name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.tp.all_reduce(self.matmul(x))
        return y if self.bias is None else y + self.bias
