"""HTTP layer benchmark: requests/s and latency (p50, p99) of GET /health and of a streamed
POST /generate (16 tokens from the fake frontend), for our server (httpd + runtime.ingress.api) and for
uvicorn (httptools + uvloop) serving a minimal ASGI app that does the same work.

Each server runs in its own process pinned to core 0; the load generator runs pinned to core 1
(`wrk` when installed, else a built-in asyncio client over raw keep-alive sockets). Prints a table.

    python scripts/bench_http.py                      # 3 rounds x 5 s per case, 64 connections
    python scripts/bench_http.py --duration 3 --rounds 1 --client python
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
SERVERS = ("ours", "uvicorn-api", "uvicorn-bare")
GENERATE_BODY = json.dumps({"input_ids": list(range(100, 100 + TOKENS)), "stream": True,
                            "sampling_params": {"max_new_tokens": TOKENS}}).encode()


# ---------------------------------------------------------------------------------------------- servers


def serve_ours(port: int) -> None:
    import uvloop

    from httpd import ServerConfig
    from runtime.ingress.api.app import create_server
    from tests.fake_frontend import FakeFrontend

    async def main():
        frontend = FakeFrontend(tokenizer=None, record_calls=False)
        server = create_server(frontend, ServerConfig(max_connections=100_000))
        await server.start("127.0.0.1", port)
        print("READY", flush=True)
        await asyncio.Event().wait()

    uvloop.run(main())


def _lifespan_ready(app):
    """Wraps an ASGI app: prints READY once uvicorn has started."""

    async def wrapped(scope, receive, send):
        if scope["type"] != "lifespan":
            return await app(scope, receive, send)
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                print("READY", flush=True)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    return wrapped


async def _read_body(receive) -> bytes:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body


def bare_asgi_app(frontend):
    """uvicorn-bare: the least an ASGI app can do for these two routes (no validation, no metrics)."""
    import msgspec

    from runtime.messages import LogprobOptions, SamplingParams

    encode = msgspec.json.Encoder().encode

    async def app(scope, receive, send):
        if scope["path"] == "/health":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"0")]})
            await send({"type": "http.response.body", "body": b""})
            return
        request = msgspec.json.decode(await _read_body(receive))
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

    return app


def api_asgi_app(frontend):
    """uvicorn-api: our own routes and handlers (runtime.ingress.api) behind a thin ASGI adapter, so the
    application work is identical and only the HTTP server differs."""
    from httpd import Request, Response, ServerConfig
    from httpd.dispatch import Dispatcher
    from runtime.ingress.api.app import build_router
    from runtime.ingress.api.metrics import Metrics

    dispatch = Dispatcher(build_router(frontend, Metrics(frontend.served_model_name)), ServerConfig())

    async def app(scope, receive, send):
        request = Request(scope["method"], scope["path"], scope["query_string"].decode("latin-1"),
                          list(scope["headers"]), await _read_body(receive), scope["http_version"], True)
        result = dispatch(request)
        if not isinstance(result, Response) and hasattr(result, "__await__"):
            result = await result
        headers = list(result.headers) + ([(b"content-type", result.content_type)] if result.content_type else [])
        if isinstance(result, Response):
            headers.append((b"content-length", b"%d" % len(result.body)))
            await send({"type": "http.response.start", "status": result.status, "headers": headers})
            await send({"type": "http.response.body", "body": result.body})
            return
        await send({"type": "http.response.start", "status": result.status, "headers": headers})
        try:
            async for piece in result.body:
                if piece:
                    await send({"type": "http.response.body", "body": piece, "more_body": True})
        finally:
            await result.body.aclose()
        await send({"type": "http.response.body", "body": b""})

    return app


def serve_uvicorn(port: int, app_kind: str) -> None:
    import uvicorn

    from tests.fake_frontend import FakeFrontend

    frontend = FakeFrontend(tokenizer=None, record_calls=False)
    app = bare_asgi_app(frontend) if app_kind == "bare" else api_asgi_app(frontend)
    uvicorn.Server(uvicorn.Config(_lifespan_ready(app), host="127.0.0.1", port=port, loop="uvloop", http="httptools",
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
    server_sys_us: float = 0.0  # the part of it spent in the kernel (socket reads and writes, epoll)


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


def _median(results: list[Result]) -> Result:
    def mid(values):
        return sorted(values)[len(values) // 2]

    return Result(mid([r.requests_per_s for r in results]), mid([r.p50_ms for r in results]),
                  mid([r.p99_ms for r in results]), sum(r.errors for r in results), sum(r.requests for r in results),
                  mid([r.server_cpu_us for r in results]), mid([r.server_sys_us for r in results]))


# ---------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per case and round")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per case; medians are shown")
    parser.add_argument("--client", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument("--serve", choices=SERVERS, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve == "ours":
        serve_ours(args.port)
        return
    if args.serve:
        serve_uvicorn(args.port, args.serve.removeprefix("uvicorn-"))
        return

    client = args.client if args.client != "auto" else ("wrk" if shutil.which("wrk") else "python")
    cores = sorted(os.sched_getaffinity(0))
    server_core, client_core = (cores[0], cores[1]) if len(cores) >= 2 else (None, None)
    load = run_wrk if client == "wrk" else run_python_client
    cases = [("GET /health", "/health", None), (f"POST /generate (stream, {TOKENS} tokens)", "/generate",
                                                GENERATE_BODY)]
    kinds = SERVERS
    # Both servers stay up (the idle one costs nothing) and the cases alternate between them, round
    # after round, so that a noisy neighbour hurts both alike; the table shows medians.
    servers = {kind: start_server(kind, server_core) for kind in kinds}
    runs: dict[tuple[str, str], list[Result]] = {}
    try:
        for _name, path, body in cases:
            for kind in kinds:
                load(servers[kind][1], path, body, 1.0, args.connections, client_core)  # warm-up
        for _ in range(args.rounds):
            for name, path, body in cases:
                for kind in kinds:
                    process, port = servers[kind]
                    server = psutil.Process(process.pid)
                    before = server.cpu_times()
                    result = load(port, path, body, args.duration, args.connections, client_core)
                    after = server.cpu_times()
                    per_request = 1e6 / max(1, result.requests)
                    result.server_cpu_us = (after.user + after.system - before.user - before.system) * per_request
                    result.server_sys_us = (after.system - before.system) * per_request
                    runs.setdefault((kind, name), []).append(result)
    finally:
        for process, _ in servers.values():
            process.terminate()
            process.wait(10)
    results = {key: _median(values) for key, values in runs.items()}

    print(f"\nclient: {client}, {args.connections} connections, {args.rounds} x {args.duration:g} s per case "
          f"(medians), servers on core {server_core}, client on core {client_core}")
    print("uvicorn-api: our runtime.ingress.api handlers behind a thin ASGI adapter (same work, other HTTP server);")
    print("uvicorn-bare: a minimal hand-written ASGI app (no validation, no metrics, smaller events)")
    print(f"| {'case':<34} | {'server':<12} | {'req/s':>8} | {'p50 ms':>7} | {'p99 ms':>7} | {'errors':>6} | "
          f"{'CPU us/req':>10} | {'of it sys':>9} | {'ours req/s / this':>17} | {'this CPU / ours CPU':>19} |")
    print(f"|{'-' * 36}|{'-' * 14}|{'-' * 10}|{'-' * 9}|{'-' * 9}|{'-' * 8}|{'-' * 12}|{'-' * 11}|{'-' * 19}|"
          f"{'-' * 21}|")
    for name, _, _ in cases:
        ours = results[("ours", name)]
        for kind in kinds:
            r = results[(kind, name)]
            print(f"| {name:<34} | {kind:<12} | {r.requests_per_s:>8.0f} | {r.p50_ms:>7.2f} | {r.p99_ms:>7.2f} | "
                  f"{r.errors:>6} | {r.server_cpu_us:>10.1f} | {r.server_sys_us:>9.1f} | "
                  f"{ours.requests_per_s / r.requests_per_s:>16.2f}x | "
                  f"{r.server_cpu_us / ours.server_cpu_us:>18.2f}x |")


if __name__ == "__main__":
    main()
