"""Soak a running server with mixed, hostile traffic, then check it came back to where it started.

    python scripts/soak.py --url http://127.0.0.1:30000 --launcher-pid <pid> --requests 5000 --duration 600

Traffic (seeded, reproducible): native /generate and OpenAI completions (and chat, when the server
has a tokenizer), streamed and not, n of 1..4, stop strings and stop token ids, short and long
prompts, requests with a short server-side `timeout` (aborted by the server), invalid requests,
and clients that disconnect at a random point (before the answer, or in the middle of a stream).

Latency of a request refused by validation (`"n": -1`), sent every 100 ms on its own connection,
is reported idle (before the soak) and under the soak's load: it must not grow with the load (the
ingress refuses it before any work, and nothing else may hold its event loop).

Checks, each a line of the table printed at the end:
  - every request that was not cut off by its own client got exactly one final answer: a JSON
    body (200 or an error status), or a stream that ends with one `data: [DONE]` after every
    sequence finished once or after one error event; never a bare close or a malformed answer;
  - afterwards the engine is idle again, as the server reports it (/get_server_info): no request
    running or queued, every KV slot free or evictable, every request-table row free, no sequence
    left in the ingress;
  - each actor process (children of --launcher-pid) is back to its baseline of open file
    descriptors, and its resident memory is within --rss-slack of its baseline.

Bounded: at most --requests requests and --duration seconds; loopback addresses only (it is a
load generator: it refuses to aim at another machine). Exit status 0 when every check passed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
import urllib.parse
import urllib.request
from collections import Counter
from dataclasses import dataclass, field

import psutil

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class Outcome:
    kind: str  # "answered", "cut_by_client", "violation"
    status: int = 0
    detail: str = ""


@dataclass
class Totals:
    outcomes: Counter = field(default_factory=Counter)
    statuses: Counter = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    validation_s: list[float] = field(default_factory=list)  # latencies of refused requests during the soak


# ---------------------------------------------------------------------------------------------- HTTP


class ConnectionClosed(Exception):
    pass


async def read_response(reader: asyncio.StreamReader, on_chunk=None) -> tuple[int, dict, bytes]:
    """One HTTP/1.1 response: status, headers, body (chunked bodies are reassembled; on_chunk(bytes) sees
    each chunk as it arrives and may raise to stop reading)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        body = bytearray()
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return status, headers, bytes(body)
            chunk = await reader.readexactly(size + 2)
            body += chunk[:-2]
            if on_chunk is not None:
                on_chunk(bytes(body))
    length = int(headers.get("content-length", "0"))
    return status, headers, await reader.readexactly(length)


def request_bytes(host: str, path: str, body: dict, api_key: str | None) -> bytes:
    payload = json.dumps(body).encode()
    auth = f"Authorization: Bearer {api_key}\r\n" if api_key else ""
    return (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n{auth}"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n").encode() + payload


# ---------------------------------------------------------------------------------------------- traffic


@dataclass
class Plan:
    path: str
    body: dict
    stream: bool
    sequences: int
    cut_after_s: float | None  # the client disconnects after this long (None: it waits for the answer)
    cut_after_events: int | None  # ... or after this many stream events


