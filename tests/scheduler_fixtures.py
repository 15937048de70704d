"""Test double of the worker for scheduler tests, a reference generator, and a synchronous driver
that runs the scheduler core with or without overlap (the actor's loop without processes).

The double behaves like ModelRunner.step as far as the scheduler can tell: it keeps req_to_token,
a 'KV pool' (each slot remembers the token written into it) and future_tokens; it resolves
placeholder ids, and its next token is a deterministic function of the whole sequence READ BACK
through req_to_token and the pool. So any slot handed out twice, a wrong prefix, a slot reused
while still referenced, or a wrong placeholder changes the output and fails the comparison with
`reference_generate`, which applies the same function to the plain token list.
"""

from __future__ import annotations

import collections
import struct
import time
from dataclasses import dataclass, field

import msgspec

from runtime.messages import (
    BatchPlan,
    BatchResult,
    EmbeddingResult,
    FinishReason,
    GenerateRequest,
    GrammarReady,
    GrammarSpec,
    SamplingParams,
    SchedulerToWorker,
    TokenUpdate,
    TokenUpdates,
    WorkerError,
)
from runtime.scheduler.core import SchedulerCore

VOCAB = 64
EOS = 0


def next_token(seq: list[int], vocab: int = VOCAB) -> int:
    h = 7
    for t in seq:
        h = (h * 1000003 + t + 1) % 2_147_483_647
    return (h >> 3) % vocab


class FakeRunner:
    def __init__(self, num_slots: int, num_rows: int, context_len: int, vocab: int = VOCAB):
        self.vocab = vocab
        self.kv: list[int | None] = [None] * (num_slots + 1)
        self.req_to_token = [[0] * context_len for _ in range(num_rows)]
        self.future_tokens: list[int | None] = [None] * (2 * num_rows + 2)
        self.live_rows: set[int] = set()
        self.prior_output_ids: dict[int, list[int]] = {}
        self.codec = msgspec.msgpack.Decoder(SchedulerToWorker)
        self.encoder = msgspec.msgpack.Encoder()
        self.fail_batches: set[int] = set()
        self.steps = 0
        self.asked_grammars: list[str] = []  # keys of CompileGrammars, in order
        self.bad_grammars: dict[str, str] = {}  # key -> the compile error to answer with
        self._grammar_replies: list[GrammarReady] = []

    def compile_grammars(self, specs: list[GrammarSpec]) -> None:
        """Compiles at once (the grammar itself does not change this double's tokens)."""
        for spec in specs:
            self.asked_grammars.append(spec.key)
            self._grammar_replies.append(GrammarReady(key=spec.key, error=self.bad_grammars.get(spec.key)))

    def grammar_replies(self) -> list[GrammarReady]:
        replies, self._grammar_replies = self._grammar_replies, []
        return replies

    def step(self, plan: BatchPlan) -> BatchResult | WorkerError:
        plan = self.codec.decode(self.encoder.encode(plan))  # what really crosses the ring
        self.steps += 1
        for new in plan.new_rows:
            self.req_to_token[new.row][:len(new.prefix_slots)] = new.prefix_slots
            self.live_rows.add(new.row)
            self.prior_output_ids[new.row] = list(new.prior_output_ids)
        out, offset, embeddings = [], 0, {}
        pooled = set(plan.pool)
        for i, row in enumerate(plan.rows):
            assert row in self.live_rows, f"plan uses row {row} that is not registered"
            p, e = plan.prefix_lens[i], plan.extend_lens[i]
            for j in range(e):
                token = plan.input_ids[offset + j]
                if token < 0:
                    token = self.future_tokens[-token - 1]
                    assert token is not None, "placeholder read before it was written"
                slot = plan.out_slots[offset + j]
                assert slot != 0, "padding slot handed out"
                self.req_to_token[row][p + j] = slot
                self.kv[slot] = token
            offset += e
            if i in pooled:  # an embedding: a function of the whole sequence read back from the cache
                assert not plan.sample[i], "an embedding row samples"
                seq = [self.kv[self.req_to_token[row][q]] for q in range(p + e)]
                embeddings[i] = embedding_of(seq)
            if plan.sample[i]:
                seq = [self.kv[self.req_to_token[row][q]] for q in range(p + e)]
                token = next_token(seq, self.vocab)
                self.future_tokens[plan.future_slots[i]] = token
                out.append(token)
        assert offset == len(plan.input_ids) == len(plan.out_slots)
        for row in plan.freed_rows:
            self.live_rows.discard(row)
        if plan.batch_id in self.fail_batches:  # fails late: device buffers hold whatever was written
            return WorkerError(batch_id=plan.batch_id, message="simulated out of memory")
        return BatchResult(batch_id=plan.batch_id, next_token_ids=out, embeddings=embeddings)


