"""load_processor: the checkpoint's own HF processor (AutoProcessor), also where its video part cannot load.

Processors that take videos too (LLaVA-OneVision's) need torchvision for their video processor, which the ingress,
a process without torch, never has. Their image path does not use it: such a processor is then built from the
checkpoint's image processor, tokenizer and processor_config.json with no video processor."""

from __future__ import annotations

import json
import os


def load_processor(model_path: str, trust_remote_code: bool = False):
    import transformers

    try:
        return transformers.AutoProcessor.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    except (ImportError, AttributeError, ValueError, TypeError) as err:
        config_path = os.path.join(model_path, "processor_config.json")
        if not os.path.isfile(config_path):
            raise
        with open(config_path) as f:
            options = json.load(f)
        processor_class = getattr(transformers, options.pop("processor_class", ""), None)
        if processor_class is None or "video_processor" not in processor_class.get_attributes():
            raise err from None

    class ImageOnly(processor_class):
        def check_argument_for_proper_class(self, name, arg):
            if name == "video_processor" and arg is None:
                return None
            return super().check_argument_for_proper_class(name, arg)

    template_path = os.path.join(model_path, "chat_template.jinja")
    if os.path.isfile(template_path) and "chat_template" not in options:
        with open(template_path) as f:
            options["chat_template"] = f.read()
    return ImageOnly(image_processor=transformers.AutoImageProcessor.from_pretrained(model_path),
                     tokenizer=transformers.AutoTokenizer.from_pretrained(model_path), video_processor=None, **options)
