"""Model registry: config.json `architectures` name -> model class."""

from __future__ import annotations

from runtime.models.config import SUPPORTED_ARCHITECTURES
from runtime.models.llama import LlamaForCausalLM
from runtime.models.llama_embedding import LlamaEmbeddingModel

# Mistral and Qwen2 differ from Llama only in config facts (sliding window, qkv bias) that
# ModelConfig resolves, so one class serves all three.
MODEL_REGISTRY = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "LlamaModel": LlamaEmbeddingModel,
    "MistralModel": LlamaEmbeddingModel,
    "Qwen2Model": LlamaEmbeddingModel,
}
assert set(MODEL_REGISTRY) == set(SUPPORTED_ARCHITECTURES)


def model_class(architecture: str) -> type[LlamaForCausalLM]:
    try:
        return MODEL_REGISTRY[architecture]
    except KeyError:
        raise ValueError(f"unsupported architecture {architecture!r}; supported: "
                         f"{', '.join(MODEL_REGISTRY)}") from None
