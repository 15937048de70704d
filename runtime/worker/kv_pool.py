"""KVPool: the paged KV cache, one K and one V tensor per layer, token-granular.

k[layer] and v[layer] are [num_slots, Hkv, D] on the device, in the model dtype or, with --kv-cache-dtype
fp8_e4m3 / fp8_e5m2, in fp8: then a value is stored as x / scale (saturated) and read as fp8 * scale, with one k
and one v scale per layer (k_scales, v_scales: the checkpoint's, or 1.0). Slot 0 is the
padding slot: never handed out by the scheduler, it absorbs writes of padded tokens (CUDA graphs)
so that they never clobber a live token. The scheduler's SlotAllocator hands out slots
1..num_slots-1, so `num_slots = max_total_tokens + 1`.

A keys-only pool (`keys_only=True`) serves multi-head latent attention (DeepSeek V2/V3): per layer one tensor
[num_slots, 1, kv_lora_rank + qk_rope_head_dim] holding each token's compressed latent and its rotated rope key; the
values are the latent part of the same rows (runtime/layers/mla.py), so `v` is empty and a token costs half the
bytes that a K and V pool of that width would.
"""

from __future__ import annotations

import torch

from runtime.layers.quantization.fp8_ops import to_fp8
from runtime.layers.quantization.kv_cache import is_fp8


class KVPool:
    def __init__(self, max_total_tokens: int, num_layers: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str, k_scales: list[float] | None = None,
                 v_scales: list[float] | None = None, keys_only: bool = False):
        if max_total_tokens <= 0:
            raise ValueError(f"max_total_tokens must be positive, got {max_total_tokens}")
        self.max_total_tokens = max_total_tokens
        self.num_slots = max_total_tokens + 1
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.keys_only = keys_only
        self.dtype = dtype
        self.quantized = is_fp8(dtype)
        # a pool in the model dtype stores values as they are: a checkpoint's scales serve fp8 pools only
        self.k_scales = list(k_scales) if k_scales and self.quantized else [1.0] * num_layers
        self.v_scales = list(v_scales) if v_scales and self.quantized else [1.0] * num_layers
        if len(self.k_scales) != num_layers or len(self.v_scales) != num_layers:
            raise ValueError(f"KV scales must name all {num_layers} layers")
        self.device = torch.device(device)
        shape = (self.num_slots, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        self.v = [] if keys_only else [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                        keys_only: bool = False) -> int:
        """Bytes of K and V (keys only: K) for one token over all layers."""
        tensors = 1 if keys_only else 2
        return tensors * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def store(self, layer_id: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None) -> None:
        """Write k/v [T, Hkv, D] of new tokens at `slots` [T] (v is None for a keys-only pool)."""
        pairs = [(self.k[layer_id], k, self.k_scales[layer_id])]
        if not self.keys_only:
            pairs.append((self.v[layer_id], v, self.v_scales[layer_id]))
        for pool, new, scale in pairs:
            if self.quantized:  # index_copy_ has no fp8 kernel on the CPU: copy the bytes
                pool.view(torch.uint8).index_copy_(0, slots, to_fp8(new, scale, self.dtype).view(torch.uint8))
            else:
                pool.index_copy_(0, slots, new.to(self.dtype))
