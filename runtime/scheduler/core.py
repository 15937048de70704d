"""The scheduler's pure core: admission, batch planning and result processing. No processes, no
devices: the actor (runtime/scheduler/actor.py) feeds it messages and carries its plans and updates.

One step:  plan = core.plan_next()  ->  the worker runs it  ->  core.process_result(result).
With overlap the actor calls plan_next() for batch N+1 before process_result() of batch N: the
core names tokens it has not seen yet by placeholders (-(k+1) reads the worker's
future_tokens[k]) and keeps per request a count of such pending tokens. A request that turns out
to have finished in batch N may already sit in batch N+1: that extra token is dropped here and its
KV slot is freed with the request, so it never reaches the user. Length limits are known when
planning, so only EOS / stop finishes cost an extra token.

Memory: a request is admitted only if the pool can hold, at every future step, what the running requests
and it will still write (runtime/scheduler/admission.py: exact for requests that cannot stop early, a learned
and decaying new-token ratio for the others). When that estimate was too low, decode runs out of KV slots and
the newest requests are retracted (counted, logged, and the ratio reset). Retracted requests go back to the
front of the queue with their output kept; their computed KV stays in the radix cache (when enabled) and they
resume with prompt + output as input.

Embedding requests (GenerateRequest.embed) are prefill only: their last chunk is named in the plan's `pool`, the
worker returns the pooled vector, and they finish there (their KV goes to the radix cache like any other's).
Mean and CLS pooling need every token's hidden state, so those requests never start from the prefix cache.

Priority (GenerateRequest.priority, higher first): the queue is admitted in priority order, and a waiting request
that finds no row or no memory retracts running requests of lower priority (the lowest, newest first), so batch
work (/v1/batches) fills the idle capacity without making interactive requests wait for it. While requests of a
higher priority decode, lower-priority prefill is held to low_priority_prefill_tokens per step (with chunking), so
batch prompts do not stretch the interactive decode steps either.
"""

from __future__ import annotations

import collections
import itertools

from runtime.messages import (
    BatchPlan,
    BatchResult,
    EmbeddingResult,
    FinishReason,
    GenerateRequest,
    GrammarReady,
    NewRow,
    RequestMeta,
    RequestRejected,
    TokenLogprobs,
    TokenUpdate,
    WorkerError,
)
from runtime.scheduler.admission import NewTokenRatio, Reservation, stops_only_at_length
from runtime.scheduler.batch_records import PlanColumns, ScheduledBatch, StepUpdates
from runtime.scheduler.chunk_control import MixedChunkSize
from runtime.scheduler.config import SchedulerConfig
from runtime.scheduler.grammar_gate import GrammarGate
from runtime.scheduler.image_blocks import ImageBlockLedger
from runtime.scheduler.policy import SchedulePolicy
from runtime.scheduler.radix_cache import PrefixMatch, RadixCache
from runtime.scheduler.request_state import Req, ReqStatus, concat_logprobs
from runtime.scheduler.slot_allocator import ReqTable, SlotAllocator
from runtime.scheduler.stop_checker import Decode, StopChecker


