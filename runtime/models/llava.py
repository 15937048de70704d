"""LLaVA 1.5 (LlavaForConditionalGeneration; Yi-VL converted to its layout): a CLIP vision tower, a two-layer MLP
projector, and a Llama-family language model (Llama, Mistral, Qwen2 text configs).

The image path: pixel_values [N, 3, H, W] -> the tower's hidden states after `vision_feature_layer` (an int, or a
list whose states are concatenated) -> without the class token for the "default" select strategy -> projector ->
one embedding per image token. The worker (runtime/worker/image_encoder.py) calls `encode_images` for the images a
step needs, in one batch, and scatters the result over the prompt's image positions before the decoder runs.

Checkpoint names: both transformers layouts are read, the saved one (`language_model.model.*`,
`language_model.lm_head.*`, `vision_tower.*`, `multi_modal_projector.*`) and the in-memory one of transformers 5
(`model.language_model.*`, `model.vision_tower.*`, `model.multi_modal_projector.*`, `lm_head.*`), and LLaVA's
original repository's (`model.*`, `model.mm_projector.0/2.*`, `model.vision_tower.vision_tower.*`).
"""

from __future__ import annotations

import torch
from torch import nn

from runtime.model_loader.weight_map import WeightTarget
from runtime.models.clip_vision import ACTIVATIONS, CLIPVisionModel
from runtime.models.config import ModelConfigError
from runtime.models.llama import LlamaForCausalLM

# checkpoint prefix -> ours
RENAMES = (("model.language_model.", "model."), ("language_model.model.", "model."),
           ("language_model.lm_head.", "lm_head."), ("model.vision_tower.vision_tower.", "vision_tower."),
           ("model.vision_tower.", "vision_tower."), ("model.multi_modal_projector.", "multi_modal_projector."),
           # LLaVA's original repository layout (runtime/multimodal/llava_original.py)
           ("model.mm_projector.0.", "multi_modal_projector.linear_1."),
           ("model.mm_projector.2.", "multi_modal_projector.linear_2."))
# text_config.model_type -> the decoder family (Qwen2-VL's text model is a Qwen2 with M-RoPE)
TEXT_FAMILIES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen2_vl": "qwen2",
                 "qwen2_vl_text": "qwen2", "qwen2_5_vl": "qwen2", "qwen2_5_vl_text": "qwen2"}


def vision_language_config(config: dict) -> dict:
    """config.json of a vision language model -> the text model's facts at the top level (what ModelConfig parses),
    with the whole original under `vision_language` for the tower's facts. The text model's facts are in
    `text_config`, or at the top level (Qwen2-VL's hub configs)."""
    text = dict(config.get("text_config") or {k: v for k, v in config.items() if k != "vision_config"})
    family = TEXT_FAMILIES.get(text.get("model_type", "llama"))
    if family is None:
        raise ModelConfigError(f"text_config.model_type {text.get('model_type')!r} is not supported (only "
                               f"{', '.join(TEXT_FAMILIES)})")
    text.setdefault("vocab_size", config.get("vocab_size"))
    if "tie_word_embeddings" in config:
        text["tie_word_embeddings"] = config["tie_word_embeddings"]
    if family == "qwen2":
        text.update(qkv_bias=True, attention_bias=False)
    return {**text, "architectures": config["architectures"], "vision_language": config}


def absolute_layers(feature_layers: list[int], num_layers: int) -> list[int]:
    """Indices into the hidden states [input, after layer 1, ..., after the last layer] (negative ones count from
    the end, as transformers' vision_feature_layer does)."""
    return [i if i >= 0 else num_layers + 1 + i for i in feature_layers]


class LlavaProjector(nn.Module):
    def __init__(self, vision_hidden: int, text_hidden: int, act: str, bias: bool):
        super().__init__()
        self.linear_1 = nn.Linear(vision_hidden, text_hidden, bias=bias)
        self.act = ACTIVATIONS[act]
        self.linear_2 = nn.Linear(text_hidden, text_hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class LlavaForConditionalGeneration(LlamaForCausalLM):
    def __init__(self, config, max_positions, tp, dtype, device):
        super().__init__(config, max_positions, tp, dtype, device)
        full = config.hf["vision_language"]
        vision = full["vision_config"]
        layer = full.get("vision_feature_layer", -2)
        self.feature_layers = absolute_layers([layer] if isinstance(layer, int) else list(layer),
                                              int(vision["num_hidden_layers"]))
        self.select_strategy = full.get("vision_feature_select_strategy", "default")
        self.image_token_id = int(full.get("image_token_index", full.get("image_token_id", 32000)))
        used = max(self.feature_layers)
        with device:
            self.vision_tower = CLIPVisionModel(vision, used).to(dtype)
            self.multi_modal_projector = LlavaProjector(
                int(vision["hidden_size"]) * len(self.feature_layers), config.hidden_size,
                full.get("projector_hidden_act", "gelu"), bool(full.get("multimodal_projector_bias", True))).to(dtype)

    @staticmethod
    def standard_config(config: dict) -> dict:
        return vision_language_config(config)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> [N, tokens per image, hidden] (before the projector's input selection is undone)."""
        states = self.vision_tower(pixel_values)
        selected = [states[i] for i in self.feature_layers]
        if self.select_strategy == "default":
            selected = [s[:, 1:] for s in selected]
        return self.multi_modal_projector(torch.cat(selected, dim=-1))

    def encode_images(self, images: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        """Each image's embeddings [its tokens, hidden]; images of one size run as one batch."""
        out: list[torch.Tensor | None] = [None] * len(images)
        by_shape: dict[tuple, list[int]] = {}
        for i, image in enumerate(images):
            by_shape.setdefault(tuple(image["pixel_values"].shape[-3:]), []).append(i)
        for indices in by_shape.values():
            pixels = torch.cat([images[i]["pixel_values"].reshape(-1, *images[i]["pixel_values"].shape[-3:])
                                for i in indices])
            features = self.image_features(pixels.to(self.dtype))
            for i, feature in zip(indices, features):
                out[i] = feature
        return out

    def weight_targets(self, name: str, tensor: torch.Tensor) -> list[WeightTarget]:
        for old, new in RENAMES:
            if name.startswith(old):
                name = new + name[len(old):]
                break
        if name.startswith("vision_tower."):
            name = "vision_tower.transformer." + name.removeprefix("vision_tower.").removeprefix("vision_model.")
            return [WeightTarget(name, tensor)] if self.vision_tower.used_weight(name) else []
        if name.startswith("multi_modal_projector."):
            return [WeightTarget(name, tensor)]
        return super().weight_targets(name, tensor)
