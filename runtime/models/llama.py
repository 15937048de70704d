"""Llama-family decoder (Llama 2/3/3.1, SmolLM, Mistral, Qwen2) over the paged KV cache.

The architectures differ only in config facts that ModelConfig resolves: qkv bias (Qwen2), the
sliding window (Mistral), tied embeddings, the rope variant. Weights use the HF names; `load_weights`
packs q/k/v into qkv_proj and gate/up into gate_up_proj and takes this rank's shard of each.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from runtime.layers.activation import SiluAndMul
from runtime.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear, copy_checked
from runtime.layers.norm import RMSNorm
from runtime.layers.parallel import TensorParallel
from runtime.layers.rotary import RotaryEmbedding
from runtime.layers.vocab import ParallelLMHead, VocabParallelEmbedding
from runtime.models.config import ModelConfig
from runtime.worker.attention.base import AttentionBackend, AttentionSpec
from runtime.worker.forward_batch import ForwardBatch

# checkpoint name fragment -> (our packed parameter fragment, shard id)
PACKED_WEIGHTS = {
    ".q_proj.": (".qkv_proj.", "q"),
    ".k_proj.": (".qkv_proj.", "k"),
    ".v_proj.": (".qkv_proj.", "v"),
    ".gate_proj.": (".gate_up_proj.", 0),
    ".up_proj.": (".gate_up_proj.", 1),
}


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int, rotary: RotaryEmbedding, tp: TensorParallel,
                 dtype: torch.dtype):
        super().__init__()
        self.layer_id = layer_id
        self.rotary = rotary
        self.qkv_proj = QKVParallelLinear(config.hidden_size, config.head_dim, config.num_heads, config.num_kv_heads,
                                          config.qkv_bias, tp, dtype)
        self.o_proj = RowParallelLinear(config.num_heads * config.head_dim, config.hidden_size, config.o_proj_bias,
                                        tp, dtype)
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.head_dim = config.head_dim

    def forward(self, hidden: torch.Tensor, batch: ForwardBatch, attn: AttentionBackend) -> torch.Tensor:
        q, k, v = self.qkv_proj.split(self.qkv_proj(hidden))
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        q, k = self.rotary(batch.positions, q, k)
        return self.o_proj(attn.forward(q, k, v, self.layer_id, batch))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, tp: TensorParallel, dtype: torch.dtype):
        super().__init__()
        size = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [size, size], config.mlp_bias, tp, dtype)
        self.act = SiluAndMul()
        self.down_proj = RowParallelLinear(size, config.hidden_size, config.mlp_bias, tp, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int, rotary: RotaryEmbedding, tp: TensorParallel,
                 dtype: torch.dtype):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.self_attn = LlamaAttention(config, layer_id, rotary, tp, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.mlp = LlamaMLP(config, tp, dtype)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None, batch: ForwardBatch,
                attn: AttentionBackend) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(hidden, batch, attn)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, max_positions: int, tp: TensorParallel, dtype: torch.dtype,
                 device: torch.device):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp, dtype)
        # one table shared by all layers
        self.rotary = RotaryEmbedding(config.head_dim, max_positions, config.rope, device)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i, self.rotary, tp, dtype)
                                    for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)

    def forward(self, batch: ForwardBatch, attn: AttentionBackend) -> torch.Tensor:
        hidden = self.embed_tokens(batch.input_ids)
        residual = None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, batch, attn)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, max_positions: int, tp: TensorParallel, dtype: torch.dtype,
                 device: torch.device):
        """Parameters are created uninitialised on `device`; fill them with load_weights or dummy init."""
        super().__init__()
        self.config = config
        self.tp = tp
        with device:
            self.model = LlamaModel(config, max_positions, tp, dtype, device)
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, tp, dtype)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def attention_spec(self) -> AttentionSpec:
        attn = self.model.layers[0].self_attn
        return AttentionSpec(num_layers=self.config.num_layers, num_q_heads=attn.num_heads,
                             num_kv_heads=attn.num_kv_heads, head_dim=self.config.head_dim,
                             scale=self.config.head_dim ** -0.5, sliding_window=self.config.sliding_window)

    def forward(self, batch: ForwardBatch, attn: AttentionBackend) -> torch.Tensor:
        """Final hidden states [T, hidden] of the batch's new tokens (logits are computed separately,
        only for the tokens that need them)."""
        return self.model(batch, attn)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy checkpoint tensors (HF names) into the parameters; returns the names of the parameters
        that were written, for the loader's completeness check."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            target, shard_id = name, None
            for fragment, (packed, packed_shard) in PACKED_WEIGHTS.items():
                if fragment in name:
                    target, shard_id = name.replace(fragment, packed), packed_shard
                    break
            param = params.get(target)
            if param is None:
                raise KeyError(f"checkpoint tensor {name} has no counterpart in {type(self).__name__}")
            loader = getattr(param, "weight_loader", None)
            if loader is None:
                copy_checked(param, tensor, name)
            elif shard_id is None:
                loader(param, tensor, name)
            else:
                loader(param, tensor, name, shard_id)
            loaded.add(target)
        return loaded
