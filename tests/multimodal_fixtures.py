"""Tiny random vision language checkpoints built with transformers (model, processor and chat template saved
together, as on the hub), images, and the arena plumbing the worker tests need."""

from __future__ import annotations

import io
import json
import os
import uuid

import numpy as np
import pytest
import torch

from runtime.messages import ArenaTensor, ImageItem
from shm import run_prefix, sweep
from shm.arena import Arena

# A processor chat template in the LLaVA 1.5 hub style: image parts become the <image> placeholder.
LLAVA_TEMPLATE = ("{% for m in messages %}{{ m['role'].upper() }}: {% if m['content'] is string %}{{ m['content'] }}"
                  "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% else %}"
                  "{{ c['text'] }}{% endif %}{% endfor %}{% endif %}\n{% endfor %}"
                  "{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def smollm2_tokenizer_with(tokens: list[str]):
    from runtime.server_args import ServerArgs
    from runtime.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(ServerArgs())
    tokenizer.add_special_tokens({"additional_special_tokens": tokens})
    return tokenizer


GRID_PINPOINTS = [[28, 56], [56, 28], [56, 56]]


def save_tiny_llava(folder: str, kind: str = "llava"):
    """A LLaVA 1.5 layout (CLIP tower, MLP projector, Llama LM; 28x28 images of 16 tokens) with random weights and
    its processor, saved in `folder`; kind "llava_next": LLaVA-NeXT's (anyres tiles of 28x28 on GRID_PINPOINTS, an
    image newline). Returns the transformers model."""
    import transformers as tf

    tokenizer = smollm2_tokenizer_with(["<image>"])
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    text = tf.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                          initializer_range=0.2, eos_token_id=2, bos_token_id=1)
    vision = tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                 image_size=28, patch_size=7, projection_dim=32, initializer_range=0.2)
    processor_options = dict(patch_size=7, vision_feature_select_strategy="default", num_additional_image_tokens=1)
    if kind == "llava_onevision":
        vision = tf.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                       num_attention_heads=4, image_size=28, patch_size=7)
        text = tf.Qwen2Config(**{k: getattr(text, k) for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                                 "num_hidden_layers", "num_attention_heads",
                                                                 "num_key_value_heads", "max_position_embeddings",
                                                                 "initializer_range", "eos_token_id", "bos_token_id")})
        # anyres_max_1: a 2x2 grid is scaled down, so the tiny images exercise it
        config = tf.LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_index=image_token,
                                         vision_feature_layer=-1, vision_feature_select_strategy="full",
                                         image_grid_pinpoints=GRID_PINPOINTS, vision_aspect_ratio="anyres_max_1")
        model_class, processor_class = tf.LlavaOnevisionForConditionalGeneration, tf.LlavaOnevisionProcessor
        image_processor = tf.LlavaOnevisionImageProcessor(size={"height": 28, "width": 28},
                                                          image_grid_pinpoints=GRID_PINPOINTS)
        processor_options = dict(num_image_tokens=16, vision_feature_select_strategy="full",
                                 vision_aspect_ratio="anyres_max_1")
    elif kind == "llava_next":
        config = tf.LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=image_token,
                                    vision_feature_layer=-2, vision_feature_select_strategy="default",
                                    image_grid_pinpoints=GRID_PINPOINTS)
        model_class, processor_class = tf.LlavaNextForConditionalGeneration, tf.LlavaNextProcessor
        image_processor = tf.LlavaNextImageProcessor(size={"shortest_edge": 28},
                                                     crop_size={"height": 28, "width": 28},
                                                     image_grid_pinpoints=GRID_PINPOINTS)
    else:
        config = tf.LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token,
                                vision_feature_layer=-2, vision_feature_select_strategy="default")
        model_class, processor_class = tf.LlavaForConditionalGeneration, tf.LlavaProcessor
        image_processor = tf.CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    torch.manual_seed(0)
    model = model_class(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.1)
        if kind != "llava":
            model.model.image_newline.normal_()
    model.save_pretrained(folder)
    if kind == "llava_onevision":  # its processor wants a video processor (torchvision): saved part by part
        image_processor.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        with open(os.path.join(folder, "processor_config.json"), "w") as f:
            json.dump({"processor_class": "LlavaOnevisionProcessor", **processor_options}, f)
        with open(os.path.join(folder, "chat_template.jinja"), "w") as f:
            f.write(LLAVA_TEMPLATE)
        return model
    processor = processor_class(image_processor=image_processor, tokenizer=tokenizer, chat_template=LLAVA_TEMPLATE,
                                **processor_options)
    processor.save_pretrained(folder)
    return model


def random_image(seed: int, width: int = 40, height: int = 32):
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def png_bytes(image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def image_item(arena: Arena, offset: int, length: int, pixel_values: torch.Tensor, **others: torch.Tensor
               ) -> ImageItem:
    """What the ingress sends for one image: its pixel values (and other tensors, e.g. image_sizes) put in `arena`."""
    tensors = {}
    for name, tensor in {"pixel_values": pixel_values, **others}.items():
        array = tensor.contiguous().numpy()
        tensors[name] = ArenaTensor(arena.name, arena.put(array.tobytes()), list(array.shape), str(array.dtype))
    return ImageItem(offset=offset, length=length, tensors=tensors)


QWEN2_VL_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}"
                     "{{ m['content'] }}{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}"
                     "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
                     "{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                     "{% endif %}")


