"""Where a step goes at saturation: a per-step timeline of the model runner at 256 and 512 running requests.

    python scripts/gpu_step_timeline.py --model-path .models/llama-3-8b-dummy --rows 256 512 --context 1536

Every row is a request with --context tokens in the KV cache (slots scattered over the pool, as the allocator
leaves them; dummy weights, greedy sampling). Parts, one table:
- decode: runner.step of R decode rows through the CUDA graph: wall time (launch + collect, what a stream sees),
  host time of launch (the worker's CPU per step), device time of the graph replay and of the sampler, and the
  bound: (KV bytes read + weight bytes) / the measured copy bandwidth;
- kernels: device time per kernel group of one decode step (torch.profiler; inside the graph replay when the
  profiler sees its kernels, else one eager step);
- scheduler: CPU time of SchedulerCore per step with R decoding requests (plan, BatchPlan encoding, result,
  TokenUpdates encoding), the work the scheduler process does between two steps;
- prefill chunks: a P-token chunk alone, and riding with R decode rows (a mixed step), for P in --chunks; and the
  same at --low-rows decode rows (serving at 4 requests/s), which decides --chunked-prefill-size: the mixed step
  is the inter-token gap every running stream sees while a prompt is prefilled.
--device cpu with a tiny model runs every part but the profiler (a smoke test of the script).
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import time
from pathlib import Path

import msgspec
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runtime.messages import BatchPlan, BatchResult, GenerateRequest, NewRow, SamplingParams, TokenUpdates  # noqa: E402
from runtime.scheduler.config import SchedulerConfig  # noqa: E402
from runtime.scheduler.core import SchedulerCore  # noqa: E402
from runtime.worker.forward_batch import ForwardBatch  # noqa: E402
from runtime.worker.model_runner import ModelRunner, ModelRunnerConfig  # noqa: E402

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=1 << 30)
KERNEL_GROUPS = [("attention", ("decode", "extend")), ("rms_norm", ("rms_norm",)), ("rotary", ("rotary",)),
                 ("silu_and_mul", ("silu",)), ("store_kv", ("store_kv",)),
                 ("gemm", ("gemm", "gemv", "nvjet", "cutlass", "sm90", "splitkreduce", "xmma")),
                 ("sampling", ("argmax", "softmax", "_sample", "_threshold"))]
TOKEN = 7


class Timeline:
    def __init__(self, runner: ModelRunner, context: int):
        self.runner = runner
        self.context = context
        self.cuda = runner.device.type == "cuda"
        generator = torch.Generator().manual_seed(0)
        self.slots = (torch.randperm(runner.max_total_tokens, generator=generator) + 1).tolist()
        self.registered = 0  # rows 0..registered-1 hold `context` tokens
        self.table: list[dict] = []

    # -------------------------------------------------------------------------------------------
    # plans
    # -------------------------------------------------------------------------------------------

    def row_slots(self, row: int) -> list[int]:
        return self.slots[row * self.context:(row + 1) * self.context]

    def decode_plan(self, num_rows: int) -> BatchPlan:
        """num_rows decode rows at position context - 1 (registered on first use); the same step every time."""
        new_rows = [NewRow(row=r, prefix_slots=self.row_slots(r)[:-1], sampling=GREEDY)
                    for r in range(self.registered, num_rows)]
        self.registered = max(self.registered, num_rows)
        rows = list(range(num_rows))
        return BatchPlan(batch_id=0, rows=rows, prefix_lens=[self.context - 1] * num_rows, extend_lens=[1] * num_rows,
                         input_ids=[TOKEN] * num_rows, out_slots=[self.row_slots(r)[-1] for r in rows],
                         sample=[True] * num_rows, future_slots=rows, new_rows=new_rows)

    def with_chunk(self, plan: BatchPlan, chunk: int) -> BatchPlan:
        """`plan` plus a fresh request's first `chunk` prompt tokens (the row after the decode rows)."""
        row = self.runner.max_running_requests - 1
        free = self.slots[self.runner.max_running_requests * self.context - self.context:]
        return BatchPlan(batch_id=0, rows=plan.rows + [row], prefix_lens=plan.prefix_lens + [0],
                         extend_lens=plan.extend_lens + [chunk], input_ids=plan.input_ids + [TOKEN] * chunk,
                         out_slots=plan.out_slots + free[:chunk], sample=plan.sample + [True],
                         future_slots=plan.future_slots + [row],
                         new_rows=plan.new_rows + [NewRow(row=row, prefix_slots=[], sampling=GREEDY)])

    # -------------------------------------------------------------------------------------------
    # measurements
    # -------------------------------------------------------------------------------------------

    def time_step(self, plan: BatchPlan, repeats: int) -> dict:
        """Median wall ms of launch + collect, host µs of launch, device ms between the step's events."""
        self.runner.step(plan)  # warm-up (and registration of new rows)
        plan = msgspec.structs.replace(plan, new_rows=[])
        wall, host, device = [], [], []
        for _ in range(repeats):
            begin = time.perf_counter()
            pending = self.runner.launch(plan)
            launched = time.perf_counter()
            result = self.runner.collect(pending)
            wall.append(time.perf_counter() - begin)
            host.append(launched - begin)
            device.append(result.forward_ms)
        return {"wall_ms": statistics.median(wall) * 1e3, "host_us": statistics.median(host) * 1e6,
                "device_ms": statistics.median(device)}

    def graph_and_sampling_ms(self, plan: BatchPlan) -> tuple[float, float]:
        graphs = self.runner.graph_runner
        if graphs is None or len(plan.rows) > graphs.max_batch_size:
            return float("nan"), float("nan")
        args = (plan.input_ids, plan.out_slots, plan.rows, [p + 1 for p in plan.prefix_lens])
        with torch.inference_mode():
            graph_ms = device_ms(lambda: graphs.replay(*args), 10)
            logits = graphs.replay(*args)
            sample_ms = device_ms(lambda: self.runner.sampler.sample(logits, plan.rows), 10)
        return graph_ms, sample_ms

    def step_kernels(self, plan: BatchPlan, step_device_ms: float) -> tuple[dict[str, tuple[float, int]], str]:
        """Device µs and calls per kernel of one decode step: the graph replay if the profiler sees its kernels."""
        kernels = profile_kernels(lambda: self.runner.step(plan))
        if sum(us for us, _ in kernels.values()) >= 0.5 * step_device_ms * 1e3:
            return kernels, "graph replay"
        return profile_kernels(lambda: self.eager_decode(plan)), "eager step"

    @torch.inference_mode()
    def eager_decode(self, plan: BatchPlan) -> None:
        runner, device = self.runner, self.runner.device
        batch = ForwardBatch.build(input_ids=torch.tensor(plan.input_ids, device=device),
                                   out_slots=torch.tensor(plan.out_slots, device=device), rows=plan.rows,
                                   prefix_lens=plan.prefix_lens, extend_lens=plan.extend_lens,
                                   req_to_token=runner.req_to_token)
        runner.attention.prepare(batch)
        runner.sampler.sample(runner.model.compute_logits(runner.model(batch, runner.attention)), plan.rows)

    def bound_ms(self, num_rows: int, bandwidth: float) -> float:
        runner = self.runner
        kv = num_rows * self.context * runner.kv_pool.bytes_per_token(
            runner.attention_spec.num_layers, runner.attention_spec.num_kv_heads, runner.attention_spec.head_dim,
            runner.kv_cache_dtype)
        weights = sum(p.numel() * p.element_size() for name, p in runner.model.named_parameters()
                      if "embed_tokens" not in name or runner.model_config.tie_word_embeddings)
        return (kv + weights) / bandwidth * 1e3

    # -------------------------------------------------------------------------------------------
    # parts
    # -------------------------------------------------------------------------------------------

    def decode_part(self, num_rows: int, repeats: int, bandwidth: float, profile: bool,
                    top_kernels: int = 0) -> dict:
        plan = self.decode_plan(num_rows)
        step = self.time_step(plan, repeats)
        plan = msgspec.structs.replace(plan, new_rows=[])
        graph_ms, sample_ms = self.graph_and_sampling_ms(plan)
        bound = self.bound_ms(num_rows, bandwidth) if bandwidth else float("nan")
        self.add("decode", num_rows, num_rows, step,
                 f"graph {graph_ms:.2f} ms + sampling {sample_ms:.2f} ms; bound {bound:.2f} ms "
                 f"({bound / step['wall_ms']:.0%} of the step)")
        if profile:
            kernels, source = self.step_kernels(plan, step["device_ms"])
            groups: dict[str, float] = collections.defaultdict(float)
            for name, (us, _) in kernels.items():
                groups[kernel_group(name)] += us
            parts = ", ".join(f"{g} {us / 1e3:.2f}" for g, us in sorted(groups.items(), key=lambda kv: -kv[1]))
            self.add("kernels", num_rows, num_rows, {"device_ms": sum(groups.values()) / 1e3}, f"{source}, ms: {parts}")
            for name, (us, calls) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top_kernels]:
                self.add("kernel", num_rows, calls, {"device_ms": us / 1e3},
                         f"{name[:90]}: {calls} calls, {us / calls:.1f} µs each")
        return step

    def chunk_part(self, num_rows: int, chunks: list[int], repeats: int, decode_step: dict) -> None:
        for chunk in chunks:
            alone = self.time_step(self.with_chunk(BatchPlan(batch_id=0, rows=[], prefix_lens=[], extend_lens=[],
                                                             input_ids=[], out_slots=[], sample=[], future_slots=[]),
                                                   chunk), repeats)
            self.add("prefill chunk alone", 0, chunk, alone, "")
            mixed = self.time_step(self.with_chunk(self.decode_plan(num_rows), chunk), repeats)
            apart = decode_step["wall_ms"] + alone["wall_ms"]
            self.add("mixed: decode rows + chunk", num_rows, num_rows + chunk, mixed,
                     f"decode then chunk apart: {apart:.2f} ms ({mixed['wall_ms'] / apart:.2f}x); every stream's "
                     f"gap {mixed['wall_ms']:.2f} ms mixed, {alone['wall_ms']:.2f} + {decode_step['wall_ms']:.2f} "
                     "apart")

    def add(self, part: str, rows: int, tokens: int, timing: dict, note: str) -> None:
        self.table.append({"part": part, "rows": rows, "tokens": tokens, **timing, "note": note})


