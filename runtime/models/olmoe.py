"""OLMoE (AllenAI): Llama attention whose q and k projections are RMS-normalized over their full width (all heads
together, before the rotation; `clip_qkv` then clamps q, k and v), and a sparse MoE MLP (experts
mlp.experts.E.{gate,up,down}_proj; softmax weights kept unless `norm_topk_prob`).

Under tensor parallelism each rank holds a slice of the q/k norm weights (its heads) and the mean square is
all-reduced over the ranks, so the normalization still spans the whole width."""

from __future__ import annotations

import torch
from torch import nn

from runtime.layers.attention import SelfAttention
from runtime.layers.linear import copy_checked
from runtime.layers.moe import SparseMoeBlock
from runtime.layers.parallel import TensorParallel
from runtime.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from runtime.models.qwen2_moe import qwen_moe_weight_targets
from runtime.worker.attention.base import AttentionBackend
from runtime.worker.forward_batch import ForwardBatch


class WidthRMSNorm(nn.Module):
    """RMSNorm over the concatenated heads of a projection, of which this rank holds heads [start, start + n)."""

    def __init__(self, num_local_heads: int, head_start: int, head_dim: int, eps: float, tp: TensorParallel,
                 dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.tp = tp
        self.start, self.end = head_start * head_dim, (head_start + num_local_heads) * head_dim
        self.weight = nn.Parameter(torch.empty(self.end - self.start, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = self.load_slice

    def load_slice(self, param: nn.Parameter, loaded: torch.Tensor, name: str, shard_id=None) -> None:
        copy_checked(param, loaded[self.start:self.end], name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, local width]."""
        x32 = x.float()
        square_sum = self.tp.all_reduce(x32.pow(2).sum(-1, keepdim=True))
        x32 = x32 * torch.rsqrt(square_sum / (x.shape[-1] * self.tp.size) + self.eps)
        return self.weight * x32.to(x.dtype)


class OlmoeAttention(SelfAttention):
    def __init__(self, *args, eps: float, clip: float | None, **kwargs):
        super().__init__(*args, **kwargs)
        qkv, tp = self.qkv_proj, self.qkv_proj.tp
        self.clip = clip
        self.q_norm = WidthRMSNorm(self.num_heads, qkv.head_start["q"], self.head_dim, eps, tp, qkv.weight.dtype)
        self.k_norm = WidthRMSNorm(self.num_kv_heads, qkv.head_start["k"], self.head_dim, eps, tp, qkv.weight.dtype)

    def forward(self, hidden: torch.Tensor, batch: ForwardBatch, attn: AttentionBackend) -> torch.Tensor:
        q, k, v = self.qkv_proj.split(self.qkv_proj(hidden))
        q, k = self.q_norm(q), self.k_norm(k)
        if self.clip is not None:
            q, k, v = (t.clamp(-self.clip, self.clip) for t in (q, k, v))
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        q, k = self.rotary(batch.positions, q, k)
        return self.o_proj(attn.forward(q, k, v, self.layer_id, batch))


class OlmoeForCausalLM(LlamaForCausalLM):
    def build_layer(self, layer_id: int) -> nn.Module:
        config, hf = self.config, self.config.hf
        attention = OlmoeAttention(config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim,
                                   layer_id, self.rotary, self.tp, self.dtype, qkv_bias=config.qkv_bias,
                                   o_bias=config.o_proj_bias, eps=config.norm_eps, clip=hf.get("clip_qkv"))
        moe = SparseMoeBlock(config.hidden_size, int(hf["num_experts"]), int(hf["num_experts_per_tok"]),
                             config.intermediate_size, bool(hf.get("norm_topk_prob", False)), self.tp, self.dtype)
        return LlamaDecoderLayer(config, attention, moe, self.dtype)

    def weight_targets(self, name: str, tensor: torch.Tensor):
        return qwen_moe_weight_targets(name, tensor) or super().weight_targets(name, tensor)