def save_tiny_qwen2_vl(folder: str, kind: str = "qwen2_vl"):
    """A Qwen2-VL layout (its ViT: 14 px patches, 2x2 merge; M-RoPE sections 2/3/3 of a 16-wide head) with random
    weights, its image processor (56x56 to 112x112 pixels), tokenizer and template, saved in `folder` part by part
    (the processor's video part needs torchvision); kind "qwen2_5_vl": Qwen2.5-VL's (RMSNorm, gated MLP, windows of
    2x2 merged units with block 1 attending the whole image). Returns the transformers model."""
    import transformers as tf

    special = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tokenizer = smollm2_tokenizer_with(special)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in special}
    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                eos_token_id=2, bos_token_id=1)
    vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3, initializer_range=0.2)
    config_class, model_class, processor_class = (tf.Qwen2VLConfig, tf.Qwen2VLForConditionalGeneration,
                                                  "Qwen2VLProcessor")
    if kind == "qwen2_5_vl":
        vision = dict(depth=2, hidden_size=32, out_hidden_size=64, intermediate_size=48, num_heads=4, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, in_channels=3, window_size=56,
                      fullatt_block_indexes=[1], hidden_act="silu", initializer_range=0.2)
        config_class, model_class, processor_class = (tf.Qwen2_5_VLConfig, tf.Qwen2_5_VLForConditionalGeneration,
                                                      "Qwen2_5_VLProcessor")
    config = config_class(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                          video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                          vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(0)
    model = model_class(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(folder)
    tf.Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14, merge_size=2,
                             temporal_patch_size=2).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    with open(os.path.join(folder, "processor_config.json"), "w") as f:
        json.dump({"processor_class": processor_class}, f)
    with open(os.path.join(folder, "chat_template.jinja"), "w") as f:
        f.write(QWEN2_VL_TEMPLATE)
    return model


def save_original_llava_onevision(folder: str):
    """The tiny LLaVA-OneVision of save_tiny_llava rewritten in LLaVA's original repository layout
    (LlavaQwenForCausalLM, `mm_*` keys, `model.mm_projector.0/2`, `model.vision_tower.vision_tower.vision_model.*`;
    the tower's config in a folder `mm_vision_tower` names, no processor, a tokenizer without <image>). Returns the
    transformers model (same weights)."""
    from safetensors.torch import load_file, save_file

    hf = os.path.join(folder, "hf")
    model = save_tiny_llava(hf, "llava_onevision")
    with open(os.path.join(hf, "config.json")) as f:
        config = json.load(f)
    tower = os.path.join(folder, "tower")
    os.makedirs(tower)
    with open(os.path.join(tower, "config.json"), "w") as f:
        json.dump(config["vision_config"], f)
    renames = (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
               ("vision_tower.", "model.vision_tower.vision_tower.vision_model."),
               ("multi_modal_projector.linear_1.", "model.mm_projector.0."),
               ("multi_modal_projector.linear_2.", "model.mm_projector.2."), ("image_newline", "model.image_newline"))
    tensors = {}
    for name, tensor in load_file(os.path.join(hf, "model.safetensors")).items():
        for old, new in renames:
            if name.startswith(old):
                name = new + name[len(old):]
                break
        tensors[name] = tensor
    original = os.path.join(folder, "original")
    os.makedirs(original)
    save_file(tensors, os.path.join(original, "model.safetensors"), metadata={"format": "pt"})
    text = {k: v for k, v in config["text_config"].items() if k not in ("architectures",)}
    with open(os.path.join(original, "config.json"), "w") as f:
        json.dump({**text, "architectures": ["LlavaQwenForCausalLM"], "model_type": "llava",
                   "mm_vision_tower": tower, "mm_vision_select_layer": -1, "mm_vision_select_feature": "patch",
                   "mm_projector_type": "mlp2x_gelu", "mm_patch_merge_type": "spatial_unpad",
                   "image_aspect_ratio": "anyres_max_1", "image_grid_pinpoints": GRID_PINPOINTS,
                   "image_token_index": config["image_token_index"], "mm_hidden_size": 32}, f)
    from runtime.server_args import ServerArgs
    from runtime.tokenizer import load_tokenizer

    load_tokenizer(ServerArgs()).save_pretrained(original)
    return model, original


NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def kinds_on_devices(kinds: tuple[str, ...]) -> list:
    """Each kind on the CPU, and on CUDA where there is one."""
    return [pytest.param((kind, device), id=f"{kind}-{device}", marks=[NO_CUDA] if device == "cuda" else [])
            for kind in kinds for device in ("cpu", "cuda")]


def vision_runner(folder: str, device: str, name: str):
    """(processor, runner, arena) for a saved vision checkpoint, closed after use: its own processor, a float32
    ModelRunner (on CUDA too: Triton attention and eager image steps, so greedy tokens match transformers exactly)
    and a 1 MiB image arena."""
    from runtime.multimodal.processor import load_processor
    from runtime.worker.model_runner import ModelRunner, ModelRunnerConfig

    processor = load_processor(folder)
    runner = ModelRunner(ModelRunnerConfig(model_path=folder, device=device, dtype="float32", max_total_tokens=1024,
                                           max_running_requests=4))
    prefix = f"{run_prefix()}{name}{uuid.uuid4().hex[:6]}_"
    arena = Arena.create(prefix + "images", 1 << 20)
    try:
        yield processor, runner, arena
    finally:
        runner.image_encoder.close()
        arena.close()
        sweep(prefix)
