"""Scheduler core: embedding (prefill-only) requests and request priorities, against the worker test double."""

import msgspec
import pytest

from runtime.messages import GenerateRequest, SamplingParams
from runtime.scheduler.config import SchedulerConfig
from runtime.scheduler.core import SchedulerCore
from tests.scheduler.test_core import assert_matches_reference, prompt
from tests.scheduler_fixtures import EOS, FakeRunner, drive, embedding_of, make_request


def make_core(total=512, rows=8, context=256, chunk=8192, radix=True, pool_from_cache=True, low_prefill=512):
    config = SchedulerConfig(max_total_tokens=total, max_running_requests=rows, context_length=context,
                             eos_token_ids=[EOS], chunked_prefill_size=chunk, disable_radix_cache=not radix,
                             pool_from_cache=pool_from_cache, low_priority_prefill_tokens=low_prefill)
    return SchedulerCore(config), FakeRunner(total, rows, context)


def embed_request(rid, ids, priority=0):
    return GenerateRequest(rid=rid, input_ids=ids, sampling=SamplingParams(), embed=True, priority=priority)


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("chunk", [-1, 8])
def test_embeddings_share_batches_with_generation(overlap, chunk):
    """Embedding requests finish after their prefill with the vector of their whole sequence (read back from the
    KV cache, cached prefix included), never sample, and run beside generation requests, chunked or not."""
    core, runner = make_core(chunk=chunk)
    shared = prompt(0, 20)
    gen = [make_request("g1", shared + prompt(1, 5), 10), make_request("g2", prompt(2, 30), 6)]
    embeds = [embed_request("e1", shared + prompt(3, 7)), embed_request("e2", prompt(4, 25)),
              embed_request("e3", shared + prompt(3, 7))]
    report = drive(core, runner, {0: [gen[0], embeds[0]], 2: [embeds[1], gen[1]], 5: [embeds[2]]}, overlap=overlap)
    assert_matches_reference(core, report, gen)
    assert set(report.embeddings) == {"e1", "e2", "e3"}
    for req in embeds:
        result = report.embeddings[req.rid]
        assert result.embedding == embedding_of(req.input_ids)
        assert result.prompt_tokens == len(req.input_ids)
        assert req.rid not in report.outcomes  # nothing went to the detokenizer
    assert report.embeddings["e3"].cached_tokens > 0  # same input as e1: served from the radix cache


def test_mean_pooling_never_starts_from_the_cache():
    core, runner = make_core(pool_from_cache=False)
    ids = prompt(5, 30)
    report = drive(core, runner, {0: [embed_request("a", ids)], 3: [embed_request("b", ids)]}, overlap=True)
    assert report.embeddings["b"].embedding == embedding_of(ids)
    assert report.embeddings["b"].cached_tokens == 0


def test_embedding_plans_pool_without_sampling():
    core, _ = make_core()
    core.add_request(embed_request("e", prompt(6, 12)))
    core.add_request(make_request("g", prompt(7, 5), 4))
    plan = core.plan_next().plan
    plan = msgspec.msgpack.decode(msgspec.msgpack.encode(plan), type=type(plan))
    assert plan.pool == [0] and plan.sample == [False, True] and plan.future_slots[0] == -1
    assert [row.embed for row in plan.new_rows] == [True, False]


def test_embedding_input_may_fill_the_context_and_no_more():
    core, _ = make_core(context=64)
    assert core.add_request(embed_request("full", prompt(8, 64))) is None
    rejected = core.add_request(embed_request("over", prompt(8, 65)))
    assert rejected.status == 400 and "65 tokens" in rejected.message


def test_higher_priority_is_admitted_first():
    core, runner = make_core(rows=2)
    low = [msgspec.structs.replace(make_request(f"low{i}", prompt(10 + i, 6), 4), priority=-1) for i in range(4)]
    high = make_request("high", prompt(20, 6), 4)
    first_admitted = []
    original_plan_next = core.plan_next

    def plan_next():
        batch = original_plan_next()
        if not first_admitted:
            first_admitted.extend(r.rid for r in core.running)
        return batch

    core.plan_next = plan_next
    report = drive(core, runner, {0: [*low, high]}, overlap=True)
    assert first_admitted == ["high", "low0"]
    assert_matches_reference(core, report, [high, *low])


@pytest.mark.parametrize("overlap", [False, True])
def test_a_waiting_interactive_request_preempts_batch_work(overlap):
    """All rows busy with low-priority requests: an interactive arrival retracts the newest of them at once,
    and every request still gets exactly its reference output (the retracted one resumes)."""
    core, runner = make_core(rows=2)
    low = [msgspec.structs.replace(make_request(f"low{i}", prompt(30 + i, 8), 40, ignore_eos=True), priority=-1)
           for i in range(2)]
    high = make_request("high", prompt(40, 5), 3, ignore_eos=True)
    steps_to_admit = {}

    original_plan_next = core.plan_next

    def plan_next():
        batch = original_plan_next()
        if "high" not in steps_to_admit and any(r.rid == "high" for r in core.running):
            steps_to_admit["high"] = core.num_batches
        return batch

    core.plan_next = plan_next
    report = drive(core, runner, {0: low, 6: [high]}, overlap=overlap)
    assert_matches_reference(core, report, [high, *low])
    assert core.num_retractions >= 1
    assert steps_to_admit["high"] <= 8  # admitted within a batch or two of its arrival, not after 40 tokens


def test_no_preemption_among_equal_priorities():
    core, runner = make_core(rows=2)
    reqs = [make_request(f"r{i}", prompt(50 + i, 8), 20, ignore_eos=True) for i in range(3)]
    report = drive(core, runner, {0: reqs[:2], 4: reqs[2:]}, overlap=True)
    assert_matches_reference(core, report, reqs)
    assert core.num_retractions == 0


@pytest.mark.parametrize("overlap", [False, True])
def test_low_priority_prefill_is_held_back_while_interactive_requests_decode(overlap):
    core, runner = make_core(rows=6, chunk=64, low_prefill=8)
    high = make_request("high", prompt(60, 4), 30, ignore_eos=True)
    low = [msgspec.structs.replace(make_request(f"low{i}", prompt(61 + i, 50), 3, ignore_eos=True), priority=-1)
           for i in range(3)]
    low.append(embed_request("low-embed", prompt(70, 40), priority=-1))
    low_prefill_beside_decode = []
    original_plan_next = core.plan_next

    def plan_next():
        batch = original_plan_next()
        if batch is not None:
            plan, reqs = batch.plan, batch.reqs
            if any(r.rid == "high" for r, e in zip(reqs, plan.extend_lens) if e == 1):
                low_prefill_beside_decode.append(sum(e for r, e in zip(reqs, plan.extend_lens)
                                                     if r.msg.priority < 0 and e > 1 or r.msg.embed))
        return batch

    core.plan_next = plan_next
    report = drive(core, runner, {0: [high], 2: low}, overlap=overlap)
    assert_matches_reference(core, report, [high, *low[:3]])
    assert report.embeddings["low-embed"].embedding == embedding_of(low[3].input_ids)
    assert low_prefill_beside_decode and max(low_prefill_beside_decode) <= 8
    assert sum(low_prefill_beside_decode) > 0  # batch work still progressed beside the decoding request
