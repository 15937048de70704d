"""The scheduler actor: wires the channels to SchedulerCore and runs the overlap loop.

Loop (one mailbox: the ingress channel, rank 0's result channel and the supervisor's control
channel, read round-robin):
    1. handle every message already waiting (requests, aborts, results, ...)
    2. plan and send batches while fewer than `depth` are in flight: depth 2 with overlap (batch
       N+1 is planned and sent before batch N's tokens are back, so the device never waits for the
       CPU), depth 1 with --disable-overlap-schedule (send, wait, process)
    3. block for the next message; with overlap, processing batch N's result (finish checks,
       radix insertion, streaming) runs while the device computes batch N+1.
Start-up: without a ModelInfo in its config the scheduler starts together with the workers and
waits for rank 0's WorkerReady; its first message to the ingress is EngineReady (the ingress
starts together with it too, and serves once it knows the model).
Heartbeat: every loop iteration beats the scheduler's slot of the run's heartbeat segment, and
the oldest batch on the workers is published there, so /health can tell a frozen scheduler or a
hung device without asking anyone.
Watchdog: a batch in flight with no result for args.watchdog_timeout seconds is logged as an
error once; /health answers 503 while it lasts and recovers if the batch completes.
Admission: past --max-queued-requests waiting sequences, new requests are refused with 429.
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
    CompileGrammars,
    EmbeddingResults,
    EngineReady,
    FlushCacheReply,
    FlushCacheRequest,
    GenerateRequest,
    GrammarReady,
    ModelInfo,
    RequestRejected,
    ServerInfoReply,
    ServerInfoRequest,
    Shutdown,
    TokenUpdates,
    WorkerError,
    WorkerReady,
)
from runtime.scheduler.batch_records import ScheduledBatch, StepUpdates
from runtime.scheduler.config import SchedulerConfig
from runtime.scheduler.core import SchedulerCore
from runtime.scheduler.stop_checker import make_decode
from runtime.server_args import ServerArgs
from shm import Arena, Heartbeat

# Outbound channel names (ActorSpec.outbound[i].name) the launcher gives the scheduler.
TO_WORKERS = "scheduler_to_worker"
TO_DETOKENIZER = "scheduler_to_detokenizer"
TO_INGRESS = "scheduler_to_ingress"

MAX_MESSAGES_PER_DRAIN = 1024
SHUTDOWN_SEND_TIMEOUT_S = 1.0
IDLE_WAIT_S = 1.0


class SchedulerActorConfig(msgspec.Struct, forbid_unknown_fields=True):
    args: ServerArgs
    model_info: ModelInfo | None = None  # None: wait for rank 0's WorkerReady
    heartbeat_segment: str = ""  # the run's Heartbeats segment ("": none)
    dp_rank: int = 0  # the data-parallel replica this scheduler drives


class SchedulerStartError(RuntimeError):
    pass


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
        self.model_info = self.config.model_info or self._wait_for_worker(args.ready_timeout)
        config = SchedulerConfig.from_args(args, self.model_info)
        self.core = SchedulerCore(config, decode=make_decode(tokenizer))
        self.depth = 1 if args.disable_overlap_schedule else 2
        self.to_workers = self.ref(TO_WORKERS)
        self.to_detokenizer = self.ref(TO_DETOKENIZER)
        self.to_ingress = self.ref(TO_INGRESS)
        self.stats = LoopStats(self.log, args.decode_log_interval)
        self.shutdown_deadline: float | None = None
        self.sent_at: dict[int, float] = {}
        self.watchdog_reported: set[int] = set()
        self.image_arenas: dict[str, Arena] = {}  # attached when the first request with images arrives
        self.heartbeat = Heartbeat(self.config.heartbeat_segment, self.name) if self.config.heartbeat_segment \
            else None
        self.log.info("scheduler: %d KV slots, %d request rows, context %d, overlap %s, radix cache %s, chunked "
                      "prefill %d, policy %s", self.core.config.max_total_tokens, self.core.config.max_running_requests,
                      self.core.config.context_length, self.depth == 2, self.core.cache is not None,
                      args.chunked_prefill_size, self.core.policy.name)

    # ---------------------------------------------------------------------------------------
    # the loop
    # ---------------------------------------------------------------------------------------

    def _wait_for_worker(self, timeout: float) -> ModelInfo:
        """Rank 0's WorkerReady (it is the first message on its channel)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match self.receive(min(1.0, max(0.0, deadline - time.monotonic()))):
                case WorkerReady(model_info=info):
                    return info
                case Shutdown():
                    raise SchedulerStartError("stopped before the worker was ready")
                case None:
                    pass
                case other:
                    raise SchedulerStartError(f"expected the worker's WorkerReady first, got {type(other).__name__}")
        raise SchedulerStartError(f"no WorkerReady from worker rank 0 within {timeout:g} s")

    def run(self) -> None:
        self.to_ingress.send(EngineReady(self.model_info))
        while True:
            if self.heartbeat is not None:
                self.heartbeat.beat()
            for msg in self.mailbox.drain(MAX_MESSAGES_PER_DRAIN):
                self.handle(msg)
            if self.shutdown_deadline is not None and self._shutdown_done():
                break
            grammars = self.core.grammars.take_outbox()
            if grammars:
                self.to_workers.send(CompileGrammars(specs=grammars))
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
            case GrammarReady():
                rejections, step = self.core.grammar_ready(msg)
                for rejection in rejections:
                    self.to_ingress.send(rejection)
                self.emit(step)
            case GenerateRequest():
                if self.shutdown_deadline is not None:
                    self.core.image_blocks.add(msg, self.core.num_batches - 1, accepted=False)
                    self.to_ingress.send(RequestRejected(rid=msg.rid, status=503,
                                                         message="the server is shutting down"))
                    return
                if len(self.core.waiting) >= self.args.max_queued_requests:
                    self.core.image_blocks.add(msg, self.core.num_batches - 1, accepted=False)
                    self.to_ingress.send(RequestRejected(rid=msg.rid, status=429, message=(
                        f"the server is overloaded: {len(self.core.waiting)} sequences are queued "
                        f"(--max-queued-requests {self.args.max_queued_requests}); retry later")))
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
            case WorkerReady():
                pass  # the model info came with the config
            case Shutdown(grace_s=grace_s):
                if self.shutdown_deadline is None:
                    self.log.info("shutdown: %d running, %d queued, grace %.1f s", len(self.core.running),
                                  len(self.core.waiting), grace_s)
                    self.shutdown_deadline = time.monotonic() + grace_s
            case _:
                self.log.error("scheduler: unexpected message %s", type(msg).__name__)
        if len(self.core.image_blocks):
            self._release_image_blocks()

    def _release_image_blocks(self) -> None:
        oldest = self.core.in_flight[0].plan.batch_id if self.core.in_flight else self.core.num_batches
        for name, block in self.core.image_blocks.releasable(oldest):
            arena = self.image_arenas.get(name)
            if arena is None:
                arena = self.image_arenas[name] = Arena.attach(name)
            arena.release(block)

    def send_batch(self, batch: ScheduledBatch) -> None:
        self.to_workers.send(batch.plan)
        self.sent_at[batch.plan.batch_id] = time.monotonic()
        self._publish_busy()
        self.stats.on_batch(batch, self.core)

    def emit(self, step: StepUpdates) -> None:
        self.stats.generated += step.new_tokens
        if step.updates:
            stamp = time.monotonic() if self.args.enable_token_timestamps else 0.0
            self.to_detokenizer.send(TokenUpdates(updates=step.updates, sent_at=stamp))
        if step.embeddings:
            self.to_ingress.send(EmbeddingResults(results=step.embeddings))

    # ---------------------------------------------------------------------------------------
    # watchdog and shutdown
    # ---------------------------------------------------------------------------------------

    def _sent_batch_done(self, batch_id: int) -> None:
        self.sent_at.pop(batch_id, None)
        if batch_id in self.watchdog_reported:
            self.watchdog_reported.discard(batch_id)
            self.log.warning("watchdog: batch %d came back after all", batch_id)
        self._publish_busy()

    def _publish_busy(self) -> None:
        """The oldest batch on the workers, for /health (monotonic and monotonic_ns share CLOCK_MONOTONIC)."""
        if self.heartbeat is None:
            return
        if self.sent_at:
            batch_id, sent = min(self.sent_at.items(), key=lambda item: item[1])
            self.heartbeat.set_busy(batch_id, max(1, int(sent * 1e9)))
        else:
            self.heartbeat.set_busy(0, 0)

    def _wait_timeout(self) -> float:
        timeouts = [IDLE_WAIT_S]
        unreported = [sent for batch_id, sent in self.sent_at.items() if batch_id not in self.watchdog_reported]
        if unreported:
            timeouts.append(max(0.0, min(unreported) + self.args.watchdog_timeout - time.monotonic()))
        if self.shutdown_deadline is not None and self.shutdown_deadline > time.monotonic():
            timeouts.append(self.shutdown_deadline - time.monotonic())
        return min(timeouts)

    def _check_watchdog(self) -> None:
        """A batch on the workers past --watchdog-timeout: logged once (and /health says it while it lasts)."""
        if not self.sent_at:
            return
        batch_id, sent = min(self.sent_at.items(), key=lambda item: item[1])
        waited = time.monotonic() - sent
        if waited >= self.args.watchdog_timeout and batch_id not in self.watchdog_reported:
            self.watchdog_reported.add(batch_id)
            self.log.error("watchdog: batch %d has been on the workers for %.0f s with no result (--watchdog-timeout "
                           "%g); the device looks hung: /health answers 503 until it comes back", batch_id, waited,
                           self.args.watchdog_timeout)

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
        if batch.retracted:
            self.log.warning("KV cache full: retracted %d running requests to the queue (%d retractions so far, %d "
                             "requests); new_token_ratio back to %.2f", batch.retracted, core.num_retractions,
                             core.num_retracted_reqs, core.new_token_ratio.value)
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
                              "#queue-req: %d, #retracted-req: %d", len(core.running), core.token_usage(), rate,
                              len(core.waiting), core.num_retracted_reqs)
