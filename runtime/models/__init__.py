"""Model registry: config.json `architectures` name -> model class."""

from __future__ import annotations

from runtime.models.config import EMBEDDING_ARCHITECTURES, SUPPORTED_ARCHITECTURES
from runtime.models.llama import LlamaForCausalLM
from runtime.models.llama_embedding import LlamaEmbeddingModel

# Mistral and Qwen2 differ from Llama only in config facts (sliding window, qkv bias) that
# ModelConfig resolves, so one class serves all three.
MODEL_REGISTRY = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
}
# The bare decoders (no LM head) of embedding checkpoints and of --is-embedding (EMBEDDING_ARCHITECTURES).
EMBEDDING_MODEL_REGISTRY = {
    "LlamaModel": LlamaEmbeddingModel,
    "MistralModel": LlamaEmbeddingModel,
    "Qwen2Model": LlamaEmbeddingModel,
}
assert set(MODEL_REGISTRY) | set(EMBEDDING_MODEL_REGISTRY) == set(SUPPORTED_ARCHITECTURES)
assert set(EMBEDDING_ARCHITECTURES.values()) == set(EMBEDDING_MODEL_REGISTRY)


def model_class(architecture: str) -> type[LlamaForCausalLM]:
    found = MODEL_REGISTRY.get(architecture) or EMBEDDING_MODEL_REGISTRY.get(architecture)
    if found is None:
        raise ValueError(f"unsupported architecture {architecture!r}; supported: "
                         f"{', '.join([*MODEL_REGISTRY, *EMBEDDING_MODEL_REGISTRY])}")
    return found
