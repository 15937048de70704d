"""Embedding pooling in the ModelRunner on tiny random checkpoints built with transformers: bare MistralModel /
Qwen2Model checkpoints, a Qwen2ForCausalLM served with --is-embedding, and a generation model, each pooled as its
sentence-transformers config says (or last token + normalise), against transformers' hidden states."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from runtime.messages import BatchPlan, NewRow, SamplingParams
from runtime.worker.model_runner import ModelRunner, ModelRunnerConfig
from runtime.worker.pooling import PoolingConfigError, read_pooling
from tests.model_fixtures import TINY_COMMON, save_tiny_model

PROMPTS = [[5, 17, 33, 2, 90, 41, 7, 12, 99, 3, 64], [8, 8, 21, 60], [44]]
GREEDY = SamplingParams(temperature=0.0)


def write_sentence_transformers(folder: str, mode: str | None, normalize: bool) -> None:
    """modules.json + 1_Pooling/config.json (+ Normalize) as sentence-transformers saves them."""
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    with open(os.path.join(folder, "modules.json"), "w") as f:
        json.dump(modules, f)
    os.makedirs(os.path.join(folder, "1_Pooling"), exist_ok=True)
    flags = {f"pooling_mode_{m}": m == mode for m in ("cls_token", "mean_tokens", "max_tokens", "lasttoken")}
    with open(os.path.join(folder, "1_Pooling", "config.json"), "w") as f:
        json.dump({"word_embedding_dimension": TINY_COMMON["hidden_size"], **flags, "include_prompt": True}, f)


def save_bare(kind: str, folder: str):
    from transformers import MistralConfig, MistralModel, Qwen2Config, Qwen2Model

    config = (MistralConfig(**TINY_COMMON, sliding_window=8) if kind == "MistralModel"
              else Qwen2Config(**TINY_COMMON))
    torch.manual_seed(1)
    model = (MistralModel if kind == "MistralModel" else Qwen2Model)(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    return model


@torch.inference_mode()
def reference(model, prompt: list[int], method: str, normalize: bool) -> torch.Tensor:
    out = model(torch.tensor([prompt]), output_hidden_states=True)
    hidden = out.hidden_states[-1][0].float()  # after the final norm, as last_hidden_state
    vector = {"last": hidden[-1], "mean": hidden.mean(0), "cls": hidden[0]}[method]
    return torch.nn.functional.normalize(vector, dim=-1) if normalize else vector


def embed_all(runner: ModelRunner, prompts: list[list[int]], chunk: int, extra_generation: list[int] | None = None):
    """Prefill every prompt as an embedding request in `chunk`-token pieces, all rows in the same steps (and a
    generation row beside them); the pooled vectors in prompt order, and the generation row's samples."""
    rows = list(range(len(prompts)))
    done = [0] * len(prompts)
    next_slot = 1
    vectors: dict[int, np.ndarray] = {}
    samples = []
    new_rows = [NewRow(row=r, prefix_slots=[], sampling=GREEDY, embed=True) for r in rows]
    gen_row = len(prompts)
    if extra_generation is not None:
        new_rows.append(NewRow(row=gen_row, prefix_slots=[], sampling=GREEDY))
    batch_id = 0
    while len(vectors) < len(prompts):
        plan = BatchPlan(batch_id=batch_id, rows=[], prefix_lens=[], extend_lens=[], input_ids=[], out_slots=[],
                         sample=[], future_slots=[], new_rows=new_rows)
        new_rows = []
        index_of = {}
        for r, p in zip(rows, prompts):
            if done[r] == len(p):
                continue
            n = min(chunk, len(p) - done[r])
            index_of[len(plan.rows)] = r
            if done[r] + n == len(p):
                plan.pool.append(len(plan.rows))
            plan.rows.append(r)
            plan.prefix_lens.append(done[r])
            plan.extend_lens.append(n)
            plan.input_ids.extend(p[done[r]:done[r] + n])
            plan.out_slots.extend(range(next_slot, next_slot + n))
            plan.sample.append(False)
            plan.future_slots.append(-1)
            next_slot += n
            done[r] += n
        if extra_generation is not None and batch_id == 0:
            plan.rows.append(gen_row)
            plan.prefix_lens.append(0)
            plan.extend_lens.append(len(extra_generation))
            plan.input_ids.extend(extra_generation)
            plan.out_slots.extend(range(next_slot, next_slot + len(extra_generation)))
            next_slot += len(extra_generation)
            plan.sample.append(True)
            plan.future_slots.append(0)
        result = runner.step(plan)
        samples += result.next_token_ids
        assert set(result.embeddings) == set(plan.pool)
        for i, raw in result.embeddings.items():
            vectors[index_of[i]] = np.frombuffer(raw, dtype="<f4")
        batch_id += 1
    return [torch.from_numpy(vectors[r].copy()) for r in rows], samples


