"""The Llama-family decoder without its LM head: checkpoints saved from transformers' bare LlamaModel,
MistralModel or Qwen2Model (e5-mistral), and any Llama-family checkpoint served with --is-embedding
(gte-Qwen2 ships as Qwen2ForCausalLM). Its output is the final hidden states, which the worker pools;
it computes no logits, so it never samples."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from runtime.layers.parallel import TensorParallel
from runtime.models.config import ModelConfig
from runtime.models.llama import LlamaForCausalLM, Qwen2ForCausalLM


class _BareDecoder:
    """Mixed into a causal LM: the same decoder, its LM head dropped."""

    def __init__(self, config: ModelConfig, max_positions: int, tp: TensorParallel, dtype: torch.dtype,
                 device: torch.device):
        super().__init__(config, max_positions, tp, dtype, device)
        del self.lm_head

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(f"{self.config.architecture} is an embedding model: it has no LM head to compute logits")

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Bare checkpoints name their tensors without the `model.` prefix; a causal LM's lm_head is skipped."""
        renamed = ((name if name.startswith("model.") else "model." + name, tensor)
                   for name, tensor in weights if not name.startswith("lm_head."))
        return super().load_weights(renamed)


class LlamaEmbeddingModel(_BareDecoder, LlamaForCausalLM):
    pass


class Qwen2EmbeddingModel(_BareDecoder, Qwen2ForCausalLM):
    pass
