"""bench_serving against a tiny real HTTP server (asyncio, keep-alive, chunked SSE in SGLang's and
OpenAI's formats) that generates exactly the requested number of tokens, a few ms apart. The
real engine is benchmarked in tests/e2e/test_server.py."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

from runtime.bench import serving as bench_serving
from runtime.server_args import ServerArgs
from runtime.tokenizer import load_tokenizer

pytest.importorskip("aiohttp", reason="bench_serving's HTTP client is aiohttp (pip install aiohttp)")

TOKEN_DELAY_S = 0.002


class FakeServer:
    """Answers /get_model_info, /generate and /v1/completions. Records every prompt and the
    highest number of requests in flight. Prompts containing FAIL get an HTTP 500."""

    def __init__(self):
        self.prompts: list[str] = []
        self.bodies: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.timestamps = False  # stamp native chunks as --enable-token-timestamps does
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> FakeServer:
        self.thread.start()
        self.ready.wait(10)
        return self

    def __exit__(self, *exc):
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def _run(self):
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._connection, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]
        self.ready.set()
        self.loop.run_forever()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        try:
            while True:
                request_line = await reader.readline()
                if not request_line:
                    return
                method, path, _ = request_line.decode().split(" ", 2)
                headers = {}
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.decode().partition(":")
                    headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                await self._handle(method, path, json.loads(body) if body else None, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _handle(self, method: str, path: str, body: dict | None, writer: asyncio.StreamWriter):
        if path == "/get_model_info":
            return self._json(writer, 200, {"model_path": None, "tokenizer_path": None})
        self.bodies.append(body)
        native = path == "/generate"
        prompt = body["text"] if native else body["prompt"]
        self.prompts.append(prompt)
        if "FAIL" in prompt:
            return self._json(writer, 500, {"error": {"message": "synthetic failure"}})
        n = body["sampling_params"]["max_new_tokens"] if native else body["max_tokens"]
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if not body["stream"]:
                await asyncio.sleep(TOKEN_DELAY_S * n)
                payload = ({"text": "x" * n, "meta_info": {"completion_tokens": n}} if native else
                           {"choices": [{"text": "x" * n}], "usage": {"completion_tokens": n}})
                return self._json(writer, 200, payload)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
            start = time.monotonic()
            for i in range(n):
                if not (self.timestamps and i % 2):
                    await asyncio.sleep(TOKEN_DELAY_S)
                chunk = ({"text": "x" * (i + 1), "meta_info": {"completion_tokens": i + 1}} if native else
                         {"choices": [{"text": "x"}]})
                if native and self.timestamps:  # one step apart at the scheduler; two chunks land together
                    chunk["meta_info"]["timestamps"] = {"scheduler": start + 0.005 * i,
                                                        "detokenizer": start + 0.001 + 0.005 * i,
                                                        "ingress": time.monotonic()}
                self._chunk(writer, b"data: " + json.dumps(chunk).encode() + b"\n\n")
                await writer.drain()
            self._chunk(writer, b"data: [DONE]\n\n")
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        finally:
            self.in_flight -= 1

    @staticmethod
    def _chunk(writer, data: bytes):
        writer.write(b"%x\r\n%s\r\n" % (len(data), data))

    @staticmethod
    def _json(writer, status: int, payload: dict):
        data = json.dumps(payload).encode()
        writer.write(b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                     % (status, len(data), data))


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ServerArgs())


def run(server: FakeServer, *flags: str) -> dict:
    if "--warmup-requests" not in flags:
        flags = ("--warmup-requests", "0", *flags)
    return bench_serving.main(["--port", str(server.port), "--disable-tqdm", *flags])


@pytest.mark.parametrize("backend", ["sglang", "openai"])
def test_random_dataset_counts_every_token_and_measures_latencies(backend, tokenizer, tmp_path, capsys):
    out_file = tmp_path / "results.jsonl"
    with FakeServer() as server:
        result = run(server, "--backend", backend, "--num-prompts", "12", "--random-input-len", "40",
                     "--random-output-len", "10", "--random-range-ratio", "0.5", "--output-file", str(out_file))
    assert result["completed"] == 12 and result["failed"] == 0
    requested = [b["sampling_params"]["max_new_tokens"] if backend == "sglang" else b["max_tokens"]
                 for b in server.bodies]
    assert all(5 <= n <= 10 for n in requested)
    assert result["total_output_tokens"] == sum(requested)
    for prompt in server.prompts:  # random token ids decoded: the length survives re-encoding roughly
        assert 20 * 0.5 <= len(tokenizer.encode(prompt, add_special_tokens=False)) <= 40 * 1.5
    assert result["mean_ttft_ms"] >= TOKEN_DELAY_S * 1000
    assert result["median_itl_ms"] >= TOKEN_DELAY_S * 1000 * 0.9
    assert result["mean_e2e_latency_ms"] > result["mean_ttft_ms"]
    assert result["output_throughput"] > 0
    assert json.loads(out_file.read_text().splitlines()[-1])["completed"] == 12
    out = capsys.readouterr().out
    # SGLang's summary block, so results compare line by line
    for label in ("Backend:", "Successful requests:", "Total generated tokens (retokenized):",
                  "Output token throughput (tok/s):", "Median TTFT (ms):", "Median TPOT (ms):", "P99 ITL (ms):"):
        assert label in out, label
    assert out.count("=" * 50) == 1 and f"{'Successful requests:':<40} {12:<10}" in out
    assert result["total_output_tokens_retokenized"] > 0


def test_random_lengths_are_sglangs():
    """Same seed, same lengths as SGLang's bench_serving: numpy's legacy generator seeded with --seed draws the
    input lengths in [max(int(len * ratio), 1), len], then the output lengths in [int(len * ratio), len]."""
    import numpy as np

    args = bench_serving.parse_args(["--num-prompts", "500", "--random-input-len", "4096", "--random-output-len",
                                     "2048", "--random-range-ratio", "0", "--seed", "1"])
    input_lens, output_lens, _ = bench_serving.random_lengths(args)
    np.random.seed(1)
    assert list(input_lens) == list(np.random.randint(1, 4097, size=500))
    assert list(output_lens) == list(np.random.randint(0, 2049, size=500))
    assert input_lens.min() >= 1 and output_lens.max() <= 2048
    args = bench_serving.parse_args(["--num-prompts", "8", "--random-input-len", "100", "--random-range-ratio", "1"])
    assert set(bench_serving.random_lengths(args)[0]) == {100}


def test_random_dataset_uses_sharegpt_text_when_given(tokenizer, tmp_path):
    data = [{"conversations": [{"from": "human", "value": f"hello world number {i}"},
                               {"from": "gpt", "value": "ok"}]} for i in range(6)]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data))
    args = bench_serving.parse_args(["--dataset-path", str(path), "--num-prompts", "4", "--random-input-len", "30",
                                     "--random-range-ratio", "1"])
    requests = bench_serving.sample_random(tokenizer, args, __import__("random").Random(1))
    assert len(requests) == 4 and all(r.prompt_len == 30 for r in requests)
    assert all("hello world number" in r.prompt for r in requests)  # repeated up to 30 tokens


def test_max_concurrency_sweep_runs_once_per_value_and_warms_up(tokenizer, capsys):
    with FakeServer() as server:
        result = run(server, "--num-prompts", "6", "--random-input-len", "8", "--random-output-len", "4",
                     "--random-range-ratio", "1", "--max-concurrency", "1", "3", "--warmup-requests", "2")
    # 2 warm-up requests (at most 32 tokens of the first prompt) before each of the two runs of 6
    assert len(server.bodies) == 2 * (2 + 6)
    assert result["max_concurrency"] == 3 and result["completed"] == 6
    out = capsys.readouterr().out
    assert "| max concurrency |" in out and out.count("Serving Benchmark Result") == 2


def test_max_concurrency_and_non_streaming(tokenizer):
    with FakeServer() as server:
        result = run(server, "--num-prompts", "10", "--random-input-len", "8", "--random-output-len", "6",
                     "--max-concurrency", "2", "--disable-stream")
    assert server.max_in_flight == 2
    assert all(body["stream"] is False for body in server.bodies)
    assert result["completed"] == 10 and result["total_output_tokens"] == sum(
        b["sampling_params"]["max_new_tokens"] for b in server.bodies)


def test_plot_writes_a_png(tokenizer, tmp_path):
    pytest.importorskip("matplotlib", reason="--plot needs the bench extra (matplotlib)")
    with FakeServer() as server:
        result = run(server, "--num-prompts", "4", "--random-input-len", "8", "--random-output-len", "3",
                     "--plot", str(tmp_path / "latency.png"))
    assert result["completed"] == 4
    assert (tmp_path / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_poisson_arrivals_spread_requests_over_time(tokenizer):
    with FakeServer() as server:
        burst = run(server, "--num-prompts", "8", "--random-input-len", "8", "--random-output-len", "2",
                    "--random-range-ratio", "1.0")
        paced = run(server, "--num-prompts", "8", "--random-input-len", "8", "--random-output-len", "2",
                    "--random-range-ratio", "1.0", "--request-rate", "20")
    # 8 arrivals at 20 req/s take ~0.35 s on average; a burst takes a few token delays.
    assert paced["duration_s"] > burst["duration_s"] + 0.1


def test_shared_prefix_groups_share_their_system_prompt(tokenizer):
    with FakeServer() as server:
        result = run(server, "--dataset-name", "generated-shared-prefix", "--gsp-num-groups", "2",
                     "--gsp-prompts-per-group", "3", "--gsp-system-prompt-len", "30", "--gsp-question-len", "5",
                     "--gsp-output-len", "3", "--num-prompts", "0")
    assert result["completed"] == 6
    prefixes = {}
    for prompt in server.prompts:
        prefixes.setdefault(prompt[:40], []).append(prompt)
    assert sorted(len(v) for v in prefixes.values()) == [3, 3]


def test_sharegpt_file_and_failed_requests_are_reported(tokenizer, tmp_path):
    words = "the quick brown fox jumps over the lazy dog " * 3
    data = [{"conversations": [{"from": "human", "value": f"{words} question {i}" + (" FAIL" if i == 0 else "")},
                               {"from": "gpt", "value": f"{words} answer {i}"}]} for i in range(5)]
    data.append({"conversations": [{"from": "human", "value": "too short"}]})  # pruned: no answer
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data))
    with FakeServer() as server:
        result = run(server, "--dataset-name", "sharegpt", "--dataset-path", str(path), "--num-prompts", "5",
                     "--sharegpt-output-len", "4")
    assert result["completed"] == 4 and result["failed"] == 1
    assert any("HTTP 500" in e for e in result["errors"])
    assert sorted(p.split()[-1] for p in server.prompts if "FAIL" not in p) == ["1", "2", "3", "4"]


def test_sharegpt_without_a_path_is_a_clear_error():
    args = bench_serving.parse_args(["--dataset-name", "sharegpt"])
    with pytest.raises(SystemExit, match="--dataset-path"):
        bench_serving.sample_sharegpt(None, args, None)


def test_token_timestamps_show_where_gaps_form(tokenizer, capsys):
    """Chunks stamped 5 ms apart at the scheduler but written in pairs: the report puts the bursts at the ingress."""
    with FakeServer() as server:
        server.timestamps = True
        result = run(server, "--num-prompts", "4", "--random-input-len", "8", "--random-output-len", "8",
                     "--random-range-ratio", "1")
    gaps = result["token_gaps"]
    assert gaps["scheduler"]["median_gap_ms"] == pytest.approx(5.0, abs=0.01)
    assert gaps["scheduler"]["under_1ms"] == 0.0
    assert gaps["ingress"]["under_1ms"] >= 0.4  # every other chunk follows its predecessor at once
    assert gaps["detokenizer"]["median_lag_ms"] == pytest.approx(1.0, abs=0.01)
    assert "Where inter-token gaps form" in capsys.readouterr().out
