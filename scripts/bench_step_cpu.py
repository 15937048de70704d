"""CPU time per decode step at saturation, without a GPU: what the scheduler process and the worker's host side
spend per step with N running requests (default 512), each part timed on its own.

    python scripts/bench_step_cpu.py                  # 512 running requests, streamed, ignore_eos
    python scripts/bench_step_cpu.py --running 256 512 --steps 200

Scheduler (SchedulerCore, the actor's per-step work with overlap): plan_next, encoding the BatchPlan, processing the
previous batch's BatchResult (stop checks, updates), encoding the TokenUpdates for the detokenizer. The worker's
result is faked (a token per row), so only the scheduler's own CPU is measured.
Worker host side (a tiny Llama on the CPU stands in for the model; its forward is not timed): decoding the
BatchPlan, ModelRunner's plan checks, building the CUDA-graph inputs of the step (padding + one tensor), encoding the
BatchResult. On a GPU the whole host side of a step is measured by scripts/gpu_step_timeline.py ("worker host").
Medians over the steady state (every request decoding), process CPU time (robust on a shared machine).
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import tempfile
import time
from pathlib import Path

import msgspec
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runtime.messages import (  # noqa: E402
    BatchPlan,
    BatchResult,
    GenerateRequest,
    SamplingParams,
    SchedulerToWorker,
    TokenUpdates,
)
from runtime.scheduler.config import SchedulerConfig  # noqa: E402
from runtime.scheduler.core import SchedulerCore  # noqa: E402
from runtime.worker.cuda_graph_runner import capture_batch_sizes, padded_inputs  # noqa: E402

PROMPT_LEN = 1024


class Parts:
    def __init__(self):
        self.times: dict[str, list[float]] = collections.defaultdict(list)

    def time(self, name: str, fn, *args):
        begin = time.process_time()
        out = fn(*args)
        self.times[name].append(time.process_time() - begin)
        return out

    def median_us(self, name: str) -> float:
        return statistics.median(self.times[name]) * 1e6


def scheduler_steps(running: int, steps: int) -> tuple[Parts, list[BatchPlan]]:
    config = SchedulerConfig(max_total_tokens=running * (PROMPT_LEN + 2 * steps + 8) + 64,
                             max_running_requests=running, context_length=8192, eos_token_ids=[2],
                             chunked_prefill_size=running * PROMPT_LEN, max_prefill_tokens=running * PROMPT_LEN)
    core = SchedulerCore(config)
    sampling = SamplingParams(temperature=0.0, max_new_tokens=2 * steps, ignore_eos=True)
    for i in range(running):
        core.add_request(GenerateRequest(rid=f"req-{i}", input_ids=[3 + (7 * i + j) % 30000 for j in range(PROMPT_LEN)],
                                         sampling=sampling, stream=True))
    encoder = msgspec.msgpack.Encoder()
    parts, plans = Parts(), []
    results: collections.deque = collections.deque()
    for step in range(steps):
        steady = step >= 2
        timed = parts if steady else Parts()
        batch = timed.time("plan_next", core.plan_next)
        data = timed.time("encode BatchPlan", encoder.encode, batch.plan)
        if steady:
            plans.append(batch.plan)
        results.append(BatchResult(batch_id=batch.plan.batch_id, next_token_ids=[5] * sum(batch.plan.sample)))
        if len(results) == 2:
            updates = timed.time("process_result", core.process_result, results.popleft())
            timed.time("encode TokenUpdates", encoder.encode, TokenUpdates(updates=updates.updates))
        assert not steady or batch.num_decode == running, "not every request is decoding"
        del data
    return parts, plans


def worker_steps(plans: list[BatchPlan], running: int) -> Parts:
    from runtime.worker.model_runner import ModelRunner, ModelRunnerConfig
    from tests.model_fixtures import save_tiny_model

    with tempfile.TemporaryDirectory() as folder:
        save_tiny_model("LlamaForCausalLM", folder)
        runner = ModelRunner(ModelRunnerConfig(model_path=folder, device="cpu", context_length=256,
                                               max_total_tokens=max(max(p.out_slots) for p in plans),
                                               max_running_requests=running))
    # The core's plans name positions past the tiny model's context: check them against a larger one.
    runner.context_length = 8192
    encoder, decoder = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(SchedulerToWorker)
    size = capture_batch_sizes(running)[-1]
    parts = Parts()
    for plan in plans:
        plan = parts.time("decode BatchPlan", decoder.decode, encoder.encode(plan))
        parts.time("check plan", runner._check_plan, plan)

        def graph_inputs(plan=plan):
            seq_lens = [p + 1 for p in plan.prefix_lens]
            rows = padded_inputs(plan.input_ids, plan.out_slots, plan.rows, seq_lens, size, running)
            return torch.tensor(rows, dtype=torch.int64)

        parts.time("graph inputs", graph_inputs)
        parts.time("encode BatchResult", encoder.encode,
                   BatchResult(batch_id=plan.batch_id, next_token_ids=[5] * len(plan.rows)))
    return parts


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--running", type=int, nargs="+", default=[512])
    p.add_argument("--steps", type=int, default=100)
    args = p.parse_args(argv)
    print("| running | part | µs per step | µs per request |")
    print("| ---: | --- | ---: | ---: |")
    for running in args.running:
        scheduler, plans = scheduler_steps(running, args.steps)
        worker = worker_steps(plans, running)
        for side, parts in (("scheduler", scheduler), ("worker", worker)):
            total = 0.0
            for name in parts.times:
                us = parts.median_us(name)
                total += us
                print(f"| {running} | {side}: {name} | {us:.0f} | {us / running:.2f} |")
            print(f"| {running} | **{side} total** | **{total:.0f}** | **{total / running:.2f}** |")


if __name__ == "__main__":
    main()
