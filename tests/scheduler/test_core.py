"""Scheduler core against the worker test double (tests/scheduler_fixtures.py): outputs equal the
reference generator token for token, and slot/row accounting holds after every step."""

import random

import pytest

from runtime.messages import BatchResult, SamplingParams
from runtime.scheduler.admission import NewTokenRatio
from runtime.scheduler.config import SchedulerConfig
from runtime.scheduler.core import SchedulerCore
from tests.scheduler_fixtures import EOS, FakeRunner, drive, make_request, next_token, reference_generate


def make_core(total=512, rows=8, context=256, chunk=8192, radix=True, policy="fcfs", stream_interval=1,
              decode=None, max_prefill=16384):
    config = SchedulerConfig(max_total_tokens=total, max_running_requests=rows, context_length=context,
                             eos_token_ids=[EOS], chunked_prefill_size=chunk, max_prefill_tokens=max_prefill,
                             schedule_policy=policy, disable_radix_cache=not radix, stream_interval=stream_interval)
    core = SchedulerCore(config, decode=decode)
    return core, FakeRunner(total, rows, context)


def prompt(seed, n):
    rng = random.Random(seed)
    return [rng.randrange(1, 64) for _ in range(n)]


def assert_matches_reference(core, report, requests):
    for req in requests:
        if req.rid in report.rejected:
            continue
        expected = reference_generate(req.input_ids, req.sampling, core.context_limit)
        got = report.outcomes[req.rid]
        assert got.tokens == expected, f"{req.rid}: {got.tokens} != {expected}"
        assert got.finish is not None and got.finish.type in ("stop", "length")
        assert got.updates[-1].meta.completion_tokens == len(expected)


MODES = [dict(overlap=o, radix=r, chunk=c) for o in (False, True) for r in (False, True) for c in (-1, 16)]


def mode_id(m):
    return f"overlap{int(m['overlap'])}-radix{int(m['radix'])}-chunk{m['chunk']}"


@pytest.mark.parametrize("mode", MODES, ids=mode_id)
def test_mixed_arrivals_match_reference(mode):
    core, runner = make_core(chunk=mode["chunk"], radix=mode["radix"])
    shared = prompt(0, 30)
    reqs = [make_request("a", prompt(1, 5), 20), make_request("b", shared + prompt(2, 10), 12),
            make_request("c", shared + prompt(3, 40), 25), make_request("d", prompt(4, 70), 8),
            make_request("e", shared + prompt(2, 10), 12, ignore_eos=True)]
    arrivals = {0: reqs[:2], 3: reqs[2:4], 9: reqs[4:]}
    report = drive(core, runner, arrivals, overlap=mode["overlap"])
    assert_matches_reference(core, report, reqs)


def test_overlap_runs_one_batch_ahead_and_drops_extra_tokens():
    """A request that stops on EOS has one more decode already planned under overlap: that token
    must never reach the user, and the plain loop must produce the very same tokens."""
    seq, n = prompt(7, 6), 0
    while True:  # find a prompt whose greedy continuation hits EOS within 40 tokens
        out = reference_generate(seq, SamplingParams(max_new_tokens=40, temperature=0.0), 10_000)
        if out[-1] == EOS and len(out) < 40:
            break
        n += 1
        seq = prompt(100 + n, 6)
    outputs = {}
    for overlap in (False, True):
        core, runner = make_core()
        report = drive(core, runner, {0: [make_request("x", seq, 40)]}, overlap=overlap)
        outputs[overlap] = report.outcomes["x"]
        assert report.outcomes["x"].finish.type == "stop" and report.outcomes["x"].finish.matched == EOS
        if overlap:
            assert report.batches == len(out) + 1  # the extra decode step
        else:
            assert report.batches == len(out)
    assert outputs[True].tokens == outputs[False].tokens == out


