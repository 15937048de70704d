"""Online serving benchmark against a running server (SGLang's bench_serving protocol, flags and report).

    python -m runtime.bench.serving --backend sglang --dataset-name random --num-prompts 200 \
        --random-input-len 1024 --random-output-len 256 --random-range-ratio 1.0 --request-rate inf

Backends: `sglang` (native /generate) and `openai` (/v1/completions). Datasets: `random` and `random-ids` (SGLang's
lengths: with the same --seed the same input and output lengths as SGLang's bench_serving, see sample_random),
`generated-shared-prefix` (groups of prompts sharing a long system prompt), and `sharegpt` (a ShareGPT-format JSON
file given with --dataset-path; nothing is downloaded). `--max-concurrency 1 8 64` runs one benchmark per value and
ends with a table of them. `--json-schema` constrains every request to a JSON schema (sampling_params.json_schema,
or response_format).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import dataclass, field

import numpy as np


@dataclass
class BenchRequest:
    prompt: str
    prompt_len: int
    output_len: int


@dataclass
class RequestOutcome:
    ok: bool = False
    prompt_len: int = 0
    output_len: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)  # one entry per token after the first (SGLang's)
    start: float = 0.0
    generated_text: str = ""
    error: str = ""
    # per chunk, with a server started with --enable-token-timestamps: when the scheduler, the detokenizer and
    # the ingress handled its tokens, and when this client read it (all CLOCK_MONOTONIC)
    stamps: list[tuple[float, float, float, float]] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------
# Datasets
# ------------------------------------------------------------------------------------------------


def random_token_prompt(tokenizer, length: int, rng: random.Random) -> str:
    special = set(tokenizer.all_special_ids)
    vocab = [i for i in range(min(tokenizer.vocab_size, 100_000)) if i not in special]
    ids = [vocab[rng.randrange(len(vocab))] for _ in range(length)]
    return tokenizer.decode(ids)


def random_lengths(args) -> tuple[np.ndarray, np.ndarray, np.random.RandomState]:
    """SGLang's draw, in its order from numpy's legacy generator seeded with --seed: input lengths uniform in
    [max(int(input_len * ratio), 1), input_len], output lengths in [int(output_len * ratio), output_len] (an output
    length may be 0 at ratio 0, as in SGLang). Also returns the generator, for what SGLang draws next."""
    rng = np.random.RandomState(args.seed)
    input_lens = rng.randint(max(int(args.random_input_len * args.random_range_ratio), 1), args.random_input_len + 1,
                             size=args.num_prompts)
    output_lens = rng.randint(int(args.random_output_len * args.random_range_ratio), args.random_output_len + 1,
                              size=args.num_prompts)
    return input_lens, output_lens, rng


def sample_random(tokenizer, args, rng: random.Random) -> list[BenchRequest]:
    """SGLang's `random`: lengths from random_lengths; the text is ShareGPT prompts (--dataset-path) repeated or cut
    to each input length. Without a ShareGPT file (SGLang would download one; nothing is downloaded here) the text
    is `random-ids`'. prompt_len is the drawn length, as SGLang reports it."""
    if not args.dataset_path:
        return sample_random_ids(tokenizer, args, rng)
    input_lens, output_lens, _ = random_lengths(args)
    with open(args.dataset_path) as f:
        data = json.load(f)
    prompts = [d["conversations"][0]["value"] for d in data if len(d.get("conversations", [])) >= 2]
    rng.shuffle(prompts)
    requests = []
    for prompt in prompts:
        if len(requests) == args.num_prompts:
            break
        ids = tokenizer.encode(prompt)
        if not ids:
            continue
        n = int(input_lens[len(requests)])
        ids = (ids * -(-n // len(ids)))[:n]
        requests.append(BenchRequest(tokenizer.decode(ids), n, int(output_lens[len(requests)])))
    return requests


def sample_random_ids(tokenizer, args, rng: random.Random) -> list[BenchRequest]:
    """SGLang's `random-ids`: request i is the ids offset_i + i + j (mod the vocabulary), j < its input length,
    decoded to text; offsets drawn after the lengths."""
    input_lens, output_lens, np_rng = random_lengths(args)
    vocab = tokenizer.vocab_size
    offsets = np_rng.randint(0, vocab, size=args.num_prompts)
    return [BenchRequest(tokenizer.decode([(int(offsets[i]) + i + j) % vocab for j in range(int(input_lens[i]))]),
                         int(input_lens[i]), int(output_lens[i])) for i in range(args.num_prompts)]


def sample_shared_prefix(tokenizer, args, rng: random.Random) -> list[BenchRequest]:
    requests = []
    for _ in range(args.gsp_num_groups):
        system = random_token_prompt(tokenizer, args.gsp_system_prompt_len, rng)
        for _ in range(args.gsp_prompts_per_group):
            question = random_token_prompt(tokenizer, args.gsp_question_len, rng)
            prompt = system + question
            requests.append(BenchRequest(prompt, len(tokenizer.encode(prompt)), args.gsp_output_len))
    rng.shuffle(requests)
    return requests[: args.num_prompts] if args.num_prompts else requests


def sample_sharegpt(tokenizer, args, rng: random.Random) -> list[BenchRequest]:
    if not args.dataset_path:
        raise SystemExit("--dataset-name sharegpt needs --dataset-path FILE (a ShareGPT-format JSON file)")
    with open(args.dataset_path) as f:
        data = json.load(f)
    pairs = [(d["conversations"][0]["value"], d["conversations"][1]["value"])
             for d in data if len(d.get("conversations", [])) >= 2]
    rng.shuffle(pairs)
    requests = []
    for prompt, completion in pairs:
        prompt_len = len(tokenizer.encode(prompt))
        output_len = args.sharegpt_output_len or len(tokenizer.encode(completion))
        if prompt_len < 4 or output_len < 4 or prompt_len > 1024 or prompt_len + output_len > 2048:
            continue  # the same pruning rule as SGLang and vLLM use for ShareGPT
        requests.append(BenchRequest(prompt, prompt_len, output_len))
        if len(requests) == args.num_prompts:
            break
    return requests


DATASETS = {"random": sample_random, "random-ids": sample_random_ids, "generated-shared-prefix": sample_shared_prefix,
            "sharegpt": sample_sharegpt}


# ------------------------------------------------------------------------------------------------
# Backends: one streaming request each
# ------------------------------------------------------------------------------------------------


def request_body(backend: str, req: BenchRequest, args) -> tuple[str, dict]:
    ignore_eos = not args.disable_ignore_eos
    if backend == "sglang":
        sampling = {"max_new_tokens": req.output_len, "temperature": 0.0, "ignore_eos": ignore_eos}
        if args.json_schema:
            sampling["json_schema"] = args.json_schema
        return "/generate", {"text": req.prompt, "sampling_params": sampling, "stream": not args.disable_stream}
    body = {
        "model": args.model or "default",
        "prompt": req.prompt,
        "max_tokens": req.output_len,
        "temperature": 0.0,
        "ignore_eos": ignore_eos,
        "stream": not args.disable_stream,
    }
    if args.json_schema:
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "bench", "schema": json.loads(args.json_schema)}}
    return "/v1/completions", body


