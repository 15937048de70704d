"""Mixture-of-experts: top-k routing and the experts of one layer held as two stacked weights.

`select_experts`: softmax over the router logits in float32, the k largest, optionally renormalized to sum to one
(Mixtral, DBRX, Qwen3-MoE) or not (Qwen2-MoE and OLMoE checkpoints keep the softmax values).

`FusedMoE`: w13 [E, 2I/tp, H] (each expert's gate rows, then its up rows) and w2 [E, H, I/tp]. Under tensor
parallelism every rank holds every expert and its share of the intermediate dimension (as a dense MLP splits it):
the down projections' partial sums are all-reduced once for all experts. Checkpoint tensors arrive per expert and
per projection; `load_expert` takes shard ids (expert, "gate" | "up" | "down"). On CUDA the Triton kernel of
kernels/fused_moe.py runs; elsewhere the torch loop over the experts below (transformers' order of operations).
With `--quantization fp8` (online) quantization/fp8_moe.py turns both weights into float8_e4m3fn after loading,
with one float32 scale per expert and output channel (w13_scale [E, 2I/tp], w2_scale [E, H]).

`SparseMoeBlock`: the router (`gate`, replicated on every rank) and the experts, as most MoE checkpoints name them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from runtime.layers.linear import ReplicatedLinear, WeightShapeError, copy_checked
from runtime.layers.parallel import TensorParallel

try:  # Triton is needed on CUDA only
    from kernels.fused_moe import fused_moe
except ImportError:
    fused_moe = None


def select_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] -> (weights [T, k] float32, expert ids [T, k] int64)."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


class FusedMoE(nn.Module):
    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int, renormalize: bool,
                 tp: TensorParallel, dtype: torch.dtype, activation: str = "silu"):
        """activation: of the gate, "silu" (SwiGLU) or "gelu" (GeGLU, tanh approximation: Grok-1)."""
        super().__init__()
        if activation not in ("silu", "gelu"):
            raise ValueError(f"MoE activation {activation!r} is not supported (silu, gelu)")
        self.activation = activation
        self.tp = tp
        self.num_experts = num_experts
        self.top_k = top_k
        self.renormalize = renormalize
        self.hidden_size = hidden_size
        self.inter_start, self.inter_end = tp.shard_range(intermediate_size)
        inter = self.inter_end - self.inter_start
        self.w13_weight = nn.Parameter(torch.empty(num_experts, 2 * inter, hidden_size, dtype=dtype),
                                       requires_grad=False)
        self.w2_weight = nn.Parameter(torch.empty(num_experts, hidden_size, inter, dtype=dtype), requires_grad=False)
        self.w13_weight.weight_loader = self.load_expert
        self.w2_weight.weight_loader = self.load_expert
        self.w13_weight.expected_shards = frozenset((e, part) for e in range(num_experts) for part in ("gate", "up"))
        self.w2_weight.expected_shards = frozenset((e, "down") for e in range(num_experts))
        self.quantize_online = False  # set by quantization.attach for --quantization fp8
        # float32 scales per expert and output channel, once quantization.finish made the weights fp8
        self.register_buffer("w13_scale", None, persistent=False)
        self.register_buffer("w2_scale", None, persistent=False)

    def load_expert(self, param: nn.Parameter, loaded: torch.Tensor, name: str, shard_id: tuple[int, str]) -> None:
        """One expert's gate ([I, H]), up ([I, H]) or down ([H, I]) projection, as the checkpoint stores it."""
        expert, part = shard_id
        inter = self.inter_end - self.inter_start
        full = inter * self.tp.size
        expected = (self.hidden_size, full) if part == "down" else (full, self.hidden_size)
        if tuple(loaded.shape) != expected or not 0 <= expert < self.num_experts:
            raise WeightShapeError(f"tensor {name}: checkpoint shape {tuple(loaded.shape)} (expert {expert}) does not "
                                   f"match the model's {expected} (of {self.num_experts} experts)")
        if part == "down":
            copy_checked(param.data[expert], loaded[:, self.inter_start:self.inter_end], name)
        else:
            offset = 0 if part == "gate" else inter
            copy_checked(param.data[expert, offset:offset + inter], loaded[self.inter_start:self.inter_end], name)

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        """x [T, H], router_logits [T, E] -> [T, H], summed over the ranks."""
        weights, ids = select_experts(router_logits, self.top_k, self.renormalize)
        return self.run_routed(x, weights, ids)

    def run_routed(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [T, H] with routing already chosen (weights [T, k] float32, expert ids [T, k]) -> [T, H], summed over
        the ranks: for families with their own routing (DeepSeek's grouped top-k)."""
        if x.is_cuda and fused_moe is not None:
            out = fused_moe(x, self.w13_weight, self.w2_weight, weights, ids, activation=self.activation,
                            w13_scale=self.w13_scale, w2_scale=self.w2_scale)
        else:
            out = self._expert_loop(x, weights, ids)
        return self.tp.all_reduce(out)

    def _expert_loop(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for expert in range(self.num_experts):
            token_index, choice = torch.where(ids == expert)
            if token_index.numel() == 0:
                continue
            gate, up = F.linear(x[token_index], self._expert_weight("w13", expert, x.dtype)).chunk(2, dim=-1)
            act = F.silu(gate) if self.activation == "silu" else F.gelu(gate, approximate="tanh")
            down = F.linear(act * up, self._expert_weight("w2", expert, x.dtype))
            expert_out = down * weights[token_index, choice, None]
            out.index_add_(0, token_index, expert_out.to(out.dtype))
        return out

    def _expert_weight(self, name: str, expert: int, dtype: torch.dtype) -> torch.Tensor:
        """One expert's w13 or w2 in `dtype`; fp8 ones dequantized (w.float() * scale)."""
        weight, scale = getattr(self, f"{name}_weight")[expert], getattr(self, f"{name}_scale")
        if scale is None:
            return weight
        return (weight.float() * scale[expert][:, None]).to(dtype)


class SparseMoeBlock(nn.Module):
    """Router (`gate`, replicated) + experts. Its output is summed over tensor-parallel ranks."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, intermediate_size: int, renormalize: bool,
                 tp: TensorParallel, dtype: torch.dtype, activation: str = "silu"):
        super().__init__()
        self.gate = ReplicatedLinear(hidden_size, num_experts, False, dtype)
        self.experts = FusedMoE(num_experts, top_k, hidden_size, intermediate_size, renormalize, tp, dtype,
                                activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.experts(x, self.gate(x))
