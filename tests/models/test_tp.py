"""Tensor-parallel sharding on the CPU: two processes (torch.distributed gloo, a file store) each load
their shard of a tiny model and run one paged prefill; the all-gathered logits must equal the
unsharded model's and transformers'. Covers kv heads split over ranks, kv heads replicated (fewer kv
heads than ranks), row-parallel all-reduce with biases, and a vocabulary that does not divide."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from runtime.layers.parallel import TensorParallel
from runtime.model_loader.loader import load_model, locate_checkpoint, read_model_config
from runtime.worker.attention.torch_backend import TorchAttentionBackend
from runtime.worker.forward_batch import ForwardBatch
from runtime.worker.kv_pool import KVPool

PROMPTS = [[5, 17, 33, 2, 90, 41, 7], [8, 8, 21]]
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@torch.inference_mode()
def sharded_logits(folder: str, tp: TensorParallel) -> torch.Tensor:
    checkpoint = locate_checkpoint(folder, "auto")
    config = read_model_config(checkpoint)
    model = load_model(checkpoint, config, "auto", torch.float32, torch.device("cpu"), 64, tp, seed=0)
    spec = model.attention_spec()
    pool = KVPool(64, spec.num_layers, spec.num_kv_heads, spec.head_dim, torch.float32, "cpu",
                  keys_only=spec.latent_value_dim is not None)
    attention = TorchAttentionBackend(spec, pool)
    req_to_token = torch.zeros(len(PROMPTS), 64, dtype=torch.int32)
    total = sum(map(len, PROMPTS))
    batch = ForwardBatch.build(input_ids=torch.tensor([t for p in PROMPTS for t in p]),
                               out_slots=torch.arange(1, total + 1), rows=list(range(len(PROMPTS))),
                               prefix_lens=[0] * len(PROMPTS), extend_lens=[len(p) for p in PROMPTS],
                               req_to_token=req_to_token)
    req_to_token[batch.rows[batch.token_batch_index], batch.positions] = batch.out_slots.int()
    attention.prepare(batch)
    return model.compute_logits(model(batch, attention))


def worker(rank: int, folder: str, store: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    logits = sharded_logits(folder, TensorParallel(rank, 2))
    if rank == 0:
        save_file({"logits": logits.contiguous()}, out)
    torch.distributed.destroy_process_group()


CASES = {
    "kv_heads_split": dict(num_key_value_heads=2, vocab_size=128),
    "kv_heads_replicated_odd_vocab": dict(num_key_value_heads=1, vocab_size=127),
    "latent_replicated": dict(num_key_value_heads=4, vocab_size=128),  # MLA: heads split, the latent on every rank
}


@pytest.mark.parametrize("architecture, case", [("LlamaForCausalLM", "kv_heads_split"),
                                                ("Qwen2ForCausalLM", "kv_heads_replicated_odd_vocab"),
                                                ("OlmoeForCausalLM", "kv_heads_split"),
                                                ("DeepseekV2ForCausalLM", "latent_replicated")])
def test_two_rank_logits_equal_the_unsharded_model(case, architecture, tmp_path):
    from transformers import (
        DeepseekV2Config,
        DeepseekV2ForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
        OlmoeConfig,
        OlmoeForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    from tests.model_fixtures import TINY_COMMON, relative_max_error

    # Llama with every bias on (o_proj and down_proj biases are added once, after the all-reduce)
    config_class, model_class, extra = {
        "LlamaForCausalLM": (LlamaConfig, LlamaForCausalLM, dict(attention_bias=True, mlp_bias=True)),
        "Qwen2ForCausalLM": (Qwen2Config, Qwen2ForCausalLM, dict(tie_word_embeddings=True)),
        # experts split their intermediate dimension; q/k norms span all heads (an all-reduced mean square)
        "OlmoeForCausalLM": (OlmoeConfig, OlmoeForCausalLM, dict(num_experts=4, num_experts_per_tok=2,
                                                                 intermediate_size=32, pad_token_id=0)),
        # MLA with q_lora_rank (q, kv_b_proj and o_proj split by heads) and shared + routed experts
        "DeepseekV2ForCausalLM": (DeepseekV2Config, DeepseekV2ForCausalLM, dict(
            q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
            n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=32,
            first_k_dense_replace=1))}[architecture]
    torch.manual_seed(0)
    reference = model_class(config_class(**{**TINY_COMMON, **CASES[case], **extra})).eval()
    for name, param in reference.named_parameters():  # transformers initialises biases and norms to constants
        if name.endswith("bias") or "norm" in name:
            torch.nn.init.normal_(param, mean=0.0 if name.endswith("bias") else 1.0, std=0.2)
    reference.save_pretrained(tmp_path / "model", safe_serialization=True)
    folder, out = str(tmp_path / "model"), str(tmp_path / "logits.safetensors")
    env = {**os.environ, "PYTHONPATH": REPO_ROOT, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "tests.models.test_tp", str(rank), folder,
                               str(tmp_path / "store"), out], cwd=REPO_ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for rank in range(2)]
    for proc in procs:
        output, _ = proc.communicate(timeout=180)
        assert proc.returncode == 0, output.decode()[-3000:]
    sharded = load_file(out)["logits"]
    unsharded = sharded_logits(folder, TensorParallel())
    assert sharded.shape == unsharded.shape == (sum(map(len, PROMPTS)), CASES[case]["vocab_size"])
    assert relative_max_error(sharded, unsharded) < 1e-5
    with torch.no_grad():
        expected = torch.cat([reference(torch.tensor([p])).logits[0] for p in PROMPTS])
    assert relative_max_error(unsharded, expected) < 1e-4


if __name__ == "__main__":
    worker(int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4])
