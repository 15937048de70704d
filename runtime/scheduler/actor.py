"""The scheduler actor: wires the channels to SchedulerCore and runs the overlap loop.

Loop (one mailbox: the ingress channel, rank 0's result channel and the supervisor's control
channel, read round-robin):
    1. handle every message already waiting (requests, aborts, results, ...)
    2. plan and send batches while fewer than `depth` are in flight: depth 2 with overlap (batch
       N+1 is planned and sent before batch N's tokens are back, so the device never waits for the
       CPU), depth 1 with --disable-overlap-schedule (send, wait, process)
    3. block for the next message; with overlap, processing batch N's result (finish checks,
       radix insertion, streaming) runs while the device computes batch N+1.
Watchdog: a batch in flight with no result for args.watchdog_timeout seconds logs an error and
raises, so the process exits non-zero and the supervisor stops the server.
Shutdown(grace_s): new requests are refused (503); running ones get up to grace_s to finish, the
rest are aborted; then the workers and the detokenizer get Shutdown and the actor exits.
"""

from __future__ import annotations

import logging
import time

import msgspec

from actors.actor import Actor
from runtime.messages import (
    AbortRequest,
    BatchResult,
    FlushCacheReply,
    FlushCacheRequest,
    GenerateRequest,
    ModelInfo,
    RequestRejected,
    ServerInfoReply,
    ServerInfoRequest,
    Shutdown,
    TokenUpdates,
    WorkerError,
)
from runtime.scheduler.core import ScheduledBatch, SchedulerConfig, SchedulerCore, StepUpdates
from runtime.scheduler.stop_checker import make_decode
from runtime.server_args import ServerArgs

# Outbound channel names (ActorSpec.outbound[i].name) the launcher gives the scheduler.
TO_WORKERS = "scheduler_to_worker"
TO_DETOKENIZER = "scheduler_to_detokenizer"
TO_INGRESS = "scheduler_to_ingress"

MAX_MESSAGES_PER_DRAIN = 1024
SHUTDOWN_SEND_TIMEOUT_S = 1.0
IDLE_WAIT_S = 1.0


class SchedulerActorConfig(msgspec.Struct, forbid_unknown_fields=True):
    args: ServerArgs
    model_info: ModelInfo  # from worker rank 0's Ready
    dp_rank: int = 0  # the data-parallel replica this scheduler drives