async def send_one(session, base_url: str, backend: str, req: BenchRequest, args) -> RequestOutcome:
    path, body = request_body(backend, req, args)
    out = RequestOutcome(prompt_len=req.prompt_len, start=time.perf_counter())
    last = out.start
    try:
        async with session.post(base_url + path, json=body) as resp:
            if resp.status != 200:
                out.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return out
            if args.disable_stream:
                payload = await resp.json()
                out.ttft = out.latency = time.perf_counter() - out.start
                out.output_len = completion_tokens(backend, payload, req.output_len)
                out.generated_text = payload.get("text", "") if backend == "sglang" else payload["choices"][0]["text"]
                out.ok = True
                return out
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    out.error = str(chunk["error"])
                    return out
                now = time.perf_counter()
                before = out.output_len
                out.output_len = completion_tokens(backend, chunk, out.output_len)
                if backend == "sglang":
                    out.generated_text = chunk.get("text", out.generated_text)  # the text so far
                    server = chunk.get("meta_info", {}).get("timestamps")
                    if server:
                        out.stamps.append((server["scheduler"], server["detokenizer"], server["ingress"], now))
                elif chunk.get("choices"):
                    out.generated_text += chunk["choices"][0].get("text", "")
                if out.ttft == 0.0:
                    out.ttft = now - out.start
                else:
                    # SGLang's: a chunk that brings n tokens counts as n gaps of (its gap / n)
                    new_tokens = max(out.output_len - before, 1) if backend == "sglang" else 1
                    out.itl.extend([(now - last) / new_tokens] * new_tokens)
                last = now
        out.latency = time.perf_counter() - out.start
        out.ok = out.ttft > 0
        if not out.ok:
            out.error = "the stream carried no tokens"
    except Exception as err:  # noqa: BLE001 - a benchmark records failures, it does not stop on them
        out.error = f"{type(err).__name__}: {err}"
    return out


