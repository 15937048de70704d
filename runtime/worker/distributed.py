"""The worker's side of tensor parallelism: the checks made before loading (the model shards over tp_size, the GPUs
reach each other peer to peer), the process group of one replica's ranks, and one KV pool size for all of them.

Collectives run through torch.distributed on the default group: NCCL on CUDA (captured inside the decode CUDA graphs:
the warm-up steps before each capture create the communicator, which a capture cannot), gloo on the CPU. Every rank
of a replica is in exactly one group, so the layers need no group handle (runtime.layers.parallel).
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable

import torch
import torch.distributed as dist

from runtime.layers.parallel import TensorParallel
from runtime.models.config import ModelConfig

log = logging.getLogger(__name__)


class ShardingError(ValueError):
    """The model cannot be split over the asked number of ranks; names the dimension."""


# config.json keys of expert MLP widths (Qwen2-MoE, Qwen3-MoE, DeepSeek ...); Mixtral's and OLMoE's is
# intermediate_size
EXPERT_WIDTH_KEYS = ("moe_intermediate_size", "shared_expert_intermediate_size")


def check_model_shards(config: ModelConfig, tp_size: int) -> None:
    """Refuse a model whose attention heads, KV heads or MLP (or expert MLP) width do not split evenly over tp_size
    ranks. (The vocabulary always does: each rank's slice is padded, runtime/layers/vocab.py.)"""
    if tp_size == 1:
        return
    if config.num_heads % tp_size:
        raise ShardingError(f"--tp-size {tp_size}: num_attention_heads {config.num_heads} of {config.architecture} "
                            f"does not divide by {tp_size}; use a tp size that divides it")
    if config.num_kv_heads % tp_size and tp_size % config.num_kv_heads:
        raise ShardingError(f"--tp-size {tp_size}: num_key_value_heads {config.num_kv_heads} neither divides by "
                            f"{tp_size} nor divides it (then each KV head would be replicated on {tp_size} / "
                            f"{config.num_kv_heads} ranks)")
    if config.intermediate_size % tp_size:
        raise ShardingError(f"--tp-size {tp_size}: intermediate_size {config.intermediate_size} (the MLP width) does "
                            f"not divide by {tp_size}")
    for key in EXPERT_WIDTH_KEYS:  # MoE families: each expert's MLP is split like the dense one
        width = config.hf.get(key)
        if isinstance(width, int) and width % tp_size:
            raise ShardingError(f"--tp-size {tp_size}: {key} {width} (an expert's MLP width) does not divide by "
                                f"{tp_size}")


def check_peer_access(gpus: list[int], can_access: Callable[[int, int], bool]) -> None:
    """--enable-p2p-check: every ordered pair of these GPUs must have peer access (can_access is
    torch.cuda.can_device_access_peer); the first pair without fails, named."""
    for a in gpus:
        for b in gpus:
            if a != b and not can_access(a, b):
                raise RuntimeError(f"--enable-p2p-check: GPU {a} has no peer-to-peer access to GPU {b} (check the "
                                   f"topology with `nvidia-smi topo -m`); without the flag NCCL copies through host "
                                   f"memory instead, which works but is slower")


def join_tp_group(init_method: str | None, tp: TensorParallel, device: torch.device, timeout_s: float,
                  p2p_check_gpus: list[int]) -> None:
    """Join the replica's process group at init_method (None: the caller did). Blocks until every rank joined, at
    most timeout_s, which also bounds each collective."""
    if p2p_check_gpus and device.type == "cuda":
        check_peer_access(p2p_check_gpus, torch.cuda.can_device_access_peer)
    if init_method is None:
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    log.info("tp rank %d/%d joining the %s group at %s", tp.rank, tp.size, backend, init_method)
    dist.init_process_group(backend, init_method=init_method, rank=tp.rank, world_size=tp.size,
                            timeout=datetime.timedelta(seconds=timeout_s))


def agree_min(value: int, device: torch.device) -> int:
    """The smallest `value` over the group's ranks (each rank sizes its KV pool from its own free memory)."""
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())
