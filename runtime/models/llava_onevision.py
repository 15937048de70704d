"""LLaVA-OneVision (LlavaOnevisionForConditionalGeneration): LLaVA-NeXT's anyres packing on a SigLIP tower (no class
token: the "full" select strategy keeps every patch) with a Qwen2 language model, and one more rule: an unpadded
feature map larger than `vision_aspect_ratio`'s anyres_max_N tiles (by area, beyond a 1.1 ratio) is scaled down
bilinearly before the row newlines are added, so a large image costs at most about N + 1 tiles of tokens."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from runtime.models.llava_next import LlavaNextForConditionalGeneration


class LlavaOnevisionForConditionalGeneration(LlavaNextForConditionalGeneration):
    def __init__(self, config, max_positions, tp, dtype, device):
        super().__init__(config, max_positions, tp, dtype, device)
        aspect = config.hf["vision_language"].get("vision_aspect_ratio", "anyres_max_9")
        self.max_tiles = int(aspect.removeprefix("anyres_max_"))

    def shrink(self, grid: torch.Tensor) -> torch.Tensor:
        _, height, width = grid.shape
        ratio = math.sqrt(height * width / (self.max_tiles * self.tile_tokens_side ** 2))
        if ratio <= 1.1:
            return grid
        return F.interpolate(grid[None], [int(height // ratio), int(width // ratio)], mode="bilinear")[0]