def completion_tokens(backend: str, payload: dict, fallback: int) -> int:
    if backend == "sglang":
        return payload.get("meta_info", {}).get("completion_tokens", fallback)
    usage = payload.get("usage") or {}
    return usage.get("completion_tokens", fallback + 1 if payload.get("choices") else fallback)


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------


async def arrivals(requests: list[BenchRequest], rate: float, rng: np.random.Generator):
    for req in requests:
        yield req
        if rate != float("inf"):
            await asyncio.sleep(rng.exponential(1.0 / rate))


async def run_benchmark(base_url: str, backend: str, requests: list[BenchRequest], args,
                        max_concurrency: int | None = None) -> tuple[list, float]:
    import aiohttp
    from tqdm import tqdm

    limit = asyncio.Semaphore(max_concurrency or len(requests) or 1)
    bar = tqdm(total=len(requests), disable=args.disable_tqdm)
    timeout = aiohttp.ClientTimeout(total=6 * 3600)
    connector = aiohttp.TCPConnector(limit=0)

    # SGLang's client reads with a 10 MB buffer: under load a stream's chunks may pile up before it is read.
    async with aiohttp.ClientSession(timeout=timeout, connector=connector, read_bufsize=10 << 20) as session:
        if args.warmup_requests:  # the first request, at most 32 tokens out, before the clock starts
            first = requests[0]
            warm = BenchRequest(first.prompt, first.prompt_len, min(first.output_len, 32))
            warmups = await asyncio.gather(*[send_one(session, base_url, backend, warm, args)
                                             for _ in range(args.warmup_requests)])
            if not any(o.ok for o in warmups):
                raise SystemExit(f"warm-up failed: {warmups[0].error}")

        async def limited(req):
            async with limit:
                outcome = await send_one(session, base_url, backend, req, args)
            bar.update(1)
            return outcome

        start = time.perf_counter()
        tasks = [asyncio.create_task(limited(req))
                 async for req in arrivals(requests, args.request_rate, np.random.default_rng(args.seed))]
        outcomes = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    bar.close()
    return outcomes, duration


