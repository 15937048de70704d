"""On CUDA (skipped elsewhere): the tiny random-weight checkpoint of every family (tests/model_fixtures.py,
`tiny_cases`: rope types, sliding windows, soft-capping, MoE through the fused Triton kernel, q/k norms...) through
the CUDA path (Triton layer kernels, Triton attention, CUDA-graph decode) against transformers on the same GPU, in
bfloat16 and float16; the Triton attention backend against the torch backend on whole-model greedy outputs; decode
replayed from CUDA graphs against eager decode (on a dense, an MoE, a soft-capped, windowed family and DeepSeek V3's
MLA, whose decode runs the MLA Triton kernel)."""

from __future__ import annotations

import copy

import pytest
import torch

from runtime.messages import BatchPlan
from runtime.worker.forward_batch import ForwardBatch
from runtime.worker.model_runner import ModelRunner, ModelRunnerConfig
from tests.model_fixtures import _CACHE_ARG, PlanDriver, _returned_cache, runner_logits, save_tiny_model, tiny_cases

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

PROMPTS = [[5, 17, 33, 2, 90, 41, 7, 64, 12, 3, 99, 18], [8, 8, 21],
           [70, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21], [44]]
NEW_TOKENS = 24
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


CASES = tiny_cases()
MOE_ARCHITECTURES = ("Mixtral", "Qwen2Moe", "Qwen3Moe", "Olmoe", "Dbrx", "Deepseek")
GRAPH_CASES = ["LlamaForCausalLM-llama3", "MixtralForCausalLM", "Gemma2ForCausalLM", "DeepseekV3ForCausalLM"]
# room for the longest prompt and its answer, within every case's rope (dynamic NTK's tiny case needs it explicit)
CONTEXT_LENGTH = 64


@pytest.fixture(scope="module", params=sorted(CASES))
def tiny(request, tmp_path_factory):
    """(checkpoint folder, the transformers model in float32 on the GPU)."""
    folder = tmp_path_factory.mktemp(request.param)
    reference = save_tiny_model(request.param, str(folder))
    return str(folder), reference.to("cuda")


