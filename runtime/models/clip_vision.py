"""The CLIP vision transformer (ViT) that LLaVA 1.5 / 1.6 and Yi-VL use as their image encoder, and SigLIP's
(LLaVA-OneVision), which differs only in its embeddings and the absence of the pre-LayerNorm.

CLIP: patch conv (no bias) + class token + learned positions -> pre-LayerNorm -> pre-norm encoder layers (attention
with biases, MLP with quick_gelu). SigLIP: patch conv (with bias) + learned positions, no class token -> the same
encoder layers (MLP with gelu tanh). The towers' callers want the hidden states after a given layer (LLaVA: the
second-to-last), so `forward` stops at `num_layers_used` and returns every state up to it. Images are encoded in one
batch: [N, 3, H, W] -> [N, 1 + patches, hidden]. The tower is replicated on every tensor-parallel rank (it is small
next to the language model). Parameter names are transformers' CLIPVisionTransformer's under `transformer.`;
checkpoints name the same tensors under `vision_model.` (hub) or directly (transformers 5 saves of LLaVA).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


class VisionAttention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, hidden)
        self.v_proj = nn.Linear(hidden, hidden)
        self.out_proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, hidden = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(n, length, self.heads, hidden // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)))
        return self.out_proj(out.transpose(1, 2).reshape(n, length, hidden))


class VisionMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(hidden, intermediate)
        self.fc2 = nn.Linear(intermediate, hidden)
        self.act = ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionEncoderLayer(nn.Module):
    def __init__(self, hidden: int, heads: int, intermediate: int, act: str, eps: float):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(hidden, eps=eps)
        self.self_attn = VisionAttention(hidden, heads)
        self.layer_norm2 = nn.LayerNorm(hidden, eps=eps)
        self.mlp = VisionMLP(hidden, intermediate, act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    def __init__(self, hidden: int, image_size: int, patch_size: int, channels: int):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.empty(hidden))
        self.patch_embedding = nn.Conv2d(channels, hidden, kernel_size=patch_size, stride=patch_size, bias=False)
        self.position_embedding = nn.Embedding((image_size // patch_size) ** 2 + 1, hidden)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class SiglipEmbeddings(nn.Module):
    def __init__(self, hidden: int, image_size: int, patch_size: int, channels: int):
        super().__init__()
        self.patch_embedding = nn.Conv2d(channels, hidden, kernel_size=patch_size, stride=patch_size)
        self.position_embedding = nn.Embedding((image_size // patch_size) ** 2, hidden)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        return patches + self.position_embedding.weight


class CLIPVisionTransformer(nn.Module):
    def __init__(self, vision_config: dict, num_layers_used: int):
        super().__init__()
        hidden = int(vision_config["hidden_size"])
        heads, intermediate = int(vision_config["num_attention_heads"]), int(vision_config["intermediate_size"])
        siglip = vision_config.get("model_type") == "siglip_vision_model"
        eps = float(vision_config.get("layer_norm_eps", 1e-6 if siglip else 1e-5))
        embeddings = SiglipEmbeddings if siglip else CLIPEmbeddings
        self.embeddings = embeddings(hidden, int(vision_config["image_size"]), int(vision_config["patch_size"]),
                                     int(vision_config.get("num_channels", 3)))
        # (sic: transformers' name)
        self.pre_layrnorm = nn.Identity() if siglip else nn.LayerNorm(hidden, eps=eps)
        default_act = "gelu_pytorch_tanh" if siglip else "quick_gelu"
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(
            VisionEncoderLayer(hidden, heads, intermediate, vision_config.get("hidden_act", default_act), eps)
            for _ in range(num_layers_used))

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """Hidden states: [after the pre-norm, after layer 1, ..., after layer num_layers_used]."""
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        states = [x]
        for layer in self.encoder.layers:
            x = layer(x)
            states.append(x)
        return states


class CLIPVisionModel(nn.Module):
    """The tower up to its last used layer: the post-LayerNorm and the later layers are never built, and their
    checkpoint tensors are skipped (`used_weight`)."""

    def __init__(self, vision_config: dict, num_layers_used: int):
        super().__init__()
        self.num_layers_used = num_layers_used
        self.transformer = CLIPVisionTransformer(vision_config, num_layers_used)

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        return self.transformer(pixel_values)

    def used_weight(self, name: str) -> bool:
        if "post_layernorm" in name or "position_ids" in name or ".head." in name:
            return False
        if ".encoder.layers." in name:
            return int(name.split(".encoder.layers.")[1].split(".")[0]) < self.num_layers_used
        return True
