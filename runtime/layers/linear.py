"""Linear layers sharded for tensor parallelism (Megatron style) with their weight loaders.

Column parallel: the output features are split over ranks (no communication in forward).
Row parallel: the input features are split; partial outputs are summed with an all-reduce.
Each parameter carries a `weight_loader(param, loaded, shard_id=None)` that copies this rank's
part of a full checkpoint tensor into it, checking shapes and naming the tensor on mismatch. Packed parameters
also carry `expected_shards`, the shard ids that must all arrive (runtime/model_loader/weight_map.py checks).
"""

from __future__ import annotations

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


def _new_param(shape: tuple[int, ...], dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)


class ReplicatedLinear(nn.Module):
    """y = x W^T (+ b) with the whole W on every rank (MoE routers, small gates)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype):
        super().__init__()
        self.weight = _new_param((out_features, in_features), dtype)
        self.bias = _new_param((out_features,), dtype) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class ColumnParallelLinear(nn.Module):
    """y = x W^T (+ b) with W's rows (output features) split over ranks; y holds this rank's features."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TensorParallel, dtype: torch.dtype):
        super().__init__()
        self.tp = tp
        self.out_start, self.out_end = tp.shard_range(out_features)
        self.weight = _new_param((self.out_end - self.out_start, in_features), dtype)
        self.weight.weight_loader = self.load_sharded
        self.bias = _new_param((self.out_end - self.out_start,), dtype) if bias else None
        if bias:
            self.bias.weight_loader = self.load_sharded

    def load_sharded(self, param: nn.Parameter, loaded: torch.Tensor, name: str, shard_id=None) -> None:
        if loaded.shape[0] != self.tp.size * param.shape[0]:
            raise WeightShapeError(f"tensor {name}: checkpoint shape {tuple(loaded.shape)} does not match the model's "
                                   f"{(self.tp.size * param.shape[0],) + tuple(param.shape[1:])}")
        copy_checked(param, loaded[self.out_start:self.out_end], name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input packed in one matmul (gate_up of the MLP).
    Each rank holds its slice of every part: [part0 slice, part1 slice, ...]."""

    def __init__(self, in_features: int, part_sizes: list[int], bias: bool, tp: TensorParallel, dtype: torch.dtype):
        nn.Module.__init__(self)
        self.tp = tp
        self.part_sizes = [size // tp.size for size in part_sizes]
        for size in part_sizes:
            tp.shard_range(size)  # checks divisibility
        total = sum(self.part_sizes)
        self.weight = _new_param((total, in_features), dtype)
        self.bias = _new_param((total,), dtype) if bias else None
        for param in (self.weight, self.bias):
            if param is not None:
                param.weight_loader = self.load_part
                param.expected_shards = frozenset(range(len(part_sizes)))

    def load_part(self, param: nn.Parameter, loaded: torch.Tensor, name: str, shard_id: int) -> None:
        per_rank = self.part_sizes[shard_id]
        offset = sum(self.part_sizes[:shard_id])
        expected = (per_rank * self.tp.size,) + tuple(param.shape[1:])
        if tuple(loaded.shape) != expected:
            raise WeightShapeError(f"tensor {name}: checkpoint shape {tuple(loaded.shape)} does not match the model's "
                                   f"{expected}")
        start = self.tp.rank * per_rank
        copy_checked(param.data[offset:offset + per_rank], loaded[start:start + per_rank], name)


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections packed in one matmul, split by heads over ranks. When there are fewer kv
    heads than ranks, each kv head is replicated on tp_size / num_kv_heads ranks."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool,
                 tp: TensorParallel, dtype: torch.dtype):
        nn.Module.__init__(self)
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
        total = self.q_size + 2 * self.kv_size
        self.weight = _new_param((total, hidden_size), dtype)
        self.bias = _new_param((total,), dtype) if bias else None
        for param in (self.weight, self.bias):
            if param is not None:
                param.weight_loader = self.load_qkv
                param.expected_shards = frozenset("qkv")

    def load_qkv(self, param: nn.Parameter, loaded: torch.Tensor, name: str, shard_id: str) -> None:
        expected = (self.total_heads[shard_id] * self.head_dim,) + tuple(param.shape[1:])
        if tuple(loaded.shape) != expected:
            raise WeightShapeError(f"tensor {name}: checkpoint shape {tuple(loaded.shape)} does not match the model's "
                                   f"{expected}")
        size = self.q_size if shard_id == "q" else self.kv_size
        start = self.head_start[shard_id] * self.head_dim
        offset = self.offset[shard_id]
        copy_checked(param.data[offset:offset + size], loaded[start:start + size], name)

    def split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W's columns (input features) split over ranks; partial sums are all-reduced,
    then the (unsharded) bias is added once."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TensorParallel, dtype: torch.dtype):
        super().__init__()
        self.tp = tp
        self.in_start, self.in_end = tp.shard_range(in_features)
        self.weight = _new_param((out_features, self.in_end - self.in_start), dtype)
        self.weight.weight_loader = self.load_sharded
        self.bias = _new_param((out_features,), dtype) if bias else None
        if bias:
            self.bias.weight_loader = lambda param, loaded, name, shard_id=None: copy_checked(param, loaded, name)

    def load_sharded(self, param: nn.Parameter, loaded: torch.Tensor, name: str, shard_id=None) -> None:
        if loaded.ndim != 2 or loaded.shape[1] != self.tp.size * param.shape[1]:
            raise WeightShapeError(f"tensor {name}: checkpoint shape {tuple(loaded.shape)} does not match the model's "
                                   f"{(param.shape[0], self.tp.size * param.shape[1])}")
        copy_checked(param, loaded[:, self.in_start:self.in_end], name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.tp.all_reduce(F.linear(x, self.weight))
        return y if self.bias is None else y + self.bias