class SchedulerCore:
    def __init__(self, config: SchedulerConfig, decode: Decode | None = None):
        self.config = config
        self.allocator = SlotAllocator(config.max_total_tokens)
        self.table = ReqTable(config.max_running_requests)
        self.cache = None if config.disable_radix_cache else RadixCache()
        self.policy = SchedulePolicy(config.schedule_policy, self.cache)
        # A request can never hold more KV than the pool: the pool bounds its length like the context.
        self.context_limit = min(config.context_length, config.max_total_tokens)
        self.stop_checker = StopChecker(config.eos_token_ids, self.context_limit, decode)
        self.chunking = config.chunked_prefill_size > 0
        self.mixed_chunk = MixedChunkSize(config.chunked_prefill_size)  # prompt tokens beside decode rows
        self.future_ring_size = 2 * config.max_running_requests + 2
        self._next_future = 0
        self.num_batches = 0  # also the next batch id
        self._arrivals = itertools.count()

        self.reqs: dict[str, Req] = {}  # every unfinished request
        self.image_blocks = ImageBlockLedger()  # arena blocks of requests' images, released in order
        self.waiting: list[Req] = []
        self.running: list[Req] = []  # admission order
        self.in_flight: collections.deque[ScheduledBatch] = collections.deque()
        self.released_rows: list[int] = []  # rows freed since the last plan (its freed_rows)
        self.new_token_ratio = NewTokenRatio()
        self.grammars = GrammarGate()  # constrained requests wait in the queue until their grammar is compiled

        # Counters for logs and server info
        self.num_retractions = 0  # times a running request was retracted (a request may count more than once)
        self.num_retracted_reqs = 0  # requests retracted at least once
        self.total_prompt_tokens = 0
        self.total_cached_tokens = 0
        self.total_generated_tokens = 0
        self.total_forward_ms = 0.0  # worker-reported step time, for the overlap benchmark

    # ---------------------------------------------------------------------------------------
    # requests in
    # ---------------------------------------------------------------------------------------

    def add_request(self, msg: GenerateRequest) -> RequestRejected | None:
        """Queue a request, or say why it can never be served."""
        rejection = self._queue_request(msg)
        self.image_blocks.add(msg, self.num_batches - 1, accepted=rejection is None)
        return rejection

    def _queue_request(self, msg: GenerateRequest) -> RequestRejected | None:
        n = len(msg.input_ids)
        if msg.rid in self.reqs:
            return RequestRejected(rid=msg.rid, status=400, message=f"rid {msg.rid!r} is already in use")
        if n == 0:
            return RequestRejected(rid=msg.rid, status=400, message="input_ids: the prompt is empty")
        if msg.embed and n > self.config.context_length:
            return RequestRejected(rid=msg.rid, status=400, message=(
                f"input: the input has {n} tokens; the context length is {self.config.context_length}"))
        if not msg.embed and n >= self.config.context_length:
            return RequestRejected(rid=msg.rid, status=400, message=(
                f"input_ids: the prompt has {n} tokens; the context length is {self.config.context_length} "
                "(prompt plus at least one generated token)"))
        if n >= self.config.max_total_tokens:
            return RequestRejected(rid=msg.rid, status=400, message=(
                f"input_ids: the prompt has {n} tokens; the KV cache holds only {self.config.max_total_tokens} "
                "(--max-total-tokens)"))
        limit = n if msg.embed else min(n + msg.sampling.max_new_tokens, self.context_limit)
        req = Req(msg=msg, prompt_ids=list(msg.input_ids), arrival_seq=next(self._arrivals), length_limit=limit)
        self.reqs[msg.rid] = req
        self.waiting.append(req)
        if msg.sampling.grammar is not None:
            self.grammars.on_request(msg.sampling.grammar)
        return None

    def grammar_ready(self, msg: GrammarReady) -> tuple[list[RequestRejected], StepUpdates]:
        """A grammar is compiled: its requests become admissible. One the workers could not compile refuses its
        queued requests: a 400 naming the request field it came from and quoting the compiler."""
        self.grammars.on_ready(msg)
        if msg.error is None:
            return [], StepUpdates(updates=[])
        rejected, updates = [], []
        for req in [r for r in self.waiting if r.sampling.grammar is not None and r.sampling.grammar.key == msg.key]:
            field = req.sampling.grammar.field or "grammar"
            message = f"{field}: the grammar compiler refused it: {msg.error}"
            self._finish(req, FinishReason(type="abort", message=message, status_code=400))
            if req.admitted_once:  # it has streamed output: end it like an abort
                updates.append(self._update(req))
            else:
                rejected.append(RequestRejected(rid=req.rid, status=400, message=message, param=field))
        return rejected, StepUpdates(updates=updates, finished=len(updates))

    def abort(self, rid: str, message: str = "aborted by request") -> StepUpdates:
        """Abort a queued, prefilling or decoding request (unknown or finished rids: nothing)."""
        req = self.reqs.get(rid)
        if req is None:
            return StepUpdates(updates=[])
        self._finish(req, FinishReason(type="abort", message=message))
        return StepUpdates(updates=[self._update(req)], finished=1)

    def flush_cache(self) -> tuple[bool, str]:
        if self.cache is None:
            return True, "the radix cache is disabled; nothing to flush"
        if self.waiting or self.running or self.in_flight:
            return False, (f"cannot flush the cache while requests are in progress ({len(self.running)} running, "
                           f"{len(self.waiting)} queued)")
        self.allocator.free(self.cache.reset())
        return True, ""

    # ---------------------------------------------------------------------------------------
    # planning
    # ---------------------------------------------------------------------------------------

    def plan_next(self) -> ScheduledBatch | None:
        """The next batch: a decode row for every running request that still has tokens to make,
        the next chunk of a partly prefilled request, and newly admitted requests, within the
        prefill budget and KV memory. None when there is nothing to run.

        Prefill budget: while requests decode, every stream waits for the step, so a step computes at most the
        mixed chunk (runtime/scheduler/chunk_control.py: sized so a mixed step costs at most two decode steps,
        never above chunked_prefill_size; the whole chunked_prefill_size while at least as many requests wait as
        decode); with none decoding, up to max_prefill_tokens. With mixed chunks (the
        default) the decode rows ride in the prefill chunk's batch; without, a step with prefill work carries
        no decode rows (SGLang's default: prefill first, decode rows wait)."""
        preempted = self._preempt_for_priority()
        decode_reqs = self._decode_candidates()
        if not self.chunking:
            budget = self.config.max_prefill_tokens
        else:
            budget = (self.mixed_chunk.budget(len(decode_reqs), len(self.waiting)) if decode_reqs
                      else self.config.max_prefill_tokens)
        if decode_reqs and not self.config.enable_mixed_chunk:
            batch = self._plan_batch([], budget, retracted=0, preempted=preempted)
            if batch is not None:
                return batch
            budget = 0
        retracted = self._make_room_for_decode(decode_reqs)
        if retracted:
            decode_reqs = [r for r in decode_reqs if r.status is ReqStatus.RUNNING]
        return self._plan_batch(decode_reqs, budget, retracted, preempted)

    def _plan_batch(self, decode_reqs: list[Req], budget: int, retracted: int,
                    preempted: bool) -> ScheduledBatch | None:
        cols = PlanColumns()
        if decode_reqs:
            slots = self._alloc_slots(len(decode_reqs))
            prefix_lens = [len(r.slots) for r in decode_reqs]
            input_ids = [-(r.last_future_slot + 1) if r.pending else self._token_at(r, p)
                         for r, p in zip(decode_reqs, prefix_lens)]
            for req, slot in zip(decode_reqs, slots):
                req.slots.append(slot)
            cols.add_decode(decode_reqs, prefix_lens, input_ids, slots)

        # Right after a retraction the freed memory is not for new requests (they would thrash), unless it was
        # made for a request of higher priority.
        new_rows, new_seqs, new_tokens, cached = self._plan_prefill(cols, budget, admit=preempted or not retracted)
        if not cols.reqs:
            return None
        if decode_reqs and not retracted:
            self.new_token_ratio.decay()

        future_slots = []
        ring, slot = self.future_ring_size, self._next_future
        for req, sample in zip(cols.reqs, cols.sample):
            if sample:
                req.last_future_slot = slot
                req.pending += 1
                future_slots.append(slot)
                slot = slot + 1 if slot + 1 < ring else 0
            else:
                future_slots.append(-1)
        self._next_future = slot
        reused = {row.row for row in new_rows}
        plan = BatchPlan(
            batch_id=self.num_batches, rows=cols.rows, prefix_lens=cols.prefix_lens, extend_lens=cols.extend_lens,
            input_ids=cols.input_ids, out_slots=cols.out_slots, sample=cols.sample, future_slots=future_slots,
            new_rows=new_rows, freed_rows=[r for r in self.released_rows if r not in reused], pool=cols.pool)
        self.released_rows = []
        self.num_batches += 1
        batch = ScheduledBatch(plan=plan, reqs=cols.reqs, epochs=[r.retractions for r in cols.reqs],
                               num_decode=len(decode_reqs), new_seqs=new_seqs, new_tokens=new_tokens,
                               cached_tokens=cached, retracted=retracted)
        self.in_flight.append(batch)
        return batch

    def _decode_candidates(self) -> list[Req]:
        """Running requests past their prefill that may still produce a token. While decoding, len(slots) is the
        known length plus the tokens in flight, minus one (the last token is the next input)."""
        return [r for r in self.running if len(r.slots) >= len(r.fill_ids) and len(r.slots) + 1 < r.length_limit]

    def _tokens_after(self, req: Req, generated: int) -> int:
        if req.msg.embed:
            return 0
        return self.stop_checker.tokens_left(req.sampling, len(req.prompt_ids), generated)

    def _token_at(self, req: Req, pos: int) -> int:
        n = len(req.prompt_ids)
        return req.prompt_ids[pos] if pos < n else req.output_ids[pos - n]

    def _make_room_for_decode(self, decode_reqs: list[Req]) -> int:
        """Retract the newest requests until every decode row gets a KV slot; returns how many left."""
        need = len(decode_reqs)
        if self.allocator.num_free >= need:
            return 0
        retracted = 0
        while self._room() < need:
            victim = max(self.running, key=_retraction_order, default=None)
            if victim is None or (len(self.running) == 1 and victim in decode_reqs):
                break  # a lone request always fits: its length is bounded by the pool
            self._retract(victim)
            retracted += 1
            if victim in decode_reqs:
                need -= 1
        if retracted:
            self.new_token_ratio.reset()
        return retracted

    def _room(self) -> int:
        """Slots obtainable now: free plus evictable cached ones."""
        return self.allocator.num_free + (self.cache.evictable_size if self.cache else 0)

    def _growth(self, req: Req, generated: int) -> int:
        """KV slots the request is expected to still write while decoding, after `generated` tokens."""
        left = self._tokens_after(req, generated)
        return self.new_token_ratio.growth(left, max(0, req.sampling.min_new_tokens - generated),
                                           stops_only_at_length(req.sampling))

    def _reservation(self, without: list[Req] = ()) -> Reservation:
        """The running requests' future demand (all but `without`): prefill still to do now, decode growth later;
        what each gives back when it finishes (its slots beyond the prefix it found in the cache)."""
        growth, freed, prefill_left = [], [], 0
        for r in self.running:
            if r in without:
                continue
            planned = max(len(r.fill_ids), len(r.slots))
            prefill_left += planned - len(r.slots)
            growth.append(self._growth(r, len(r.output_ids) + r.pending))
            freed.append(planned - r.prefix_hit)
        return Reservation(self._room() + sum(len(r.slots) for r in without) - prefill_left, growth, freed)

    def _plan_prefill(self, cols: PlanColumns, budget: int, admit: bool) -> tuple[list[NewRow], int, int, int]:
        new_rows: list[NewRow] = []
        new_seqs = new_tokens = cached = 0
        reservation = None  # built only when there is someone to admit
        # Beside decoding requests of a higher priority, lower-priority prefill gets a small share of the step, so
        # batch work cannot stretch the interactive requests' decode steps.
        urgent = max((r.msg.priority for r in self.running if not r.is_prefilling), default=None)
        low_left = self.config.low_priority_prefill_tokens

        def held_back(req: Req) -> bool:
            return self.chunking and urgent is not None and req.msg.priority < urgent

        # 1. The partly prefilled request continues (at most one exists: only the last request
        #    admitted in a step is cut).
        for req in self.running:
            if req.is_prefilling:
                n = min(len(req.fill_ids) - len(req.slots), budget, self._room())
                if held_back(req):
                    n = min(n, low_left)
                    low_left -= max(n, 0)
                if n > 0:
                    self._add_extend(req, n, cols)
                    budget -= n
                    new_tokens += n

        # 2. New requests, in priority then policy order, while rows, budget and memory last.
        for req in self._admission_order() if admit else []:
            if budget <= 0 or self.table.num_free == 0 or len(self.running) >= self.config.max_running_requests:
                break
            if req.pending:
                continue  # retracted with a token still in flight: its input is not known yet
            if not self.grammars.admissible(req.sampling.grammar):
                continue  # its grammar is still compiling on the workers
            if reservation is None:
                reservation = self._reservation()
            fill = req.prompt_ids + req.output_ids
            match_len = self._prefix_key_len(req, fill)
            prefix_len, unlocked = self.cache.peek_prefix(fill[:match_len]) if self.cache else (0, 0)
            extend = len(fill) - prefix_len
            # Now: the new tokens, and the cached prefix the request locks (it stops being evictable).
            need_now, growth = extend + unlocked, self._growth(req, len(req.output_ids))
            alone = not self.running and not new_seqs
            if not reservation.try_admit(need_now, growth, extend, force=alone):
                break
            n = min(extend, budget)
            if held_back(req):
                if low_left <= 0:
                    break  # the rest of the queue is of this priority or lower
                n = min(n, low_left)
                low_left -= n
            if n < extend and not self.chunking:
                if new_seqs or any(e > 1 for e in cols.extend_lens):
                    break  # no chunking: a prompt over budget runs alone as its step's only prefill
                n = extend
            new_rows.append(self._admit(req, fill, match_len))
            self._add_extend(req, n, cols)
            budget -= n
            new_seqs += 1
            new_tokens += n
            cached += len(req.slots) - n
            if n < extend:
                break
        return new_rows, new_seqs, new_tokens, cached

    def _prefix_key_len(self, req: Req, fill: list[int]) -> int:
        """How much of `fill` may come from the cache: all but the last token (its logits are
        needed), and while prompt logprobs are still wanted, nothing from the token before
        logprob_start_len on (its logits score the first token asked for)."""
        if req.msg.embed and not self.config.pool_from_cache:
            return 0
        n = len(fill) - 1
        opts = req.msg.logprobs
        if opts.return_logprob and opts.logprob_start_len >= 0 and not req.admitted_once:
            n = min(n, max(opts.logprob_start_len - 1, 0))
        return n

    def _admit(self, req: Req, fill: list[int], match_len: int) -> NewRow:
        row = self.table.alloc()
        match = self.cache.match_prefix(fill[:match_len]) if self.cache else None
        self.waiting.remove(req)
        self.running.append(req)
        req.status = ReqStatus.RUNNING
        req.row = row
        req.fill_ids = fill
        req.slots = list(match.slots) if match else []
        req.tree_len = req.prefix_hit = len(req.slots)
        req.tree_node = match.node if match else None
        if match:
            self.cache.lock(match.node)
        req.kv_committed = len(req.slots)
        if not req.admitted_once:
            req.admitted_once = True
            req.cached_tokens = len(req.slots)
            self.total_prompt_tokens += len(req.prompt_ids)
            self.total_cached_tokens += req.cached_tokens
        return NewRow(row=row, prefix_slots=list(req.slots), sampling=req.sampling, logprobs=req.msg.logprobs,
                      prior_output_ids=list(req.output_ids), embed=req.msg.embed, images=req.msg.images)

    def _add_extend(self, req: Req, n: int, cols: PlanColumns) -> None:
        start = len(req.slots)
        slots = self._alloc_slots(n)
        req.slots.extend(slots)
        last_chunk = len(req.slots) == len(req.fill_ids)
        embed = req.msg.embed
        # max_new_tokens == 0 (a prefill only: cache a prefix, score a prompt) samples nothing.
        sample = last_chunk and not embed and req.sampling.max_new_tokens > 0
        cols.add_extend(req, start, req.fill_ids[start:start + n], slots, sample, last_chunk and embed)

    def _alloc_slots(self, n: int) -> list[int]:
        if self.allocator.num_free < n and self.cache:
            self.allocator.free(self.cache.evict(n - self.allocator.num_free))
        slots = self.allocator.alloc(n)
        if slots is None:
            raise RuntimeError(f"scheduler: out of KV slots ({n} wanted, {self.allocator.num_free} free); "
                               "the admission accounting is wrong")
        return slots

    # ---------------------------------------------------------------------------------------
    # results
    # ---------------------------------------------------------------------------------------

    def process_result(self, result: BatchResult) -> StepUpdates:
        batch = self._pop_in_flight(result.batch_id)
        self.total_forward_ms += result.forward_ms
        self.mixed_chunk.observe(batch.num_decode, batch.new_tokens, result.forward_ms)
        plan = batch.plan
        touched: list[Req] = []
        embeddings: list[EmbeddingResult] = []
        pooled = set(plan.pool)
        finished = accepted = 0
        k = 0  # index into next_token_ids
        for i, req in enumerate(batch.reqs):
            sampled = plan.sample[i]
            token = result.next_token_ids[k] if sampled else None
            logprobs = result.logprobs.get(k) if sampled else None
            k += sampled
            if req.is_finished:
                continue  # aborted, or finished in an earlier batch: drop the extra token
            current = req.status is ReqStatus.RUNNING and batch.epochs[i] == req.retractions
            if current:
                req.kv_committed = max(req.kv_committed, plan.prefix_lens[i] + plan.extend_lens[i])
                if i in result.prompt_logprobs and req.retractions == 0 and not req.prompt_logprobs_sent:
                    req.prompt_logprobs = concat_logprobs(req.prompt_logprobs, result.prompt_logprobs[i])
            if i in pooled and current:
                self._finish_embedding(req, result.embeddings.get(i), embeddings, touched)
                finished += 1
                continue
            if not sampled:
                if current and plan.prefix_lens[i] + plan.extend_lens[i] < len(req.fill_ids):
                    self._cache_unfinished(req)
                elif current:  # the last chunk of a max_new_tokens == 0 request
                    self._finish(req, FinishReason(type="length", length=0))
                    touched.append(req)
                    finished += 1
                continue
            req.pending -= 1
            req.output_ids.append(token)
            accepted += 1
            if logprobs is not None:
                req.unsent_logprobs = concat_logprobs(req.unsent_logprobs, logprobs)
            touched.append(req)
            reason = self.stop_checker.check(req.sampling, len(req.prompt_ids), req.output_ids)
            if reason is not None:
                self._learn_length(req)
                self._finish(req, reason)
                finished += 1
        self.total_generated_tokens += accepted
        updates = [self._update(r) for r in touched if self._should_send(r)]
        return StepUpdates(updates=updates, finished=finished, new_tokens=accepted, embeddings=embeddings)

    def _finish_embedding(self, req: Req, vector: bytes | None, embeddings: list[EmbeddingResult],
                          touched: list[Req]) -> None:
        if vector is None:  # the worker must pool every index of plan.pool
            self._finish(req, FinishReason(type="abort", message="the worker returned no embedding", status_code=500))
            touched.append(req)
            return
        self._finish(req, FinishReason(type="stop"))
        embeddings.append(EmbeddingResult(rid=req.rid, embedding=vector, prompt_tokens=len(req.prompt_ids),
                                          cached_tokens=req.cached_tokens))

    def process_error(self, error: WorkerError) -> StepUpdates:
        """A step failed on the worker: abort its requests with the worker's message."""
        batch = self._pop_in_flight(error.batch_id)
        updates = []
        for req in dict.fromkeys(batch.reqs):
            if not req.is_finished:
                self._finish(req, FinishReason(type="abort", message=f"worker error: {error.message}",
                                                  status_code=500))
                updates.append(self._update(req))
        return StepUpdates(updates=updates, finished=len(updates))

    def _pop_in_flight(self, batch_id: int) -> ScheduledBatch:
        if not self.in_flight or self.in_flight[0].plan.batch_id != batch_id:
            expected = self.in_flight[0].plan.batch_id if self.in_flight else None
            raise RuntimeError(f"scheduler: result for batch {batch_id}, expected batch {expected}")
        return self.in_flight.popleft()

    def _should_send(self, req: Req) -> bool:
        """Streams send every stream_interval tokens (and the first at once); others at the end."""
        if req.is_finished:
            return True
        if not req.msg.stream:
            return False
        unsent = len(req.output_ids) - req.sent_len
        return req.sent_len == 0 or unsent >= (req.sampling.stream_interval or self.config.stream_interval)

    def _update(self, req: Req) -> TokenUpdate:
        sampling = req.sampling
        prompt_logprobs = None
        if req.prompt_logprobs is not None and not req.prompt_logprobs_sent:
            prompt_logprobs, req.prompt_logprobs_sent = req.prompt_logprobs, True
            if req.msg.logprobs.logprob_start_len == 0:  # the first prompt token: an entry without a logprob
                prompt_logprobs = TokenLogprobs(
                    token_ids=req.prompt_ids[:1] + prompt_logprobs.token_ids, logprobs=prompt_logprobs.logprobs,
                    top_ids=prompt_logprobs.top_ids, top_logprobs=prompt_logprobs.top_logprobs,
                    ids_logprobs=prompt_logprobs.ids_logprobs)
        update = TokenUpdate(
            rid=req.rid, new_token_ids=req.output_ids[req.sent_len:],
            meta=RequestMeta(prompt_tokens=len(req.prompt_ids), completion_tokens=len(req.output_ids),
                             cached_tokens=req.cached_tokens),
            finish=req.finish, logprobs=req.unsent_logprobs, prompt_logprobs=prompt_logprobs,
            skip_special_tokens=sampling.skip_special_tokens,
            spaces_between_special_tokens=sampling.spaces_between_special_tokens, no_stop_trim=sampling.no_stop_trim,
            stop=sampling.stop if req.sent_len == 0 else [],
            stop_regex=sampling.stop_regex if req.sent_len == 0 else [])
        req.sent_len = len(req.output_ids)
        req.unsent_logprobs = None
        return update

    # ---------------------------------------------------------------------------------------
    # leaving a row: finish, abort, retraction
    # ---------------------------------------------------------------------------------------

    def _finish(self, req: Req, reason: FinishReason) -> None:
        if req.status is ReqStatus.RUNNING:
            self._release(req)
        elif req.status is ReqStatus.WAITING:
            self.waiting.remove(req)
        req.status = ReqStatus.FINISHED
        req.finish = reason
        del self.reqs[req.rid]
        self.image_blocks.finished(req.rid, self.num_batches - 1)

    # ---------------------------------------------------------------------------------------
    # priority
    # ---------------------------------------------------------------------------------------

    def _admission_order(self) -> list[Req]:
        ordered = self.policy.order(list(self.waiting))
        if len({r.msg.priority for r in ordered}) > 1:
            ordered.sort(key=lambda r: -r.msg.priority)  # stable: policy order within a priority
        return ordered

    def _preempt_for_priority(self) -> bool:
        """Retract lower-priority running requests while the most urgent waiting request finds no row or no
        memory and they could give it that. True when something was retracted."""
        if not self.waiting or not self.running:
            return False
        top = max(self.waiting, key=lambda r: r.msg.priority)
        if top.pending or top.msg.priority <= min(r.msg.priority for r in self.running):
            return False
        if not self.grammars.admissible(top.sampling.grammar):
            return False  # it could not be admitted anyway before its grammar is compiled
        victims = [r for r in self.running if r.msg.priority < top.msg.priority]
        if not self._fits(top, victims):
            return False  # even without every lower-priority request it would not fit: keep them running
        preempted = False
        while not self._fits(top, []):
            victims = [r for r in self.running if r.msg.priority < top.msg.priority]
            if not victims:
                break
            self._retract(max(victims, key=_retraction_order))
            preempted = True
        return preempted

    def _fits(self, req: Req, without: list[Req]) -> bool:
        """Whether `req` could be admitted as far as rows and memory go, once the running requests `without` left
        (prefix cache hits ignored)."""
        if min(self.table.num_free, self.config.max_running_requests - len(self.running)) + len(without) == 0:
            return False
        need = len(req.prompt_ids) + len(req.output_ids)
        alone = all(r in without for r in self.running)  # a request alone always fits
        return self._reservation(without).try_admit(need, self._growth(req, len(req.output_ids)), need, force=alone)

    def _learn_length(self, req: Req) -> None:
        """A request that could have stopped early finished: how much of its budget did it use?"""
        sampling = req.sampling
        if stops_only_at_length(sampling):
            return
        generated = len(req.output_ids)
        budget = generated + self.stop_checker.tokens_left(sampling, len(req.prompt_ids), generated)
        self.new_token_ratio.observe_finished(generated, budget)

    def _retract(self, req: Req) -> None:
        self._release(req)
        req.status = ReqStatus.WAITING
        self.num_retracted_reqs += req.retractions == 0
        req.retractions += 1
        self.num_retractions += 1
        self.waiting.insert(0, req)

    def _release(self, req: Req) -> None:
        """Give back the row and KV: computed KV goes to the radix cache, the rest is freed (slots
        of tokens still being computed are safe to reuse: batches run in order on the worker)."""
        committed = req.kv_committed
        owned_from = req.tree_len
        if self.cache is not None and committed > req.tree_len:
            key = (req.prompt_ids + req.output_ids)[:committed]
            existing = self.cache.insert(key, req.slots[:committed])
            self.allocator.free(req.slots[req.tree_len:existing])  # the tree had its own copies
            owned_from = committed
        self.allocator.free(req.slots[owned_from:])
        self.allocator.free(req.dup_slots)
        if req.tree_node is not None:
            self.cache.unlock(req.tree_node)
        self.running.remove(req)
        self.table.free(req.row)
        self.released_rows.append(req.row)
        req.row = -1
        req.slots, req.fill_ids, req.dup_slots = [], [], []
        req.tree_node, req.tree_len, req.kv_committed = None, 0, 0

    def _cache_unfinished(self, req: Req) -> None:
        """After a non-final prefill chunk: put its computed KV in the radix cache so others can
        share it, and move the request's lock down to the new end."""
        n = req.kv_committed
        if self.cache is None or n <= req.tree_len:
            return
        key = req.fill_ids[:n]
        existing = self.cache.insert(key, req.slots[:n])
        # Tokens the tree already had in other slots: the row keeps using its own copies.
        req.dup_slots.extend(req.slots[req.tree_len:existing])
        match: PrefixMatch = self.cache.match_prefix(key)
        self.cache.lock(match.node)
        if req.tree_node is not None:
            self.cache.unlock(req.tree_node)
        req.tree_node, req.tree_len = match.node, n

    # ---------------------------------------------------------------------------------------
    # state
    # ---------------------------------------------------------------------------------------

    @property
    def is_idle(self) -> bool:
        return not self.waiting and not self.running and not self.in_flight

    def token_usage(self) -> float:
        used = self.config.max_total_tokens - self._room()
        return used / self.config.max_total_tokens

    def cache_hit_rate(self) -> float:
        return self.total_cached_tokens / self.total_prompt_tokens if self.total_prompt_tokens else 0.0

    def server_info(self) -> dict:
        return {
            "max_total_tokens": self.config.max_total_tokens,
            "max_running_requests": self.config.max_running_requests,
            "context_length": self.config.context_length,
            "running": len(self.running),
            "queued": len(self.waiting),
            "free_slots": self.allocator.num_free,
            "free_rows": self.table.num_free,
            "unfinished_requests": len(self.reqs),
            "cached_tokens": self.cache.total_size if self.cache else 0,
            "evictable_tokens": self.cache.evictable_size if self.cache else 0,
            "token_usage": round(self.token_usage(), 4),
            "cache_hit_rate": round(self.cache_hit_rate(), 4),
            "new_token_ratio": round(self.new_token_ratio.value, 4),
            "retractions": self.num_retractions,
            "retracted_requests": self.num_retracted_reqs,
            "generated_tokens": self.total_generated_tokens,
            "forward_ms_total": round(self.total_forward_ms, 3),
            "batches": self.num_batches,
            "radix_cache": self.cache is not None,
            "schedule_policy": self.policy.name,
            "chunked_prefill_size": self.config.chunked_prefill_size,
            "mixed_chunk_size": self.mixed_chunk.size,
            "max_prefill_tokens": self.config.max_prefill_tokens,
            "enable_mixed_chunk": self.config.enable_mixed_chunk,
            "grammar_compiles": self.grammars.compiles,
            "grammar_cache_hits": self.grammars.cache_hits,
            "grammars_compiling": self.grammars.compiling,
        }

    def check_invariants(self) -> None:
        """Every KV slot is owned exactly once (free list, radix tree, or one running request),
        every row once; when idle everything is free or evictable. Raises AssertionError."""
        n = self.config.max_total_tokens
        owned = self.allocator.free_slots() + (self.cache.all_slots() if self.cache else [])
        for req in self.running:
            owned.extend(req.owned_slots())
        if len(owned) != n or set(owned) != set(range(1, n + 1)):
            counts = collections.Counter(owned)
            dup = sorted(s for s, c in counts.items() if c > 1)[:10]
            lost = sorted(set(range(1, n + 1)) - set(owned))[:10]
            raise AssertionError(f"KV slot accounting broken: {len(owned)} owned of {n}; duplicated {dup}, lost {lost}")
        rows = self.table.free_rows() + [r.row for r in self.running]
        assert sorted(rows) == list(range(self.config.max_running_requests)), f"request-table rows broken: {rows}"
        for req in self.waiting:
            assert req.status is ReqStatus.WAITING and not req.slots and req.row == -1
        if self.cache:
            self.cache.check()
        if self.is_idle:
            assert not self.reqs, f"idle with unfinished requests {list(self.reqs)}"
            if self.cache:
                assert self.cache.protected_size == 0, f"idle with {self.cache.protected_size} locked cache tokens"
            assert self._room() == n, f"idle: free + evictable = {self._room()} != pool {n}"
            assert self.table.num_free == self.config.max_running_requests


def _retraction_order(req: Req) -> tuple[int, int]:
    """The running request given up first: the lowest priority, then the newest."""
    return -req.msg.priority, req.arrival_seq
