"""load_processor: the checkpoint's own HF processor (AutoProcessor), also where its video part cannot load.

Processors that take videos too (LLaVA-OneVision's, Qwen2-VL's) need torchvision for their video processor, which the
ingress, a process without torch, never has. Their image path does not use it: such a processor is then built from
the checkpoint's image processor, tokenizer and processor_config.json with no video processor. Checkpoints in LLaVA's
original repository layout ship no processor: runtime/multimodal/llava_original.py builds the equivalent one.

The image processor is the PIL one where transformers has both: torchvision is optional, and some transformers
versions gate AutoImageProcessor itself on it. Repository code never runs (no trust_remote_code), as for models."""

from __future__ import annotations

import json
import os


def without_video(processor_class):
    """`processor_class` accepting video_processor=None."""

    class ImageOnly(processor_class):
        def check_argument_for_proper_class(self, name, arg):
            if name == "video_processor" and arg is None:
                return None
            return super().check_argument_for_proper_class(name, arg)

    return ImageOnly


def load_image_processor(model_path: str):
    """The checkpoint's image processor (preprocessor_config.json's image_processor_type), PIL backend first."""
    import transformers

    with open(os.path.join(model_path, "preprocessor_config.json")) as f:
        name = json.load(f).get("image_processor_type") or ""
    name = name.removesuffix("Fast").removesuffix("Pil")
    for class_name in (f"{name}Pil", name) if name else ():
        image_processor_class = getattr(transformers, class_name, None)
        if image_processor_class is None:
            continue
        try:
            return image_processor_class.from_pretrained(model_path)
        except ImportError:  # that class needs torchvision
            continue
    return transformers.AutoImageProcessor.from_pretrained(model_path)


def load_processor(model_path: str):
    import transformers

    from runtime.multimodal.llava_original import build_processor, is_original_llava

    with open(os.path.join(model_path, "config.json")) as f:
        config = json.load(f)
    if is_original_llava(config):
        return build_processor(model_path, config, without_video)
    try:
        return transformers.AutoProcessor.from_pretrained(model_path, trust_remote_code=False)
    except (ImportError, AttributeError, ValueError, TypeError) as err:
        config_path = os.path.join(model_path, "processor_config.json")
        if not os.path.isfile(config_path):
            raise
        with open(config_path) as f:
            options = json.load(f)
        processor_class = getattr(transformers, options.pop("processor_class", ""), None)
        if processor_class is None or "video_processor" not in processor_class.get_attributes():
            raise err from None
    template_path = os.path.join(model_path, "chat_template.jinja")
    if os.path.isfile(template_path) and "chat_template" not in options:
        with open(template_path) as f:
            options["chat_template"] = f.read()
    return without_video(processor_class)(image_processor=load_image_processor(model_path),
                                          tokenizer=transformers.AutoTokenizer.from_pretrained(model_path),
                                          video_processor=None, **options)
