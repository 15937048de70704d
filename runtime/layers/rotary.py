"""Rotary position embeddings (RoPE) in the HF/NeoX "rotate half" layout, with Llama's scaling variants.

The frequencies follow the checkpoint's rope config: "default", "linear" (positions divided by
`factor`) and "llama3" (Llama 3.1's per-frequency interpolation). Other types (dynamic NTK, yarn,
longrope) are refused by `RopeConfig.from_hf` with a clear message.
A [max_positions, head_dim] float32 table (cos of the head_dim/2 frequencies, then their sin) is built once on
the model's device. On CUDA the Triton kernel of kernels/rotary.py rotates q and k in place in one launch;
elsewhere the torch code below, which is also the reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

try:  # Triton is needed on CUDA only
    from kernels.rotary import apply_rotary
except ImportError:
    apply_rotary = None

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class UnsupportedRopeError(ValueError):
    pass


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    @classmethod
    def from_hf(cls, config: dict) -> RopeConfig:
        """From a config.json dict: transformers 5 writes `rope_parameters` (theta inside), older files
        `rope_theta` plus an optional `rope_scaling` dict."""
        params = dict(config.get("rope_parameters") or {})
        scaling = config.get("rope_scaling") or {}
        params = {**scaling, **params}
        theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedRopeError(f"rope type {rope_type!r} is not supported (supported: "
                                       f"{', '.join(SUPPORTED_ROPE_TYPES)})")
        kwargs = {"theta": float(theta), "rope_type": rope_type}
        if rope_type != "default":
            kwargs["factor"] = float(params["factor"])
        if rope_type == "llama3":
            kwargs.update(low_freq_factor=float(params["low_freq_factor"]),
                          high_freq_factor=float(params["high_freq_factor"]),
                          original_max_position_embeddings=int(params["original_max_position_embeddings"]))
        return cls(**kwargs)

    def inv_freq(self, head_dim: int) -> torch.Tensor:
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        if self.rope_type == "linear":
            return inv_freq / self.factor
        if self.rope_type == "llama3":
            return self._llama3_scaled(inv_freq)
        return inv_freq

    def _llama3_scaled(self, inv_freq: torch.Tensor) -> torch.Tensor:
        # Long wavelengths are divided by `factor`, short ones kept, and the band between is blended.
        low_freq_wavelen = self.original_max_position_embeddings / self.low_freq_factor
        high_freq_wavelen = self.original_max_position_embeddings / self.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / self.factor, inv_freq)
        smooth = (self.original_max_position_embeddings / wavelen - self.low_freq_factor) / (
            self.high_freq_factor - self.low_freq_factor)
        blended = (1 - smooth) * scaled / self.factor + smooth * scaled
        in_band = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        return torch.where(in_band, blended, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_positions: int, config: RopeConfig, device: torch.device | str):
        super().__init__()
        self.head_dim = head_dim
        inv_freq = config.inv_freq(head_dim).to(device)
        freqs = torch.outer(torch.arange(max_positions, device=device, dtype=torch.float32), inv_freq)
        # [max_positions, head_dim]: cos | sin, the layout of kernels/rotary.py's cache
        self.register_buffer("cos_sin", torch.cat([freqs.cos(), freqs.sin()], dim=-1), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, Hq, D], k [T, Hkv, D] -> rotated q and k (on CUDA rotated in place and returned)."""
        if q.is_cuda and apply_rotary is not None and not torch.compiler.is_compiling():
            apply_rotary(positions, q, k, self.cos_sin)
            return q, k
        cos, sin = self.cos_sin[positions].unsqueeze(1).to(q.dtype).chunk(2, dim=-1)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
