"""Where a decode step's time goes, on CUDA: ModelRunner.step of a static batch (prefill, then decode steps through the
CUDA graphs), split into host and device parts with CUDA events and host clocks, plus the floor of the weight matmuls
alone (every projection and the LM head at the batch size, cuBLAS, replayed from one CUDA graph) and a per-kernel
breakdown of one eager decode step from torch.profiler.

    python scripts/gpu_profile_decode.py --model-path .models/llama-3-8b-dummy --batch-size 1 64 --input-len 128

Columns: step = wall time of runner.step (launch + collect) in the decode loop, median; launch host = host time
of runner.launch; graph = device time of one graph replay; sample = device time of the sampler on its logits;
device idle = step - graph - sample (host time the GPU waits for: plan checks, input copy, collect, result);
matmuls = the weight-matmul floor.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runtime.messages import BatchPlan, NewRow, SamplingParams  # noqa: E402
from runtime.worker.forward_batch import ForwardBatch  # noqa: E402
from runtime.worker.model_runner import ModelRunner, ModelRunnerConfig  # noqa: E402

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=1 << 30)
KERNEL_GROUPS = [("attention", ("decode", "extend")), ("rms_norm", ("rms_norm",)), ("rotary", ("rotary",)),
                 ("silu_and_mul", ("silu",)), ("store_kv", ("store_kv",)),
                 ("matmul", ("gemm", "gemv", "nvjet", "cutlass", "sm90", "splitkreduce")),
                 ("sampling", ("argmax", "softmax", "_sample", "_threshold"))]


def device_ms(fn, repeats: int) -> float:
    """Median device time of fn() over `repeats` calls, by CUDA events."""
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def prefill(runner: ModelRunner, batch_size: int, input_len: int) -> int:
    rows = list(range(batch_size))
    ids = torch.randint(100, runner.info.vocab_size - 100, (batch_size * input_len,)).tolist()
    runner.step(BatchPlan(batch_id=0, rows=rows, prefix_lens=[0] * batch_size, extend_lens=[input_len] * batch_size,
                          input_ids=ids, out_slots=list(range(1, 1 + batch_size * input_len)),
                          sample=[True] * batch_size, future_slots=rows,
                          new_rows=[NewRow(row=r, prefix_slots=[], sampling=GREEDY) for r in rows]))
    return 1 + batch_size * input_len


def decode_plan(step: int, batch_size: int, seq_len: int, slot: int, free: bool = False) -> BatchPlan:
    rows = list(range(batch_size))
    return BatchPlan(batch_id=step, rows=rows, prefix_lens=[seq_len - 1] * batch_size, extend_lens=[1] * batch_size,
                     input_ids=[-(r + 1) for r in rows], out_slots=list(range(slot, slot + batch_size)),
                     sample=[True] * batch_size, future_slots=rows, freed_rows=rows if free else [])


def matmul_floor_ms(runner: ModelRunner, batch_size: int) -> float:
    """Every weight matmul of a decode step (projections of all layers, LM head), nothing else, in one graph."""
    weights = [p for name, p in runner.model.named_parameters() if p.dim() == 2 and "embed_tokens" not in name]
    if runner.model.config.tie_word_embeddings:
        weights.append(runner.model.lm_head.weight)
    inputs = {w.shape[1]: torch.randn(batch_size, w.shape[1], dtype=runner.dtype, device=runner.device)
              for w in weights}
    for w in weights:  # warm-up: cuBLAS picks its kernels
        F.linear(inputs[w.shape[1]], w)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for w in weights:
            F.linear(inputs[w.shape[1]], w)
    return device_ms(graph.replay, 20)


@torch.inference_mode()
def kernel_breakdown(runner: ModelRunner, batch_size: int, seq_len: int, slot: int) -> dict[str, float]:
    """Device µs per kernel group in one eager decode step (forward + LM head + greedy sampling)."""
    rows = list(range(batch_size))
    device = runner.device

    def eager_step():
        batch = ForwardBatch.build(input_ids=torch.full((batch_size,), 7, device=device),
                                   out_slots=torch.arange(slot, slot + batch_size, device=device), rows=rows,
                                   prefix_lens=[seq_len - 1] * batch_size, extend_lens=[1] * batch_size,
                                   req_to_token=runner.req_to_token)
        runner.attention.prepare(batch)
        logits = runner.model.compute_logits(runner.model(batch, runner.attention))
        runner.sampler.sample(logits, rows)

    eager_step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        eager_step()
        torch.cuda.synchronize()
    groups: dict[str, float] = collections.defaultdict(float)
    for event in prof.key_averages():
        total = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0.0)
        if total <= 0 or event.key.startswith(("cuda", "Memcpy", "Memset")) or event.key.startswith("aten::"):
            continue
        name = event.key.lower()
        group = next((g for g, keys in KERNEL_GROUPS if any(k in name for k in keys)), "other")
        groups[group] += total
    return dict(groups)


def profile(runner: ModelRunner, batch_size: int, input_len: int, steps: int) -> dict:
    slot = prefill(runner, batch_size, input_len)
    seq_len = input_len + 1
    launch_s, step_s = [], []
    for step in range(1, steps + 1):
        plan = decode_plan(step, batch_size, seq_len, slot)
        begin = time.perf_counter()
        pending = runner.launch(plan)
        launched = time.perf_counter()
        runner.collect(pending)
        step_s.append(time.perf_counter() - begin)
        launch_s.append(launched - begin)
        slot += batch_size
        seq_len += 1
    rows = list(range(batch_size))
    row = {"batch": batch_size, "step_ms": statistics.median(step_s) * 1e3,
           "launch_host_us": statistics.median(launch_s) * 1e6}
    graph_runner = runner.graph_runner
    with torch.inference_mode():
        if graph_runner is not None and batch_size <= graph_runner.max_batch_size:
            args = ([7] * batch_size, list(range(slot, slot + batch_size)), rows, [seq_len] * batch_size)
            row["graph_ms"] = device_ms(lambda: graph_runner.replay(*args), 20)
            logits = graph_runner.replay(*args)
            row["sample_ms"] = device_ms(lambda: runner.sampler.sample(logits, rows), 20)
            row["device_idle_ms"] = row["step_ms"] - row["graph_ms"] - row["sample_ms"]
    row["matmul_floor_ms"] = matmul_floor_ms(runner, batch_size)
    row["kernels_us"] = kernel_breakdown(runner, batch_size, seq_len, slot)
    runner.step(decode_plan(steps + 1, batch_size, seq_len, slot, free=True))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--load-format", default="dummy")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=64)
    args = parser.parse_args()
    max_batch = max(args.batch_size)
    start = time.perf_counter()
    runner = ModelRunner(ModelRunnerConfig(model_path=args.model_path, load_format=args.load_format, dtype=args.dtype,
                                           device="cuda", max_running_requests=max_batch,
                                           max_total_tokens=max_batch * (args.input_len + args.steps + 8) + 64))
    print(f"runner ready in {time.perf_counter() - start:.1f} s (CUDA graph capture "
          f"{runner.graph_runner.capture_s if runner.graph_runner else 0:.2f} s), {torch.cuda.get_device_name()}")
    rows = [profile(runner, b, args.input_len, args.steps) for b in args.batch_size]
    print("| batch | step ms | launch host µs | graph ms | sample ms | device idle ms | matmul floor ms |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        nan = float("nan")
        print(f"| {r['batch']} | {r['step_ms']:.3f} | {r['launch_host_us']:.0f} | {r.get('graph_ms', nan):.3f} "
              f"| {r.get('sample_ms', nan):.3f} | {r.get('device_idle_ms', nan):.3f} "
              f"| {r['matmul_floor_ms']:.3f} |")
    groups = sorted({g for r in rows for g in r["kernels_us"]})
    print("\neager decode step, device µs per kernel group (torch.profiler)")
    print("| batch | " + " | ".join(groups) + " | total |")
    print("| ---: |" + " ---: |" * (len(groups) + 1))
    for r in rows:
        k = r["kernels_us"]
        print(f"| {r['batch']} | " + " | ".join(f"{k.get(g, 0):.0f}" for g in groups) + f" | {sum(k.values()):.0f} |")


if __name__ == "__main__":
    main()