def scheduler_cpu(num_rows: int, context: int, steps: int = 40) -> dict:
    """SchedulerCore's CPU per step with num_rows decoding streamed requests (what its process does per step)."""
    config = SchedulerConfig(max_total_tokens=num_rows * (context + 4 * steps + 8) + 64, max_running_requests=num_rows,
                             context_length=context + 4 * steps + 64, eos_token_ids=[2],
                             chunked_prefill_size=num_rows * context, max_prefill_tokens=num_rows * context)
    core = SchedulerCore(config)
    sampling = SamplingParams(temperature=0.0, max_new_tokens=4 * steps, ignore_eos=True)
    for i in range(num_rows):
        core.add_request(GenerateRequest(rid=f"r{i}", input_ids=[3 + (i + j) % 1000 for j in range(context)],
                                         sampling=sampling, stream=True))
    encoder = msgspec.msgpack.Encoder()
    results: collections.deque = collections.deque()
    times = []
    for step in range(2 * steps):
        begin = time.process_time()
        batch = core.plan_next()
        encoder.encode(batch.plan)
        results.append(BatchResult(batch_id=batch.plan.batch_id, next_token_ids=[5] * sum(batch.plan.sample)))
        if len(results) == 2:  # overlap: batch N's result after batch N+1 was planned
            encoder.encode(TokenUpdates(updates=core.process_result(results.popleft()).updates))
        if step >= steps and batch.num_decode == num_rows:
            times.append(time.process_time() - begin)
    ms = statistics.median(times) * 1e3 if times else float("nan")
    return {"wall_ms": ms, "host_us": ms * 1e3 / num_rows}