@pytest.fixture(scope="module", params=GRAPH_CASES)
def graph_case(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    save_tiny_model(request.param, str(folder))
    return str(folder)


def make_runner(folder: str, dtype: str, **overrides) -> ModelRunner:
    config = dict(model_path=folder, device="cuda", dtype=dtype, max_total_tokens=1024, max_running_requests=8,
                  context_length=CONTEXT_LENGTH)
    return ModelRunner(ModelRunnerConfig(**{**config, **overrides}))


def relative_error(x: torch.Tensor, reference: torch.Tensor) -> float:
    return float((x.float() - reference.float()).abs().max() / reference.float().abs().max())


def per_token_error(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """[L, V] logits -> [L]: each position's largest deviation, relative to the reference's largest logit."""
    return (x.float() - reference.float()).abs().amax(dim=-1) / reference.float().abs().max()


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_prefill_logits_as_close_to_float32_as_transformers(tiny, dtype, request):
    """Our logits in 16-bit are within a small factor of transformers' own 16-bit error against float32, token by
    token. In a mixture of experts, a token whose top-k experts are near a tie may be routed differently by either
    16-bit run (the fused kernel rounds in another order than transformers' loop: each layer's output agrees to
    3e-3, yet one token of the tiny Mixtral flips an expert in the next layer); one such token per prompt is allowed."""
    folder, reference = tiny
    runner = make_runner(folder, dtype)
    low = copy.deepcopy(reference).to(DTYPES[dtype])
    moe = any(name in request.node.callspec.id for name in MOE_ARCHITECTURES)
    for prompt, ours in zip(PROMPTS, runner_logits(runner, PROMPTS)):
        ids = torch.tensor([prompt], device="cuda")
        with torch.inference_mode():
            exact, theirs = reference(ids).logits[0], low(ids).logits[0]
        ours_error, their_error = per_token_error(ours, exact), per_token_error(theirs, exact)
        outliers = int((ours_error > 2 * their_error.max() + 2e-3).sum())
        assert outliers <= (1 if moe else 0), (prompt, ours_error.tolist(), float(their_error.max()))


@torch.inference_mode()
def teacher_forced_logits(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """[len(tokens), V] float32: the logits each of `tokens` was picked from, feeding them one at a time through
    transformers' cache (as it decodes: dynamic and longrope rope depend on the length of each call)."""
    out = model(torch.tensor([prompt], device="cuda"), use_cache=True)
    logits = [out.logits[0, -1].float()]
    for token in tokens[:-1]:
        out = model(torch.tensor([[token]], device="cuda"), use_cache=True, **{_CACHE_ARG: _returned_cache(out)})
        logits.append(out.logits[0, -1].float())
    return torch.stack(logits)


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_greedy_decoding_follows_transformers(tiny, dtype, request):
    """Batched greedy decoding (prefill, then CUDA-graph decode steps): teacher-forced through our own tokens, each
    pick is the float32 model's best token, or within twice transformers' own 16-bit rounding of it at that step (a
    near tie that rounding may break either way). Comparing token streams with transformers' 16-bit run instead
    would fail on the first such tie, after which the two streams share nothing. A mixture of experts may route one
    step differently (see the prefill test) and is allowed one such step per prompt."""
    folder, reference = tiny
    runner = make_runner(folder, dtype)
    assert runner.graph_runner is not None
    outputs = PlanDriver(runner).generate(PROMPTS, NEW_TOKENS)
    low = copy.deepcopy(reference).to(DTYPES[dtype])
    moe = any(name in request.node.callspec.id for name in MOE_ARCHITECTURES)
    for prompt, ours in zip(PROMPTS, outputs):
        exact = teacher_forced_logits(reference, prompt, ours)
        noise = (teacher_forced_logits(low, prompt, ours) - exact).abs().amax(dim=-1)
        gap = exact.amax(dim=-1) - exact.gather(1, torch.tensor(ours, device="cuda")[:, None])[:, 0]
        outliers = int((gap > 2 * noise + 1e-3).sum())
        assert outliers <= (1 if moe else 0), (prompt, gap.tolist(), noise.tolist())


def test_triton_attention_matches_torch_attention(tiny):
    """Whole-model greedy outputs in float32 (exact products in both backends): the same tokens."""
    folder, _ = tiny
    outputs = {}
    for backend in ("triton", "torch"):
        runner = make_runner(folder, "float32", attention_backend=backend)
        outputs[backend] = PlanDriver(runner).generate(PROMPTS, NEW_TOKENS)
        del runner
    assert outputs["triton"] == outputs["torch"]


@torch.inference_mode()
def eager_decode_logits(runner: ModelRunner, plan: BatchPlan) -> torch.Tensor:
    """The logits of a decode plan computed eagerly (no graph) on the runner's model and KV cache."""
    device = runner.device
    batch = ForwardBatch.build(input_ids=torch.tensor(plan.input_ids, device=device),
                               out_slots=torch.tensor(plan.out_slots, device=device), rows=plan.rows,
                               prefix_lens=plan.prefix_lens, extend_lens=plan.extend_lens,
                               req_to_token=runner.req_to_token)
    runner.req_to_token[batch.rows, batch.positions] = batch.out_slots.int()
    runner.attention.prepare(batch)
    return runner.model.compute_logits(runner.model(batch, runner.attention))


@pytest.mark.parametrize("batch_size", [3, 8])  # padded to the graph of 4; a graph's exact size
def test_cuda_graph_decode_equals_eager_decode(graph_case, batch_size):
    """float32 (every kernel's products exact): the same greedy tokens with and without graphs. bfloat16: one step's
    logits through the graph and eagerly agree to rounding (the graph's attention splits the sequence differently,
    so 16-bit greedy tokens may part at near ties)."""
    folder = graph_case
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch_size)]
    outputs = []
    for disable in (False, True):
        runner = make_runner(folder, "float32", disable_cuda_graph=disable)
        assert (runner.graph_runner is None) == disable
        replays = []
        if not disable:
            replay = runner.graph_runner.replay
            runner.graph_runner.replay = lambda *args: replays.append(len(args[2])) or replay(*args)
        outputs.append(PlanDriver(runner).generate(prompts, NEW_TOKENS))
        assert replays == ([] if disable else [batch_size] * (NEW_TOKENS - 1))
        del runner
    assert outputs[0] == outputs[1]

    graphs, eager = make_runner(folder, "bfloat16"), make_runner(folder, "bfloat16", disable_cuda_graph=True)
    seqs = {}
    for runner in (graphs, eager):  # identical KV caches: same rows, slots and tokens
        driver = PlanDriver(runner)
        seqs[runner] = [driver.start(p) for p in prompts]
        driver.prefill(seqs[runner])
    rows = [s.row for s in seqs[graphs]]
    seq_lens = [len(s.tokens) for s in seqs[graphs]]
    out_slots = [900 + i for i in range(batch_size)]
    ids = [s.tokens[-1] for s in seqs[graphs]]
    assert ids == [s.tokens[-1] for s in seqs[eager]]
    with torch.inference_mode():
        from_graph = graphs.graph_runner.replay(ids, out_slots, rows, seq_lens).clone()
    plan = BatchPlan(batch_id=0, rows=rows, prefix_lens=[n - 1 for n in seq_lens], extend_lens=[1] * batch_size,
                     input_ids=ids, out_slots=out_slots, sample=[True] * batch_size, future_slots=rows)
    from_eager = eager_decode_logits(eager, plan)
    assert relative_error(from_graph, from_eager) < 2e-2
