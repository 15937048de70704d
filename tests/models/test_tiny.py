"""Tiny random-weight models of every registered architecture, built and saved as safetensors by
transformers, against transformers: prefill logits and batched greedy decoding through the paged
cache. Llama uses llama3 rope scaling, Mistral a sliding window shorter than the sequences, Qwen2
qkv biases and tied embeddings."""

from __future__ import annotations

import pytest
import torch

from runtime.models import MODEL_REGISTRY
from runtime.worker.model_runner import ModelRunner, ModelRunnerConfig
from tests.model_fixtures import PlanDriver, hf_greedy, relative_max_error, runner_logits, save_tiny_model

PROMPTS = [[5, 17, 33, 2, 90, 41, 7, 64, 12, 3, 99, 18], [8, 8, 21], [70, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14,
                                                                       15, 16, 17, 18, 19, 20, 21], [44]]
NEW_TOKENS = 24


@pytest.fixture(scope="module", params=sorted(MODEL_REGISTRY))
def tiny(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    reference = save_tiny_model(request.param, str(folder))
    runner = ModelRunner(ModelRunnerConfig(model_path=str(folder), device="cpu", max_total_tokens=512,
                                           max_running_requests=8))
    return runner, reference


def test_architecture_facts(tiny):
    runner, reference = tiny
    assert runner.info.architecture == reference.config.architectures[0]
    spec = runner.attention_spec
    assert (spec.num_q_heads, spec.num_kv_heads, spec.head_dim) == (4, 2, 16)
    assert spec.sliding_window == (8 if runner.info.architecture == "MistralForCausalLM" else None)
    if runner.info.architecture == "Qwen2ForCausalLM":
        assert runner.model.model.layers[0].self_attn.qkv_proj.bias is not None
        assert runner.model.lm_head.weight is runner.model.model.embed_tokens.weight


def test_prefill_logits_match_transformers(tiny):
    runner, reference = tiny
    ours = runner_logits(runner, PROMPTS)
    for prompt, logits in zip(PROMPTS, ours):
        with torch.no_grad():
            expected = reference(torch.tensor([prompt])).logits[0]
        assert relative_max_error(logits, expected) < 1e-4


def test_batched_greedy_decoding_matches_transformers(tiny):
    runner, reference = tiny
    outputs = PlanDriver(runner).generate(PROMPTS, NEW_TOKENS)
    for prompt, output in zip(PROMPTS, outputs):
        assert output == hf_greedy(reference, prompt, NEW_TOKENS)[1]
