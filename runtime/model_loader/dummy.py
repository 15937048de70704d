"""Dummy weights (--load-format dummy): the architecture is real, the values small and random.

Norm weights are ones (so activations keep a sane scale); every other parameter is drawn from
uniform(-0.02, 0.02) directly on its device and in its dtype, deterministically from the seed. Parameters of a
quantized checkpoint's layout: fp8 weights are drawn in float32 and cast, their scales are ones.
"""

from __future__ import annotations

import torch
from torch import nn


def init_dummy_weights(model: nn.Module, seed: int) -> None:
    generators: dict[torch.device, torch.Generator] = {}
    for name, param in model.named_parameters():
        if name.endswith("norm.weight") or "_scale" in name.rpartition(".")[2]:
            param.data.fill_(1.0)
            continue
        if param.device not in generators:
            generators[param.device] = torch.Generator(device=param.device).manual_seed(seed)
        if param.dtype.itemsize == 1:  # fp8: uniform_ has no 8-bit float kernels
            values = torch.empty(param.shape, device=param.device).uniform_(-0.02, 0.02,
                                                                            generator=generators[param.device])
            param.data.copy_(values)
            continue
        param.data.uniform_(-0.02, 0.02, generator=generators[param.device])
