"""ModelRunner.step on a tiny Llama: overlap placeholders, launch/collect order, row lifecycle, logprobs,
plan validation and sizing defaults."""

from __future__ import annotations

import pytest
import torch

from runtime.layers.linear import WeightShapeError
from runtime.messages import BatchPlan, LogprobOptions, NewRow, SamplingParams
from runtime.worker.model_runner import DEFAULT_MAX_RUNNING, TOKENS_PER_RUNNING_REQUEST, ModelRunner, ModelRunnerConfig
from tests.model_fixtures import GREEDY, PlanDriver, runner_logits, save_tiny_model

PROMPT_A = [5, 17, 33, 2, 90, 41, 7]
PROMPT_B = [8, 8, 21, 60]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    save_tiny_model("LlamaForCausalLM", str(path))
    return str(path)


@pytest.fixture
def runner(folder):
    return ModelRunner(ModelRunnerConfig(model_path=folder, device="cpu", max_total_tokens=256, max_running_requests=4))


def reference_outputs(runner, prompts, new_tokens):
    return PlanDriver(runner).generate(prompts, new_tokens)


def prefill_plan(batch_id, prompts, rows, first_slot, future_slots, logprobs=LogprobOptions()):
    slots = list(range(first_slot, first_slot + sum(map(len, prompts))))
    return BatchPlan(batch_id=batch_id, rows=rows, prefix_lens=[0] * len(rows), extend_lens=[len(p) for p in prompts],
                     input_ids=[t for p in prompts for t in p], out_slots=slots, sample=[True] * len(rows),
                     future_slots=future_slots,
                     new_rows=[NewRow(row=r, prefix_slots=[], sampling=GREEDY, logprobs=logprobs) for r in rows])


def test_placeholders_read_tokens_sampled_by_an_unseen_batch(runner):
    """The overlap protocol: plan N+1 is launched before plan N's tokens reach the host; its inputs
    name them as -(future_slot + 1)."""
    expected = reference_outputs(runner, [PROMPT_A, PROMPT_B], 4)
    rows, future = [0, 1], [3, 6]
    pending = runner.launch(prefill_plan(0, [PROMPT_A, PROMPT_B], rows, 1, future))
    seq_lens = [len(PROMPT_A), len(PROMPT_B)]
    next_slot = 1 + sum(seq_lens)
    outputs = [[], []]
    for step in range(1, 4):
        plan = BatchPlan(batch_id=step, rows=rows, prefix_lens=list(seq_lens), extend_lens=[1, 1],
                         input_ids=[-(f + 1) for f in future], out_slots=[next_slot, next_slot + 1],
                         sample=[True, True], future_slots=[(f + 2) % 10 for f in future])
        following = runner.launch(plan)  # launched before the previous step is collected
        for out, token in zip(outputs, runner.collect(pending).next_token_ids):
            out.append(token)
        pending, future = following, plan.future_slots
        seq_lens = [n + 1 for n in seq_lens]
        next_slot += 2
    for out, token in zip(outputs, runner.collect(pending).next_token_ids):
        out.append(token)
    assert outputs == expected


def test_rows_sample_only_where_asked_and_results_follow_row_order(runner):
    [expected_b] = reference_outputs(runner, [PROMPT_B], 1)
    plan = prefill_plan(0, [PROMPT_A, PROMPT_B], [2, 0], 1, [-1, 5])
    plan.sample = [False, True]  # row 2's chunk is not its last
    result = runner.step(plan)
    assert result.batch_id == 0 and result.next_token_ids == expected_b
    assert result.forward_ms > 0
    assert int(runner.future_tokens[5]) == expected_b[0]


def test_freed_row_is_reusable_by_a_new_request(runner):
    driver = PlanDriver(runner)
    first = driver.start(PROMPT_A)
    driver.prefill([first])
    driver.finish(first)
    second = driver.start(PROMPT_B)  # takes the freed row again
    assert second.row == first.row
    driver.prefill([second])
    driver.decode([second], 3)
    assert second.output == reference_outputs(runner, [PROMPT_B], 4)[0]


