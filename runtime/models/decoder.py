"""The skeleton every decoder-only family shares: token embedding -> layers -> final norm -> LM head.

A family subclasses `CausalLM` and says what differs:
- `build_layer(layer_id)`: its decoder layer, a module with a `self_attn` (runtime/layers/attention.py) and
  `forward(hidden, residual, batch, attn) -> (hidden, residual)`; residual is None before the first layer (the
  norms fuse the residual add, see runtime/layers/norm.py);
- `build_norm()`: the final norm; `embed_scale` (Gemma multiplies embeddings by sqrt(hidden));
- `attention_scale`, `attn_logit_cap`, `final_logit_cap`, `logit_scale`, `alibi_slopes`: attention and logit facts;
- `standard_config(config)`: renames in config.json before ModelConfig parses it (for families that name the
  common facts differently);
- `weight_targets(name, tensor)`: which parameter(s) each checkpoint tensor fills (runtime/model_loader/weight_map.py);
  the default maps the Llama layout (q/k/v and gate/up packed).
Parameters are created uninitialised on `device`; the loader fills them (load_weights) or draws dummy values.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from runtime.layers.norm import RMSNorm
from runtime.layers.parallel import TensorParallel
from runtime.layers.rotary import RotaryEmbedding
from runtime.layers.vocab import ParallelLMHead, VocabParallelEmbedding
from runtime.model_loader.weight_map import LLAMA_PACKED, WeightTarget, load_mapped, packed_target
from runtime.models.config import ModelConfig
from runtime.worker.attention.base import AttentionBackend, AttentionSpec
from runtime.worker.forward_batch import ForwardBatch


class DecoderModel(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, layers: list[nn.Module], norm: nn.Module,
                 embed_scale: float | None, tp: TensorParallel, dtype: torch.dtype):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(vocab_size, hidden_size, tp, dtype)
        self.layers = nn.ModuleList(layers)
        self.norm = norm
        self.embed_scale = embed_scale

    def forward(self, batch: ForwardBatch, attn: AttentionBackend) -> torch.Tensor:
        hidden = self.embed_tokens(batch.input_ids) if batch.input_embeds is None else batch.input_embeds
        if self.embed_scale is not None:
            # transformers rounds the scale to the model dtype first (sqrt(3072) is 55.5 in bfloat16); a host float
            # keeps the step free of device syncs and capturable
            hidden = hidden * float(torch.tensor(self.embed_scale, dtype=hidden.dtype))
        residual = None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, batch, attn)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class CausalLM(nn.Module):
    embed_scale: float | None = None
    attn_logit_cap: float | None = None
    final_logit_cap: float | None = None
    logit_scale: float | None = None
    alibi_slopes: tuple[float, ...] | None = None  # per q head of this rank (Baichuan 13B): no rope, score biases

    def __init__(self, config: ModelConfig, max_positions: int, tp: TensorParallel, dtype: torch.dtype,
                 device: torch.device):
        super().__init__()
        self.config = config
        self.tp = tp
        self.dtype = dtype
        self.max_positions = max_positions
        self.device = device
        with device:
            self.rotary = self.build_rotary()
            layers = [self.build_layer(i) for i in range(config.num_layers)]
            self.model = DecoderModel(config.vocab_size, config.hidden_size, layers, self.build_norm(),
                                      self.embed_scale, tp, dtype)
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, tp, dtype)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @staticmethod
    def standard_config(config: dict) -> dict:
        return config

    def build_rotary(self) -> RotaryEmbedding | None:
        """One table shared by all layers (None: no rotary, e.g. ALiBi)."""
        config = self.config
        return RotaryEmbedding(config.head_dim, self.max_positions, config.rope, self.device, config.rotary_dim)

    def build_layer(self, layer_id: int) -> nn.Module:
        raise NotImplementedError

    def build_norm(self) -> nn.Module:
        return RMSNorm(self.config.hidden_size, self.config.norm_eps, self.dtype)

    @property
    def attention_scale(self) -> float:
        return self.config.head_dim ** -0.5

    def attention_spec(self) -> AttentionSpec:
        attn = self.model.layers[0].self_attn
        return AttentionSpec(num_layers=self.config.num_layers, num_q_heads=attn.num_heads,
                             num_kv_heads=attn.num_kv_heads, head_dim=self.config.head_dim,
                             scale=self.attention_scale, sliding_window=self.config.sliding_window,
                             window_layers=self.config.sliding_window_layers, logit_cap=self.attn_logit_cap,
                             alibi_slopes=self.alibi_slopes)

    def forward(self, batch: ForwardBatch, attn: AttentionBackend) -> torch.Tensor:
        """Final hidden states [T, hidden] of the batch's new tokens (logits are computed separately,
        only for the tokens that need them)."""
        return self.model(batch, attn)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits [N, vocab]."""
        logits = self.lm_head(hidden)
        if self.logit_scale is not None:
            logits = logits * self.logit_scale
        if self.final_logit_cap is not None:
            logits = torch.tanh(logits / self.final_logit_cap) * self.final_logit_cap
        return logits

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy checkpoint tensors into the parameters; returns the names of the parameters that were written, for
        the loader's completeness check."""
        return load_mapped(self, weights, self.weight_targets)

    def weight_targets(self, name: str, tensor: torch.Tensor) -> list[WeightTarget]:
        if "rotary_emb.inv_freq" in name or (name == "lm_head.weight" and self.config.tie_word_embeddings):
            return []
        return [packed_target(name, tensor, LLAMA_PACKED)]
