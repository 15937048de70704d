"""Helpers for the model tests: a small scheduler stand-in that hands out rows and KV slots and builds
BatchPlans (`PlanDriver`), transformers references, and tiny random-weight checkpoints."""

from __future__ import annotations

import inspect
import json
import os
from dataclasses import dataclass, field

import torch
from transformers import LlamaForCausalLM

from runtime.messages import BatchPlan, BatchResult, LogprobOptions, NewRow, SamplingParams
from runtime.worker.forward_batch import ForwardBatch
from runtime.worker.model_runner import ModelRunner

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=1 << 20)

# SmolLM2 token ids of a few texts (its tokenizer, once): prompts of different lengths.
SMOLLM2_PROMPTS = [
    [504, 3575, 282, 4649, 314],  # "The capital of France is"
    [1604, 3987, 46477, 24, 94, 727, 2367],  # "def fibonacci(n):\n    "
    [6403, 1980, 253, 655, 28, 281, 253, 1165, 6560, 411, 260, 3426, 28, 665, 4161, 354, 1573, 43663, 617],
    [26843],  # "Hi"
    [1, 4093, 198, 1780, 314, 216, 34, 27, 34, 47, 2, 198, 1, 520, 9531, 198],  # a chat turn
]


@dataclass
class Seq:
    """One request as the driver sees it: its row, every token known so far, the KV slots of the
    tokens already computed, and what it generated."""

    row: int
    tokens: list[int]
    slots: list[int]
    owned_slots: list[int]  # slots this request allocated (shared prefix slots are not freed with it)
    output: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    prompt_logprobs: list = field(default_factory=list)


class PlanDriver:
    """Allocates request-table rows and KV slots like the scheduler does and drives runner.step."""

    def __init__(self, runner: ModelRunner):
        self.runner = runner
        self.free_rows = list(range(runner.max_running_requests))
        self.free_slots = list(range(runner.max_total_tokens, 0, -1))  # slot 0 is the padding slot
        self.pending_new_rows: list[NewRow] = []
        self.pending_freed_rows: list[int] = []
        self.batch_id = 0

    def start(self, prompt: list[int], sampling: SamplingParams = GREEDY,
              logprobs: LogprobOptions = LogprobOptions(), prefix_of: Seq | None = None, prefix_len: int = 0,
              images: list | None = None) -> Seq:
        """A new request; with `prefix_of`, its first prefix_len tokens reuse that request's KV slots
        (as a radix-cache hit would)."""
        prefix_slots = prefix_of.slots[:prefix_len] if prefix_of is not None else []
        if prefix_of is not None:
            assert prefix_of.tokens[:prefix_len] == prompt[:prefix_len]
        seq = Seq(row=self.free_rows.pop(0), tokens=list(prompt), slots=list(prefix_slots), owned_slots=[])
        self.pending_new_rows.append(NewRow(row=seq.row, prefix_slots=list(prefix_slots), sampling=sampling,
                                            logprobs=logprobs, images=images or []))
        return seq

    def finish(self, seq: Seq) -> None:
        self.free_slots.extend(seq.owned_slots)
        self.free_rows.insert(0, seq.row)  # the next request takes this row again
        self.pending_freed_rows.append(seq.row)

    def step(self, work: list[tuple[Seq, int]]) -> BatchResult:
        """Compute `n` more known tokens of each (seq, n); a seq whose known tokens are then all
        computed samples its next token."""
        plan = BatchPlan(batch_id=self.batch_id, rows=[], prefix_lens=[], extend_lens=[], input_ids=[], out_slots=[],
                         sample=[], future_slots=[], new_rows=self.pending_new_rows,
                         freed_rows=self.pending_freed_rows)
        self.batch_id += 1
        self.pending_new_rows, self.pending_freed_rows = [], []
        for seq, n in work:
            done = len(seq.slots)
            assert 0 < n <= len(seq.tokens) - done
            new_slots = [self.free_slots.pop() for _ in range(n)]
            plan.rows.append(seq.row)
            plan.prefix_lens.append(done)
            plan.extend_lens.append(n)
            plan.input_ids.extend(seq.tokens[done:done + n])
            plan.out_slots.extend(new_slots)
            seq.slots.extend(new_slots)
            seq.owned_slots.extend(new_slots)
            samples = len(seq.slots) == len(seq.tokens)
            plan.sample.append(samples)
            plan.future_slots.append(seq.row if samples else -1)
        result = self.runner.step(plan)
        sampled = [seq for seq, _ in work if len(seq.slots) == len(seq.tokens)]
        assert len(result.next_token_ids) == len(sampled)
        for j, (seq, token) in enumerate(zip(sampled, result.next_token_ids)):
            seq.tokens.append(token)
            seq.output.append(token)
            seq.logprobs.append(result.logprobs.get(j))
        for i, (seq, _) in enumerate(work):
            if i in result.prompt_logprobs:
                seq.prompt_logprobs.append(result.prompt_logprobs[i])
        return result

    def prefill(self, seqs: list[Seq], chunk: int | None = None) -> None:
        """Compute every known token of the seqs, all in one step, or `chunk` tokens per seq per step."""
        targets = [len(s.tokens) for s in seqs]
        while True:
            work = [(s, min(chunk or target, target - len(s.slots))) for s, target in zip(seqs, targets)
                    if len(s.slots) < target]
            if not work:
                return
            self.step(work)

    def decode(self, seqs: list[Seq], steps: int) -> None:
        for _ in range(steps):
            self.step([(s, 1) for s in seqs])

    def generate(self, prompts: list[list[int]], new_tokens: int, sampling: SamplingParams = GREEDY) -> list[list[int]]:
        seqs = [self.start(p, sampling) for p in prompts]
        self.prefill(seqs)
        self.decode(seqs, new_tokens - 1)
        for seq in seqs:
            self.finish(seq)
        return [seq.output for seq in seqs]