def test_empty_plan_only_frees_rows(runner):
    driver = PlanDriver(runner)
    seq = driver.start(PROMPT_A)
    driver.prefill([seq])
    result = runner.step(BatchPlan(batch_id=9, rows=[], prefix_lens=[], extend_lens=[], input_ids=[], out_slots=[],
                                   sample=[], future_slots=[], freed_rows=[seq.row]))
    assert result.next_token_ids == [] and result.batch_id == 9
    assert runner.sampler._rows[seq.row] is None


def test_output_and_prompt_logprobs_come_from_the_raw_logits(runner):
    options = LogprobOptions(return_logprob=True, logprob_start_len=3, top_logprobs_num=2)
    [logits] = runner_logits(runner, [PROMPT_A], row=3)
    expected = torch.log_softmax(logits, dim=-1)
    result = runner.step(prefill_plan(0, [PROMPT_A], [0], 1, [0], logprobs=options))
    sampled = result.next_token_ids[0]
    output = result.logprobs[0]
    assert output.token_ids == [sampled]
    assert output.logprobs[0] == pytest.approx(float(expected[-1, sampled]), abs=1e-4)
    top = torch.topk(expected[-1], 2)
    assert output.top_ids[0] == top.indices.tolist()
    prompt = result.prompt_logprobs[0]
    assert prompt.token_ids == PROMPT_A[3:]  # positions 3.. are scored by the logits at 2..
    want = [float(expected[p - 1, PROMPT_A[p]]) for p in range(3, len(PROMPT_A))]
    assert prompt.logprobs == pytest.approx(want, abs=1e-4)


def test_rows_without_logprobs_get_none(runner):
    result = runner.step(prefill_plan(0, [PROMPT_A], [0], 1, [0]))
    assert result.logprobs == {} and result.prompt_logprobs == {}


@pytest.mark.parametrize("change, message", [
    (dict(extend_lens=[7]), "input_ids"),
    (dict(sample=[True, False]), "BatchPlan.sample"),
    (dict(rows=[4]), "rows: row 4"),
    (dict(out_slots=[0, 1, 2, 3, 4, 5, 6]), "out_slots"),
    (dict(prefix_lens=[250]), "context_length"),
    (dict(input_ids=[5, 17, 33, 2, 90, 41, 128]), "input_ids must be token ids below 128"),
    (dict(input_ids=[5, 17, 33, 2, 90, 41, -11]), "placeholders down to -10"),
])
def test_inconsistent_plans_are_refused_with_the_field_named(runner, change, message):
    plan = prefill_plan(0, [PROMPT_A], [0], 1, [0])
    for name, value in change.items():
        setattr(plan, name, value)
    if "extend_lens" in change:
        plan.input_ids = plan.input_ids[:5]
    with pytest.raises(ValueError, match=message):
        runner.step(plan)