def embedding_of(seq: list[int]) -> bytes:
    """The double's pooled vector of a sequence: two float32s from its hash and its length."""
    return struct.pack("<2f", float(next_token(seq, 1 << 20)), float(len(seq)))


def reference_generate(prompt: list[int], sampling: SamplingParams, context_limit: int, eos=(EOS,)) -> list[int]:
    seq, out = list(prompt), []
    while True:
        token = next_token(seq)
        seq.append(token)
        out.append(token)
        if len(out) >= sampling.max_new_tokens or len(seq) >= context_limit:
            return out
        if (not sampling.ignore_eos and token in eos) or token in sampling.stop_token_ids:
            return out


@dataclass
class Outcome:
    tokens: list[int] = field(default_factory=list)
    finish: FinishReason | None = None
    updates: list[TokenUpdate] = field(default_factory=list)


@dataclass
class DriveReport:
    outcomes: dict[str, Outcome]
    rejected: dict[str, str]
    steps: int
    batches: int
    embeddings: dict[str, EmbeddingResult] = field(default_factory=dict)


def make_request(rid: str, prompt: list[int], max_new_tokens: int = 16, stream: bool = False,
                 **sampling) -> GenerateRequest:
    return GenerateRequest(rid=rid, input_ids=prompt, stream=stream,
                           sampling=SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, **sampling))


def drive(core: SchedulerCore, runner, arrivals: dict[int, list[GenerateRequest]], overlap: bool,
          aborts: dict[int, list[str]] | None = None, check_every_step: bool = True,
          max_steps: int = 100_000) -> DriveReport:
    """Run the core like the actor does: plan, 'send' (the runner computes at once, its result is
    held back), and with overlap process batch N only after batch N+1 was planned."""
    arrivals = {k: list(v) for k, v in arrivals.items()}
    aborts = {k: list(v) for k, v in (aborts or {}).items()}
    outcomes: dict[str, Outcome] = collections.defaultdict(Outcome)
    rejected: dict[str, str] = {}
    embeddings: dict[str, EmbeddingResult] = {}
    results: collections.deque = collections.deque()
    batches = 0

    def deliver(updates):
        TokenUpdates(updates=updates)  # must be a valid message
        for u in updates:
            o = outcomes[u.rid]
            assert o.finish is None, f"update for {u.rid} after its final update"
            o.tokens.extend(u.new_token_ids)
            o.updates.append(u)
            o.finish = u.finish

    def process_oldest():
        result = results.popleft()
        if isinstance(result, WorkerError):
            deliver(core.process_error(result).updates)
        else:
            step_updates = core.process_result(result)
            deliver(step_updates.updates)
            for embedding in step_updates.embeddings:
                assert embedding.rid not in embeddings and embedding.rid not in outcomes
                embeddings[embedding.rid] = embedding

    for step in range(max_steps):
        for msg in arrivals.pop(step, []):
            rejection = core.add_request(msg)
            if rejection is not None:
                rejected[msg.rid] = rejection.message
        for rid in aborts.pop(step, []):
            deliver(core.abort(rid).updates)
        grammars = core.grammars.take_outbox()
        if grammars:
            runner.compile_grammars(grammars)
        for reply in runner.grammar_replies():
            rejections, updates = core.grammar_ready(reply)
            rejected.update((r.rid, r.message) for r in rejections)
            deliver(updates.updates)
        batch = core.plan_next()
        if batch is not None:
            batches += 1
            results.append(runner.step(batch.plan))
        if overlap:
            if len(results) >= 2 or (batch is None and results):
                process_oldest()
        else:
            while results:
                process_oldest()
        if batch is None and not results and core.grammars.compiling:
            time.sleep(0.002)  # a real runner compiles in the background
        if check_every_step:
            core.check_invariants()
        if not arrivals and not aborts and core.is_idle and not results:
            core.check_invariants()
            return DriveReport(outcomes=dict(outcomes), rejected=rejected, steps=step + 1, batches=batches,
                               embeddings=embeddings)
    raise AssertionError(f"workload did not finish in {max_steps} steps")
