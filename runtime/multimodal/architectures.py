"""The vision language architectures we serve (config.json `architectures` names), for the processes that must know
without importing the models (the ingress loads their processor; the launcher makes the image arena)."""

from __future__ import annotations

import json
import os

from runtime.multimodal.llava_original import ORIGINAL_LLAVA

VISION_LANGUAGE_ARCHITECTURES = frozenset({"LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration",
                                           "LlavaOnevisionForConditionalGeneration", "Qwen2VLForConditionalGeneration",
                                           "Qwen2_5_VLForConditionalGeneration"})


def is_vision_language_folder(model_path: str | None) -> bool:
    """Whether `model_path` is an HF folder whose config.json names a vision language architecture we serve."""
    if not model_path or not os.path.isfile(os.path.join(model_path, "config.json")):
        return False
    with open(os.path.join(model_path, "config.json")) as f:
        architectures = json.load(f).get("architectures") or []
    return bool(VISION_LANGUAGE_ARCHITECTURES.intersection(architectures)
                or set(ORIGINAL_LLAVA).intersection(architectures))