def make_plan(rng: random.Random, with_tokenizer: bool, vocab: int) -> Plan:
    stream = rng.random() < 0.5
    n = rng.choice((1, 1, 1, 2, 4))
    max_tokens = rng.choice((1, 4, 16, 32, 64))
    long_prompt = rng.random() < 0.2
    ids = [rng.randrange(3, vocab) for _ in range(rng.randint(200, 400) if long_prompt else rng.randint(1, 24))]
    text = " ".join(rng.choice(("the", "capital", "of", "France", "is", "a", "city", "story")) for _ in ids)
    sampling = {"max_new_tokens": max_tokens, "temperature": rng.choice((0.0, 0.7)), "n": n}
    if rng.random() < 0.3:
        sampling["stop_token_ids"] = [rng.randrange(3, vocab)]
    if with_tokenizer and rng.random() < 0.3:
        sampling["stop"] = [rng.choice((".", " the", "\n"))]
    kind = rng.random()
    chat = with_tokenizer and kind >= 0.8
    if kind < 0.55:
        body = {"sampling_params": sampling, "stream": stream}
        if with_tokenizer and rng.random() < 0.5:
            body["text"] = text
        else:
            body["input_ids"] = ids
        path = "/generate"
    elif chat:
        body = {"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens, "n": n, "stream": stream}
        path = "/v1/chat/completions"
    else:
        body = {"prompt": ids, "max_tokens": max_tokens, "n": n, "stream": stream,
                "temperature": sampling["temperature"], **({"stop": sampling["stop"]} if "stop" in sampling else {})}
        path = "/v1/completions"
    roll = rng.random()
    if roll < 0.05:
        body["timeout"] = rng.choice((0.001, 0.05))  # the server aborts it: an answer (504, or done in time)
    elif roll < 0.08:
        body["temperature" if path != "/generate" else "sampling_params"] = -1  # invalid: a 400
    cut_after_s = cut_after_events = None
    cut = rng.random()
    if cut < 0.1:
        cut_after_s = rng.uniform(0.0, 0.05)
    elif cut < 0.2 and stream:
        cut_after_events = rng.randint(1, 4)
    return Plan(path, body, stream, n, cut_after_s, cut_after_events)


class _CutNow(Exception):
    pass


def judge_stream(body: bytes, sequences: int) -> str:
    """'' when the SSE body is one well-formed final answer, else what is wrong with it."""
    events = [e for e in body.decode(errors="replace").split("\n\n") if e]
    if not events or events[-1] != "data: [DONE]":
        return "the stream does not end with data: [DONE]"
    if sum(1 for e in events if e == "data: [DONE]") != 1:
        return "more than one [DONE]"
    payloads = []
    for event in events[:-1]:
        if not event.startswith("data: "):
            return f"not an SSE data line: {event[:80]!r}"
        payloads.append(json.loads(event[len("data: "):]))
    if any("error" in p for p in payloads):
        return "" if "error" in payloads[-1] else "events after an error event"
    finished: Counter = Counter()
    for p in payloads:
        if "choices" in p:
            for choice in p["choices"]:
                if choice.get("finish_reason") is not None:
                    finished[choice["index"]] += 1
        elif p.get("meta_info", {}).get("finish_reason") is not None:
            finished[p.get("index", 0)] += 1
    if sorted(finished) != list(range(sequences)) or any(c != 1 for c in finished.values()):
        return f"finishes per sequence {dict(finished)} for {sequences} sequences"
    return ""


async def run_one(host: str, port: int, plan: Plan, api_key: str | None) -> Outcome:
    reader, writer = await asyncio.open_connection(host, port)
    events_seen = 0

    def on_chunk(body: bytes) -> None:
        nonlocal events_seen
        events_seen = body.count(b"\n\n")
        if plan.cut_after_events is not None and events_seen >= plan.cut_after_events:
            raise _CutNow

    try:
        writer.write(request_bytes(host, plan.path, plan.body, api_key))
        await writer.drain()
        if plan.cut_after_s is not None:
            try:
                answer = await asyncio.wait_for(read_response(reader), plan.cut_after_s)
            except asyncio.TimeoutError:
                return Outcome("cut_by_client")
        else:
            try:
                answer = await read_response(reader, on_chunk if plan.stream else None)
            except _CutNow:
                return Outcome("cut_by_client")
        status, headers, body = answer
        content_type = headers.get("content-type", "")
        if status == 200 and content_type.startswith("text/event-stream"):
            problem = judge_stream(body, plan.sequences)
        else:
            try:
                decoded = json.loads(body)
                problem = "" if status == 200 or "error" in decoded else f"error status {status} without an error"
            except ValueError:
                problem = f"status {status} with a body that is not JSON: {body[:80]!r}"
        return Outcome("violation" if problem else "answered", status, problem)
    except (asyncio.IncompleteReadError, ConnectionResetError, BrokenPipeError) as err:
        return Outcome("violation", 0, f"no final answer: {type(err).__name__}")
    finally:
        writer.close()


# ---------------------------------------------------------------------------------------------- server state


def get_json(url: str, api_key: str | None) -> dict:
    request = urllib.request.Request(url)
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def engine_state(url: str, api_key: str | None) -> dict:
    info = get_json(url + "/get_server_info", api_key)
    state = info["internal_states"][0]
    return {"running": state["running"], "queued": state["queued"],
            "kv_not_free": state["max_total_tokens"] - state["free_slots"] - state["evictable_tokens"],
            "rows_in_use": state["max_running_requests"] - state["free_rows"],
            "scheduler_requests": state["unfinished_requests"],
            "ingress_sequences": state["ingress_unfinished_sequences"]}


def wait_idle(url: str, api_key: str | None, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        state = engine_state(url, api_key)
        if not any(state.values()) or time.monotonic() > deadline:
            return state
        time.sleep(0.2)


def children_usage(launcher_pid: int) -> dict[str, tuple[int, int]]:
    """(open descriptors, resident bytes) per actor process, by its title."""
    out = {}
    for child in psutil.Process(launcher_pid).children():
        with child.oneshot():
            out[child.cmdline()[0] if child.cmdline() else str(child.pid)] = (child.num_fds(), child.memory_info().rss)
    return out


# ---------------------------------------------------------------------------------------------- main


async def validation_latencies(host: str, port: int, api_key: str | None, stop: asyncio.Event) -> list[float]:
    """Seconds to get the 400 of an invalid request, one every 100 ms until `stop`."""
    out = []
    while not stop.is_set():
        started = time.perf_counter()
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(request_bytes(host, "/generate", {"input_ids": [3], "sampling_params": {"n": -1}}, api_key))
            status, _, _ = await read_response(reader)
            if status == 400:
                out.append(time.perf_counter() - started)
        finally:
            writer.close()
        try:
            await asyncio.wait_for(stop.wait(), 0.1)
        except asyncio.TimeoutError:
            pass
    return out


def percentiles_ms(values: list[float]) -> str:
    if not values:
        return "none"
    ordered = sorted(values)
    pick = lambda q: 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return f"p50 {pick(0.5):.1f} ms, p99 {pick(0.99):.1f} ms, max {1000 * ordered[-1]:.1f} ms ({len(values)} requests)"


async def idle_latencies(host: str, port: int, api_key: str | None, seconds: float) -> list[float]:
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(seconds, stop.set)
    return await validation_latencies(host, port, api_key, stop)


async def soak(host: str, port: int, args, with_tokenizer: bool, vocab: int, totals: Totals) -> None:
    stop = asyncio.Event()
    probe = asyncio.ensure_future(validation_latencies(host, port, args.api_key, stop))
    try:
        await _soak(host, port, args, with_tokenizer, vocab, totals)
    finally:
        stop.set()
        totals.validation_s = await probe


async def _soak(host: str, port: int, args, with_tokenizer: bool, vocab: int, totals: Totals) -> None:
    rng = random.Random(args.seed)
    deadline = time.monotonic() + args.duration
    queue: asyncio.Queue = asyncio.Queue()
    for _ in range(args.requests):
        queue.put_nowait(make_plan(rng, with_tokenizer, vocab))

    async def client() -> None:
        while time.monotonic() < deadline:
            try:
                plan = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            try:  # at the end of --duration the clients still waiting hang up (more disconnects, nothing else)
                outcome = await asyncio.wait_for(run_one(host, port, plan, args.api_key),
                                                 max(0.1, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                outcome = Outcome("cut_by_client")
            totals.outcomes[outcome.kind] += 1
            if outcome.status:
                totals.statuses[outcome.status] += 1
            if outcome.kind == "violation" and len(totals.violations) < 20:
                totals.violations.append(f"{plan.path} stream={plan.stream}: {outcome.detail}")

    await asyncio.gather(*(client() for _ in range(args.concurrency)))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:30000")
    parser.add_argument("--launcher-pid", type=int, default=None,
                        help="the server's launcher: its actors' descriptors and memory are checked")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--duration", type=float, default=600.0, help="stop sending after this many seconds")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--idle-timeout", type=float, default=60.0, help="how long the engine may take to go idle")
    parser.add_argument("--rss-slack", type=float, default=0.25, help="allowed resident memory growth (fraction)")
    args = parser.parse_args(argv)
    parsed = urllib.parse.urlparse(args.url)
    if parsed.hostname not in LOOPBACK:
        parser.error(f"--url: {parsed.hostname} is not a loopback address; the soak only targets this machine")
    host, port = parsed.hostname, parsed.port or 80

    info = get_json(args.url + "/get_model_info", args.api_key)
    server = get_json(args.url + "/get_server_info", args.api_key)
    with_tokenizer = not server.get("skip_tokenizer_init", False)
    vocab = info["vocab_size"]
    asyncio.run(soak(host, port, argparse.Namespace(**{**vars(args), "requests": min(4, args.requests),
                                                       "concurrency": 4}), with_tokenizer, vocab, Totals()))
    wait_idle(args.url, args.api_key, args.idle_timeout)
    baseline = children_usage(args.launcher_pid) if args.launcher_pid else {}
    idle_validation = asyncio.run(idle_latencies(host, port, args.api_key, 2.0))

    totals = Totals()
    started = time.monotonic()
    asyncio.run(soak(host, port, args, with_tokenizer, vocab, totals))
    elapsed = time.monotonic() - started
    state = wait_idle(args.url, args.api_key, args.idle_timeout)
    time.sleep(1.0)  # let the actors release what the last requests held
    after = children_usage(args.launcher_pid) if args.launcher_pid else {}

    checks: dict[str, tuple[bool, str]] = {
        "every request got one final answer": (not totals.outcomes["violation"],
                                               f"{totals.outcomes['violation']} violations"),
        "engine idle afterwards": (not any(state.values()), json.dumps(state)),
    }
    for name, (fds, rss) in baseline.items():
        fds_after, rss_after = after.get(name, (None, None))
        ok = fds_after is not None and fds_after <= fds and rss_after <= rss * (1 + args.rss_slack)
        checks[f"{name}: descriptors and memory"] = (ok, f"fds {fds} -> {fds_after}, rss {rss >> 20} -> "
                                                         f"{(rss_after or 0) >> 20} MiB")
    result = {"requests": sum(totals.outcomes.values()), "elapsed_s": round(elapsed, 1),
              "outcomes": dict(totals.outcomes), "statuses": dict(sorted(totals.statuses.items())),
              "violations": totals.violations, "state": state,
              "checks": {name: ok for name, (ok, _) in checks.items()}, "ok": all(ok for ok, _ in checks.values())}
    print(f"{result['requests']} requests in {elapsed:.1f} s: {dict(totals.outcomes)}; statuses "
          f"{result['statuses']}")
    print(f"  validation error, idle:       {percentiles_ms(idle_validation)}")
    print(f"  validation error, under load: {percentiles_ms(totals.validation_s)}")
    result["validation_ms"] = {"idle": percentiles_ms(idle_validation), "load": percentiles_ms(totals.validation_s)}
    width = max(len(name) for name in checks)
    for name, (ok, detail) in checks.items():
        print(f"  {'PASS' if ok else 'FAIL'}  {name:<{width}}  {detail}")
    for violation in totals.violations:
        print(f"  violation: {violation}")
    return result


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(0 if main()["ok"] else 1)
