"""Gemma 3 (text; Gemma3ForCausalLM, the 1B and the language part of the larger ones): Gemma 2's sandwich layers and
scaled embeddings, plus a Gemma RMSNorm over each head of q and k, local layers (sliding window, five of every six
by default) with their own rope base (`rope_local_base_freq`, no scaling) and global layers with `rope_theta` and
the config's rope scaling. Soft-capping is off in the released configs (null) but honoured when set."""

from __future__ import annotations

from runtime.layers.attention import SelfAttention
from runtime.layers.rotary import RopeConfig, RotaryEmbedding
from runtime.models.gemma import gemma_norm
from runtime.models.gemma2 import Gemma2ForCausalLM, alternating_layer_types
from runtime.models.llama import llama_attention


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    @staticmethod
    def standard_config(config: dict) -> dict:
        pattern = config.get("sliding_window_pattern") or config.get("_sliding_window_pattern") or 6
        return alternating_layer_types(config, int(pattern))

    def build_rotary(self) -> RotaryEmbedding:
        self.local_rotary = RotaryEmbedding(self.config.head_dim, self.max_positions, self.local_rope(),
                                            self.device, self.config.rotary_dim)
        return super().build_rotary()

    def local_rope(self) -> RopeConfig:
        hf = self.config.hf
        if isinstance((hf.get("rope_parameters") or {}).get("sliding_attention"), dict):
            return RopeConfig.from_hf(hf, "sliding_attention")
        return RopeConfig(theta=float(hf.get("rope_local_base_freq", 10000.0)))

    def build_attention(self, layer_id: int) -> SelfAttention:
        config = self.config
        sliding = config.hf["layer_types"][layer_id] == "sliding_attention"
        return llama_attention(config, layer_id, self.local_rotary if sliding else self.rotary, self.tp, self.dtype,
                               qk_norm=lambda heads: gemma_norm(config.head_dim, config, self.dtype))
