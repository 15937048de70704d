"""Checkpoint tensor names -> model parameters.

A model names, for each checkpoint tensor, the parameter(s) it fills: `WeightTarget(param, tensor, shard_id)`.
`load_mapped` copies every target through the parameter's `weight_loader` (which takes this rank's shard and checks
shapes) or, for plain parameters, a checked copy, and returns the parameters it wrote completely for the loader's
completeness check: a packed parameter (`expected_shards`: q/k/v, gate/up, every expert's projections) counts only
once all its shards arrived, so a checkpoint missing one expert's tensor is refused, not served from uninitialized
memory. The helpers below build targets for the layouts checkpoints use:
- `packed_target`: separate q/k/v or gate/up tensors into our packed parameters, with their shard id;
- `split_rows`: a tensor that packs several of them (Phi-3's qkv_proj, GLM's gate_up_proj, DBRX's Wqkv);
- `expert_target`: per-expert projections (Mixtral's w1/w2/w3, Qwen-MoE's gate/up/down_proj) into FusedMoE;
- `interleaved_rotary_to_halves`: q/k rows of checkpoints that rotate interleaved pairs (GPT-J style: Cohere, GLM)
  reordered per head so that the rotary layer's "rotate half" pairs meet the same dimensions.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from runtime.layers.linear import copy_checked

# checkpoint name fragment -> (our packed parameter fragment, shard id): the Llama layout
LLAMA_PACKED = {
    ".q_proj.": (".qkv_proj.", "q"),
    ".k_proj.": (".qkv_proj.", "k"),
    ".v_proj.": (".qkv_proj.", "v"),
    ".gate_proj.": (".gate_up_proj.", 0),
    ".up_proj.": (".gate_up_proj.", 1),
}


@dataclass(frozen=True)
class WeightTarget:
    param: str
    tensor: torch.Tensor
    shard_id: object = None


TargetFn = Callable[[str, torch.Tensor], list[WeightTarget]]


def load_mapped(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]], targets: TargetFn) -> set[str]:
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    shards: dict[str, set] = {}
    for name, tensor in weights:
        for target in targets(name, tensor):
            param = params.get(target.param)
            if param is None:
                raise KeyError(f"checkpoint tensor {name} has no counterpart in {type(model).__name__} "
                               f"(looked for {target.param})")
            loader = getattr(param, "weight_loader", None)
            if loader is None:
                copy_checked(param, target.tensor, name)
            elif target.shard_id is None:
                loader(param, target.tensor, name)
            else:
                loader(param, target.tensor, name, target.shard_id)
                shards.setdefault(target.param, set()).add(target.shard_id)
            loaded.add(target.param)
    return {name for name in loaded if getattr(params[name], "expected_shards", set()) <= shards.get(name, set())}


def packed_target(name: str, tensor: torch.Tensor, packed: dict[str, tuple[str, object]]) -> WeightTarget:
    for fragment, (packed_fragment, shard_id) in packed.items():
        if fragment in name:
            return WeightTarget(name.replace(fragment, packed_fragment), tensor, shard_id)
    return WeightTarget(name, tensor)


def split_rows(name: str, tensor: torch.Tensor, sizes: list[int], shard_ids: list[object]) -> list[WeightTarget]:
    """A packed checkpoint tensor (rows = output features) -> one target per part, all for parameter `name`."""
    if tensor.shape[0] != sum(sizes):
        raise ValueError(f"tensor {name}: {tensor.shape[0]} rows cannot be split into parts of {sizes}")
    return [WeightTarget(name, part, shard_id) for part, shard_id in zip(tensor.split(sizes), shard_ids)]


def expert_target(name: str, tensor: torch.Tensor, pattern: re.Pattern, parts: dict[str, str]) -> WeightTarget | None:
    """`pattern` has groups (prefix, expert, projection); parts maps the projection's name to gate | up | down.
    -> a target for FusedMoE's w13_weight or w2_weight at `prefix`, or None if the name is not an expert's."""
    match = pattern.search(name)
    if match is None:
        return None
    prefix, expert, projection = match.groups()
    part = parts[projection]
    param = f"{prefix}w2_weight" if part == "down" else f"{prefix}w13_weight"
    return WeightTarget(param, tensor, (int(expert), part))


def rotary_halves_order(head_dim: int, rotary_dim: int) -> torch.Tensor:
    """The dimension order within a head that turns interleaved rotation pairs (2i, 2i+1) into "rotate half" pairs
    (i, i + rotary_dim/2); dimensions past rotary_dim stay where they are."""
    order = torch.arange(head_dim)
    order[:rotary_dim] = torch.cat([torch.arange(0, rotary_dim, 2), torch.arange(1, rotary_dim, 2)])
    return order


def interleaved_rotary_to_halves(tensor: torch.Tensor, num_heads: int, head_dim: int, rotary_dim: int) -> torch.Tensor:
    """Rows of a q or k projection (weight [H * D, in] or bias [H * D]) whose rotation pairs interleaved dimensions,
    reordered per head by `rotary_halves_order`. q and k get the same permutation, so their dot products, and the
    attention, are unchanged."""
    order = rotary_halves_order(head_dim, rotary_dim)
    return tensor[(torch.arange(num_heads)[:, None] * head_dim + order[None, :]).reshape(-1)]


def interleaved_qk_to_halves(name: str, tensor: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
                             rotary_dim: int) -> torch.Tensor:
    """A checkpoint tensor of a model with interleaved rotary pairs, in our layout: q_proj / k_proj rows (weights and
    biases) reordered per head, per-head q/k norm weights ([heads, head_dim]) in the same order; others unchanged."""
    if ".q_proj." in name:
        return interleaved_rotary_to_halves(tensor, num_heads, head_dim, rotary_dim)
    if ".k_proj." in name:
        return interleaved_rotary_to_halves(tensor, num_kv_heads, head_dim, rotary_dim)
    if ".q_norm." in name or ".k_norm." in name:
        return tensor[..., rotary_halves_order(head_dim, rotary_dim)]
    return tensor
