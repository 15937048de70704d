"""Model registry: config.json `architectures` name -> model class, one line per architecture.

`model_config_from_hf` picks the first listed architecture we serve, lets its class rename config facts
(`standard_config`), and parses the result into a ModelConfig; a checkpoint of any other architecture is refused
with a message that names it and lists the supported ones.
"""

from __future__ import annotations

from runtime.models.baichuan import BaichuanForCausalLM
from runtime.models.chatglm import ChatGLMForCausalLM
from runtime.models.cohere import CohereForCausalLM
from runtime.models.config import ModelConfig, ModelConfigError
from runtime.models.dbrx import DbrxForCausalLM
from runtime.models.decoder import CausalLM
from runtime.models.deepseek_v2 import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM
from runtime.models.gemma import GemmaForCausalLM
from runtime.models.gemma2 import Gemma2ForCausalLM
from runtime.models.gemma3 import Gemma3ForCausalLM
from runtime.models.glm import GlmForCausalLM
from runtime.models.glm4 import Glm4ForCausalLM
from runtime.models.grok import Grok1ForCausalLM
from runtime.models.internlm2 import InternLM2ForCausalLM
from runtime.models.llama import ExaoneForCausalLM, LlamaForCausalLM, Qwen2ForCausalLM
from runtime.models.llama_embedding import LlamaEmbeddingModel, Qwen2EmbeddingModel
from runtime.models.llava import LlavaForConditionalGeneration
from runtime.models.llava_next import LlavaNextForConditionalGeneration
from runtime.models.llava_onevision import LlavaOnevisionForConditionalGeneration
from runtime.models.minicpm import MiniCPMForCausalLM
from runtime.models.minicpm3 import MiniCPM3ForCausalLM
from runtime.models.mixtral import MixtralForCausalLM
from runtime.models.olmoe import OlmoeForCausalLM
from runtime.models.phi3 import Phi3ForCausalLM
from runtime.models.qwen import QWenLMHeadModel
from runtime.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
from runtime.models.qwen2_moe import Qwen2MoeForCausalLM
from runtime.models.qwen2_vl import Qwen2VLForConditionalGeneration
from runtime.models.qwen3 import Qwen3ForCausalLM
from runtime.models.qwen3_moe import Qwen3MoeForCausalLM
from runtime.models.stablelm import StableLmForCausalLM
from runtime.models.xverse import XverseForCausalLM, XverseMoeForCausalLM
from runtime.multimodal.llava_original import ORIGINAL_LLAVA, hf_layout

MODEL_REGISTRY: dict[str, type[CausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "ExaoneForCausalLM": ExaoneForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "OlmoeForCausalLM": OlmoeForCausalLM,
    "DbrxForCausalLM": DbrxForCausalLM,
    "GemmaForCausalLM": GemmaForCausalLM,
    "Gemma2ForCausalLM": Gemma2ForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
    "StableLmForCausalLM": StableLmForCausalLM,
    "CohereForCausalLM": CohereForCausalLM,
    "GlmForCausalLM": GlmForCausalLM,
    "Glm4ForCausalLM": Glm4ForCausalLM,
    "Phi3ForCausalLM": Phi3ForCausalLM,
    "DeepseekV2ForCausalLM": DeepseekV2ForCausalLM,
    "DeepseekV3ForCausalLM": DeepseekV3ForCausalLM,
    # Families whose modeling code lives only in their checkpoint repositories (never run: built from config.json)
    "Grok1ForCausalLM": Grok1ForCausalLM,
    "Grok1ModelForCausalLM": Grok1ForCausalLM,
    "ChatGLMModel": ChatGLMForCausalLM,
    "ChatGLMForConditionalGeneration": ChatGLMForCausalLM,
    "InternLM2ForCausalLM": InternLM2ForCausalLM,
    "BaichuanForCausalLM": BaichuanForCausalLM,
    "BaiChuanForCausalLM": BaichuanForCausalLM,
    "MiniCPMForCausalLM": MiniCPMForCausalLM,
    "MiniCPM3ForCausalLM": MiniCPM3ForCausalLM,
    "XverseForCausalLM": XverseForCausalLM,
    "XverseMoeForCausalLM": XverseMoeForCausalLM,
    "QWenLMHeadModel": QWenLMHeadModel,
    # Vision language models (runtime/multimodal/ preprocesses their images in the ingress)
    "LlavaForConditionalGeneration": LlavaForConditionalGeneration,
    "LlavaNextForConditionalGeneration": LlavaNextForConditionalGeneration,
    "LlavaOnevisionForConditionalGeneration": LlavaOnevisionForConditionalGeneration,
    "Qwen2VLForConditionalGeneration": Qwen2VLForConditionalGeneration,
    "Qwen2_5_VLForConditionalGeneration": Qwen2_5_VLForConditionalGeneration,
    # Bare decoders (no LM head), served as embedding models
    "LlamaModel": LlamaEmbeddingModel,
    "MistralModel": LlamaEmbeddingModel,
    "Qwen2Model": Qwen2EmbeddingModel,
}


def model_class(architecture: str) -> type[CausalLM]:
    try:
        return MODEL_REGISTRY[architecture]
    except KeyError:
        raise ModelConfigError(_unsupported(architecture)) from None


def model_config_from_hf(config: dict, generation_config: dict | None = None) -> ModelConfig:
    architectures = config.get("architectures") or []
    supported = [a for a in architectures if a in MODEL_REGISTRY or a in ORIGINAL_LLAVA]
    if not supported:
        raise ModelConfigError(_unsupported(architectures or "(none in config.json)"))
    architecture = supported[0]
    try:
        if architecture in ORIGINAL_LLAVA:  # read as the transformers layout it corresponds to
            config = hf_layout(config, int(config.get("image_token_index", 0)))
            architecture = config["architectures"][0]
        standard = MODEL_REGISTRY[architecture].standard_config(config)
    except KeyError as missing:
        raise ModelConfigError(f"config.json lacks {missing.args[0]!r}") from None
    return ModelConfig.from_hf(standard, generation_config, architecture)


def _unsupported(architecture) -> str:
    return f"unsupported architecture {architecture}; supported: {', '.join(MODEL_REGISTRY)}"
