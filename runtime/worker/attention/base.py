"""The attention backend interface: the one place where the paged KV cache is read and written.

A backend is built once per ModelRunner with the model's attention shape (`AttentionSpec`) and the
KV pool. Every step the runner calls `prepare(batch)` once, before the layers run (the place to
compute indices and kernel metadata; keep `forward` free of host syncs so it can be captured in a
CUDA graph later), then each attention layer calls `forward(q, k, v, layer_id, batch)`.

Semantics of `forward`, for every backend:
- q [T, Hq, D], k and v [T, Hkv, D]: projections of the step's new tokens (rotary already applied).
- First k/v are stored into the pool: kv_pool.k[layer_id][batch.out_slots] = k (same for v).
- Then new token t of batch row i attends to the row's cached prefix
  (slots req_to_token[rows[i], :prefix_lens[i]]) and to the row's new tokens up to and including itself
  (causal). Query head h reads kv head h // (Hq // Hkv) (GQA). Scores are scaled by `spec.scale`.
- With `spec.sliding_window = W`, a token at position p sees only keys at positions > p - W
  (Mistral's convention: W keys including itself); with `spec.window_layers` set, only those layers use the
  window and the others attend to the whole sequence (Gemma 2 and 3 alternate).
- With `spec.logit_cap = c`, scaled scores s become c * tanh(s / c) before the softmax (Gemma 2's soft-capping).
- With `spec.alibi_slopes` (one per q head), head h adds slopes[h] * (key position - query position) to its scaled
  scores (ALiBi: Baichuan 13B).
- Returns [T, Hq * D] in the dtype of q.

Multi-head latent attention (`spec.latent_value_dim = R`, DeepSeek V2/V3, runtime/layers/mla.py) is the same call
with one kv head and `v=None`: k [T, 1, D] is each token's cache entry (latent then rope key), the pool keeps keys
only, and the values are the first R dimensions of each cached key. Returns [T, Hq * R].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from runtime.worker.forward_batch import ForwardBatch

if TYPE_CHECKING:
    from runtime.worker.kv_pool import KVPool


@dataclass(frozen=True)
class AttentionSpec:
    """Attention shape of one model, per tensor-parallel rank (heads already divided by tp_size)."""

    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    sliding_window: int | None = None
    window_layers: tuple[int, ...] | None = None  # the layers that use sliding_window; None: all of them
    logit_cap: float | None = None
    alibi_slopes: tuple[float, ...] | None = None  # per q head of this rank
    # MLA: no value cache; the values are the first latent_value_dim dimensions of each (single-head) cached key
    latent_value_dim: int | None = None

    @property
    def value_dim(self) -> int:
        return self.latent_value_dim or self.head_dim

    def window(self, layer_id: int) -> int | None:
        """The sliding window of one layer (None: it attends to the whole sequence)."""
        if self.window_layers is not None and layer_id not in self.window_layers:
            return None
        return self.sliding_window

    def distinct_windows(self) -> list[int | None]:
        return sorted({self.window(layer) for layer in range(self.num_layers)}, key=lambda w: (w is not None, w or 0))


class AttentionBackend(Protocol):
    spec: AttentionSpec
    kv_pool: KVPool

    def prepare(self, batch: ForwardBatch) -> None:
        """Once per step, before the layers: compute the metadata `forward` needs."""
        ...

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int,
                batch: ForwardBatch) -> torch.Tensor:
        """Store k/v of the new tokens at batch.out_slots, then attend (see the module docstring)."""
        ...
