"""DeepSeek V2 / V3 (MLA + DeepSeek MoE) beyond the prefill and greedy checks every family gets in test_tiny.py:
- the KV pool holds one latent row per token and layer (kv_lora_rank + qk_rope_head_dim values, no V tensor), and
  pool sizing counts those bytes;
- decode steps, where the absorbed-weight path reads the latent cache, give transformers' logits step after step
  (transformers up-projects keys and values from its own latent cache), with the torch backend and with the MLA
  backend's Triton decode kernel (in Triton's interpreter on the CPU);
- a prefix reused from the cache and a prompt prefilled in chunks beside decode rows give transformers' tokens;
- an fp8 latent cache stays within fp8's precision;
- two-rank tensor parallelism (heads split, latent replicated): tests/models/test_tp.py;
- a V3 checkpoint's multi-token-prediction layer is skipped; an fp8-quantized one (as released) is refused by name;
- a V3 checkpoint served end to end (`python -m runtime`, overlap scheduling) answers transformers' greedy tokens.
Cases (tests/model_fixtures.py): V2 with yarn rope (mscale) and group-limited routing, V2 with q_lora_rank and two
shared experts, V3 with sigmoid noaux_tc routing (non-zero correction bias), q_lora_rank and yarn."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from types import SimpleNamespace

import psutil
import pytest
import torch
from safetensors.torch import load_file, save_file

from runtime.models.config import ModelConfigError
from runtime.worker.attention.mla_backend import MlaAttentionBackend
from runtime.worker.forward_batch import ForwardBatch
from runtime.worker.model_runner import ModelRunner, ModelRunnerConfig
from tests.e2e.test_server import checkpoint_server
from tests.model_fixtures import _CACHE_ARG, PlanDriver, relative_max_error, runner_logits, save_tiny_model

CASES = ["DeepseekV2ForCausalLM-yarn", "DeepseekV2ForCausalLM-q_lora", "DeepseekV3ForCausalLM"]
PROMPTS = [[5, 17, 33, 2, 90, 41, 7, 64, 12], [70, 1, 2, 3]]
DECODE_STEPS = 5
LATENT, ROPE = 32, 8  # the cases' kv_lora_rank and qk_rope_head_dim


def make_runner(folder: str) -> ModelRunner:
    return ModelRunner(ModelRunnerConfig(model_path=folder, device="cpu", max_total_tokens=256,
                                         max_running_requests=4))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    saved = {}
    for case in CASES:
        folder = str(tmp_path_factory.mktemp(case))
        saved[case] = (folder, save_tiny_model(case, folder))
    return saved


def test_pool_holds_one_latent_row_per_token(checkpoints, monkeypatch):
    runner = make_runner(checkpoints["DeepseekV3ForCausalLM"][0])
    spec, pool = runner.attention_spec, runner.kv_pool
    assert (spec.num_kv_heads, spec.head_dim, spec.latent_value_dim) == (1, LATENT + ROPE, LATENT)
    assert pool.keys_only and pool.v == []
    assert [tuple(k.shape) for k in pool.k] == [(257, 1, LATENT + ROPE)] * 2
    # sizing: a quarter of the available RAM on the CPU, at 2 layers x (latent + rope key) x 4 bytes per token
    # (a K and V pool of that width would count twice as much)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=4 * 320_000))
    runner.config = dataclasses.replace(runner.config, max_total_tokens=None)
    assert runner._pool_size() == 320_000 // (2 * (LATENT + ROPE) * 4)


@torch.inference_mode()
def decode_logits(runner: ModelRunner, prompts: list[list[int]], steps: int) -> list[list[torch.Tensor]]:
    """Prefill the prompts in one paged step, then `steps` DECODE steps of all rows, each feeding the argmax of the
    previous logits -> per row, the logits of every step (the prefill's last position first)."""
    logits = [[row[-1]] for row in runner_logits(runner, prompts)]
    lengths = [len(p) for p in prompts]
    next_slot = sum(lengths) + 1  # runner_logits took the top of the slot range
    for _ in range(steps):
        ids = [int(row[-1].argmax()) for row in logits]
        slots = list(range(next_slot, next_slot + len(prompts)))
        next_slot += len(prompts)
        batch = ForwardBatch.build(input_ids=torch.tensor(ids), out_slots=torch.tensor(slots),
                                   rows=list(range(len(prompts))), prefix_lens=lengths,
                                   extend_lens=[1] * len(prompts), req_to_token=runner.req_to_token)
        runner.req_to_token[batch.rows, batch.positions] = batch.out_slots.int()
        runner.attention.prepare(batch)
        step = runner.model.compute_logits(runner.model(batch, runner.attention))
        for row, out in zip(logits, step):
            row.append(out)
        lengths = [n + 1 for n in lengths]
    return logits


@torch.inference_mode()
def hf_decode_logits(model, prompt: list[int], steps: int) -> list[torch.Tensor]:
    out = model(torch.tensor([prompt]), use_cache=True)
    logits = [out.logits[0, -1]]
    for _ in range(steps):
        out = model(torch.tensor([[int(logits[-1].argmax())]]), use_cache=True,
                    **{_CACHE_ARG: getattr(out, _CACHE_ARG)})
        logits.append(out.logits[0, -1])
    return logits


@pytest.mark.parametrize("case, backend", [(case, "torch") for case in CASES] +
                         [("DeepseekV3ForCausalLM", "mla-triton")])
def test_decode_steps_match_transformers(checkpoints, case, backend):
    folder, reference = checkpoints[case]
    runner = make_runner(folder)
    if backend == "mla-triton":  # Triton's interpreter on the CPU: the kernel the model uses on CUDA
        pytest.importorskip("triton")
        runner.attention = MlaAttentionBackend(runner.attention_spec, runner.kv_pool)
    ours = decode_logits(runner, PROMPTS, DECODE_STEPS)
    for prompt, row in zip(PROMPTS, ours):
        expected = hf_decode_logits(reference, prompt, DECODE_STEPS)
        for step, (got, want) in enumerate(zip(row, expected)):
            assert relative_max_error(got, want) < 1e-4, f"step {step}"


def test_prefix_reuse_and_chunks_mixed_with_decode_rows(checkpoints):
    """A second request reuses the first one's cached latent rows for their common prefix (a radix-cache hit) and
    prefills the rest in chunks, in the same steps as the first one's decode rows: both answer transformers' greedy
    tokens."""
    folder, reference = checkpoints["DeepseekV2ForCausalLM-q_lora"]
    driver = PlanDriver(make_runner(folder))
    first = driver.start(PROMPTS[0])
    driver.prefill([first])
    second = driver.start(PROMPTS[0][:6] + [99, 3, 17, 40, 2], prefix_of=first, prefix_len=6)
    while not second.output:  # its prompt in chunks of 2, each step beside the first request's decode row
        driver.step([(first, 1), (second, min(2, len(second.tokens) - len(second.slots)))])
    driver.decode([first, second], 4)
    for seq in (first, second):
        prompt = seq.tokens[:len(seq.tokens) - len(seq.output)]
        with torch.no_grad():
            logits = reference(torch.tensor([seq.tokens[:-1]])).logits[0, len(prompt) - 1:]
        assert seq.output == logits.argmax(-1).tolist()


def test_fp8_latent_cache(checkpoints):
    """--kv-cache-dtype fp8_e4m3 stores the latent rows in fp8: the prompt's logits stay within fp8's precision of
    transformers' (3 mantissa bits: up to ~11% of the largest logit on this tiny random model); a misread cache
    (wrong bytes, a lost scale) is off by far more."""
    folder, reference = checkpoints["DeepseekV3ForCausalLM"]
    runner = ModelRunner(ModelRunnerConfig(model_path=folder, device="cpu", max_total_tokens=256,
                                           max_running_requests=4, kv_cache_dtype="fp8_e4m3"))
    assert runner.kv_pool.k[0].dtype == torch.float8_e4m3fn
    for prompt, logits in zip(PROMPTS, runner_logits(runner, PROMPTS)):
        with torch.no_grad():
            expected = reference(torch.tensor([prompt])).logits[0]
        assert relative_max_error(logits, expected) < 0.25


def test_fp8_block_quantized_checkpoint_is_refused_by_name(checkpoints, tmp_path):
    folder, _ = checkpoints["DeepseekV3ForCausalLM"]
    quantized = str(tmp_path / "fp8")
    shutil.copytree(folder, quantized)
    with open(os.path.join(quantized, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                     "weight_block_size": [128, 128]}
    with open(os.path.join(quantized, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(ModelConfigError, match="DeepseekV3ForCausalLM checkpoints quantized with fp8 are not served"):
        make_runner(quantized)


def test_v3_multi_token_prediction_layer_is_skipped(checkpoints, tmp_path):
    """DeepSeek-V3 checkpoints hold model.layers.{num_hidden_layers}.* (the MTP module): not a layer we build."""
    folder, _ = checkpoints["DeepseekV3ForCausalLM"]
    mtp = str(tmp_path / "mtp")
    shutil.copytree(folder, mtp)
    path = os.path.join(mtp, "model.safetensors")
    tensors = load_file(path)
    tensors.update({name.replace("model.layers.1.", "model.layers.2."): tensor.clone()
                    for name, tensor in tensors.items() if name.startswith("model.layers.1.")})
    tensors["model.layers.2.eh_proj.weight"] = torch.zeros(64, 128)
    save_file(tensors, path, metadata={"format": "pt"})
    plain, with_mtp = make_runner(folder), make_runner(mtp)
    assert torch.equal(runner_logits(plain, PROMPTS)[0], runner_logits(with_mtp, PROMPTS)[0])


@pytest.fixture(scope="module")
def served_v3(checkpoints, tmp_path_factory):
    folder, reference = checkpoints["DeepseekV3ForCausalLM"]
    for srv in checkpoint_server(folder, tmp_path_factory.mktemp("server") / "server.log"):
        yield srv, reference


def test_served_deepseek_v3_answers_with_transformers_greedy_tokens(served_v3):
    server, reference = served_v3
    prompts = [*PROMPTS, [44], [8, 8, 21]]
    status, out = server.post("/generate", {"input_ids": prompts, "sampling_params": {
        "temperature": 0, "max_new_tokens": 8, "ignore_eos": True}})
    assert status == 200, out
    for prompt, answer in zip(prompts, out):
        output = answer["output_ids"]
        assert len(output) == 8
        with torch.no_grad():
            logits = reference(torch.tensor([prompt + output[:-1]])).logits[0, len(prompt) - 1:]
        assert output == logits.argmax(-1).tolist()
