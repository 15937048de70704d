"""The worker actor: one per GPU rank, a thin loop around runtime.model_runner.ModelRunner.

Every rank reads every BatchPlan from the scheduler's broadcast ring and runs runner.step(plan);
rank 0 alone answers, with the BatchResult or, when the step raised (CUDA OOM, ...), a WorkerError
naming the batch, and then keeps serving. Ready carries rank 0's ModelInfo, msgpack-encoded
(`decode_model_info` reads it back).

Shutdown: Shutdown(grace_s > 0) (from the supervisor) keeps serving plans for up to grace_s so
the scheduler can finish its running requests; Shutdown(grace_s == 0) (the scheduler's last
message, or an immediate stop) exits at once.
"""

from __future__ import annotations

import time

import msgspec

from actors.actor import Actor
from runtime.messages import BatchPlan, ModelInfo, Shutdown, WorkerError
from runtime.server_args import ServerArgs

TO_SCHEDULER = "worker_to_scheduler"  # rank 0's outbound channel name
GRACE_SLACK_S = 2.0  # beyond the grace period, for the scheduler's own Shutdown to arrive


class WorkerActorConfig(msgspec.Struct, forbid_unknown_fields=True):
    args: ServerArgs
    tp_rank: int = 0


def runner_config(args: ServerArgs, tp_rank: int):
    from runtime.model_runner import ModelRunnerConfig

    return ModelRunnerConfig(
        model_path=args.model_path, load_format=args.load_format, dtype=args.dtype, device=args.device,
        tp_rank=tp_rank, tp_size=args.tp_size, context_length=args.context_length,
        max_total_tokens=args.max_total_tokens, max_running_requests=args.max_running_requests,
        mem_fraction_static=args.mem_fraction_static, attention_backend=args.attention_backend,
        random_seed=args.random_seed)


def decode_model_info(info: bytes) -> ModelInfo:
    return msgspec.msgpack.decode(info, type=ModelInfo)


class WorkerActor(Actor):
    config_type = WorkerActorConfig

    def __init__(self, context):
        super().__init__(context)
        from runtime.model_runner import ModelRunner  # torch: only in worker processes

        self.rank = self.config.tp_rank
        self.runner = ModelRunner(runner_config(self.config.args, self.rank))
        self.to_scheduler = self.ref(TO_SCHEDULER) if self.rank == 0 else None
        self.log.info("worker rank %d ready: %s", self.rank, self.runner.info)

    def ready_info(self) -> bytes:
        return msgspec.msgpack.encode(self.runner.info)

    def run(self) -> None:
        deadline = None
        while deadline is None or time.monotonic() < deadline:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            match self.receive(timeout):
                case BatchPlan() as plan:
                    result = self.step(plan)
                    if self.to_scheduler is not None:
                        self.to_scheduler.send(result)
                case Shutdown(grace_s=grace_s) if grace_s > 0:
                    deadline = deadline or time.monotonic() + grace_s + GRACE_SLACK_S
                case Shutdown():
                    break
                case None:
                    pass
                case other:
                    self.log.error("worker: unexpected message %s", type(other).__name__)
        self.log.info("worker rank %d stopped", self.rank)

    def step(self, plan: BatchPlan):
        try:
            return self.runner.step(plan)
        except Exception as e:  # the scheduler aborts this batch's requests; we keep serving
            self.log.exception("batch %d failed", plan.batch_id)
            return WorkerError(batch_id=plan.batch_id, message=f"{type(e).__name__}: {e}")
