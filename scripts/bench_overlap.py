"""Overlap benchmark: the same workload served with and without the overlap schedule, in one run.

The real actors run as in production: a worker process (ModelRunner) and a scheduler process,
started by the Supervisor and talking over shared-memory rings; this script plays the ingress
(sends GenerateRequests) and the detokenizer (reads TokenUpdates). For each mode it reports output
throughput, mean time per output token, and the fraction of the run the worker sat idle waiting
for a plan (1 - its summed step time / the run's wall time; the scheduler accumulates the step
times the worker reports and returns them in its server info). Greedy outputs of the two modes
must be identical: the script exits 1 if they are not.

    python scripts/bench_overlap.py                       # SmolLM2 on the CPU (or the GPU, if any)
    python scripts/bench_overlap.py --num-prompts 64 --input-len 256 --output-len 128 --output bench.json
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from actors.spec import ActorSpec  # noqa: E402
from actors.supervisor import Supervisor  # noqa: E402
from runtime.messages import GenerateRequest, SamplingParams, ServerInfoReply, ServerInfoRequest, TokenUpdates  # noqa: E402
from runtime.scheduler.actor import TO_DETOKENIZER, TO_INGRESS, TO_WORKERS, SchedulerActorConfig  # noqa: E402
from runtime.server_args import ServerArgs  # noqa: E402
from runtime.worker.actor import TO_SCHEDULER, WorkerActorConfig, decode_model_info  # noqa: E402

RING_BYTES = 8 << 20


@dataclass
class ModeResult:
    mode: str
    requests: int
    output_tokens: int
    duration_s: float
    output_throughput: float  # tokens/s
    mean_tpot_ms: float  # per request: (last token - first token) / (tokens - 1), averaged
    mean_ttft_ms: float
    worker_idle_fraction: float
    batches: int


def start_actors(sup: Supervisor, args: ServerArgs):
    """Worker rank 0 and the scheduler; returns the ingress-side and detokenizer-side channels."""
    msg = "runtime.messages:"
    to_sched = sup.channel("to_sched", msg + "IngressToScheduler", RING_BYTES)
    results = sup.channel(TO_SCHEDULER, msg + "WorkerToScheduler", RING_BYTES)
    plans = sup.channel(TO_WORKERS, msg + "SchedulerToWorker", RING_BYTES, n_readers=1)
    to_detok = sup.channel(TO_DETOKENIZER, msg + "SchedulerToDetokenizer", RING_BYTES)
    to_ingress = sup.channel(TO_INGRESS, msg + "SchedulerToIngress", RING_BYTES)
    worker = ActorSpec("worker0", "runtime.worker:WorkerActor",
                       config=msgspec.Raw(msgspec.json.encode(WorkerActorConfig(args=args, tp_rank=0))),
                       inbound=[plans], outbound=[results], log_level="warning")
    info = decode_model_info(sup.start(worker))
    scheduler = ActorSpec("scheduler", "runtime.scheduler:SchedulerActor",
                          config=msgspec.Raw(msgspec.json.encode(SchedulerActorConfig(args=args, model_info=info))),
                          inbound=[to_sched, results], outbound=[plans, to_detok, to_ingress], log_level="warning")
    sup.start(scheduler)
    return (sup.connect(to_sched, writer=True), sup.connect(to_detok), sup.connect(to_ingress), info)


def server_info(to_sched, from_sched, token: int) -> dict:
    to_sched.put(ServerInfoRequest(token=token))
    while True:
        reply = from_sched.get(timeout=60)
        if isinstance(reply, ServerInfoReply) and reply.token == token:
            return {k: msgspec.msgpack.decode(v) for k, v in reply.info.items()}
        if reply is None:
            raise TimeoutError("no server info reply from the scheduler")


def run_mode(base: ServerArgs, overlap: bool, prompts: list[list[int]], output_len: int,
             timeout_s: float) -> tuple[ModeResult, dict[str, list[int]]]:
    args = msgspec.structs.replace(base, disable_overlap_schedule=not overlap)
    sup = Supervisor(ready_timeout=args.ready_timeout)
    channels = []
    try:
        to_sched, from_detok, from_sched, info = start_actors(sup, args)
        channels = [to_sched, from_detok, from_sched]
        # Warm-up (first-step allocations, lazy initialisation): not measured.
        sampling = SamplingParams(temperature=0.0, max_new_tokens=output_len, ignore_eos=True)
        to_sched.put(GenerateRequest(rid="warmup", input_ids=prompts[0], sampling=sampling))
        collect(from_detok, {"warmup"}, timeout_s)
        before = server_info(to_sched, from_sched, 1)

        start = time.perf_counter()
        for i, prompt in enumerate(prompts):
            to_sched.put(GenerateRequest(rid=f"r{i}", input_ids=prompt, sampling=sampling, stream=True))
        tokens, first_at, last_at = collect(from_detok, {f"r{i}" for i in range(len(prompts))}, timeout_s, start)
        duration = max(last_at.values()) - start
        after = server_info(to_sched, from_sched, 2)
    finally:
        for channel in channels:
            channel.close()
        sup.stop(grace_s=2.0)

    busy_s = (after["forward_ms_total"] - before["forward_ms_total"]) / 1e3
    total = sum(len(t) for t in tokens.values())
    tpots = [(last_at[r] - first_at[r]) / (len(t) - 1) for r, t in tokens.items() if len(t) > 1]
    result = ModeResult(
        mode="overlap" if overlap else "no overlap", requests=len(prompts), output_tokens=total,
        duration_s=duration, output_throughput=total / duration,
        mean_tpot_ms=1e3 * statistics.mean(tpots) if tpots else float("nan"),
        mean_ttft_ms=1e3 * statistics.mean(first_at[r] - start for r in tokens),
        worker_idle_fraction=max(0.0, 1.0 - busy_s / duration), batches=after["batches"] - before["batches"])
    return result, tokens


def collect(from_detok, rids: set[str], timeout_s: float, start: float = 0.0):
    tokens = {rid: [] for rid in rids}
    first_at, last_at = {}, {}
    deadline = time.monotonic() + timeout_s
    while len(last_at) < len(rids):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(rids) - len(last_at)} requests did not finish in {timeout_s} s")
        msg = from_detok.get(timeout=1.0)
        if not isinstance(msg, TokenUpdates):
            continue
        now = time.perf_counter()
        for u in msg.updates:
            if u.rid not in tokens:
                continue
            if u.new_token_ids and u.rid not in first_at:
                first_at[u.rid] = now
            tokens[u.rid].extend(u.new_token_ids)
            if u.finish is not None:
                last_at[u.rid] = now
    return tokens, first_at, last_at


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-path", default=None, help="default: SmolLM2-135M-Instruct (GGUF)")
    parser.add_argument("--load-format", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--max-running-requests", type=int, default=16)
    parser.add_argument("--max-total-tokens", type=int, default=None)
    parser.add_argument("--vocab-limit", type=int, default=1000, help="prompt token ids are drawn below this")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=1,
                        help="alternate the modes this many times; each mode's median-duration round is reported")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    opts = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    total = opts.max_total_tokens or max(4096, opts.num_prompts * (opts.input_len + opts.output_len + 8))
    base = ServerArgs(model_path=opts.model_path, load_format=opts.load_format, device=opts.device, dtype=opts.dtype,
                      max_running_requests=opts.max_running_requests, max_total_tokens=total,
                      skip_tokenizer_init=True, random_seed=opts.seed)
    rng = random.Random(opts.seed)
    prompts = [[rng.randrange(1, opts.vocab_limit) for _ in range(opts.input_len)] for _ in range(opts.num_prompts)]

    rounds: dict[bool, list[ModeResult]] = {False: [], True: []}
    outputs: dict[bool, dict] = {}
    identical = True
    for _ in range(opts.rounds):
        for overlap in (False, True):
            result, tokens = run_mode(base, overlap, prompts, opts.output_len, opts.timeout)
            rounds[overlap].append(result)
            identical &= outputs.setdefault(overlap, tokens) == tokens
    results = [sorted(rounds[o], key=lambda r: r.duration_s)[len(rounds[o]) // 2] for o in (False, True)]

    header = ("mode", "reqs", "out tok", "time s", "out tok/s", "TPOT ms", "TTFT ms", "worker idle", "batches")
    rows = [(r.mode, r.requests, r.output_tokens, f"{r.duration_s:.2f}", f"{r.output_throughput:.1f}",
             f"{r.mean_tpot_ms:.1f}", f"{r.mean_ttft_ms:.1f}", f"{100 * r.worker_idle_fraction:.1f}%", r.batches)
            for r in results]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for row in (header, *rows):
        print("  ".join(str(x).rjust(w) for x, w in zip(row, widths)))
    identical &= outputs[False] == outputs[True]
    print(f"greedy outputs identical with and without overlap: {identical}")
    if opts.output:
        Path(opts.output).write_text(json.dumps({
            "config": vars(opts), "results": [asdict(r) for r in results], "identical": identical,
            "rounds": {("overlap" if o else "no overlap"): [asdict(r) for r in rs] for o, rs in rounds.items()}},
            indent=2))
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
