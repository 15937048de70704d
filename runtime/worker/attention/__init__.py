"""Attention backends over the paged KV cache (interface in base.py)."""

from __future__ import annotations

import torch

from runtime.worker.attention.base import AttentionBackend, AttentionSpec
from runtime.worker.kv_pool import KVPool

BACKENDS = ("auto", "torch", "triton")


def create_attention_backend(name: str, spec: AttentionSpec, kv_pool: KVPool) -> AttentionBackend:
    """"auto": triton on CUDA when it is importable, torch otherwise. Latent attention (MLA) with triton is the MLA
    backend (mla_backend.py)."""
    if name not in BACKENDS:
        raise ValueError(f"attention_backend must be one of {', '.join(BACKENDS)}; got {name!r}")
    on_cuda = kv_pool.device.type == "cuda"
    if name == "auto":
        name = "triton" if on_cuda and _triton_backend_available() else "torch"
    if name == "triton":
        if not on_cuda:
            raise ValueError("attention_backend triton needs a CUDA device")
        if spec.latent_value_dim is not None:
            from runtime.worker.attention.mla_backend import MlaAttentionBackend

            return MlaAttentionBackend(spec, kv_pool)
        from runtime.worker.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend(spec, kv_pool)
    from runtime.worker.attention.torch_backend import TorchAttentionBackend

    return TorchAttentionBackend(spec, kv_pool)


def _triton_backend_available() -> bool:
    try:
        import triton  # noqa: F401

        from runtime.worker.attention import triton_backend  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()
