"""Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration): Qwen2-VL's design (runtime/models/qwen2_vl.py: dynamic resolution,
2x2 merger, M-RoPE language model) with a different ViT: RMSNorm instead of LayerNorm, a gated SiLU MLP with biases,
and window attention. The merged-token units of each image are regrouped into windows of `window_size` pixels
(window_size / merge / patch units a side, the last ones cut by the image's edge); most blocks attend within a window,
the `fullatt_block_indexes` blocks within the whole frame, and the merger's output is put back in the image's order.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from runtime.models.qwen2_vl import Qwen2VisionTransformer, Qwen2VLForConditionalGeneration, VisionBlock


class VisionRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class GatedVisionBlock(VisionBlock):
    def __init__(self, dim: int, heads: int, intermediate: int):
        super().__init__(dim, heads, intermediate, "gelu")
        self.norm1 = VisionRMSNorm(dim)
        self.norm2 = VisionRMSNorm(dim)
        self.mlp = nn.Module()
        self.mlp.gate_proj = nn.Linear(dim, intermediate)
        self.mlp.up_proj = nn.Linear(dim, intermediate)
        self.mlp.down_proj = nn.Linear(intermediate, dim)

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp.down_proj(F.silu(self.mlp.gate_proj(x)) * self.mlp.up_proj(x))


class Qwen25VisionTransformer(Qwen2VisionTransformer):
    def __init__(self, vision: dict, text_hidden: int):
        super().__init__(vision, int(vision.get("out_hidden_size", text_hidden)))
        self.window_units = int(vision.get("window_size", 112)) // self.merge // self.patch_size
        self.full_blocks = set(vision.get("fullatt_block_indexes", [7, 15, 23, 31]))

    @staticmethod
    def embed_dim(vision: dict) -> int:
        return int(vision.get("hidden_size", 1280))

    def build_block(self, vision: dict, dim: int) -> nn.Module:
        return GatedVisionBlock(dim, self.heads, int(vision.get("intermediate_size", 3420)))

    def build_norm(self, dim: int) -> nn.Module:
        return VisionRMSNorm(dim)

    def windows(self, grids: list[tuple[int, int, int]]) -> tuple[torch.Tensor, list[int]]:
        """The merged units' order window by window (frame, window row, window column, row, column), and the
        windows' lengths in patches."""
        order, lengths, base = [], [], 0
        side = self.window_units
        for t, h, w in grids:
            h, w = h // self.merge, w // self.merge
            units = np.arange(t * h * w).reshape(t, h, w) + base
            for frame in units:
                for top in range(0, h, side):
                    for left in range(0, w, side):
                        window = frame[top:top + side, left:left + side].reshape(-1)
                        order.append(window)
                        lengths.append(len(window) * self.merge ** 2)
            base += t * h * w
        return torch.from_numpy(np.concatenate(order)), lengths

    def forward(self, patches: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        weight = self.patch_embed.proj.weight
        x = self.patch_embed.proj(patches.to(weight.dtype).view(-1, self.channels, self.temporal_patch_size,
                                                                self.patch_size, self.patch_size)).flatten(1)
        cos, sin = self.rotary(grids, x.device)
        order, window_lengths = self.windows(grids)
        order = order.to(x.device)
        unit = self.merge ** 2

        def by_window(t: torch.Tensor) -> torch.Tensor:
            return t.view(-1, unit, *t.shape[1:])[order].flatten(0, 1)

        x, cos, sin = by_window(x), by_window(cos), by_window(sin)
        frame_lengths = [h * w for t, h, w in grids for _ in range(t)]
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, frame_lengths if i in self.full_blocks else window_lengths)
        merged = self.merge_tokens(x)
        return merged[torch.argsort(order)]


class Qwen2_5_VLForConditionalGeneration(Qwen2VLForConditionalGeneration):
    vision_class = Qwen25VisionTransformer
