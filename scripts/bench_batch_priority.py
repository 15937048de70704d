"""Interactive latency beside batch work: does a large /v1/batches job slow interactive requests down?

Three runs of the same interactive probe (streamed chat completions, one after another, each timed for its first
token and its end), on one server:
  alone         nothing else runs;
  batch         a /v1/batches job of --batch-requests chat requests runs (priority below interactive requests);
  same-prio     the same load sent as concurrent interactive /v1/chat/completions requests (no priority: what a
                batch would cost without the scheduler's priorities).
Prints a table. Starts its own server (`python -m runtime` with --server-args, a fresh --storage-dir) unless
--base-url is given. CPU example (a few minutes):

    python scripts/bench_batch_priority.py --server-args "--max-running-requests 8" --probes 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import aiohttp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(server_args: str, storage: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = open(os.path.join(storage, "server.log"), "w")
    proc = subprocess.Popen([sys.executable, "-m", "runtime", "--port", str(port), "--storage-dir", storage,
                             *shlex.split(server_args)], stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        with open(log.name) as f:
            if "Ready: serving" in f.read():
                return proc, f"http://127.0.0.1:{port}"
        if proc.poll() is not None:
            sys.exit(f"the server exited; see {log.name}")
        time.sleep(0.5)
    proc.kill()
    sys.exit(f"the server did not start; see {log.name}")


def chat_body(content: str, max_tokens: int, stream: bool) -> dict:
    return {"model": "default", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": stream}


async def probe(session: aiohttp.ClientSession, url: str, max_tokens: int) -> tuple[float, float]:
    """(time to first token, end-to-end) of one streamed interactive request, in seconds."""
    start = time.perf_counter()
    first = None
    async with session.post(url + "/v1/chat/completions",
                            json=chat_body("Name three rivers.", max_tokens, True)) as response:
        response.raise_for_status()
        async for line in response.content:
            if first is None and line.startswith(b"data: {") and b'"content":"' in line:
                first = time.perf_counter() - start
    return first if first is not None else float("nan"), time.perf_counter() - start


async def probes(session, url: str, count: int, max_tokens: int) -> list[tuple[float, float]]:
    return [await probe(session, url, max_tokens) for _ in range(count)]


async def submit_batch(session, url: str, requests: int, max_tokens: int) -> str:
    lines = "\n".join(json.dumps({"custom_id": f"b{i}", "method": "POST", "url": "/v1/chat/completions",
                                  "body": chat_body(f"Write story number {i}.", max_tokens, False)})
                      for i in range(requests))
    form = aiohttp.FormData()
    form.add_field("purpose", "batch")
    form.add_field("file", lines.encode(), filename="bench.jsonl")
    async with session.post(url + "/v1/files", data=form) as response:
        file_id = (await response.json())["id"]
    async with session.post(url + "/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                                                       "completion_window": "24h"}) as response:
        return (await response.json())["id"]


async def batch_counts(session, url: str, batch_id: str) -> dict:
    async with session.get(f"{url}/v1/batches/{batch_id}") as response:
        return (await response.json())["request_counts"]


async def run(args) -> list[dict]:
    rows = Table()
    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        await probe(session, args.base_url, 2)  # warm-up
        rows.append(summarize("alone", await probes(session, args.base_url, args.probes, args.probe_tokens), None))

        batch_id = await submit_batch(session, args.base_url, args.batch_requests, args.batch_tokens)
        while (await batch_counts(session, args.base_url, batch_id))["completed"] == 0:
            await asyncio.sleep(0.2)  # the batch is running at full speed
        before = await batch_counts(session, args.base_url, batch_id)
        started = time.perf_counter()
        samples = await probes(session, args.base_url, args.probes, args.probe_tokens)
        after = await batch_counts(session, args.base_url, batch_id)
        rate = (after["completed"] - before["completed"]) / (time.perf_counter() - started)
        rows.append(summarize("batch", samples, rate))
        async with session.post(f"{args.base_url}/v1/batches/{batch_id}/cancel"):
            pass

        done = 0

        async def background(i: int) -> None:
            nonlocal done
            async with session.post(args.base_url + "/v1/chat/completions",
                                    json=chat_body(f"Write story number {i}.", args.batch_tokens, False)) as r:
                await r.read()
            done += 1

        load = [asyncio.create_task(background(i)) for i in range(args.batch_requests)]
        while done == 0:
            await asyncio.sleep(0.2)
        before, started = done, time.perf_counter()
        samples = await probes(session, args.base_url, args.probes, args.probe_tokens)
        rows.append(summarize("same-prio", samples, (done - before) / (time.perf_counter() - started)))
        for task in load:
            task.cancel()
        await asyncio.gather(*load, return_exceptions=True)
    return rows


class Table(list):
    """The rows, each printed as soon as it is measured (a slow machine still shows the first ones)."""

    def __init__(self):
        super().__init__()
        print(f"{'run':<10} {'TTFT p50 ms':>12} {'TTFT p90 ms':>12} {'e2e p50 ms':>11} {'e2e p90 ms':>11} "
              f"{'background req/s':>17}", flush=True)

    def append(self, row: dict) -> None:
        super().append(row)
        rate = "-" if row["background_req_per_s"] is None else f"{row['background_req_per_s']:.2f}"
        print(f"{row['run']:<10} {row['ttft_p50_ms']:>12.1f} {row['ttft_p90_ms']:>12.1f} {row['e2e_p50_ms']:>11.1f} "
              f"{row['e2e_p90_ms']:>11.1f} {rate:>17}", flush=True)


def summarize(name: str, samples: list[tuple[float, float]], background_rate: float | None) -> dict:
    ttft = sorted(s[0] for s in samples)
    e2e = sorted(s[1] for s in samples)

    def p90(values):
        return values[min(len(values) - 1, int(0.9 * len(values)))]

    return {"run": name, "ttft_p50_ms": 1e3 * statistics.median(ttft), "ttft_p90_ms": 1e3 * p90(ttft),
            "e2e_p50_ms": 1e3 * statistics.median(e2e), "e2e_p90_ms": 1e3 * p90(e2e),
            "background_req_per_s": background_rate}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", help="a running server (default: start one)")
    parser.add_argument("--server-args", default="", help="flags for the server this script starts")
    parser.add_argument("--probes", type=int, default=8, help="interactive requests per run")
    parser.add_argument("--probe-tokens", type=int, default=16)
    parser.add_argument("--batch-requests", type=int, default=200)
    parser.add_argument("--batch-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # stop the server this script started
    proc = None
    with tempfile.TemporaryDirectory() as storage:
        if args.base_url is None:
            proc, args.base_url = start_server(args.server_args, storage)
        try:
            rows = asyncio.run(run(args))
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(60)
    return rows


if __name__ == "__main__":
    main()
