"""The worker actor: one per GPU rank, a thin loop around runtime.worker.model_runner.ModelRunner.

Every rank reads every BatchPlan from the scheduler's broadcast ring and runs it; rank 0 alone
answers, in batch order, with the BatchResult or, when the step raised (CUDA OOM, ...), a
WorkerError naming the batch, and then keeps serving. Ready carries rank 0's ModelInfo,
msgpack-encoded (`decode_model_info` reads it back).

Tensor parallelism (tp_size > 1): the ranks of a replica join one process group (ModelRunner, through
runtime/worker/distributed.py) and every rank samples: the LM head all-gathers the logits, so each rank
holds the same logits and draws the same tokens from the same seeded generator, without a broadcast of
the samples. Each rank needs them anyway: the next plan's placeholder ids are resolved from each rank's
own future_tokens. A step that fails on one rank leaves the ranks out of step (a collective would wait
for ever), so with tp_size > 1 a failed step ends the worker, and the supervisor stops the server.

Overlap on the device side: runner.launch(plan) queues the step on the device and returns;
runner.collect(pending) waits for its sampled ids. While batch N runs, the worker launches batch
N+1 as soon as it arrives (the scheduler sends it before N's result is back), so the device queue
never drains between steps; N's result is collected and sent once N is done. On the CPU launch
computes synchronously, so this reduces to step-by-step.

Grammars: CompileGrammars starts background compiles (runtime/constrained/compile_cache.py); while any
runs, the loop polls every millisecond and rank 0 sends a GrammarReady per grammar as it finishes.

Shutdown: Shutdown(grace_s > 0) (from the supervisor) keeps serving plans for up to grace_s so
the scheduler can finish its running requests; Shutdown(grace_s == 0) (the scheduler's last
message, or an immediate stop) exits at once.

Start-up: rank 0's first message to the scheduler is WorkerReady(ModelInfo): the scheduler starts
together with the workers and sizes itself once the model is loaded.
Heartbeat: a thread beats the worker's slot of the run's heartbeat segment every
HEARTBEAT_INTERVAL_S, also while a long step runs (torch releases the GIL), so /health tells a
frozen process (SIGSTOP) from a busy one; a hung device shows as the scheduler's oldest batch.
"""

from __future__ import annotations

import collections
import threading
import time

import msgspec

from actors.actor import Actor
from runtime.messages import BatchPlan, CompileGrammars, ModelInfo, Shutdown, WorkerError, WorkerReady
from runtime.server_args import ServerArgs
from shm import Heartbeat

TO_SCHEDULER = "worker_to_scheduler"  # rank 0's outbound channel name
GRACE_SLACK_S = 2.0  # beyond the grace period, for the scheduler's own Shutdown to arrive
POLL_S = 2e-4  # mailbox wait while a launched step runs on the device
GRAMMAR_POLL_S = 1e-3  # mailbox wait while grammars compile in the background (their end wakes no ring)
HEARTBEAT_INTERVAL_S = 0.5


class WorkerActorConfig(msgspec.Struct, forbid_unknown_fields=True):
    args: ServerArgs
    tp_rank: int = 0
    heartbeat_segment: str = ""  # the run's Heartbeats segment ("": none)
    dp_rank: int = 0
    gpu_id: int = 0  # device index on this node (runtime.distributed.layout)
    dist_init_method: str | None = None  # tp_size > 1: tcp://host:port where the replica's ranks meet
    p2p_check_gpus: list[int] = []  # --enable-p2p-check: this node's GPUs of the replica
    cpu_threads: int = 0  # torch's intra-op threads; 0: torch's default (one worker on the node)


def decode_model_info(info: bytes) -> ModelInfo:
    return msgspec.msgpack.decode(info, type=ModelInfo)