class SchedulerActor(Actor):
    config_type = SchedulerActorConfig

    def __init__(self, context):
        super().__init__(context)
        args: ServerArgs = self.config.args
        self.args = args
        tokenizer = None
        if not args.skip_tokenizer_init:
            from runtime.tokenizer import load_tokenizer  # transformers: only when stop strings can occur

            tokenizer = load_tokenizer(args)
        config = SchedulerConfig.from_args(args, self.config.model_info)
        self.core = SchedulerCore(config, decode=make_decode(tokenizer))
        self.depth = 1 if args.disable_overlap_schedule else 2
        self.to_workers = self.ref(TO_WORKERS)
        self.to_detokenizer = self.ref(TO_DETOKENIZER)
        self.to_ingress = self.ref(TO_INGRESS)
        self.stats = LoopStats(self.log, args.decode_log_interval)
        self.shutdown_deadline: float | None = None
        self.sent_at: dict[int, float] = {}
        self.log.info("scheduler: %d KV slots, %d request rows, context %d, overlap %s, radix cache %s, chunked "
                      "prefill %d, policy %s", self.core.config.max_total_tokens, self.core.config.max_running_requests,
                      self.core.config.context_length, self.depth == 2, self.core.cache is not None,
                      args.chunked_prefill_size, self.core.policy.name)

    # ---------------------------------------------------------------------------------------
    # the loop
    # ---------------------------------------------------------------------------------------

    def run(self) -> None:
        while True:
            for msg in self.mailbox.drain(MAX_MESSAGES_PER_DRAIN):
                self.handle(msg)
            if self.shutdown_deadline is not None and self._shutdown_done():
                break
            while len(self.core.in_flight) < self.depth:
                batch = self.core.plan_next()
                if batch is None:
                    break
                self.send_batch(batch)
            msg = self.mailbox.get(self._wait_timeout())
            if msg is not None:
                self.handle(msg)
            self._check_watchdog()
        self._finish_shutdown()

    def handle(self, msg) -> None:
        match msg:
            case BatchResult():
                self._sent_batch_done(msg.batch_id)
                self.emit(self.core.process_result(msg))
            case WorkerError():
                self._sent_batch_done(msg.batch_id)
                self.log.error("worker error in batch %d: %s", msg.batch_id, msg.message)
                self.emit(self.core.process_error(msg))
            case GenerateRequest():
                if self.shutdown_deadline is not None:
                    self.to_ingress.send(RequestRejected(rid=msg.rid, status=503,
                                                         message="the server is shutting down"))
                    return
                rejection = self.core.add_request(msg)
                if rejection is not None:
                    self.to_ingress.send(rejection)
            case AbortRequest(rid=rid):
                self.emit(self.core.abort(rid))
            case FlushCacheRequest(token=token):
                ok, message = self.core.flush_cache()
                if ok:
                    self.log.info("radix cache flushed")
                self.to_ingress.send(FlushCacheReply(token=token, ok=ok, message=message))
            case ServerInfoRequest(token=token):
                state = {"dp_rank": self.config.dp_rank, **self.core.server_info()}
                info = {k: msgspec.Raw(msgspec.msgpack.encode(v)) for k, v in state.items()}
                self.to_ingress.send(ServerInfoReply(token=token, info=info))
            case Shutdown(grace_s=grace_s):
                if self.shutdown_deadline is None:
                    self.log.info("shutdown: %d running, %d queued, grace %.1f s", len(self.core.running),
                                  len(self.core.waiting), grace_s)
                    self.shutdown_deadline = time.monotonic() + grace_s
            case _:
                self.log.error("scheduler: unexpected message %s", type(msg).__name__)

    def send_batch(self, batch: ScheduledBatch) -> None:
        self.to_workers.send(batch.plan)
        self.sent_at[batch.plan.batch_id] = time.monotonic()
        self.stats.on_batch(batch, self.core)

    def emit(self, step: StepUpdates) -> None:
        self.stats.generated += step.new_tokens
        if step.updates:
            self.to_detokenizer.send(TokenUpdates(updates=step.updates))

    # ---------------------------------------------------------------------------------------
    # watchdog and shutdown
    # ---------------------------------------------------------------------------------------

    def _sent_batch_done(self, batch_id: int) -> None:
        self.sent_at.pop(batch_id, None)

    def _wait_timeout(self) -> float:
        timeouts = [IDLE_WAIT_S]
        if self.sent_at:
            oldest = min(self.sent_at.values())
            timeouts.append(max(0.0, oldest + self.args.watchdog_timeout - time.monotonic()))
        if self.shutdown_deadline is not None and self.shutdown_deadline > time.monotonic():
            timeouts.append(self.shutdown_deadline - time.monotonic())
        return min(timeouts)

    def _check_watchdog(self) -> None:
        if not self.sent_at:
            return
        batch_id, sent = min(self.sent_at.items(), key=lambda item: item[1])
        waited = time.monotonic() - sent
        if waited >= self.args.watchdog_timeout:
            message = (f"watchdog: batch {batch_id} has been on the workers for {waited:.0f} s with no result "
                       f"(--watchdog-timeout {self.args.watchdog_timeout:g}); the worker is hung, stopping the server")
            self.log.error(message)
            raise WatchdogTimeout(message)

    def _shutdown_done(self) -> bool:
        if self.core.is_idle:
            return True
        if time.monotonic() < self.shutdown_deadline:
            return False
        for rid in list(self.core.reqs):
            self.emit(self.core.abort(rid, message="the server is shutting down"))
        return not self.core.in_flight  # wait for batches in flight (the watchdog still applies)

    def _finish_shutdown(self) -> None:
        for ref in (self.to_workers, self.to_detokenizer):
            try:
                ref.send(Shutdown(grace_s=0.0), timeout=SHUTDOWN_SEND_TIMEOUT_S)
            except Exception as e:  # a peer that is gone already: nothing to tell
                self.log.warning("could not send Shutdown on %s: %s", ref.name, e)
        self.log.info("scheduler stopped")


class WatchdogTimeout(RuntimeError):
    pass


class LoopStats:
    """SGLang-style logs: one line per prefill batch, one every `decode_log_interval` decode batches."""

    def __init__(self, log: logging.Logger, decode_log_interval: int):
        self.log = log
        self.decode_log_interval = max(1, decode_log_interval)
        self.decode_batches = 0
        self.generated = 0
        self.window_start = time.monotonic()
        self.window_generated = 0

    def on_batch(self, batch: ScheduledBatch, core: SchedulerCore) -> None:
        if batch.new_tokens:
            self.log.info("Prefill batch. #new-seq: %d, #new-token: %d, #cached-token: %d, cache hit rate: %.2f%%, "
                          "token usage: %.2f, #running-req: %d, #queue-req: %d", batch.new_seqs, batch.new_tokens,
                          batch.cached_tokens, 100.0 * core.cache_hit_rate(), core.token_usage(), len(core.running),
                          len(core.waiting))
        if batch.num_decode:
            self.decode_batches += 1
            if self.decode_batches % self.decode_log_interval == 0:
                now = time.monotonic()
                rate = (self.generated - self.window_generated) / max(now - self.window_start, 1e-9)
                self.window_start, self.window_generated = now, self.generated
                self.log.info("Decode batch. #running-req: %d, token usage: %.2f, gen throughput (token/s): %.2f, "
                              "#queue-req: %d", len(core.running), core.token_usage(), rate, len(core.waiting))