@torch.inference_mode()
def runner_logits(runner: ModelRunner, prompts: list[list[int]], row: int = 0) -> list[torch.Tensor]:
    """Logits of every prompt position, all prompts prefilled together in one paged step through the
    runner's model and attention backend (uses rows from `row` on, and the top of the slot range)."""
    slots = runner.max_total_tokens
    rows, out_slots = [], []
    for i, prompt in enumerate(prompts):
        rows.append(row + i)
        mine = list(range(slots - len(prompt) + 1, slots + 1))
        slots -= len(prompt)
        out_slots.extend(mine)
    batch = ForwardBatch.build(input_ids=torch.tensor([t for p in prompts for t in p], device=runner.device),
                               out_slots=torch.tensor(out_slots, device=runner.device), rows=rows,
                               prefix_lens=[0] * len(prompts), extend_lens=[len(p) for p in prompts],
                               req_to_token=runner.req_to_token)
    runner.req_to_token[batch.rows[batch.token_batch_index], batch.positions] = batch.out_slots.int()
    runner.attention.prepare(batch)
    logits = runner.model.compute_logits(runner.model(batch, runner.attention))
    return list(logits.split([len(p) for p in prompts]))


@torch.inference_mode()
def hf_greedy(model, prompt: list[int], new_tokens: int) -> tuple[torch.Tensor, list[int]]:
    """transformers reference: prompt logits [L, V] and `new_tokens` greedy tokens, token by token
    through its own KV cache (no EOS stop)."""
    out = model(torch.tensor([prompt]), use_cache=True)
    prompt_logits = out.logits[0].float()
    tokens = [int(prompt_logits[-1].argmax())]
    cache = _returned_cache(out)
    for _ in range(new_tokens - 1):
        out = model(torch.tensor([[tokens[-1]]]), use_cache=True, **{_CACHE_ARG: cache})
        cache = _returned_cache(out)
        tokens.append(int(out.logits[0, -1].argmax()))
    return prompt_logits, tokens


# transformers renamed `past_key_values` to `cache` (5.x); accept both spellings.
_CACHE_ARG = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


def _returned_cache(out):
    return getattr(out, _CACHE_ARG)


def relative_max_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours.float() - reference.float()).abs().max() / reference.float().abs().max())


def hf_smollm2(gguf_path: str):
    """transformers' own GGUF reading (dequantization and llama.cpp's Q/K row order undone by its code,
    not ours) into a LlamaForCausalLM, without the accelerate package that from_pretrained wants."""
    from transformers import LlamaConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = load_gguf_checkpoint(gguf_path)["config"]
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in config.items() if k != "model_type"}))
    tensors = load_gguf_checkpoint(gguf_path, return_tensors=True, model_to_load=model)["tensors"]
    result = model.load_state_dict(tensors, strict=False)
    assert set(result.missing_keys) <= {"lm_head.weight"} and not result.unexpected_keys, result
    model.tie_weights()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model.eval()


TINY_COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2, eos_token_id=1,
                   bos_token_id=0)


@dataclass(frozen=True)
class TinyCase:
    """A tiny random checkpoint of one architecture: the transformers config that builds it (its `architectures`
    name is the one served), runner settings it needs, and for architectures transformers cannot build (their
    modeling code lives in the checkpoint repository) a rewrite of the saved folder into that layout."""

    architecture: str
    config: object  # a transformers PretrainedConfig
    context_length: int | None = None
    layout: str | None = None  # "exaone": a Llama checkpoint rewritten in EXAONE 3's names and config keys


def _rope(rope_type: str, **params) -> dict:
    return {"rope_type": rope_type, "rope_theta": 10000.0, **params}