def summarize(outcomes: list[RequestOutcome], duration: float, args, max_concurrency: int | None = None,
              tokenizer=None) -> dict:
    done = [o for o in outcomes if o.ok]
    ms = lambda xs, fn: float(fn(xs)) * 1000 if len(xs) else 0.0  # noqa: E731
    ttft = [o.ttft for o in done]
    tpot = [(o.latency - o.ttft) / (o.output_len - 1) for o in done if o.output_len > 1]
    itl = [x for o in done for x in o.itl]
    e2e = [o.latency for o in done]
    total_in = sum(o.prompt_len for o in done)
    total_out = sum(o.output_len for o in done)
    retokenized = sum(len(tokenizer.encode(o.generated_text, add_special_tokens=False)) for o in done
                      if o.generated_text) if tokenizer is not None else total_out
    per_s = lambda n: n / duration if duration else 0.0  # noqa: E731
    result = {
        "backend": args.backend,
        "dataset_name": args.dataset_name,
        "request_rate": args.request_rate,
        "max_concurrency": max_concurrency,
        "random_input_len": args.random_input_len,
        "random_output_len": args.random_output_len,
        "random_range_ratio": args.random_range_ratio,
        "completed": len(done),
        "failed": len(outcomes) - len(done),
        "duration_s": duration,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "total_output_tokens_retokenized": retokenized,
        "request_throughput": per_s(len(done)),
        "input_throughput": per_s(total_in),
        "output_throughput": per_s(total_out),
        "total_throughput": per_s(total_in + total_out),
        "concurrency": per_s(sum(e2e)),
    }
    for name, xs in (("ttft", ttft), ("tpot", tpot), ("itl", itl), ("e2e_latency", e2e)):
        result[f"mean_{name}_ms"] = ms(xs, np.mean)
        result[f"median_{name}_ms"] = ms(xs, np.median)
        result[f"std_{name}_ms"] = ms(xs, np.std)
        result[f"p99_{name}_ms"] = ms(xs, lambda v: np.percentile(v, 99))
    result["p95_itl_ms"] = ms(itl, lambda v: np.percentile(v, 95))
    result["max_itl_ms"] = ms(itl, np.max)
    errors = sorted({o.error for o in outcomes if not o.ok})
    if errors:
        result["errors"] = errors[:5]
    gaps = token_gaps(done)
    if gaps:
        result["token_gaps"] = gaps
    return result


STAGES = ("scheduler", "detokenizer", "ingress", "client")


def token_gaps(outcomes: list[RequestOutcome]) -> dict | None:
    """Where inter-token gaps form: for consecutive chunks of one stream, the gap between them as each stage
    handled them (the scheduler's is the step time; a gap that shrinks to ~0 at a later stage is a burst made
    there), and the median lag from one stage to the next."""
    pairs = [(a, b) for o in outcomes for a, b in zip(o.stamps, o.stamps[1:])]
    if not pairs:
        return None
    out = {}
    for k, stage in enumerate(STAGES):
        gaps = np.array([b[k] - a[k] for a, b in pairs]) * 1000
        out[stage] = {"median_gap_ms": float(np.median(gaps)), "p99_gap_ms": float(np.percentile(gaps, 99)),
                      "under_1ms": float(np.mean(gaps < 1.0))}
    for k in range(1, len(STAGES)):
        lags = np.array([s[k] - s[k - 1] for o in outcomes for s in o.stamps]) * 1000
        out[STAGES[k]]["median_lag_ms"] = float(np.median(lags))
    return out


