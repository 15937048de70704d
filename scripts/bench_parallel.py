"""Multi-GPU measurements of issue 13 (needs 2 GPUs; nothing here runs on the CPU-only CI):

    python scripts/bench_parallel.py allreduce           # the collectives of one TP=2 decode step, eager and in a
                                                         # CUDA graph (also proves NCCL all-reduce captures)
    python scripts/bench_parallel.py tp                  # batch-1 decode tok/s, TP=1 vs TP=2 (target >= 1.6x)
    python scripts/bench_parallel.py dp                  # serving 1000 x 1024/1024, DP=1 vs DP=2 (target >= 1.9x)

Options: --model-path (default .models/llama-3-8b-dummy: Llama-3-8B's config and tokenizer, dummy weights),
--num-prompts (dp, default 1000), --decode-tokens (tp, default 256). Each mode prints one table; `tp` and `dp` start
`python -m runtime` servers (dummy weights) one after the other and drive them with runtime.bench.serving.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

READY_TIMEOUT_S = 900


# ------------------------------------------------------------------ collectives of one decode step


def allreduce_rank() -> None:
    """One rank (under torch.distributed.run): Llama-3-8B's decode-step collectives at TP=2: per layer the o_proj and
    down_proj all-reduces of [bs, 4096] bf16, the embedding all-reduce, and the LM head's all-gather of
    [bs, 128256 / 2] (bf16 logits slice) — as runtime/layers issue them (torch.distributed, NCCL)."""
    import torch
    import torch.distributed as dist

    from runtime.layers.parallel import TensorParallel

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    on_cuda = torch.cuda.is_available()  # the CPU (gloo, eager only, few repeats) only checks the script runs
    device = torch.device("cuda", rank) if on_cuda else torch.device("cpu")
    if on_cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if on_cuda else "gloo")
    tp = TensorParallel(rank, world)
    hidden, layers, vocab = 4096, 32, 128256
    repeats = 50 if on_cuda else 2
    rows = []
    for bs in (1, 8, 32, 128):
        x = torch.randn(bs, hidden, dtype=torch.bfloat16, device=device)
        logits = torch.randn(bs, vocab // world, dtype=torch.bfloat16, device=device)

        def step(x=x, logits=logits):
            for _ in range(2 * layers + 1):
                tp.all_reduce(x)
            return tp.all_gather_last_dim(logits)

        for _ in range(3):  # creates the communicator before any capture
            step()
        eager = time_steps(step, repeats, on_cuda)
        graphed = float("nan")
        if on_cuda:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
            graphed = time_steps(graph.replay, repeats, on_cuda)
        rows.append((bs, eager, graphed))
    if rank == 0:
        print(f"TP={world} decode-step collectives (65 all-reduces of [bs, {hidden}] bf16 + all-gather of logits), "
              f"{'NCCL' if on_cuda else 'gloo'}")
        print("| batch | eager µs/step | CUDA graph µs/step |\n| ---: | ---: | ---: |")
        for bs, eager, graphed in rows:
            print(f"| {bs} | {eager:.0f} | {graphed:.0f} |")
    dist.destroy_process_group()


def time_steps(fn, repeats: int, on_cuda: bool) -> float:
    """µs per call of fn: by CUDA events on the GPU, by the wall clock on the CPU."""
    import torch

    if not on_cuda:
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - start) * 1e6 / repeats
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / repeats


# ------------------------------------------------------------------ servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model_path: str, *flags: str, log_dir: Path):
        self.port = free_port()
        self.log_path = log_dir / f"server{'_'.join(flags).replace('-', '')}.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "runtime", "--model-path", model_path, "--load-format",
                                      "dummy", "--port", str(self.port), *flags], stdout=self.log,
                                     stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while "Ready: serving" not in self.log_path.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server {flags} did not start:\n{self.log_path.read_text()[-3000:]}")
            time.sleep(1)
        self.url = f"http://127.0.0.1:{self.port}"

    def info(self) -> dict:
        with urllib.request.urlopen(self.url + "/get_server_info", timeout=60) as response:
            return json.load(response)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def bench(server: Server, *flags: str) -> dict:
    from runtime.bench import serving

    return serving.main(["--base-url", server.url, "--random-range-ratio", "1.0", "--disable-tqdm", *flags])


def run_tp(args) -> None:
    rows = []
    for tp in (1, 2):
        server = Server(args.model_path, "--tp", str(tp), log_dir=args.log_dir)
        try:
            result = bench(server, "--num-prompts", "8", "--max-concurrency", "1", "--random-input-len", "128",
                           "--random-output-len", str(args.decode_tokens))
        finally:
            server.stop()
        rows.append((tp, 1000.0 / result["mean_tpot_ms"], result["mean_tpot_ms"], result["mean_ttft_ms"]))
    print("Batch-1 decode, Llama-3-8B (dummy weights), 128 prompt / "
          f"{args.decode_tokens} output tokens, 8 requests one at a time")
    print("| TP | decode tok/s | TPOT ms | TTFT ms | vs TP=1 |\n| ---: | ---: | ---: | ---: | ---: |")
    for tp, rate, tpot, ttft in rows:
        print(f"| {tp} | {rate:.1f} | {tpot:.2f} | {ttft:.1f} | {rate / rows[0][1]:.2f}x |")
    print(f"target: TP=2 >= 1.6x TP=1 -> {'met' if rows[1][1] >= 1.6 * rows[0][1] else 'NOT met'}")


def run_dp(args) -> None:
    rows = []
    for dp in (1, 2):
        server = Server(args.model_path, "--dp", str(dp), log_dir=args.log_dir)
        try:
            result = bench(server, "--num-prompts", str(args.num_prompts), "--random-input-len", "1024",
                           "--random-output-len", "1024")
            dispatched = [state.get("dispatched", state.get("batches")) for state in server.info()["internal_states"]]
        finally:
            server.stop()
        rows.append((dp, result["output_throughput"], result["request_throughput"], result["duration_s"],
                     result["failed"], dispatched))
    print(f"Serving {args.num_prompts} x 1024/1024 at request rate inf, Llama-3-8B (dummy weights)")
    print("| DP | output tok/s | req/s | duration s | failed | per replica | vs DP=1 |")
    print("| ---: | ---: | ---: | ---: | ---: | --- | ---: |")
    for dp, out, req, duration, failed, dispatched in rows:
        print(f"| {dp} | {out:.0f} | {req:.2f} | {duration:.1f} | {failed} | {dispatched} | {out / rows[0][1]:.2f}x |")
    print(f"target: DP=2 >= 1.9x DP=1 -> {'met' if rows[1][1] >= 1.9 * rows[0][1] else 'NOT met'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["allreduce", "tp", "dp", "_allreduce_rank"])
    parser.add_argument("--model-path", default=".models/llama-3-8b-dummy")
    parser.add_argument("--num-prompts", type=int, default=1000)
    parser.add_argument("--decode-tokens", type=int, default=256)
    parser.add_argument("--log-dir", type=Path, default=Path(os.environ.get("OUT", "/tmp")))
    args = parser.parse_args()
    if args.mode == "_allreduce_rank":
        allreduce_rank()
    elif args.mode == "allreduce":
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", __file__,
                        "_allreduce_rank"], cwd=ROOT, check=True)
    elif args.mode == "tp":
        run_tp(args)
    else:
        run_dp(args)


if __name__ == "__main__":
    main()