def assert_close(ours: torch.Tensor, ref: torch.Tensor, normalized: bool) -> None:
    cosine = float(torch.nn.functional.cosine_similarity(ours, ref, dim=0))
    assert cosine > 0.999, cosine
    if normalized:
        assert abs(float(ours.norm()) - 1.0) < 1e-4
    else:
        assert abs(float(ours.norm()) / float(ref.norm()) - 1.0) < 1e-3


CASES = [
    # (checkpoint, sentence-transformers pooling or None, Normalize module, expected method)
    ("MistralModel", "mean_tokens", True, "mean"),
    ("Qwen2Model", None, True, "last"),
    ("Qwen2Model", "lasttoken", True, "last"),
    ("Qwen2ForCausalLM", "cls_token", False, "cls"),
]


@pytest.mark.parametrize(("kind", "mode", "normalize", "method"), CASES, ids=[f"{c[0]}-{c[3]}" for c in CASES])
def test_pooled_vectors_match_transformers(tmp_path, kind, mode, normalize, method):
    folder = str(tmp_path)
    if kind == "Qwen2ForCausalLM":
        causal = save_tiny_model(kind, folder)
        model = causal.model
    else:
        model = save_bare(kind, folder)
    if mode is not None:
        write_sentence_transformers(folder, mode, normalize)
    runner = ModelRunner(ModelRunnerConfig(model_path=folder, device="cpu", max_total_tokens=256,
                                           max_running_requests=4, is_embedding=kind == "Qwen2ForCausalLM"))
    assert runner.info.is_embedding and runner.info.pooling.method == method
    assert runner.info.pooling.normalize == normalize and runner.info.pooling.dimensions == TINY_COMMON["hidden_size"]
    for chunk in (64, 3):  # whole prompts in one step; then 3-token chunks (mean sums across them)
        vectors, _ = embed_all(runner, PROMPTS, chunk)
        for prompt, ours in zip(PROMPTS, vectors):
            assert_close(ours, reference(model, prompt, method, normalize), normalize)


def test_a_generation_model_pools_last_token_beside_sampling_rows(tmp_path):
    causal = save_tiny_model("LlamaForCausalLM", str(tmp_path))
    runner = ModelRunner(ModelRunnerConfig(model_path=str(tmp_path), device="cpu", max_total_tokens=256,
                                           max_running_requests=4))
    assert not runner.info.is_embedding and runner.info.pooling.method == "last"
    generation = [9, 10, 11, 12]
    vectors, samples = embed_all(runner, PROMPTS[:2], 64, extra_generation=generation)
    for prompt, ours in zip(PROMPTS[:2], vectors):
        assert_close(ours, reference(causal.model, prompt, "last", True), True)
    with torch.inference_mode():
        expected = int(causal(torch.tensor([generation])).logits[0, -1].argmax())
    assert samples == [expected]


def test_bare_checkpoints_are_embedding_models_and_causal_ones_need_the_flag(tmp_path):
    save_bare("MistralModel", str(tmp_path))
    runner = ModelRunner(ModelRunnerConfig(model_path=str(tmp_path), device="cpu", max_total_tokens=64,
                                           max_running_requests=2))
    assert runner.info.is_embedding and runner.info.architecture == "MistralModel"
    with pytest.raises(ValueError, match="samples no tokens"):
        runner.step(BatchPlan(batch_id=0, rows=[0], prefix_lens=[0], extend_lens=[2], input_ids=[1, 2],
                              out_slots=[1, 2], sample=[True], future_slots=[0],
                              new_rows=[NewRow(row=0, prefix_slots=[], sampling=GREEDY)]))


def test_matryoshka_and_bad_sentence_transformers_configs(tmp_path):
    folder = str(tmp_path)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"matryoshka_dimensions": [16, 32]}, f)
    pooling = read_pooling(folder, 64, is_embedding=True)
    assert pooling.matryoshka and pooling.matryoshka_dimensions == [16, 32] and pooling.method == "last"
    write_sentence_transformers(folder, "max_tokens", True)
    with pytest.raises(PoolingConfigError, match="pooling_mode_max_tokens is not supported"):
        read_pooling(folder, 64, is_embedding=True)
    assert read_pooling(folder, 64, is_embedding=False).method == "last"  # a generation server ignores it
    with open(os.path.join(folder, "modules.json"), "w") as f:
        json.dump([{"type": "sentence_transformers.models.Dense", "path": "2_Dense"}], f)
    with pytest.raises(PoolingConfigError, match="Dense"):
        read_pooling(folder, 64, is_embedding=True)
