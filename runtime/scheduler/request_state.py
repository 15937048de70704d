"""Scheduler-side state of one request.

Token positions: the sequence is prompt_ids + output_ids, followed by `pending` tokens the worker
has sampled but the scheduler has not received yet (overlap). `slots[i]` is the KV slot of
position i; len(slots) is how far KV has been planned (computed, or being computed by a batch in
flight). While decoding, len(slots) == len(prompt_ids) + len(output_ids) + pending - 1: the last
token is the next step's input.

KV ownership: slots[:tree_len] are held by the radix cache (the request locks `tree_node`),
except positions whose slot the request computed itself while the tree already had the same tokens
with other slots: those duplicates are in `dup_slots`, owned by the request until it leaves its
row (the worker's req_to_token row still points at them). slots[tree_len:] are the request's.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from runtime.messages import FinishReason, GenerateRequest, TokenLogprobs
from runtime.scheduler.radix_cache import TreeNode


class ReqStatus(enum.Enum):
    WAITING = "waiting"  # in the queue (new, or retracted)
    RUNNING = "running"  # holds a request-table row (prefilling or decoding)
    FINISHED = "finished"


@dataclass(eq=False)
class Req:
    msg: GenerateRequest
    prompt_ids: list[int]
    arrival_seq: int  # admission order tie-breaker; retraction picks the highest
    length_limit: int  # prompt + output tokens the request may reach (max_new_tokens, context, pool)
    status: ReqStatus = ReqStatus.WAITING
    output_ids: list[int] = field(default_factory=list)
    finish: FinishReason | None = None

    # Table row and KV (valid while RUNNING)
    row: int = -1
    slots: list[int] = field(default_factory=list)
    fill_ids: list[int] = field(default_factory=list)  # what this admission prefills: prompt + output so far
    tree_node: TreeNode | None = None
    tree_len: int = 0
    prefix_hit: int = 0  # cached prefix found at admission: slots shared with the tree, not freed by this request
    dup_slots: list[int] = field(default_factory=list)
    kv_committed: int = 0  # positions whose KV a processed batch computed (safe to cache)

    # Overlap: tokens sampled in batches whose results have not come back
    pending: int = 0
    last_future_slot: int = -1  # future_tokens slot of the newest pending token

    # Reporting
    cached_tokens: int = 0  # prefix-cache hit of the first admission
    admitted_once: bool = False
    sent_len: int = 0  # output tokens already sent to the detokenizer
    unsent_logprobs: TokenLogprobs | None = None
    prompt_logprobs: TokenLogprobs | None = None
    prompt_logprobs_sent: bool = False
    retractions: int = 0  # also the admission epoch: results of an earlier admission carry only tokens

    @property
    def rid(self) -> str:
        return self.msg.rid

    @property
    def sampling(self):
        return self.msg.sampling

    @property
    def seq_len(self) -> int:
        """Known tokens (prompt + output received so far)."""
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def is_prefilling(self) -> bool:
        return self.status is ReqStatus.RUNNING and len(self.slots) < len(self.fill_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is ReqStatus.FINISHED

    def owned_slots(self) -> list[int]:
        """KV slots the request must free itself when it leaves its row."""
        return self.slots[self.tree_len:] + self.dup_slots


def concat_logprobs(a: TokenLogprobs | None, b: TokenLogprobs) -> TokenLogprobs:
    if a is None:
        return b
    return TokenLogprobs(token_ids=a.token_ids + b.token_ids, logprobs=a.logprobs + b.logprobs,
                         top_ids=a.top_ids + b.top_ids, top_logprobs=a.top_logprobs + b.top_logprobs,
                         ids_logprobs=a.ids_logprobs + b.ids_logprobs)
