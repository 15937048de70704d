"""HTTP layer benchmark: requests/s and latency (p50, p99) of GET /health and of a streamed
POST /generate (16 tokens from the fake frontend), for our server (httpd + runtime.api) and for
uvicorn (httptools + uvloop) serving a minimal ASGI app that does the same work.

Each server runs in its own process pinned to core 0; the load generator runs pinned to core 1
(`wrk` when installed, else a built-in asyncio client over raw keep-alive sockets). Prints a table.

    python scripts/bench_http.py                      # 10 s per case, 64 connections
    python scripts/bench_http.py --duration 5 --connections 32 --client python
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import psutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

TOKENS = 16
GENERATE_BODY = json.dumps({"input_ids": list(range(100, 100 + TOKENS)), "stream": True,
                            "sampling_params": {"max_new_tokens": TOKENS}}).encode()


# ---------------------------------------------------------------------------------------------- servers


def serve_ours(port: int) -> None:
    import uvloop

    from httpd import ServerConfig
    from runtime.api.app import create_server
    from tests.fake_frontend import FakeFrontend

    async def main():
        frontend = FakeFrontend(tokenizer=None)
        server = create_server(frontend, ServerConfig(max_connections=100_000))
        await server.start("127.0.0.1", port)
        print("READY", flush=True)
        await asyncio.Event().wait()

    uvloop.run(main())


def serve_uvicorn(port: int) -> None:
    import msgspec
    import uvicorn

    from runtime.messages import LogprobOptions, SamplingParams
    from tests.fake_frontend import FakeFrontend

    frontend = FakeFrontend(tokenizer=None)
    encode = msgspec.json.Encoder().encode

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    print("READY", flush=True)
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["path"] == "/health":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"0")]})
            await send({"type": "http.response.body", "body": b""})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        request = msgspec.json.decode(body)
        sampling = SamplingParams(max_new_tokens=request["sampling_params"]["max_new_tokens"])
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        text, ids = "", []
        async for update in frontend.generate(os.urandom(8).hex(), request["input_ids"], sampling, LogprobOptions(),
                                              True):
            text += update.text_delta
            ids += update.new_token_ids
            finish = None if update.finish is None else {"type": update.finish.type}
            event = {"text": text, "output_ids": ids, "meta_info": {
                "finish_reason": finish, "prompt_tokens": update.meta.prompt_tokens,
                "completion_tokens": update.meta.completion_tokens}}
            await send({"type": "http.response.body", "body": b"data: " + encode(event) + b"\n\n", "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})

    uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, loop="uvloop", http="httptools",
                                  log_level="warning", access_log=False, backlog=4096)).run()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(kind: str, core: int | None) -> tuple[subprocess.Popen, int]:
    port = free_port()
    command = [sys.executable, os.path.abspath(__file__), "--serve", kind, "--port", str(port)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, cwd=REPO,
                               preexec_fn=(lambda: os.sched_setaffinity(0, {core})) if core is not None else None)
    line = process.stdout.readline()
    if b"READY" not in line:
        process.kill()
        raise RuntimeError(f"the {kind} server did not start")
    return process, port


# ---------------------------------------------------------------------------------------------- load


@dataclass
class Result:
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    requests: int
    server_cpu_us: float = 0.0  # server process CPU time per request (robust on a busy machine)


def run_wrk(port: int, path: str, body: bytes | None, seconds: float, connections: int, core: int | None) -> Result:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        if body is not None:
            script.write(f'wrk.method = "POST"\nwrk.body = {json.dumps(body.decode())}\n'
                         'wrk.headers["Content-Type"] = "application/json"\n')
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", "-s", script.name,
               f"http://127.0.0.1:{port}{path}"]
    if core is not None:
        command = ["taskset", "-c", str(core)] + command
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    os.unlink(script.name)

    def latency_ms(percentile: str) -> float:
        value, unit = re.search(rf"^\s+{percentile}%\s+([\d.]+)(us|ms|s)\s*$", output, re.M).groups()
        return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]

    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    total_errors = (int(errors.group(1)) if errors else 0) + (sum(map(int, socket_errors.groups()))
                                                             if socket_errors else 0)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))
    count = int(re.search(r"(\d+) requests in", output).group(1))
    return Result(rps, latency_ms("50"), latency_ms("99"), total_errors, count)


async def _python_load(port: int, path: str, body: bytes | None, seconds: float, connections: int) -> Result:
    import httptools

    request = (f"{'POST' if body else 'GET'} {path} HTTP/1.1\r\nHost: bench\r\n".encode()
               + (b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body) if body
                  else b"\r\n"))
    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + seconds

    async def connection():
        nonlocal errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)

        class Done:
            complete = False
            status = 0

            def on_message_complete(self):
                self.complete = True

        while time.perf_counter() < stop_at:
            state = Done()
            parser = httptools.HttpResponseParser(state)
            start = time.perf_counter()
            writer.write(request)
            while not state.complete:
                data = await reader.read(65536)
                if not data:
                    errors += 1
                    return
                parser.feed_data(data)
            if parser.get_status_code() != 200:
                errors += 1
            latencies.append(time.perf_counter() - start)
        writer.close()

    began = time.perf_counter()
    await asyncio.gather(*(connection() for _ in range(connections)))
    elapsed = time.perf_counter() - began
    latencies.sort()
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1e3  # noqa: E731
    return Result(len(latencies) / elapsed, pick(0.50), pick(0.99), errors, len(latencies))


def run_python_client(port, path, body, seconds, connections, core) -> Result:
    if core is not None:
        os.sched_setaffinity(0, {core})
    import uvloop

    return uvloop.run(_python_load(port, path, body, seconds, connections))


# ---------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per case")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--client", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument("--serve", choices=("ours", "uvicorn"), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        (serve_ours if args.serve == "ours" else serve_uvicorn)(args.port)
        return

    client = args.client if args.client != "auto" else ("wrk" if shutil.which("wrk") else "python")
    cores = sorted(os.sched_getaffinity(0))
    server_core, client_core = (cores[0], cores[1]) if len(cores) >= 2 else (None, None)
    load = run_wrk if client == "wrk" else run_python_client
    cases = [("GET /health", "/health", None), (f"POST /generate (stream, {TOKENS} tokens)", "/generate",
                                                GENERATE_BODY)]
    results: dict[tuple[str, str], Result] = {}
    for kind in ("ours", "uvicorn"):
        process, port = start_server(kind, server_core)
        try:
            server = psutil.Process(process.pid)
            for name, path, body in cases:
                load(port, path, body, 1.0, args.connections, client_core)  # warm-up
                cpu_before = sum(server.cpu_times()[:2])
                result = load(port, path, body, args.duration, args.connections, client_core)
                result.server_cpu_us = (sum(server.cpu_times()[:2]) - cpu_before) / max(1, result.requests) * 1e6
                results[(kind, name)] = result
        finally:
            process.terminate()
            process.wait(10)

    print(f"\nclient: {client}, {args.connections} connections, {args.duration:g} s per case, "
          f"server on core {server_core}, client on core {client_core}")
    print(f"| {'case':<34} | {'server':<8} | {'req/s':>9} | {'p50 ms':>8} | {'p99 ms':>8} | {'errors':>6} | "
          f"{'CPU us/req':>10} | {'req/s vs uvicorn':>16} | {'CPU/req vs uvicorn':>18} |")
    print(f"|{'-' * 36}|{'-' * 10}|{'-' * 11}|{'-' * 10}|{'-' * 10}|{'-' * 8}|{'-' * 12}|{'-' * 18}|{'-' * 20}|")
    for name, _, _ in cases:
        base = results[("uvicorn", name)]
        for kind in ("ours", "uvicorn"):
            r = results[(kind, name)]
            print(f"| {name:<34} | {kind:<8} | {r.requests_per_s:>9.0f} | {r.p50_ms:>8.2f} | {r.p99_ms:>8.2f} | "
                  f"{r.errors:>6} | {r.server_cpu_us:>10.1f} | {r.requests_per_s / base.requests_per_s:>15.2f}x | "
                  f"{base.server_cpu_us / r.server_cpu_us:>17.2f}x |")
    print("(CPU/req vs uvicorn: how many times less server CPU time we spend per request)")


if __name__ == "__main__":
    main()
