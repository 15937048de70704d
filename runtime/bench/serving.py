"""Online serving benchmark against a running server (SGLang's bench_serving protocol and flags).

    python -m runtime.bench.serving --backend sglang --dataset-name random --num-prompts 200 \
        --random-input-len 1024 --random-output-len 256 --random-range-ratio 1.0 --request-rate inf

Backends: `sglang` (native /generate) and `openai` (/v1/completions). `--json-schema` constrains every
request to a JSON schema (sampling_params.json_schema, or response_format). Datasets: `random` (prompts of
random token ids decoded to text), `generated-shared-prefix` (groups of prompts sharing a long system
prompt), and `sharegpt` (a ShareGPT-format JSON file given with --dataset-path; nothing is downloaded).
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
    itl: list[float] = field(default_factory=list)
    start: float = 0.0
    error: str = ""


# ------------------------------------------------------------------------------------------------
# Datasets
# ------------------------------------------------------------------------------------------------


def random_token_prompt(tokenizer, length: int, rng: random.Random) -> str:
    special = set(tokenizer.all_special_ids)
    vocab = [i for i in range(min(tokenizer.vocab_size, 100_000)) if i not in special]
    ids = [vocab[rng.randrange(len(vocab))] for _ in range(length)]
    return tokenizer.decode(ids)


def sample_random(tokenizer, args, rng: random.Random) -> list[BenchRequest]:
    def length(full: int) -> int:
        return max(1, rng.randint(int(full * args.random_range_ratio), full))

    requests = []
    for _ in range(args.num_prompts):
        in_len, out_len = length(args.random_input_len), length(args.random_output_len)
        requests.append(BenchRequest(random_token_prompt(tokenizer, in_len, rng), in_len, out_len))
    return requests


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


DATASETS = {"random": sample_random, "generated-shared-prefix": sample_shared_prefix, "sharegpt": sample_sharegpt}


# ------------------------------------------------------------------------------------------------
# Backends: one streaming request each
# ------------------------------------------------------------------------------------------------


def request_body(backend: str, req: BenchRequest, args) -> tuple[str, dict]:
    if backend == "sglang":
        sampling = {"max_new_tokens": req.output_len, "temperature": 0.0, "ignore_eos": True}
        if args.json_schema:
            sampling["json_schema"] = args.json_schema
        return "/generate", {"text": req.prompt, "sampling_params": sampling, "stream": not args.disable_stream}
    body = {
        "model": args.model or "default",
        "prompt": req.prompt,
        "max_tokens": req.output_len,
        "temperature": 0.0,
        "ignore_eos": True,
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
                if out.ttft == 0.0:
                    out.ttft = now - out.start
                else:
                    out.itl.append(now - last)
                last = now
                out.output_len = completion_tokens(backend, chunk, out.output_len)
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


async def run_benchmark(base_url: str, backend: str, requests: list[BenchRequest], args) -> tuple[list, float]:
    import aiohttp
    from tqdm import tqdm

    limit = asyncio.Semaphore(args.max_concurrency or len(requests) or 1)
    bar = tqdm(total=len(requests), disable=args.disable_tqdm)
    timeout = aiohttp.ClientTimeout(total=6 * 3600)
    connector = aiohttp.TCPConnector(limit=0)

    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
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


def summarize(outcomes: list[RequestOutcome], duration: float, args) -> dict:
    done = [o for o in outcomes if o.ok]
    ms = lambda xs, fn: float(fn(xs)) * 1000 if len(xs) else 0.0  # noqa: E731
    ttft = [o.ttft for o in done]
    tpot = [(o.latency - o.ttft) / (o.output_len - 1) for o in done if o.output_len > 1]
    itl = [x for o in done for x in o.itl]
    e2e = [o.latency for o in done]
    total_in = sum(o.prompt_len for o in done)
    total_out = sum(o.output_len for o in done)
    result = {
        "backend": args.backend,
        "request_rate": args.request_rate,
        "max_concurrency": args.max_concurrency,
        "completed": len(done),
        "failed": len(outcomes) - len(done),
        "duration_s": duration,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(done) / duration if duration else 0.0,
        "input_throughput": total_in / duration if duration else 0.0,
        "output_throughput": total_out / duration if duration else 0.0,
        "concurrency": sum(e2e) / duration if duration else 0.0,
    }
    for name, xs in (("ttft", ttft), ("tpot", tpot), ("itl", itl), ("e2e_latency", e2e)):
        result[f"mean_{name}_ms"] = ms(xs, np.mean)
        result[f"median_{name}_ms"] = ms(xs, np.median)
        result[f"p99_{name}_ms"] = ms(xs, lambda v: np.percentile(v, 99))
    errors = sorted({o.error for o in outcomes if not o.ok})
    if errors:
        result["errors"] = errors[:5]
    return result


def print_report(result: dict) -> None:
    rows = [
        ("Backend", result["backend"]),
        ("Traffic request rate", result["request_rate"]),
        ("Max request concurrency", result["max_concurrency"] or "not set"),
        ("Successful requests", result["completed"]),
        ("Failed requests", result["failed"]),
        ("Benchmark duration (s)", f"{result['duration_s']:.2f}"),
        ("Total input tokens", result["total_input_tokens"]),
        ("Total generated tokens", result["total_output_tokens"]),
        ("Request throughput (req/s)", f"{result['request_throughput']:.2f}"),
        ("Input token throughput (tok/s)", f"{result['input_throughput']:.2f}"),
        ("Output token throughput (tok/s)", f"{result['output_throughput']:.2f}"),
        ("Concurrency", f"{result['concurrency']:.2f}"),
    ]
    print(f"{' Serving Benchmark Result ':=^60}")
    for label, value in rows:
        print(f"{label:<40}{value!s:>20}")
    for title, key in (("Time to First Token", "ttft"), ("Time per Output Token (excl. 1st token)", "tpot"),
                       ("Inter-Token Latency", "itl"), ("End-to-End Latency", "e2e_latency")):
        print(f"{' ' + title + ' ':-^60}")
        for stat in ("mean", "median", "p99"):
            print(f"{stat.capitalize() + ' ' + key.upper() + ' (ms)':<40}{result[f'{stat}_{key}_ms']:>20.2f}")
    if result.get("errors"):
        print("Errors (first distinct ones):", *result["errors"], sep="\n  ")
    print("=" * 60)


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
    p.add_argument("--max-concurrency", type=int, default=None)
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
    args = parse_args(argv)
    base_url = (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")
    tokenizer = load_tokenizer(args, base_url)
    requests = DATASETS[args.dataset_name](tokenizer, args, random.Random(args.seed))
    if not requests:
        raise SystemExit("the dataset produced no requests")
    outcomes, duration = asyncio.run(run_benchmark(base_url, args.backend, requests, args))
    result = summarize(outcomes, duration, args)
    print_report(result)
    if args.output_file:
        with open(args.output_file, "a") as f:
            f.write(json.dumps(result) + "\n")
    if args.plot:
        plot(outcomes, args.plot)
    return result


if __name__ == "__main__":
    result = main(sys.argv[1:])
    sys.exit(0 if result["completed"] else 1)
