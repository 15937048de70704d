"""LLaVA's own repository layout (lmms-lab/llava-onevision-qwen2-7b-ov, lmms-lab/llama3-llava-next-8b,
liuhaotian/llava-v1.5-7b, ...: LlavaQwenForCausalLM, LlavaLlamaForCausalLM, LlavaMistralForCausalLM), read as the
transformers layout it corresponds to. No torch here: the ingress builds the processor from it, the worker the model.

Their config.json is the language model's, plus `mm_*` keys; the vision tower's config is not in the checkpoint but
named by `mm_vision_tower` (a hub id: the known towers' configs are below, facts from their published configs; or a
local folder with a config.json). `image_aspect_ratio` picks the form: "anyres_max_N" is LLaVA-OneVision's,
"anyres" with `mm_patch_merge_type` "spatial_unpad" LLaVA-NeXT's, anything else LLaVA 1.5's. Tensor names
(`model.mm_projector.0/2`, `model.vision_tower.vision_tower.vision_model.*`, `model.image_newline`) are renamed by
runtime/models/llava.py. They ship no processor: the image processor is the tower's (CLIP's or SigLIP's
normalization, the tower's input size) with the checkpoint's grid, and "<image>" is added to the tokenizer.
"""

from __future__ import annotations

import json
import os

ORIGINAL_LLAVA = ("LlavaLlamaForCausalLM", "LlavaQwenForCausalLM", "LlavaMistralForCausalLM")

_CLIP_L = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
               num_attention_heads=16, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5)
KNOWN_TOWERS = {
    "openai/clip-vit-large-patch14-336": {**_CLIP_L, "image_size": 336},
    "openai/clip-vit-large-patch14": {**_CLIP_L, "image_size": 224},
    "google/siglip-so400m-patch14-384": dict(model_type="siglip_vision_model", hidden_size=1152,
                                             intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                                             patch_size=14, image_size=384, hidden_act="gelu_pytorch_tanh",
                                             layer_norm_eps=1e-6),
}


def is_original_llava(config: dict) -> bool:
    return bool(set(config.get("architectures") or []) & set(ORIGINAL_LLAVA))


def tower_config(name: str) -> dict:
    if name in KNOWN_TOWERS:
        return dict(KNOWN_TOWERS[name])
    path = os.path.join(name, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"mm_vision_tower {name!r}: not a known tower ({', '.join(KNOWN_TOWERS)}) nor a folder with "
                         f"a config.json")
    with open(path) as f:
        config = json.load(f)
    return dict(config.get("vision_config") or config)


def form(config: dict) -> str:
    """"onevision", "next" or "llava"."""
    aspect = str(config.get("image_aspect_ratio") or "")
    if aspect.startswith("anyres_max"):
        return "onevision"
    if aspect.startswith("anyres") and "unpad" in str(config.get("mm_patch_merge_type", "")):
        return "next"
    return "llava"


def hf_layout(config: dict, image_token_id: int) -> dict:
    """The transformers config.json (LlavaForConditionalGeneration, its NeXT or OneVision form) of an original one."""
    vision = tower_config(config["mm_vision_tower"])
    siglip = vision.get("model_type") == "siglip_vision_model"
    kind = form(config)
    text = {k: v for k, v in config.items() if not k.startswith(("mm_", "image_"))}
    text["model_type"] = "qwen2" if "LlavaQwenForCausalLM" in config["architectures"] else (
        "mistral" if "LlavaMistralForCausalLM" in config["architectures"] else "llama")
    select = config.get("mm_vision_select_feature", "patch")
    hf = {"text_config": text, "vision_config": vision,
          "vision_feature_layer": int(config.get("mm_vision_select_layer", -2)),
          # "patch" drops CLIP's class token; SigLIP has none
          "vision_feature_select_strategy": "default" if select == "patch" and not siglip else "full",
          "projector_hidden_act": "gelu", "multimodal_projector_bias": True, "image_token_index": image_token_id,
          "tie_word_embeddings": bool(config.get("tie_word_embeddings", False))}
    if kind == "llava":
        return {**hf, "architectures": ["LlavaForConditionalGeneration"]}
    hf["image_grid_pinpoints"] = config["image_grid_pinpoints"]
    if kind == "next":
        return {**hf, "architectures": ["LlavaNextForConditionalGeneration"]}
    return {**hf, "architectures": ["LlavaOnevisionForConditionalGeneration"],
            "vision_aspect_ratio": config["image_aspect_ratio"]}


def build_processor(model_path: str, config: dict, without_video):
    """The transformers processor equivalent to the checkpoint's own preprocessing (see the module docstring);
    `without_video(cls)` is the processor class taking no video processor (runtime/multimodal/processor.py)."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_path)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    layout = hf_layout(config, tokenizer.convert_tokens_to_ids("<image>"))
    vision = layout["vision_config"]
    size = int(vision["image_size"])
    norm = dict(image_mean=[0.5] * 3, image_std=[0.5] * 3) if vision["model_type"] == "siglip_vision_model" else {}
    strategy = layout["vision_feature_select_strategy"]
    patch = int(vision["patch_size"])
    kind = form(config)
    if kind == "onevision":
        image_processor = transformers.LlavaOnevisionImageProcessor(
            size={"height": size, "width": size}, image_grid_pinpoints=layout["image_grid_pinpoints"], **norm)
        return without_video(transformers.LlavaOnevisionProcessor)(
            image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
            num_image_tokens=(size // patch) ** 2, vision_feature_select_strategy=strategy,
            vision_aspect_ratio=layout["vision_aspect_ratio"])
    options = dict(patch_size=patch, vision_feature_select_strategy=strategy,
                   num_additional_image_tokens=0 if vision["model_type"] == "siglip_vision_model" else 1)
    crop = dict(size={"shortest_edge": size}, crop_size={"height": size, "width": size}, **norm)
    if kind == "next":
        image_processor = transformers.LlavaNextImageProcessor(image_grid_pinpoints=layout["image_grid_pinpoints"],
                                                               **crop)
        return transformers.LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, **options)
    return transformers.LlavaProcessor(image_processor=transformers.CLIPImageProcessor(**crop), tokenizer=tokenizer,
                                       **options)