def profile_kernels(fn) -> dict[str, tuple[float, int]]:
    """Device µs and calls per kernel name over one call of fn (torch.profiler)."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = {}
    for event in prof.key_averages():
        total = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0.0)
        if total > 0 and not event.key.startswith(("cuda", "Memcpy", "Memset", "aten::")):
            kernels[event.key] = (total, event.count)
    return kernels


def kernel_group(name: str) -> str:
    name = name.lower()
    return next((g for g, keys in KERNEL_GROUPS if any(k in name for k in keys)), "other")


def device_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Bytes per second of a 1 GiB device copy, counting bytes read and written."""
    src = torch.randn(256 << 20, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    return 2 * src.numel() * 4 / (device_ms(lambda: dst.copy_(src), 10) * 1e-3)


def print_table(rows: list[dict]) -> None:
    print("| part | decode rows | tokens | wall ms | device ms | host µs | note |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    nan = float("nan")
    for r in rows:
        print(f"| {r['part']} | {r['rows']} | {r['tokens']} | {r.get('wall_ms', nan):.2f} | "
              f"{r.get('device_ms', nan):.2f} | {r.get('host_us', nan):.0f} | {r['note']} |")


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-path", default=None)
    p.add_argument("--load-format", default="dummy")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--rows", type=int, nargs="+", default=[256, 512])
    p.add_argument("--context", type=int, default=1536, help="tokens in the KV cache per row")
    p.add_argument("--chunks", type=int, nargs="*", default=[512, 2048, 8192])
    p.add_argument("--low-rows", type=int, default=32, help="0: no low-row part")
    p.add_argument("--low-chunks", type=int, nargs="*", default=[256, 512, 1024])
    p.add_argument("--quantization", default=None, help="as the server's flag (fp8: the weight-only fp8 GEMMs)")
    p.add_argument("--kv-cache-dtype", default="auto")
    p.add_argument("--top-kernels", type=int, default=0, help="also list the N kernels with most device time")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--output", default=None, help="write the table as JSON here")
    args = p.parse_args(argv)

    start = time.perf_counter()
    max_rows = max(args.rows + [args.low_rows])
    runner = ModelRunner(ModelRunnerConfig(model_path=args.model_path, load_format=args.load_format, dtype=args.dtype,
                                           device=args.device, max_running_requests=max_rows + 1,
                                           quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype))
    context = min(args.context, (runner.max_total_tokens - max(args.chunks + args.low_chunks + [0])) // (max_rows + 1))
    print(f"runner ready in {time.perf_counter() - start:.1f} s: {runner.max_total_tokens} KV slots, CUDA graphs "
          f"{runner.graph_runner.sizes[-1] if runner.graph_runner else 'off'} (captured in "
          f"{runner.graph_runner.capture_s if runner.graph_runner else 0:.1f} s), context {context} per row")
    timeline = Timeline(runner, context)
    bandwidth = copy_bandwidth() if timeline.cuda else 0.0
    if bandwidth:
        print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write)")
    for num_rows in args.rows:
        step = timeline.decode_part(num_rows, args.repeats, bandwidth, profile=timeline.cuda,
                                    top_kernels=args.top_kernels)
        timeline.add("scheduler CPU per step", num_rows, num_rows, scheduler_cpu(num_rows, min(context, 256)),
                     "plan + encode + result + updates; host µs column: per request")
        timeline.chunk_part(num_rows, args.chunks, max(3, args.repeats // 3), step)
    if args.low_rows:
        low = timeline.decode_part(args.low_rows, args.repeats, bandwidth, profile=False)
        timeline.chunk_part(args.low_rows, args.low_chunks, max(3, args.repeats // 3), low)
    print_table(timeline.table)
    if args.output:
        Path(args.output).write_text(json.dumps(timeline.table, indent=1))
    return timeline.table


if __name__ == "__main__":
    main()
