"""What a quantization method is: a config read from the checkpoint (or a flag) that picks, per linear layer, the
`LinearMethod` computing it (None: the layer stays in the model dtype)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from runtime.layers.linear import LinearBase, LinearMethod

# Our packed layers and the checkpoint modules packed into them (the HF names of every Llama-like model). A model
# may name others in a `packed_modules_mapping` class attribute.
DEFAULT_PACKED_MODULES = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


__all__ = ["DEFAULT_PACKED_MODULES", "LinearMethod", "QuantConfig", "QuantizationConfigError", "checkpoint_names",
           "is_skipped"]


class QuantizationConfigError(ValueError):
    """A quantization config or flag that cannot be served, with the reason."""


class QuantConfig(Protocol):
    name: str  # the --quantization value

    def linear_method(self, prefix: str, layer: LinearBase,
                      packed_modules: dict[str, list[str]]) -> LinearMethod | None:
        """The method of the layer at `prefix` (our module name, e.g. model.layers.0.self_attn.qkv_proj);
        `packed_modules` names the checkpoint modules packed into our layers (base.DEFAULT_PACKED_MODULES)."""
        ...


def checkpoint_names(prefix: str, packed_modules: dict[str, list[str]]) -> list[str]:
    """The checkpoint module names behind one of our layers: q/k/v_proj behind qkv_proj, itself otherwise."""
    parent, _, leaf = prefix.rpartition(".")
    parts = packed_modules.get(leaf)
    if parts is None:
        return [prefix]
    return [f"{parent}.{part}" if parent else part for part in parts]


def is_skipped(prefix: str, packed_modules: dict[str, list[str]], skipped: Callable[[str], bool]) -> bool:
    """Whether the checkpoint left the layer in full precision. A packed layer must have all of its parts
    converted or none (one matmul has one format)."""
    names = checkpoint_names(prefix, packed_modules)
    flags = [skipped(name) for name in names]
    if any(flags) and not all(flags):
        kept = [name for name, flag in zip(names, flags) if flag]
        raise QuantizationConfigError(f"the checkpoint leaves {', '.join(kept)} unquantized but not the other parts "
                                      f"of {prefix}, which run as one matmul")
    return all(flags)
