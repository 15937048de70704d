"""fp8 KV cache: the pool's storage dtype (--kv-cache-dtype) and the per-layer k/v scales.

A cached value is stored as fp8(k / k_scale) and read back as fp8 * k_scale. The scales come from the checkpoint
when it has them (`self_attn.k_scale` / `v_scale`, compressed-tensors' kv_cache_scheme and ModelOpt; the older
`kv_scale` for both; or `k_proj.output_scale` / `v_proj.output_scale`), else 1.0, which suits the usual range of
rotated keys and values (|x| up to a few tens; e4m3 reaches 448, e5m2 57344).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from runtime.layers.quantization.base import QuantizationConfigError

KV_CACHE_DTYPES = {"auto": None, "fp8_e5m2": torch.float8_e5m2, "fp8_e4m3": torch.float8_e4m3fn}
FP8_DTYPES = (torch.float8_e5m2, torch.float8_e4m3fn)

_SCALE_NAME = re.compile(r"layers\.(\d+)\.self_attn\.(k_scale|v_scale|kv_scale|k_proj\.output_scale|"
                         r"v_proj\.output_scale|attn\.k_scale|attn\.v_scale)$")


def resolve_kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    if name not in KV_CACHE_DTYPES:
        raise QuantizationConfigError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}; got {name!r}")
    return KV_CACHE_DTYPES[name] or model_dtype


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in FP8_DTYPES


@dataclass
class KVCacheScales:
    """Per-layer scales read from the checkpoint (layers it does not name keep 1.0)."""

    k: list[float]
    v: list[float]

    @classmethod
    def ones(cls, num_layers: int) -> KVCacheScales:
        return cls([1.0] * num_layers, [1.0] * num_layers)

    def take_from(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """Pass the checkpoint's tensors through, keeping the KV-cache scales for this object."""
        for name, tensor in weights:
            match = _SCALE_NAME.search(name)
            if match is None:
                yield name, tensor
                continue
            layer, kind = int(match.group(1)), match.group(2)
            if layer >= len(self.k) or tensor.numel() != 1:
                raise QuantizationConfigError(f"checkpoint tensor {name} of shape {tuple(tensor.shape)} is not a "
                                              f"per-layer KV-cache scale of this {len(self.k)}-layer model")
            value = float(tensor.float().reshape(()))
            if not value > 0:
                raise QuantizationConfigError(f"checkpoint tensor {name} holds KV-cache scale {value}: it must be "
                                              f"positive")
            if kind.startswith(("k", "attn.k")):
                self.k[layer] = value
            if kind.startswith(("v", "attn.v")) or kind == "kv_scale":
                self.v[layer] = value
