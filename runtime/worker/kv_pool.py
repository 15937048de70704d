"""KVPool: the paged KV cache, one K and one V tensor per layer, token-granular.

k[layer] and v[layer] are [num_slots, Hkv, D] in the model dtype on the device. Slot 0 is the
padding slot: never handed out by the scheduler, it absorbs writes of padded tokens (CUDA graphs)
so that they never clobber a live token. The scheduler's SlotAllocator hands out slots
1..num_slots-1, so `num_slots = max_total_tokens + 1`.
"""

from __future__ import annotations

import torch


class KVPool:
    def __init__(self, max_total_tokens: int, num_layers: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        if max_total_tokens <= 0:
            raise ValueError(f"max_total_tokens must be positive, got {max_total_tokens}")
        self.max_total_tokens = max_total_tokens
        self.num_slots = max_total_tokens + 1
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        shape = (self.num_slots, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """Bytes of K and V for one token over all layers."""
        return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def store(self, layer_id: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write k/v [T, Hkv, D] of new tokens at `slots` [T]."""
        self.k[layer_id].index_copy_(0, slots, k.to(self.dtype))
        self.v[layer_id].index_copy_(0, slots, v.to(self.dtype))
