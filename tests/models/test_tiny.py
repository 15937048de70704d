"""Tiny random-weight models of every architecture we serve, built and saved as safetensors by transformers (EXAONE,
whose code lives in its checkpoint repository, as a Llama rewritten in its layout), against transformers in float32:
prefill logits and batched greedy decoding through the paged cache. Each case exercises its family's peculiarities
(tests/model_fixtures.py, `tiny_cases`): rope types, sliding windows (on alternate layers too), soft-capping, MoE
routing and shared experts, q/k norms, partial and interleaved rotary, fused checkpoint tensors, parallel and sandwich
layers."""

from __future__ import annotations

import pytest
import torch

from runtime.models import MODEL_REGISTRY
from runtime.worker.model_runner import ModelRunner, ModelRunnerConfig
from tests.model_fixtures import PlanDriver, hf_greedy, relative_max_error, runner_logits, save_tiny_model, tiny_cases

PROMPTS = [[5, 17, 33, 2, 90, 41, 7, 64, 12, 3, 99, 18], [8, 8, 21], [70, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14,
                                                                       15, 16, 17, 18, 19, 20, 21], [44]]
NEW_TOKENS = 16
CASES = tiny_cases()
# transformers recomputes these ropes' frequencies from the length of each forward call: its one-shot forward over a
# whole sequence differs from its token-by-token decode, which is what we serve
STEPWISE_ROPES = ("dynamic", "longrope")


@pytest.fixture(scope="module", params=sorted(CASES))
def tiny(request, tmp_path_factory):
    case = CASES[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    reference = save_tiny_model(request.param, str(folder))
    runner = ModelRunner(ModelRunnerConfig(model_path=str(folder), device="cpu", max_total_tokens=512,
                                           max_running_requests=8, context_length=case.context_length))
    return case, runner, reference


def test_every_registered_architecture_has_a_case():
    """The bare decoders (embedding models) are checked against transformers by the embedding tests, the families
    whose code lives in their checkpoint repositories by test_remote_families.py, the vision language models by
    test_llava.py and test_qwen2_vl.py."""
    from runtime.models.config import EMBEDDING_ARCHITECTURES
    from runtime.multimodal.architectures import VISION_LANGUAGE_ARCHITECTURES
    from tests.models.test_remote_families import REMOTE_ARCHITECTURES

    bare = set(EMBEDDING_ARCHITECTURES.values())
    assert {case.architecture for case in CASES.values()} == (set(MODEL_REGISTRY) - bare - REMOTE_ARCHITECTURES
                                                              - VISION_LANGUAGE_ARCHITECTURES)


def test_architecture_facts(tiny):
    case, runner, _ = tiny
    assert runner.info.architecture == case.architecture
    spec = runner.attention_spec
    # MLA (DeepSeek) caches one latent "head" per token
    assert (spec.num_q_heads, spec.num_kv_heads) == ((4, 1) if spec.latent_value_dim else (4, 2))
    windows = [spec.window(layer) for layer in range(spec.num_layers)]
    expected = {"MistralForCausalLM": [8, 8] if getattr(case.config, "sliding_window", None) else [None, None],
                "Gemma2ForCausalLM": [8, None], "Gemma3ForCausalLM": [8, None]}.get(case.architecture, [None, None])
    assert windows == expected
    assert (spec.logit_cap is not None) == (case.architecture == "Gemma2ForCausalLM")


def test_prefill_logits_match_transformers(tiny):
    _, runner, reference = tiny
    ours = runner_logits(runner, PROMPTS)
    for prompt, logits in zip(PROMPTS, ours):
        with torch.no_grad():
            expected = reference(torch.tensor([prompt])).logits[0]
        assert relative_max_error(logits, expected) < 1e-4


def test_batched_greedy_decoding_matches_transformers(tiny):
    """Each greedy token is transformers' argmax after the prompt and our earlier tokens (one forward over the whole
    sequence; token by token through its cache where its rope depends on the call)."""
    case, runner, reference = tiny
    outputs = PlanDriver(runner).generate(PROMPTS, NEW_TOKENS)
    rope = (getattr(case.config, "rope_parameters", None) or {}).get("rope_type")
    for prompt, output in zip(PROMPTS, outputs):
        if rope in STEPWISE_ROPES:
            assert output == hf_greedy(reference, prompt, NEW_TOKENS)[1]
            continue
        with torch.no_grad():
            logits = reference(torch.tensor([prompt + output[:-1]])).logits[0, len(prompt) - 1:]
        assert output == logits.argmax(-1).tolist()
