"""The scheduler's batch records: PlanColumns (the batch being planned, columnar as the BatchPlan it becomes),
ScheduledBatch (a plan sent to the worker, with its requests) and StepUpdates (what processing a result gives)."""

from __future__ import annotations

from dataclasses import dataclass, field

from runtime.messages import BatchPlan, EmbeddingResult, TokenUpdate
from runtime.scheduler.request_state import Req


@dataclass(slots=True)
class PlanColumns:
    """The batch being planned, in the BatchPlan's columnar layout. Decode rows go in as whole columns (one list
    operation per column, not a call per request); prefill rows one by one. A prefill chunk that is not the
    prompt's last computes KV but does not sample; the last chunk of an embedding request is pooled."""

    reqs: list[Req] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    prefix_lens: list[int] = field(default_factory=list)
    extend_lens: list[int] = field(default_factory=list)
    sample: list[bool] = field(default_factory=list)
    input_ids: list[int] = field(default_factory=list)
    out_slots: list[int] = field(default_factory=list)
    pool: list[int] = field(default_factory=list)  # plan indices of rows whose pooled vector the worker returns

    def add_decode(self, reqs: list[Req], prefix_lens: list[int], input_ids: list[int], slots: list[int]) -> None:
        n = len(reqs)
        self.reqs += reqs
        self.rows += [r.row for r in reqs]
        self.prefix_lens += prefix_lens
        self.extend_lens += [1] * n
        self.sample += [True] * n
        self.input_ids += input_ids
        self.out_slots += slots

    def add_extend(self, req: Req, prefix_len: int, input_ids: list[int], slots: list[int], sample: bool,
                   pool: bool) -> None:
        if pool:
            self.pool.append(len(self.reqs))
        self.reqs.append(req)
        self.rows.append(req.row)
        self.prefix_lens.append(prefix_len)
        self.extend_lens.append(len(slots))
        self.sample.append(sample)
        self.input_ids += input_ids
        self.out_slots += slots


@dataclass
class ScheduledBatch:
    """A sent plan and, per plan row, the request and its admission epoch (a result for an
    earlier admission of a retracted request only carries its sampled token)."""

    plan: BatchPlan
    reqs: list[Req]
    epochs: list[int]
    num_decode: int
    new_seqs: int
    new_tokens: int  # extend tokens of prefill rows
    cached_tokens: int  # prefix-cache hits of the newly admitted requests
    retracted: int = 0  # running requests retracted to make room for this batch's decode rows


@dataclass
class StepUpdates:
    """What processing a result (or an abort) produces for the detokenizer."""

    updates: list[TokenUpdate]
    finished: int = 0
    new_tokens: int = 0
    embeddings: list[EmbeddingResult] = field(default_factory=list)  # for the ingress, not the detokenizer
