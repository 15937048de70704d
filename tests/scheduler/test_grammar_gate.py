"""Constrained requests in the scheduler core: each new grammar is asked of the workers once, its
requests wait in the queue (without holding back free requests) until it is ready, a repeated grammar is
a cache hit, and a grammar the workers cannot compile refuses its requests with a 400 that names the request
field and quotes the compiler."""

import pytest

from runtime.messages import GrammarReady, GrammarSpec
from runtime.scheduler.grammar_gate import GrammarGate
from tests.scheduler.test_core import assert_matches_reference, make_core, prompt
from tests.scheduler_fixtures import drive, make_request

SCHEMA = GrammarSpec(key="json-object", kind="json_schema", source='{"type": "object"}')
REGEX = GrammarSpec(key="lowercase", kind="regex", source="[a-z]+", field="sampling_params.regex")


@pytest.mark.parametrize("overlap", [False, True])
def test_constrained_requests_wait_for_their_grammar_only(overlap):
    core, runner = make_core()
    reqs = [make_request("free", prompt(1, 6), 10), make_request("json1", prompt(2, 6), 10, grammar=SCHEMA),
            make_request("json2", prompt(3, 6), 10, grammar=SCHEMA), make_request("re", prompt(4, 6), 10,
                                                                                   grammar=REGEX)]
    report = drive(core, runner, {0: reqs[:3], 4: reqs[3:]}, overlap=overlap)
    assert_matches_reference(core, report, reqs)
    assert runner.asked_grammars == [SCHEMA.key, REGEX.key]  # one compile per distinct grammar
    info = core.server_info()
    assert (info["grammar_compiles"], info["grammar_cache_hits"], info["grammars_compiling"]) == (2, 0, 0)
    again = drive(core, runner, {0: [make_request("json3", prompt(5, 6), 4, grammar=SCHEMA)]}, overlap=overlap)
    assert again.outcomes["json3"].finish is not None
    assert core.server_info()["grammar_cache_hits"] == 1 and runner.asked_grammars == [SCHEMA.key, REGEX.key]


def test_queued_request_is_not_admitted_before_its_grammar_is_ready():
    core, _ = make_core()
    core.add_request(make_request("c", prompt(1, 6), 4, grammar=REGEX))
    core.add_request(make_request("f", prompt(2, 6), 4))
    assert core.grammars.take_outbox() == [REGEX]
    batch = core.plan_next()
    assert [r.rid for r in batch.reqs] == ["f"]  # the free request goes first
    assert core.plan_next() is not None  # (f decodes) c still waits
    assert [r.rid for r in core.waiting] == ["c"]
    core.grammar_ready(GrammarReady(key=REGEX.key))
    assert "c" in [r.rid for r in core.plan_next().reqs]


def test_a_grammar_the_workers_refuse_refuses_its_requests():
    core, runner = make_core()
    runner.bad_grammars[REGEX.key] = "Regex parsing error at position 3"
    reqs = [make_request("bad", prompt(1, 6), 5, grammar=REGEX), make_request("ok", prompt(2, 6), 5)]
    report = drive(core, runner, {0: reqs}, overlap=True)
    assert report.rejected == {
        "bad": "sampling_params.regex: the grammar compiler refused it: Regex parsing error at position 3"}
    assert report.outcomes["ok"].finish is not None and "bad" not in report.outcomes


def test_ready_set_is_bounded_and_forgets_the_least_recently_used():
    gate = GrammarGate(capacity=2)
    specs = [GrammarSpec(key=c, kind="regex", source=c) for c in "abc"]
    for spec in specs:
        assert not gate.admissible(spec)
        gate.on_ready(GrammarReady(key=spec.key))
    assert gate.take_outbox() == specs
    assert not gate.admissible(specs[0])  # forgotten: asked again
    assert gate.take_outbox() == [specs[0]] and gate.admissible(specs[2])