def test_sizing_defaults_on_cpu(folder):
    runner = ModelRunner(ModelRunnerConfig(model_path=folder, device="cpu", max_total_tokens=40))
    info = runner.info
    assert info.context_length == 256  # the model's max_position_embeddings
    assert info.max_running_requests == 16  # a tiny pool still serves 16 requests at once (at most half the slots)
    assert runner.req_to_token.shape == (16, 256)
    assert runner.future_tokens.shape == (2 * 16 + 2,)
    assert runner.kv_pool.k[0].shape == (41, 2, 16)  # slot 0 is padding
    sized = ModelRunner(ModelRunnerConfig(model_path=folder, device="cpu", context_length=128))
    per_token = 2 * 2 * 2 * 16 * 4  # k and v, 2 layers, 2 kv heads, head_dim 16, float32
    assert 0 < sized.info.max_total_tokens * per_token <= 2 << 30
    assert sized.info.context_length == 128
    # As many requests as can each hold min(context, TOKENS_PER_RUNNING_REQUEST) tokens, within the device's cap.
    assert TOKENS_PER_RUNNING_REQUEST > 128
    assert sized.info.max_running_requests == min(DEFAULT_MAX_RUNNING["cpu"], sized.info.max_total_tokens // 128)
    small = ModelRunner(ModelRunnerConfig(model_path=folder, device="cpu", max_total_tokens=20 * 256))
    assert small.info.max_running_requests == 20
    # The graphs cover every batch up to the running cap, or what --cuda-graph-max-bs / --cuda-graph-bs ask for.
    assert small.graph_batch_sizes() == [1, 2, 4, 8, 12, 16, 20]
    small.config.cuda_graph_max_bs = 8
    assert small.graph_batch_sizes() == [1, 2, 4, 8]
    small.config.cuda_graph_bs = [1, 4, 64]
    assert small.graph_batch_sizes() == [1, 4]


def test_sampling_params_reach_the_sampler(runner):
    """A seeded hot row samples reproducibly through the runner, and not the greedy tokens."""
    params = SamplingParams(temperature=50.0, seed=1234, max_new_tokens=8)
    first = PlanDriver(runner).generate([PROMPT_A], 6, sampling=params)[0]
    again = PlanDriver(runner).generate([PROMPT_B, PROMPT_A], 6, sampling=params)[1]
    assert first == again
    assert first != reference_outputs(runner, [PROMPT_A], 6)[0]


def test_torch_compile_runs_small_decode_batches_compiled_with_the_same_tokens(folder):
    """--enable-torch-compile: decode batches up to torch_compile_max_bs run the compiled model (dynamo captures it,
    the attention backend stays outside), larger ones and prefill eagerly; greedy tokens equal the eager runner's.
    (The aot_eager backend keeps the test fast; inductor on the CPU gave the same tokens, after a 2-minute compile.)"""
    from torch._dynamo.utils import counters

    prompts = [PROMPT_A, PROMPT_B, [3, 1, 4, 1, 5]]
    eager = ModelRunner(ModelRunnerConfig(model_path=folder, device="cpu", max_total_tokens=256,
                                          max_running_requests=4))
    compiled = ModelRunner(ModelRunnerConfig(model_path=folder, device="cpu", max_total_tokens=256,
                                             max_running_requests=4, enable_torch_compile=True,
                                             torch_compile_max_bs=2, torch_compile_backend="aot_eager"))
    counters.clear()
    assert PlanDriver(compiled).generate(prompts[:2], 5) == PlanDriver(eager).generate(prompts[:2], 5)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0  # the decode steps of 2 rows ran compiled
    assert PlanDriver(compiled).generate(prompts, 5) == PlanDriver(eager).generate(prompts, 5)
    assert counters["stats"]["unique_graphs"] == graphs  # 3 rows: above torch_compile_max_bs, eager


def test_json_model_override_args_replace_config_keys(folder):
    """SGLang's --json-model-override-args: a benchmark shape with another tokenizer's vocabulary, or fewer layers;
    with real weights a shape that no longer fits them is refused by the loader, with dummy weights it is built."""
    runner = ModelRunner(ModelRunnerConfig(model_path=folder, device="cpu", max_total_tokens=64, load_format="dummy",
                                           model_override={"vocab_size": 300, "num_hidden_layers": 1}))
    assert (runner.info.vocab_size, runner.model_config.num_layers, len(runner.kv_pool.k)) == (300, 1, 1)
    assert runner_logits(runner, [PROMPT_A])[0].shape == (len(PROMPT_A), 300)
    with pytest.raises(WeightShapeError, match="does not match the model"):
        ModelRunner(ModelRunnerConfig(model_path=folder, device="cpu", max_total_tokens=64,
                                      model_override={"vocab_size": 300}))


def test_json_model_override_args_refuse_gguf():
    with pytest.raises(ValueError, match="GGUF"):
        ModelRunner(ModelRunnerConfig(device="cpu", max_total_tokens=64, model_override={"vocab_size": 300}))