def test_repeated_prompt_reports_cached_tokens():
    core, runner = make_core()
    p = prompt(11, 40)
    first = drive(core, runner, {0: [make_request("r1", p, 5)]}, overlap=True)
    second = drive(core, runner, {0: [make_request("r2", p, 5)]}, overlap=True)
    assert first.outcomes["r1"].updates[-1].meta.cached_tokens == 0
    assert second.outcomes["r2"].updates[-1].meta.cached_tokens == len(p) - 1
    assert second.outcomes["r2"].tokens == first.outcomes["r1"].tokens
    assert core.cache_hit_rate() == pytest.approx((len(p) - 1) / (2 * len(p)))


def test_disabled_radix_cache_caches_nothing():
    core, runner = make_core(radix=False)
    p = prompt(11, 40)
    drive(core, runner, {0: [make_request("r1", p, 5)]}, overlap=True)
    second = drive(core, runner, {0: [make_request("r2", p, 5)]}, overlap=True)
    assert second.outcomes["r2"].updates[-1].meta.cached_tokens == 0
    assert core.allocator.num_free == core.config.max_total_tokens


def test_chunked_prefill_interleaves_with_decode():
    """A long prompt arriving while another request decodes is prefilled in chunks, each step also
    carrying the decode row (mixed batches), so the first stream keeps flowing."""
    core, runner = make_core(chunk=16)
    short = make_request("short", prompt(1, 4), 30, ignore_eos=True)
    long = make_request("long", prompt(2, 100), 4, ignore_eos=True)
    plans = []
    original_step = runner.step

    def recording_step(plan):
        plans.append(plan)
        return original_step(plan)

    runner.step = recording_step
    report = drive(core, runner, {0: [short], 2: [long]}, overlap=True)
    assert_matches_reference(core, report, [short, long])
    mixed = [p for p in plans if len(p.rows) == 2 and 1 in p.extend_lens and max(p.extend_lens) > 1]
    assert len(mixed) >= 6  # 100 tokens / 16 per chunk, each with the decode row
    assert all(sum(e for e in p.extend_lens if e > 1) <= 16 for p in plans)


def test_partially_prefilled_prompt_is_shared_through_the_cache():
    core, runner = make_core(chunk=16)
    p = prompt(5, 90)
    a = make_request("a", p, 3, ignore_eos=True)
    b = make_request("b", p + [9, 9], 3, ignore_eos=True)
    report = drive(core, runner, {0: [a], 4: [b]}, overlap=False)
    assert_matches_reference(core, report, [a, b])
    # b arrived while a was still being prefilled in chunks and found a's first chunks cached
    assert report.outcomes["b"].updates[-1].meta.cached_tokens >= 48


def test_lpm_policy_prefers_cached_prefix():
    core, runner = make_core(rows=1, policy="lpm")
    shared = prompt(3, 30)
    drive(core, runner, {0: [make_request("warm", shared + [1], 2)]}, overlap=False)
    cold = [t for t in prompt(4, 40) if t != shared[0]][:31]
    reqs = [make_request("cold", cold, 2), make_request("hot", shared + [2], 2)]
    order = []
    original_step = runner.step

    def recording_step(plan):
        for new in plan.new_rows:
            order.append(len(new.prefix_slots))
        return original_step(plan)

    runner.step = recording_step
    report = drive(core, runner, {0: reqs}, overlap=False)
    assert_matches_reference(core, report, reqs)
    assert order[0] == 30 and order[1] == 0  # the cached one went first despite arriving second


def test_retraction_under_a_tiny_pool_loses_no_work():
    """Requests that may stop early are admitted on the new-token ratio; when it says they stop much earlier
    than they do (here: as if learned from short answers), decode runs out of slots and retracts; the outputs
    are still exact."""
    for overlap in (False, True):
        core, runner = make_core(total=120, rows=6, context=120, chunk=16)
        core.new_token_ratio = NewTokenRatio(init=0.1)
        reqs = [make_request(f"r{i}", prompt(20 + i, 12), 40) for i in range(6)]
        report = drive(core, runner, {0: reqs}, overlap=overlap)
        assert core.num_retractions > 0 and 0 < core.num_retracted_reqs <= core.num_retractions
        assert core.server_info()["retractions"] == core.num_retractions
        assert_matches_reference(core, report, reqs)


