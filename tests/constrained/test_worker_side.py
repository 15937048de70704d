"""The worker's half of constrained decoding: the compile cache (background compiles, one answer per asked
grammar, errors quoted, eviction), the per-row matchers (tokens fed one step late, as with overlap; a
terminated grammar allows only the stop tokens; a re-admitted row replays its output) and the sampler
applying the mask (greedy and random rows never leave the grammar; logprobs stay those of the raw logits)."""

from __future__ import annotations

import time

import pytest
import torch

from runtime.constrained import backend
from runtime.constrained.compile_cache import GrammarCompileCache
from runtime.constrained.grammars import grammar_spec
from runtime.constrained.row_matchers import RowMatchers
from runtime.messages import LogprobOptions, SamplingParams
from runtime.worker.sampling import Sampler
from tests.constrained.char_vocab import STOP, VOCAB, allowed_ids, char_compiler
from tests.fake_frontend import smollm2_tokenizer

DIGITS = grammar_spec("regex", "[0-9]{2}")  # two digits, then the stop token
WORD = grammar_spec("regex", "ab|ac")


@pytest.fixture(scope="module")
def compiled():
    compiler = char_compiler()
    return {spec.key: backend.compile_grammar(compiler, spec) for spec in (DIGITS, WORD)}


class FakeStep:
    """What RowMatchers reads of a PendingStep: the sampled ids once `done` (None on the CPU)."""

    def __init__(self, token_ids: list[int]):
        self.token_ids = torch.tensor(token_ids)
        self.done = None


def ids(*chars: str) -> list[int]:
    return [VOCAB.index(c) for c in chars]


def test_mask_follows_tokens_fed_one_step_late(compiled):
    matchers = RowMatchers(len(VOCAB), [STOP], torch.device("cpu"))
    assert matchers.mask([0, 1]) is None  # nothing constrained: no mask, no work
    matchers.add_row(3, compiled[DIGITS.key])
    mask = matchers.mask([5, 3])
    assert mask.indices == [1]
    assert allowed_ids(mask.bitmask[1], len(VOCAB)) == ids(*"0123456789")
    matchers.record([5, 3], FakeStep(ids("x", "7")))  # row 3 sampled "7"; row 5 is free
    matchers.record([3], FakeStep(ids("2")))  # and then "2": both fed at the next mask
    assert allowed_ids(matchers.mask([3]).bitmask[0], len(VOCAB)) == [STOP]
    matchers.record([3], FakeStep([STOP]))
    assert allowed_ids(matchers.mask([3]).bitmask[0], len(VOCAB)) == [STOP]  # terminated: the extra overlap step
    matchers.free_row(3)
    assert matchers.mask([3]) is None and len(matchers) == 0


def test_readmitted_row_replays_its_output(compiled):
    matchers = RowMatchers(len(VOCAB), [STOP], torch.device("cpu"))
    matchers.add_row(0, compiled[WORD.key], prior_output_ids=ids("a"))
    assert allowed_ids(matchers.mask([0]).bitmask[0], len(VOCAB)) == ids("b", "c")


def test_sampler_stays_inside_the_grammar(compiled):
    vocab = len(VOCAB)
    sampler = Sampler(4, vocab, [STOP], "cpu", seed=1)
    matchers = RowMatchers(vocab, [STOP], torch.device("cpu"))
    logits = torch.zeros(3, vocab)
    logits[:, VOCAB.index("z")] = 30.0  # what the model wants, the grammar forbids
    sampler.add_row(0, SamplingParams(temperature=0.0, grammar=WORD), LogprobOptions(return_logprob=True))
    sampler.add_row(1, SamplingParams(temperature=1.0, grammar=DIGITS, min_new_tokens=5))
    sampler.add_row(2, SamplingParams(temperature=0.0))
    matchers.add_row(0, compiled[WORD.key])
    matchers.add_row(1, compiled[DIGITS.key])
    for step in range(3):
        out = sampler.sample(logits, [0, 1, 2], matchers.mask([0, 1, 2]))
        tokens = out.token_ids.tolist()
        matchers.record([0, 1, 2], FakeStep(tokens))
        assert tokens[2] == VOCAB.index("z")  # the free row is untouched
        assert VOCAB[tokens[0]] == ["a", "b", "</s>"][step]  # greedy among the allowed: first by id
        assert VOCAB[tokens[1]] in ("0123456789" if step < 2 else ["</s>"])  # min_new_tokens yields to the grammar
        assert out.logprobs[0].logprobs[0] == pytest.approx(torch.log_softmax(logits[0], -1)[tokens[0]].item())


def test_compile_cache_answers_each_asked_grammar_once():
    loads = []

    def load_tokenizer():
        loads.append(1)
        return smollm2_tokenizer()

    cache = GrammarCompileCache(load_tokenizer, 49152, [2], capacity=2)
    assert not loads  # nothing loaded until a grammar is asked for
    bad = grammar_spec("ebnf", "root ::= missing")  # the ingress would refuse it; the worker answers anyway
    cache.submit([DIGITS, WORD, bad])
    replies = wait_replies(cache, 3)
    assert {r.key: r.error for r in replies} == {DIGITS.key: None, WORD.key: None, bad.key: replies[-1].error}
    assert 'Rule "missing" is not defined' in {r.key: r.error for r in replies}[bad.key]
    assert len(loads) == 1 and not cache.busy
    cache.submit([WORD])  # cached: answered by the next poll, no compile
    assert [r.key for r in wait_replies(cache, 1)] == [WORD.key] and cache.compiles == 3
    cache.submit([grammar_spec("regex", "x")])  # a fourth grammar: the oldest finished ones leave (capacity 2)
    wait_replies(cache, 1)
    assert cache.get(DIGITS) is not None  # evicted: compiled again on the spot
    assert cache.compiles == 5
    cache.close()


def wait_replies(cache, count, timeout=60.0):
    replies, deadline = [], time.monotonic() + timeout
    while len(replies) < count and time.monotonic() < deadline:
        replies += cache.replies()
        time.sleep(0.01)
    assert len(replies) == count
    return sorted(replies, key=lambda r: r.error is not None)