def print_token_gaps(gaps: dict) -> None:
    print("Where inter-token gaps form (server stamps, --enable-token-timestamps):")
    print("| stage | median gap ms | P99 gap ms | gaps under 1 ms | median lag after the previous stage ms |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for stage in STAGES:
        g = gaps[stage]
        lag = f"{g['median_lag_ms']:.3f}" if "median_lag_ms" in g else ""
        print(f"| {stage} | {g['median_gap_ms']:.2f} | {g['p99_gap_ms']:.2f} | {g['under_1ms']:.1%} | {lag} |")


def print_report(result: dict) -> None:
    """SGLang's summary block, line for line (its TPOT section too, which SGLang printed until 2025)."""
    def line(label: str, value, fmt: str = "") -> None:
        print("{:<40} {:<10}".format(label + ":", format(value, fmt)))

    def title(text: str, fill: str = "-") -> None:
        print("{s:{c}^{n}}".format(s=text, c=fill, n=50))

    print()
    title(" Serving Benchmark Result ", "=")
    line("Backend", result["backend"])
    line("Traffic request rate", result["request_rate"])
    line("Max request concurrency", result["max_concurrency"] if result["max_concurrency"] else "not set")
    line("Successful requests", result["completed"])
    line("Benchmark duration (s)", result["duration_s"], ".2f")
    line("Total input tokens", result["total_input_tokens"])
    line("Total generated tokens", result["total_output_tokens"])
    line("Total generated tokens (retokenized)", result["total_output_tokens_retokenized"])
    line("Request throughput (req/s)", result["request_throughput"], ".2f")
    line("Input token throughput (tok/s)", result["input_throughput"], ".2f")
    line("Output token throughput (tok/s)", result["output_throughput"], ".2f")
    line("Total token throughput (tok/s)", result["total_throughput"], ".2f")
    line("Concurrency", result["concurrency"], ".2f")
    title("End-to-End Latency")
    line("Mean E2E Latency (ms)", result["mean_e2e_latency_ms"], ".2f")
    line("Median E2E Latency (ms)", result["median_e2e_latency_ms"], ".2f")
    title("Time to First Token")
    line("Mean TTFT (ms)", result["mean_ttft_ms"], ".2f")
    line("Median TTFT (ms)", result["median_ttft_ms"], ".2f")
    line("P99 TTFT (ms)", result["p99_ttft_ms"], ".2f")
    title("Time per Output Token (excl. 1st token)")
    line("Mean TPOT (ms)", result["mean_tpot_ms"], ".2f")
    line("Median TPOT (ms)", result["median_tpot_ms"], ".2f")
    line("P99 TPOT (ms)", result["p99_tpot_ms"], ".2f")
    title("Inter-Token Latency")
    line("Mean ITL (ms)", result["mean_itl_ms"], ".2f")
    line("Median ITL (ms)", result["median_itl_ms"], ".2f")
    line("P95 ITL (ms)", result["p95_itl_ms"], ".2f")
    line("P99 ITL (ms)", result["p99_itl_ms"], ".2f")
    line("Max ITL (ms)", result["max_itl_ms"], ".2f")
    print("=" * 50)
    if result.get("token_gaps"):
        print_token_gaps(result["token_gaps"])
    if result["failed"]:
        print(f"Failed requests: {result['failed']}; first distinct errors:", *result.get("errors", []), sep="\n  ")


SWEEP_COLUMNS = (("max concurrency", "max_concurrency", ""), ("req/s", "request_throughput", ".2f"),
                 ("out tok/s", "output_throughput", ".1f"), ("median TTFT ms", "median_ttft_ms", ".1f"),
                 ("median TPOT ms", "median_tpot_ms", ".2f"), ("median ITL ms", "median_itl_ms", ".2f"),
                 ("P99 ITL ms", "p99_itl_ms", ".1f"), ("failed", "failed", ""))


def print_sweep(results: list[dict]) -> None:
    print("| " + " | ".join(name for name, _, _ in SWEEP_COLUMNS) + " |")
    print("|" + " ---: |" * len(SWEEP_COLUMNS))
    for r in results:
        print("| " + " | ".join(format(r[key] if r[key] is not None else "not set", fmt)
                                for _, key, fmt in SWEEP_COLUMNS) + " |")


def plot(outcomes: list[RequestOutcome], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install '.[bench]'") from None
    done = sorted((o for o in outcomes if o.ok), key=lambda o: o.start)
    if not done:
        return
    t0 = done[0].start
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot([o.start - t0 for o in done], [o.latency * 1000 for o in done], ".", label="end-to-end")
    ax.plot([o.start - t0 for o in done], [o.ttft * 1000 for o in done], ".", label="TTFT")
    ax.set_xlabel("request start (s)")
    ax.set_ylabel("latency (ms)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m runtime.bench.serving", description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="sglang", choices=["sglang", "sglang-native", "openai", "sglang-oai"])
    p.add_argument("--base-url", default=None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--model", default=None, help="model name for the OpenAI backend")
    p.add_argument("--tokenizer", default=None, help="tokenizer path (default: the server's tokenizer_path)")
    p.add_argument("--dataset-name", default="random", choices=sorted(DATASETS))
    p.add_argument("--dataset-path", default=None)
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--sharegpt-output-len", type=int, default=None)
    p.add_argument("--random-input-len", type=int, default=1024)
    p.add_argument("--random-output-len", type=int, default=1024)
    p.add_argument("--random-range-ratio", type=float, default=0.0)
    p.add_argument("--gsp-num-groups", type=int, default=8)
    p.add_argument("--gsp-prompts-per-group", type=int, default=16)
    p.add_argument("--gsp-system-prompt-len", type=int, default=512)
    p.add_argument("--gsp-question-len", type=int, default=64)
    p.add_argument("--gsp-output-len", type=int, default=64)
    p.add_argument("--request-rate", type=float, default=float("inf"))
    p.add_argument("--max-concurrency", type=int, nargs="+", default=None,
                   help="at most this many requests in flight; several values: one run each, then a table")
    p.add_argument("--warmup-requests", type=int, default=1, help="requests sent before the clock starts")
    p.add_argument("--disable-ignore-eos", action="store_true", help="let requests stop at EOS")
    p.add_argument("--disable-stream", action="store_true")
    p.add_argument("--disable-tqdm", action="store_true")
    p.add_argument("--output-file", default=None, help="append the result as one JSON line")
    p.add_argument("--plot", default=None, help="write a latency-over-time plot (PNG) to this file")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json-schema", default=None,
                   help="constrain every request's output to this JSON schema (JSON text, or @file to read it from)")
    args = p.parse_args(argv)
    args.backend = {"sglang-native": "sglang", "sglang-oai": "openai"}.get(args.backend, args.backend)
    if not 0.0 <= args.random_range_ratio <= 1.0:
        p.error("--random-range-ratio must be in [0, 1]")
    if args.json_schema and args.json_schema.startswith("@"):
        with open(args.json_schema[1:]) as f:
            args.json_schema = f.read()
    return args


def load_tokenizer(args, base_url: str):
    """--tokenizer, else the server's tokenizer (GET /get_model_info), loaded like the server does
    (runtime.tokenizer: HF folders, GGUF files with the conversion cache, the default model)."""
    import urllib.request

    from runtime.server_args import ServerArgs
    from runtime.tokenizer import load_tokenizer as load_server_tokenizer

    path = args.tokenizer
    if path is None:
        with urllib.request.urlopen(base_url + "/get_model_info", timeout=30) as resp:
            info = json.load(resp)
        path = info.get("tokenizer_path") or info.get("model_path")  # None: the server runs the default model
    return load_server_tokenizer(ServerArgs(tokenizer_path=path))


def main(argv=None) -> dict:
    """Runs the benchmark (once per --max-concurrency value); returns the last run's result."""
    args = parse_args(argv)
    base_url = (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")
    tokenizer = load_tokenizer(args, base_url)
    requests = DATASETS[args.dataset_name](tokenizer, args, random.Random(args.seed))
    if not requests:
        raise SystemExit("the dataset produced no requests")
    print(f"#Input tokens: {sum(r.prompt_len for r in requests)}")
    print(f"#Output tokens: {sum(r.output_len for r in requests)}")
    results = []
    for max_concurrency in args.max_concurrency or [None]:
        outcomes, duration = asyncio.run(run_benchmark(base_url, args.backend, requests, args, max_concurrency))
        result = summarize(outcomes, duration, args, max_concurrency, tokenizer)
        print_report(result)
        results.append(result)
        if args.output_file:
            with open(args.output_file, "a") as f:
                f.write(json.dumps(result) + "\n")
        if args.plot:
            plot(outcomes, args.plot)
    if len(results) > 1:
        print_sweep(results)
    return results[-1]


if __name__ == "__main__":
    result = main(sys.argv[1:])
    sys.exit(0 if result["completed"] else 1)