def tiny_cases() -> dict[str, TinyCase]:
    """One case per architecture (and per rope type), each exercising the architecture's peculiarities."""
    import transformers as tf

    common = dict(TINY_COMMON)
    moe = dict(num_experts_per_tok=2, moe_intermediate_size=32)
    pad = dict(pad_token_id=0)  # for configs whose default pad id lies past the tiny vocabulary
    mla = dict(**{**common, "num_key_value_heads": 4}, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
               v_head_dim=16, n_routed_experts=8, n_shared_experts=1, first_k_dense_replace=1, **moe)
    cases = [
        TinyCase("LlamaForCausalLM", tf.LlamaConfig(**common, rope_scaling=_rope(
            "llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=32))),
        TinyCase("LlamaForCausalLM", tf.LlamaConfig(**common, rope_scaling=_rope("linear", factor=2.0))),
        # dynamic NTK grows the base past max_position_embeddings: the decode runs past it
        TinyCase("LlamaForCausalLM", tf.LlamaConfig(**{**common, "max_position_embeddings": 32},
                                                    rope_scaling=_rope("dynamic", factor=2.0)), context_length=64),
        TinyCase("LlamaForCausalLM", tf.LlamaConfig(**common, rope_scaling=_rope(
            "yarn", factor=4.0, original_max_position_embeddings=64, beta_fast=32.0, beta_slow=1.0))),
        TinyCase("MistralForCausalLM", tf.MistralConfig(**common, sliding_window=8)),
        TinyCase("MistralForCausalLM", tf.MistralConfig(**common, head_dim=32, sliding_window=None)),  # NeMo's
        TinyCase("Qwen2ForCausalLM", tf.Qwen2Config(**common, tie_word_embeddings=True)),
        TinyCase("ExaoneForCausalLM", tf.LlamaConfig(**common), layout="exaone"),
        TinyCase("Qwen3ForCausalLM", tf.Qwen3Config(**common, head_dim=16)),
        TinyCase("MixtralForCausalLM", tf.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2)),
        TinyCase("Qwen2MoeForCausalLM", tf.Qwen2MoeConfig(**common, **moe, num_experts=4, norm_topk_prob=False,
                                                          shared_expert_intermediate_size=48)),
        TinyCase("Qwen3MoeForCausalLM", tf.Qwen3MoeConfig(**common, **moe, num_experts=4, norm_topk_prob=True,
                                                          head_dim=16, mlp_only_layers=[1])),
        TinyCase("OlmoeForCausalLM", tf.OlmoeConfig(**{**common, "intermediate_size": 32}, num_experts=4,
                                                    num_experts_per_tok=2, clip_qkv=1.0, **pad)),
        TinyCase("DbrxForCausalLM", tf.DbrxConfig(
            vocab_size=128, d_model=64, n_heads=4, n_layers=2, max_seq_len=256, initializer_range=0.2,
            eos_token_id=1, bos_token_id=0, attn_config=dict(kv_n_heads=2, clip_qkv=1.0, rope_theta=10000.0),
            ffn_config=dict(ffn_hidden_size=32, moe_num_experts=4, moe_top_k=2))),
        TinyCase("GemmaForCausalLM", tf.GemmaConfig(**common, head_dim=16)),
        TinyCase("Gemma2ForCausalLM", tf.Gemma2Config(**common, head_dim=16, sliding_window=8,
                                                      query_pre_attn_scalar=24, attn_logit_softcapping=10.0,
                                                      final_logit_softcapping=10.0)),
        TinyCase("Gemma3ForCausalLM", tf.Gemma3TextConfig(
            **common, head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
            layer_types=["sliding_attention", "full_attention"],
            rope_parameters={"sliding_attention": _rope("default"),
                             "full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 2.0}})),
        TinyCase("StableLmForCausalLM", tf.StableLmConfig(**common, use_qkv_bias=True)),  # StableLM 2 1.6B
        TinyCase("StableLmForCausalLM", tf.StableLmConfig(**common, qk_layernorm=True,  # StableLM 2 12B
                                                          use_parallel_residual=True)),
        TinyCase("CohereForCausalLM", tf.CohereConfig(**common, use_qk_norm=True, logit_scale=0.25, **pad)),
        TinyCase("GlmForCausalLM", tf.GlmConfig(**common, head_dim=16, **pad)),
        TinyCase("Glm4ForCausalLM", tf.Glm4Config(**common, head_dim=16, **pad)),
        TinyCase("Phi3ForCausalLM", tf.Phi3Config(
            **common, **pad, original_max_position_embeddings=32, partial_rotary_factor=0.5,
            rope_scaling={"rope_type": "longrope", "short_factor": [1.0, 1.5, 2.0, 3.0],
                          "long_factor": [1.5, 3.0, 5.0, 8.0]})),
        # MLA (latent cache, absorbed decode) + DeepSeek MoE: one dense layer, then shared + routed experts
        TinyCase("DeepseekV2ForCausalLM", tf.DeepseekV2Config(  # V2-Lite's shape: no q_lora_rank; yarn as V2's
            **mla, q_lora_rank=None, topk_method="group_limited_greedy", n_group=4, topk_group=2,
            rope_scaling=_rope("yarn", factor=4.0, original_max_position_embeddings=64, beta_fast=32.0,
                               beta_slow=1.0, mscale=0.707, mscale_all_dim=0.707))),
        TinyCase("DeepseekV2ForCausalLM", tf.DeepseekV2Config(**{**mla, "n_shared_experts": 2}, q_lora_rank=24,
                                                              routed_scaling_factor=1.5)),
        TinyCase("DeepseekV3ForCausalLM", tf.DeepseekV3Config(  # V3's routing: sigmoid, noaux_tc, renormalized
            **mla, q_lora_rank=24, n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
            rope_scaling=_rope("yarn", factor=4.0, original_max_position_embeddings=64, beta_fast=32.0,
                               beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0))),
    ]
    names: dict[str, TinyCase] = {}
    for case in cases:
        suffix = {"LlamaForCausalLM": lambda c: c.config.rope_scaling["rope_type"],
                  "MistralForCausalLM": lambda c: "sliding" if c.config.sliding_window else "nemo",
                  "StableLmForCausalLM": lambda c: "12b" if c.config.qk_layernorm else "1.6b",
                  "DeepseekV2ForCausalLM": lambda c: "q_lora" if c.config.q_lora_rank else "yarn"}.get(
            case.architecture)
        names[case.architecture + (f"-{suffix(case)}" if suffix else "")] = case
    return names


def save_tiny_model(case_name: str, folder: str, generation_eos: list[int] | None = None):
    """Build a random-weight transformers model of a tiny case (an architecture name serves for its first case),
    save it as safetensors in `folder`, return it. Norm weights and biases are perturbed: transformers initialises
    them to constants, which would hide a norm applied wrongly."""
    from transformers import AutoModelForCausalLM

    cases = tiny_cases()
    case = cases.get(case_name) or next(c for name, c in cases.items() if name.startswith(case_name + "-"))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(case.config, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.1)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # DeepSeek V3's routing bias (zeros): make it choose
                buffer.add_(torch.randn_like(buffer) * 0.3)
    model.save_pretrained(folder, safe_serialization=True)
    if case.layout == "exaone":
        _rewrite_as_exaone(folder)
    if generation_eos is not None:
        with open(os.path.join(folder, "generation_config.json"), "w") as f:
            json.dump({"eos_token_id": generation_eos}, f)
    return model


EXAONE_NAMES = (("model.embed_tokens.", "transformer.wte."), ("model.norm.", "transformer.ln_f."),
                ("model.layers.", "transformer.h."), (".input_layernorm.", ".ln_1."),
                (".post_attention_layernorm.", ".ln_2."), (".self_attn.o_proj.", ".attn.attention.out_proj."),
                (".self_attn.", ".attn.attention."), (".mlp.gate_proj.", ".mlp.c_fc_0."),
                (".mlp.up_proj.", ".mlp.c_fc_1."), (".mlp.down_proj.", ".mlp.c_proj."))


def _rewrite_as_exaone(folder: str) -> None:
    """A saved Llama checkpoint -> EXAONE 3's layout (LGAI-EXAONE/EXAONE-3.0-7.8B-Instruct: tensor names of its
    modeling_exaone.py, config keys num_layers, layer_norm_epsilon, activation_function)."""
    from safetensors.torch import load_file, save_file

    path = os.path.join(folder, "model.safetensors")
    tensors = {}
    for name, tensor in load_file(path).items():
        for ours, theirs in EXAONE_NAMES:
            name = name.replace(ours, theirs)
        tensors[name] = tensor
    save_file(tensors, path, metadata={"format": "pt"})
    config_path = os.path.join(folder, "config.json")
    with open(config_path) as f:
        llama = json.load(f)
    exaone = {"architectures": ["ExaoneForCausalLM"], "model_type": "exaone", "activation_function": "silu",
              "num_layers": llama["num_hidden_layers"], "layer_norm_epsilon": llama["rms_norm_eps"],
              "rope_theta": llama["rope_parameters"]["rope_theta"], "rope_scaling": None,
              **{key: llama[key] for key in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
                                             "num_key_value_heads", "max_position_embeddings", "tie_word_embeddings",
                                             "bos_token_id", "eos_token_id")}}
    with open(config_path, "w") as f:
        json.dump(exaone, f)