def test_requests_that_run_to_their_length_never_retract():
    """ignore_eos requests write exactly their token budget: admission reserves it at the peak, so a pool
    far too small for all of them at once runs them without a single retraction."""
    for overlap in (False, True):
        core, runner = make_core(total=120, rows=6, context=120, chunk=16)
        reqs = [make_request(f"r{i}", prompt(20 + i, 12), 40, ignore_eos=True) for i in range(6)]
        report = drive(core, runner, {0: reqs}, overlap=overlap)
        assert core.num_retractions == 0
        assert_matches_reference(core, report, reqs)


def test_abort_queued_prefilling_and_decoding():
    for overlap in (False, True):
        core, runner = make_core(rows=2, chunk=8, max_prefill=8)
        decoding = make_request("decoding", prompt(1, 5), 50, ignore_eos=True)
        prefilling = make_request("prefilling", prompt(2, 80), 50, ignore_eos=True)
        queued = make_request("queued", prompt(3, 5), 50, ignore_eos=True)
        report = drive(core, runner, {0: [decoding, prefilling, queued]}, overlap=overlap,
                       aborts={4: ["queued", "prefilling", "decoding"], 5: ["unknown-rid"]})
        for rid in ("decoding", "prefilling", "queued"):
            assert report.outcomes[rid].finish.type == "abort", rid
        assert report.outcomes["queued"].tokens == []
        assert report.outcomes["prefilling"].tokens == []
        expected = reference_generate(decoding.input_ids, decoding.sampling, core.context_limit)
        got = report.outcomes["decoding"].tokens
        assert 0 < len(got) < 50 and got == expected[:len(got)]


def test_requests_that_can_never_fit_are_rejected():
    core, runner = make_core(total=64, context=100)
    reqs = [make_request("too-long-for-pool", prompt(1, 64), 4),
            make_request("too-long-for-context", prompt(1, 100), 4),
            make_request("empty", [], 4), make_request("ok", prompt(2, 10), 4)]
    report = drive(core, runner, {0: reqs}, overlap=True)
    assert "KV cache" in report.rejected["too-long-for-pool"]
    assert "context length" in report.rejected["too-long-for-context"]
    assert "input_ids" in report.rejected["empty"]
    assert "ok" not in report.rejected and report.outcomes["ok"].finish is not None
    assert core.add_request(make_request("dup", prompt(3, 5), 100)) is None
    assert "already in use" in core.add_request(make_request("dup", prompt(3, 5), 4)).message
    core.abort("dup")


def test_context_limit_finishes_with_length():
    core, runner = make_core(total=512, context=40)
    req = make_request("x", prompt(9, 30), 100, ignore_eos=True)
    report = drive(core, runner, {0: [req]}, overlap=True)
    out = report.outcomes["x"]
    assert len(out.tokens) == 10 and out.finish.type == "length"


def test_flush_cache_only_when_idle():
    core, runner = make_core()
    drive(core, runner, {0: [make_request("a", prompt(1, 20), 3)]}, overlap=True)
    assert core.cache.total_size > 0
    assert core.add_request(make_request("b", prompt(2, 20), 3)) is None
    ok, message = core.flush_cache()
    assert not ok and "queued" in message
    core.abort("b")
    ok, message = core.flush_cache()
    assert ok and core.cache.total_size == 0 and core.allocator.num_free == core.config.max_total_tokens


def test_stream_interval_and_non_stream_updates():
    core, runner = make_core(stream_interval=4)
    stream = make_request("s", prompt(1, 5), 10, stream=True, ignore_eos=True)
    whole = make_request("w", prompt(2, 5), 10, ignore_eos=True)
    report = drive(core, runner, {0: [stream, whole]}, overlap=True)
    assert [len(u.new_token_ids) for u in report.outcomes["s"].updates] == [1, 4, 4, 1]
    assert [len(u.new_token_ids) for u in report.outcomes["w"].updates] == [10]
    assert report.outcomes["s"].updates[0].finish is None


