"""Rotary position embeddings (RoPE) in the HF/NeoX "rotate half" layout, with the scaling variants of
transformers' rope types.

The frequencies follow the checkpoint's rope config:
- "default"; "linear" (positions divided by `factor`); "llama3" (Llama 3.1's per-frequency interpolation);
- "yarn" (blend of interpolated and extrapolated frequencies, cos/sin scaled by the attention factor);
- "dynamic" (NTK: the base grows with the sequence length past the original context) and "longrope" (Phi-3: short
  or long per-frequency factors, cos/sin scaled by the attention factor). transformers recomputes these two from the
  longest position of each forward call; here row p of the table uses the frequencies of a sequence of p + 1 tokens,
  which is what transformers computes for each new token when it decodes through its cache (and what vLLM does for
  longrope). A prefill past the original context therefore differs from transformers' one-shot prefill, as it does
  in vLLM and SGLang.
Partial rotary (`rotary_dim` < head_dim) rotates the first rotary_dim dimensions of each head. Checkpoints whose
rotation pairs interleaved dimensions (GPT-J style: Cohere, GLM) are served by permuting their q/k projection rows
at load time (runtime/model_loader/weight_map.py), so one layout serves every model.

A [max_positions, rotary_dim] float32 table (cos of the rotary_dim/2 frequencies, then their sin) is built once on
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

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")


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
    # yarn
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None  # yarn and longrope: the cos/sin scale (None: derived from factor)
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    # longrope: one factor per rotated frequency
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()

    @classmethod
    def from_hf(cls, config: dict, layer_type: str | None = None) -> RopeConfig:
        """From a config.json dict: transformers 5 writes `rope_parameters` (theta inside; nested per layer type for
        models whose layer types differ, e.g. Gemma 3: `layer_type` picks one, "full_attention" by default), older
        files `rope_theta` plus an optional `rope_scaling`."""
        params = dict(config.get("rope_parameters") or {})
        if any(isinstance(value, dict) for value in params.values()):
            params = dict(params.get(layer_type or "full_attention") or {})
        scaling = config.get("rope_scaling") or {}
        params = {**scaling, **params}
        theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type == "su":  # Phi-3's first name for longrope
            rope_type = "longrope"
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedRopeError(f"rope type {rope_type!r} is not supported (supported: "
                                       f"{', '.join(SUPPORTED_ROPE_TYPES)})")
        max_positions = int(config.get("max_position_embeddings", 2048))
        original = int(params.get("original_max_position_embeddings")
                       or config.get("original_max_position_embeddings") or max_positions)
        kwargs = {"theta": float(theta), "rope_type": rope_type}
        try:
            if rope_type in ("linear", "dynamic", "llama3"):
                kwargs["factor"] = float(params["factor"])
            if rope_type == "dynamic":
                # transformers grows the base past the config's max_position_embeddings
                kwargs["original_max_position_embeddings"] = max_positions
            if rope_type == "llama3":
                kwargs.update(low_freq_factor=float(params["low_freq_factor"]),
                              high_freq_factor=float(params["high_freq_factor"]),
                              original_max_position_embeddings=int(params["original_max_position_embeddings"]))
            if rope_type in ("yarn", "longrope"):
                factor = params.get("factor")
                kwargs.update(factor=float(factor) if factor else max_positions / original,
                              original_max_position_embeddings=original,
                              attention_factor=_float_or_none(params.get("attention_factor")))
            if rope_type == "yarn":
                kwargs.update(beta_fast=float(params.get("beta_fast") or 32),
                              beta_slow=float(params.get("beta_slow") or 1),
                              mscale=_float_or_none(params.get("mscale")),
                              mscale_all_dim=_float_or_none(params.get("mscale_all_dim")),
                              truncate=bool(params.get("truncate", True)))
            if rope_type == "longrope":
                kwargs.update(short_factor=tuple(float(f) for f in params["short_factor"]),
                              long_factor=tuple(float(f) for f in params["long_factor"]))
        except KeyError as missing:
            raise UnsupportedRopeError(f"rope type {rope_type!r} needs {missing.args[0]!r} in its parameters") from None
        return cls(**kwargs)

    def default_context_length(self, max_position_embeddings: int) -> int:
        """The context a checkpoint is served with by default: its max_position_embeddings, or for yarn its original
        context times `factor` when that is longer (Qwen's documented way to enable long contexts)."""
        if self.rope_type == "yarn":
            return max(max_position_embeddings, int(self.original_max_position_embeddings * self.factor))
        return max_position_embeddings

    def longest_context_length(self, max_position_embeddings: int) -> int:
        """The longest context an explicit --context-length may ask for: linear and dynamic scaling stretch the
        config's max_position_embeddings by `factor` (as vLLM counts them; many configs state the stretched length
        already, so it is not the default); llama3 and longrope configs state their long context."""
        if self.rope_type in ("linear", "dynamic"):
            return int(max_position_embeddings * self.factor)
        return self.default_context_length(max_position_embeddings)

    def cos_sin_table(self, rotary_dim: int, max_positions: int, device: torch.device | str) -> torch.Tensor:
        """[max_positions, rotary_dim] float32: cos of the rotary_dim/2 angles of each position, then their sin."""
        positions = torch.arange(max_positions, device=device, dtype=torch.float32)
        if self.rope_type in ("dynamic", "longrope"):
            angles = positions[:, None] * self._per_position_inv_freq(rotary_dim, max_positions).to(device)
        else:
            angles = torch.outer(positions, self.inv_freq(rotary_dim).to(device))
        scale = self._cos_sin_scale()
        return torch.cat([angles.cos() * scale, angles.sin() * scale], dim=-1)

    def inv_freq(self, rotary_dim: int) -> torch.Tensor:
        inv_freq = self._base_inv_freq(self.theta, rotary_dim)
        if self.rope_type == "linear":
            return inv_freq / self.factor
        if self.rope_type == "llama3":
            return self._llama3_scaled(inv_freq)
        if self.rope_type == "yarn":
            return self._yarn_scaled(rotary_dim)
        return inv_freq

    @staticmethod
    def _base_inv_freq(theta: float, rotary_dim: int) -> torch.Tensor:
        return 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))

    def _per_position_inv_freq(self, rotary_dim: int, max_positions: int) -> torch.Tensor:
        """[max_positions, rotary_dim/2]: the frequencies transformers uses for a sequence of p + 1 tokens."""
        original = self.original_max_position_embeddings
        seq_lens = torch.arange(1, max_positions + 1, dtype=torch.float64)
        if self.rope_type == "longrope":
            short = 1.0 / (torch.tensor(self.short_factor) * self.theta ** (
                torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))
            long = 1.0 / (torch.tensor(self.long_factor) * self.theta ** (
                torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))
            return torch.where((seq_lens > original)[:, None], long[None, :], short[None, :])
        seq_lens = seq_lens.clamp(min=original)
        growth = (self.factor * seq_lens / original) - (self.factor - 1)
        bases = self.theta * growth ** (rotary_dim / (rotary_dim - 2))
        exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).double() / rotary_dim
        return (1.0 / bases[:, None] ** exponents[None, :]).float()

    def _cos_sin_scale(self) -> float:
        if self.rope_type not in ("yarn", "longrope"):
            return 1.0
        if self.attention_factor is not None:
            return self.attention_factor
        if self.rope_type == "longrope":
            if self.factor <= 1.0:
                return 1.0
            return math.sqrt(1 + math.log(self.factor) / math.log(self.original_max_position_embeddings))
        if self.mscale and self.mscale_all_dim:
            return _yarn_mscale(self.factor, self.mscale) / _yarn_mscale(self.factor, self.mscale_all_dim)
        return _yarn_mscale(self.factor)

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

    def _yarn_scaled(self, dim: int) -> torch.Tensor:
        # Frequencies that turn fewer than beta_slow times over the original context are interpolated (divided by
        # factor), those that turn more than beta_fast times are kept, with a linear ramp between.
        def correction_dim(rotations: float) -> float:
            return dim * math.log(self.original_max_position_embeddings / (rotations * 2 * math.pi)) / (
                2 * math.log(self.theta))

        low, high = correction_dim(self.beta_fast), correction_dim(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        pos_freqs = self.theta ** (torch.arange(0, dim, 2).float() / dim)
        extrapolation = 1 - ramp
        return (1.0 / (self.factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation


def _float_or_none(value) -> float | None:
    return None if value is None else float(value)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_positions: int, config: RopeConfig, device: torch.device | str,
                 rotary_dim: int | None = None):
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim or head_dim
        if self.rotary_dim % 2 or self.rotary_dim > head_dim:
            raise ValueError(f"rotary_dim {self.rotary_dim} must be even and at most head_dim {head_dim}")
        # [max_positions, rotary_dim]: cos | sin, the layout of kernels/rotary.py's cache
        self.register_buffer("cos_sin", config.cos_sin_table(self.rotary_dim, max_positions, device),
                             persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, Hq, D], k [T, Hkv, D] -> rotated q and k (on CUDA rotated in place and returned)."""
        if q.is_cuda and apply_rotary is not None and not torch.compiler.is_compiling():
            apply_rotary(positions, q, k, self.cos_sin)
            return q, k
        cos, sin = self.cos_sin[positions].unsqueeze(1).to(q.dtype).chunk(2, dim=-1)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rot, rest = x[..., :self.rotary_dim], x[..., self.rotary_dim:]
        x1, x2 = rot.chunk(2, dim=-1)
        rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        return torch.cat((rotated, rest), dim=-1) if rest.shape[-1] else rotated
