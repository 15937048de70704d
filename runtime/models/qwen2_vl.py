"""Qwen2-VL (Qwen2VLForConditionalGeneration): its own ViT at dynamic resolution, and M-RoPE in a Qwen2 language model.

Vision: the processor resizes an image to a multiple of 28 px within its pixel budget and flattens it into patches of
2 frames x 14 x 14 x 3 (pixel_values [patches, 1176], image_grid_thw [1, 3] = frames, rows, columns of patches, in
2x2 merge-block order). The tower: a bias-free Conv3d patch embedding, blocks of pre-LayerNorm attention (fused qkv
with bias, 2D rotary over the patch's row and column) and MLP, attention within each image's frame only; the merger
folds each 2x2 block into one token (LayerNorm, MLP to the language model's width). All images of a step run as one
sequence of patches.

M-RoPE: the head's rotary frequencies are split in three sections (`mrope_section`, e.g. 16/24/24 of 64) that rotate
by three position ids: an image token at merged grid cell (t, h, w) has (s + t, s + h, s + w), s being the position
its image starts at; a text token has its position three times, and text after an image continues from
s + max(merged rows, merged columns). The worker computes these ids (runtime/worker/image_encoder.py, from
`image_rope`) and hands them over in ForwardBatch.rope_positions; steps without images in their rows keep the
one-dimensional positions (their three ids are equal), so CUDA graphs still serve text-only decode batches.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from runtime.layers.rotary import RopeConfig, RotaryEmbedding
from runtime.model_loader.weight_map import WeightTarget
from runtime.models.clip_vision import ACTIVATIONS
from runtime.models.llama import LlamaForCausalLM
from runtime.models.llava import vision_language_config

RENAMES = (("model.language_model.", "model."), ("model.visual.", "visual."))


class MRotaryEmbedding(RotaryEmbedding):
    def __init__(self, head_dim: int, max_positions: int, config: RopeConfig, device, mrope_section: list[int]):
        super().__init__(head_dim, max_positions, config, device)
        if sum(mrope_section) * 2 != self.rotary_dim:
            raise ValueError(f"mrope_section {mrope_section} must cover half the rotary dimensions {self.rotary_dim}")
        axis = torch.cat([torch.full((n,), i % 3) for i, n in enumerate(mrope_section)])
        axis = torch.cat([axis, axis])  # the cos half, then the sin half of the table
        self.register_buffer("axis_mask", (axis[None, :] == torch.arange(3)[:, None]).to(self.cos_sin.dtype)
                             .to(self.cos_sin.device), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        if positions.dim() == 1:
            return super().forward(positions, q, k)
        cos_sin = (self.cos_sin[positions] * self.axis_mask[:, None, :]).sum(0)  # [3, T, D] -> [T, D]
        cos, sin = cos_sin.unsqueeze(1).to(q.dtype).chunk(2, dim=-1)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class VisionBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_dim: int, act: str):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(dim, dim * 3)
        self.attn.proj = nn.Linear(dim, dim)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(dim, mlp_dim)
        self.mlp.fc2 = nn.Linear(mlp_dim, dim)
        self.act = ACTIVATIONS[act]

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        n, dim = x.shape
        q, k, v = self.attn.qkv(self.norm1(x)).view(n, 3, self.heads, -1).unbind(1)
        q = (q.float() * cos + rotate_half(q.float()) * sin).to(v.dtype)
        k = (k.float() * cos + rotate_half(k.float()) * sin).to(v.dtype)
        out = torch.cat([F.scaled_dot_product_attention(qs.transpose(0, 1), ks.transpose(0, 1), vs.transpose(0, 1))
                         .transpose(0, 1) for qs, ks, vs in zip(q.split(lengths), k.split(lengths), v.split(lengths))])
        x = x + self.attn.proj(out.reshape(n, dim))
        return x + self.feed_forward(self.norm2(x))

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp.fc2(self.act(self.mlp.fc1(x)))


class Qwen2VisionTransformer(nn.Module):
    def __init__(self, vision: dict, text_hidden: int):
        super().__init__()
        dim = self.embed_dim(vision)
        self.heads = int(vision.get("num_heads", 16))
        self.patch_size = int(vision.get("patch_size", 14))
        self.temporal_patch_size = int(vision.get("temporal_patch_size", 2))
        self.channels = int(vision.get("in_channels", vision.get("in_chans", 3)))
        self.merge = int(vision.get("spatial_merge_size", 2))
        kernel = (self.temporal_patch_size, self.patch_size, self.patch_size)
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv3d(self.channels, dim, kernel_size=kernel, stride=kernel, bias=False)
        head_dim = dim // self.heads
        theta = float((vision.get("rope_parameters") or {}).get("rope_theta", 10000.0))
        spatial = head_dim // 2
        self.register_buffer("inv_freq", 1.0 / theta ** (torch.arange(0, spatial, 2, dtype=torch.float) / spatial),
                             persistent=False)
        self.blocks = nn.ModuleList(self.build_block(vision, dim) for _ in range(int(vision.get("depth", 32))))
        merged = dim * self.merge ** 2
        self.merger = nn.Module()
        self.merger.ln_q = self.build_norm(dim)
        self.merger.mlp = nn.Sequential(nn.Linear(merged, merged), nn.GELU(), nn.Linear(merged, text_hidden))

    @staticmethod
    def embed_dim(vision: dict) -> int:
        return int(vision.get("embed_dim", 1280))

    def build_block(self, vision: dict, dim: int) -> nn.Module:
        mlp_dim = int(dim * float(vision.get("mlp_ratio", 4)))
        return VisionBlock(dim, self.heads, mlp_dim, vision.get("hidden_act", "quick_gelu"))

    def build_norm(self, dim: int) -> nn.Module:
        return nn.LayerNorm(dim, eps=1e-6)

    def rotary(self, grids: list[tuple[int, int, int]], device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [patches, 1, head_dim] of every patch's (row, column), in merge-block order."""
        ids = []
        for t, h, w in grids:
            rows = torch.arange(h).view(h // self.merge, self.merge, 1, 1).expand(-1, -1, w // self.merge, self.merge)
            cols = torch.arange(w).view(1, 1, w // self.merge, self.merge).expand(h // self.merge, self.merge, -1, -1)
            block = torch.stack([rows.transpose(1, 2).flatten(), cols.transpose(1, 2).flatten()], dim=-1)
            ids.append(block.repeat(t, 1))
        ids = torch.cat(ids).to(device)
        freqs = (ids[..., None].float() * self.inv_freq).flatten(1)  # [patches, h freqs | w freqs]
        freqs = torch.cat([freqs, freqs], dim=-1)[:, None, :]
        return freqs.cos(), freqs.sin()

    def forward(self, patches: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        weight = self.patch_embed.proj.weight
        x = self.patch_embed.proj(patches.to(weight.dtype).view(-1, self.channels, self.temporal_patch_size,
                                                                self.patch_size, self.patch_size)).flatten(1)
        cos, sin = self.rotary(grids, x.device)
        lengths = [h * w for t, h, w in grids for _ in range(t)]  # attention within each frame
        for block in self.blocks:
            x = block(x, cos, sin, lengths)
        return self.merge_tokens(x)

    def merge_tokens(self, x: torch.Tensor) -> torch.Tensor:
        return self.merger.mlp(self.merger.ln_q(x).view(-1, x.shape[-1] * self.merge ** 2))


class Qwen2VLForConditionalGeneration(LlamaForCausalLM):
    vision_class = Qwen2VisionTransformer

    def __init__(self, config, max_positions, tp, dtype, device):
        full = config.hf["vision_language"]
        self.mrope_section = list(config.hf["mrope_section"])
        super().__init__(config, max_positions, tp, dtype, device)
        vision = full["vision_config"]
        self.merge = int(vision.get("spatial_merge_size", 2))
        self.image_token_id = int(full.get("image_token_id", full.get("image_token_index", 151655)))
        with device:
            self.visual = self.vision_class(vision, config.hidden_size).to(dtype)

    @staticmethod
    def standard_config(config: dict) -> dict:
        """Flat (hub) or nested (transformers 5) configs; the mrope rope type is the default rope with sections."""
        standard = vision_language_config(config)
        params = dict(standard.get("rope_parameters") or {})
        scaling = dict(standard.get("rope_scaling") or {})
        section = params.pop("mrope_section", None) or scaling.pop("mrope_section", None) or [16, 24, 24]
        for rope in (params, scaling):
            if rope.get("rope_type", rope.get("type")) == "mrope":
                rope.pop("type", None)
                rope["rope_type"] = "default"
        return {**standard, "rope_parameters": params or None, "rope_scaling": scaling or None,
                "mrope_section": section}

    def build_rotary(self) -> RotaryEmbedding:
        config = self.config
        return MRotaryEmbedding(config.head_dim, self.max_positions, config.rope, self.device, self.mrope_section)

    def image_rope(self, tensors: dict[str, np.ndarray]) -> tuple[np.ndarray, int]:
        """An image's M-RoPE ids relative to its start [3, tokens], and how far the positions after it move on."""
        t, h, w = (int(v) for v in tensors["image_grid_thw"].reshape(3))
        h, w = h // self.merge, w // self.merge
        grid = np.stack(np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")).reshape(3, -1)
        return grid, max(h, w)

    def encode_images(self, images: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        grids = [tuple(int(v) for v in image["image_grid_thw"].reshape(3).tolist()) for image in images]
        patches = torch.cat([image["pixel_values"].reshape(-1, image["pixel_values"].shape[-1]) for image in images])
        features = self.visual(patches.to(self.dtype), grids)
        return list(features.split([t * h * w // self.merge ** 2 for t, h, w in grids]))

    def weight_targets(self, name: str, tensor: torch.Tensor) -> list[WeightTarget]:
        for old, new in RENAMES:
            if name.startswith(old):
                name = new + name[len(old):]
                break
        if name.startswith("visual."):
            return [WeightTarget(name, tensor)]
        return super().weight_targets(name, tensor)