class WorkerActor(Actor):
    config_type = WorkerActorConfig

    def __init__(self, context):
        super().__init__(context)
        from runtime.worker.model_runner import ModelRunner, ModelRunnerConfig  # torch: only in worker processes

        config = self.config
        if config.cpu_threads:
            import torch

            torch.set_num_threads(config.cpu_threads)
        self.rank = config.tp_rank
        self.tp_size = config.args.tp_size
        runner_config = ModelRunnerConfig.from_server_args(config.args, self.rank, config.gpu_id)
        runner_config.dist_init_method = config.dist_init_method
        runner_config.dist_timeout_s = config.args.ready_timeout
        runner_config.p2p_check_gpus = config.p2p_check_gpus
        self.runner = ModelRunner(runner_config)
        self.launched: collections.deque = collections.deque()  # PendingStep or WorkerError, batch order
        self.to_scheduler = self.ref(TO_SCHEDULER) if self.rank == 0 else None
        self.log.info("worker dp %d tp %d/%d ready: %s", config.dp_rank, self.rank, self.tp_size, self.runner.info)

    def ready_info(self) -> bytes:
        return msgspec.msgpack.encode(self.runner.info)

    def run(self) -> None:
        stop_beating = threading.Event()
        if self.config.heartbeat_segment:
            threading.Thread(target=self._beat, args=(stop_beating,), name="heartbeat", daemon=True).start()
        if self.to_scheduler is not None:
            self.to_scheduler.send(WorkerReady(self.runner.info))
        try:
            self._serve()
        finally:
            stop_beating.set()

    def _beat(self, stop: threading.Event) -> None:
        heartbeat = Heartbeat(self.config.heartbeat_segment, self.name)
        try:
            while not stop.wait(HEARTBEAT_INTERVAL_S):
                heartbeat.beat()
        finally:
            heartbeat.close()

    def _serve(self) -> None:
        deadline = None
        while deadline is None or time.monotonic() < deadline or self.launched:
            if self.launched and self._oldest_done():
                self._answer_oldest()
                continue
            timeout = POLL_S if self.launched else None if deadline is None else max(0.0, deadline - time.monotonic())
            if self.runner.compiling_grammars:
                timeout = GRAMMAR_POLL_S if timeout is None else min(timeout, GRAMMAR_POLL_S)
            match self.receive(timeout):
                case BatchPlan() as plan:
                    self.launched.append(self.launch(plan))
                case CompileGrammars(specs=specs):
                    self.runner.compile_grammars(specs)
                case Shutdown(grace_s=grace_s) if grace_s > 0:
                    deadline = deadline or time.monotonic() + grace_s + GRACE_SLACK_S
                case Shutdown():
                    deadline = time.monotonic()  # answer what was launched, then exit
                case None:
                    pass
                case other:
                    self.log.error("worker: unexpected message %s", type(other).__name__)
            self._answer_grammars()
        self.log.info("worker rank %d stopped", self.rank)

    def _answer_grammars(self) -> None:
        for reply in self.runner.grammar_replies():
            if self.to_scheduler is not None:
                self.to_scheduler.send(reply)

    def launch(self, plan: BatchPlan):
        try:
            return self.runner.launch(plan)
        except Exception as e:  # the scheduler aborts this batch's requests; we keep serving
            self._fatal_with_tp(plan.batch_id, e)
            self.log.exception("batch %d failed", plan.batch_id)
            return WorkerError(batch_id=plan.batch_id, message=f"{type(e).__name__}: {e}")

    def _fatal_with_tp(self, batch_id: int, error: Exception) -> None:
        if self.tp_size > 1:
            raise RuntimeError(f"tensor-parallel rank {self.rank} failed batch {batch_id} ({type(error).__name__}: "
                               f"{error}); the ranks are out of step, stopping the server") from error

    def _oldest_done(self) -> bool:
        """The oldest launched step has finished on the device (always, on the CPU), or more
        steps are queued behind it: then collecting it cannot delay the device."""
        oldest = self.launched[0]
        done = getattr(oldest, "done", None)
        return len(self.launched) > 1 or done is None or done.query()

    def _answer_oldest(self) -> None:
        item = self.launched.popleft()
        if not isinstance(item, WorkerError):
            try:
                item = self.runner.collect(item)
            except Exception as e:
                self._fatal_with_tp(item.batch_id, e)
                self.log.exception("batch %d failed", item.batch_id)
                item = WorkerError(batch_id=item.batch_id, message=f"{type(e).__name__}: {e}")
        if self.to_scheduler is not None:
            self.to_scheduler.send(item)