def test_stop_strings_matched_on_decoded_tail():
    decode = lambda ids: "".join(chr(ord("a") + t % 26) for t in ids)  # noqa: E731
    p = prompt(3, 8)
    full = reference_generate(p, SamplingParams(max_new_tokens=30, ignore_eos=True, temperature=0.0), 10_000)
    stop = decode(full[10:13])
    first = decode(full).find(stop)
    core, runner = make_core(decode=decode)
    report = drive(core, runner, {0: [make_request("x", p, 30, ignore_eos=True, stop=[stop])]}, overlap=True)
    out = report.outcomes["x"]
    assert out.finish.type == "stop" and out.finish.matched == stop
    assert len(out.tokens) == first + 3 and out.tokens == full[:first + 3]
    # The detokenizer learns the stop strings from the request's first update (to hold back their starts).
    assert out.updates[0].stop == [stop] and all(u.stop == [] for u in out.updates[1:])


def test_worker_error_aborts_the_batch_and_the_scheduler_keeps_serving():
    for overlap in (False, True):
        core, runner = make_core()
        runner.fail_batches = {2}
        a = make_request("a", prompt(1, 5), 10, ignore_eos=True)
        b = make_request("b", prompt(2, 5), 10, ignore_eos=True)
        c = make_request("c", prompt(3, 5), 5)
        report = drive(core, runner, {0: [a, b], 6: [c]}, overlap=overlap)
        for rid in ("a", "b"):
            assert report.outcomes[rid].finish.type == "abort"
            assert "simulated out of memory" in report.outcomes[rid].finish.message
        assert_matches_reference(core, report, [c])


def test_result_for_the_wrong_batch_is_refused():
    core, runner = make_core()
    core.add_request(make_request("a", prompt(1, 5), 3))
    batch = core.plan_next()
    with pytest.raises(RuntimeError, match="expected batch"):
        core.process_result(BatchResult(batch_id=batch.plan.batch_id + 7, next_token_ids=[1]))


def test_random_workloads_leave_no_leak():
    """Seeded random workloads: shared prefixes, staggered arrivals, aborts at random times, pools small
    enough to force eviction (and retraction, with a low new-token ratio), every mode. Outputs of requests
    that were not aborted equal the reference; aborted ones are a prefix of it; nothing leaks."""
    rng = random.Random(1234)
    retractions = 0
    for trial in range(12):
        overlap, radix = rng.random() < 0.5, rng.random() < 0.7
        chunk = rng.choice([-1, 8, 16, 64])
        total = rng.choice([96, 160, 400])
        core, runner = make_core(total=total, rows=rng.choice([2, 4, 8]), context=96, chunk=chunk, radix=radix,
                                 policy=rng.choice(["fcfs", "lpm"]), stream_interval=rng.choice([1, 3]))
        # Half the trials admit as if answers were short: requests that may stop early then outgrow the pool.
        core.new_token_ratio = NewTokenRatio(init=rng.choice([0.7, 0.05]))
        bases = [prompt(trial * 100 + i, rng.randrange(5, 40)) for i in range(3)]
        reqs, arrivals, aborts = [], {}, {}
        for i in range(rng.randrange(4, 14)):
            p = rng.choice(bases)[: rng.randrange(1, 40)] + prompt(trial * 1000 + i, rng.randrange(0, 20))
            p = p or [1]
            req = make_request(f"t{trial}r{i}", p, rng.randrange(1, 50), stream=rng.random() < 0.5,
                               ignore_eos=rng.random() < 0.5)
            reqs.append(req)
            arrivals.setdefault(rng.randrange(0, 30), []).append(req)
            if rng.random() < 0.2:
                aborts.setdefault(rng.randrange(0, 60), []).append(req.rid)
        report = drive(core, runner, arrivals, overlap=overlap, aborts=aborts)
        retractions += core.num_retractions
        aborted = {rid for rids in aborts.values() for rid in rids}
        for req in reqs:
            if req.rid in report.rejected:
                continue
            got = report.outcomes[req.rid]
            expected = reference_generate(req.input_ids, req.sampling, core.context_limit)
            if got.finish.type == "abort":
                assert req.rid in aborted and got.tokens == expected[:len(got.tokens)]
            else:
                assert got.tokens == expected, req.rid
        core.check_invariants()
    assert retractions > 0  # the small pools did force retractions


def test_next_token_double_is_sensitive_to_every_token():
    assert next_token([1, 2, 3]) != next_token([1, 2, 4]) or next_token([1, 2, 3]) != next_token([2, 2, 3])


def test_prefill_budget_is_small_while_requests_decode():
    """With nothing decoding a step prefills up to max_prefill_tokens; while requests decode (their streams wait
    for the step) at most chunked_prefill_size prompt tokens."""
    core, runner = make_core(total=2000, rows=8, context=512, chunk=16, max_prefill=64)
    reqs = [make_request(f"r{i}", prompt(40 + i, 30), 20, ignore_eos=True) for i in range(5)]
    steps = []
    plan_next = core.plan_next

    def plan_and_record():
        batch = plan_next()
        if batch is not None:
            steps.append((batch.num_decode, batch.new_tokens))
        return batch

    core.plan_next = plan_and_record
    report = drive(core, runner, {0: reqs[:3], 6: reqs[3:]}, overlap=True)
    assert steps[0] == (0, 64)  # nothing decodes yet: 64 prompt tokens (two prompts and a chunk of the third)
    assert all(new <= 16 for decode, new in steps if decode) and any(decode and new for decode, new in steps)
    assert_matches_reference(core, report, reqs)


def test_stop_regex_ends_the_request_on_the_token_that_completes_a_match():
    decode = lambda ids: "".join(chr(ord("a") + t % 26) for t in ids)  # noqa: E731
    p = prompt(3, 8)
    full = reference_generate(p, SamplingParams(max_new_tokens=30, ignore_eos=True, temperature=0.0), 10_000)
    text = decode(full)
    pattern = f"{text[12]}[a-z]{{2}}{text[15]}"  # matches text[12:16] (or an earlier look-alike)
    import re
    match = re.search(pattern, text)
    core, runner = make_core(decode=decode)
    request = make_request("x", p, 30, ignore_eos=True, stop_regex=[pattern])
    report = drive(core, runner, {0: [request]}, overlap=True)
    out = report.outcomes["x"]
    assert out.finish.type == "stop" and out.finish.matched == pattern and out.finish.matched_text == match.group(0)
    assert out.tokens == full[:match.end()]
    assert out.updates[0].stop_regex == [pattern]


def test_per_request_stream_interval_overrides_the_servers():
    core, runner = make_core(stream_interval=1)
    request = make_request("s", prompt(1, 5), 10, stream=True, ignore_eos=True, stream_interval=4)
    report = drive(core, runner, {0: [request]}, overlap=True)
    assert [len(u.new_token_ids) for u in report.outcomes["s"].updates] == [1, 4, 4, 1]


@pytest.mark.parametrize("chunk", [-1, 4])
def test_max_new_tokens_zero_prefills_and_generates_nothing(chunk):
    core, runner = make_core(chunk=chunk)
    p = prompt(5, 10)
    report = drive(core, runner, {0: [make_request("z", p, 0)], 8: [make_request("y", p + [3], 4)]}, overlap=True)
    zero = report.outcomes["z"]
    assert zero.tokens == [] and zero.finish.type == "length" and zero.finish.length == 0
    assert zero.updates[-1].meta.completion_tokens == 0
    assert report.outcomes["y"].updates[-1].meta.cached_tokens == 10  # the zero-token request cached its prompt
