"""End to end: `python -m runtime` on SmolLM2 (CPU) as a subprocess, driven over HTTP like a user
would (urllib for the native API, the openai client, bench_serving), then stopped with SIGTERM.

One server for the module; the tests run in file order and the last one stops it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import psutil
import pytest

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
READY_TIMEOUT_S = 420  # model load on a busy 2-core machine
READY_LINE = "Ready: serving SmolLM2-135M-Instruct at "


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, log_path, *flags: str, ready_line: str = READY_LINE):
        self.ready_line = ready_line
        self.port = free_port()
        self.log_path = log_path
        self.log = open(log_path, "w")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
        self.proc = subprocess.Popen([sys.executable, "-m", "runtime", "--port", str(self.port), *flags],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        self.url = f"http://127.0.0.1:{self.port}"
        self.children: list[psutil.Process] = []

    ready_line = READY_LINE

    def output(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.ready_line in self.output():
                self.children = psutil.Process(self.proc.pid).children(recursive=True)
                return
            if self.proc.poll() is not None:
                pytest.fail(f"the server exited with {self.proc.returncode} before it was ready:\n"
                            f"{self.output()[-4000:]}")
            time.sleep(0.5)
        pytest.fail(f"no ready line within {READY_TIMEOUT_S} s:\n{self.output()[-4000:]}")

    def post(self, path: str, body: dict) -> tuple[int, dict]:
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as err:
            return err.code, json.load(err)

    def get(self, path: str) -> tuple[int, dict | bytes]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=120) as response:
                body = response.read()
                return response.status, json.loads(body) if body else body
        except urllib.error.HTTPError as err:
            return err.code, json.load(err)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def serve(self, stop_timeout_s: float = 60):
        """Yields this server once ready; then a clean stop (SIGTERM: the shared memory is unlinked, which the suite
        checks), killed if it does not end in time."""
        try:
            self.wait_ready()
            yield self
        finally:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(stop_timeout_s)
                except subprocess.TimeoutExpired:
                    pass
            self.kill()
        for child in self.children:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        self.log.close()


def checkpoint_server(folder: str, log_path):
    """`python -m runtime` on a tiny checkpoint without a tokenizer (token ids over HTTP, on the CPU), yielded once
    ready; it must then stop cleanly on SIGTERM (exit 0: the shared memory is freed)."""
    srv = Server(log_path, "--model-path", folder, "--skip-tokenizer-init", "--device", "cpu",
                 "--max-running-requests", "8", "--max-total-tokens", "1024", ready_line=f"Ready: serving {folder} at ")
    try:
        srv.wait_ready()
        yield srv
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(60) == 0, srv.output()[-3000:]
    finally:
        srv.kill()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("server") / "server.log", "--max-running-requests", "16",
                 "--max-total-tokens", "8192")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.kill()


def test_ready_line_names_the_model_and_url(server):
    assert f"{READY_LINE}{server.url}" in server.output()
    titles = sorted(p.cmdline()[0] for p in server.children)
    assert titles == ["runtime: detokenizer", "runtime: ingress", "runtime: scheduler", "runtime: worker 0"]


def test_native_generate(server):
    status, out = server.post("/generate", {"text": "The capital of France is",
                                            "sampling_params": {"temperature": 0, "max_new_tokens": 8}})
    assert status == 200, out
    assert "Paris" in out["text"]
    meta = out["meta_info"]
    assert meta["completion_tokens"] == len(out["output_ids"]) <= 8
    assert meta["prompt_tokens"] == 5 and meta["finish_reason"]["type"] in ("length", "stop")


def test_native_generate_rejects_bad_input_naming_the_field(server):
    status, out = server.post("/generate", {"text": "Hi", "sampling_params": {"temperature": -1}})
    assert status == 400 and "temperature" in out["error"]["message"]


def test_openai_completion_and_chat(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    completion = client.completions.create(model="default", prompt="The capital of France is", max_tokens=8,
                                           temperature=0)
    assert "Paris" in completion.choices[0].text
    assert completion.usage.completion_tokens <= 8
    chat = client.chat.completions.create(model="default", temperature=0, max_tokens=16,
                                          messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in chat.choices[0].message.content
    assert chat.choices[0].finish_reason in ("stop", "length")


def test_bench_serving_against_the_server(server, capsys):
    from runtime.bench import serving as bench_serving

    result = bench_serving.main(["--base-url", server.url, "--num-prompts", "20", "--random-input-len", "16",
                                 "--random-output-len", "4", "--random-range-ratio", "1.0", "--disable-tqdm"])
    assert result["completed"] == 20 and result["failed"] == 0, result.get("errors")
    assert result["total_output_tokens"] == 20 * 4  # bench requests ignore_eos
    assert result["mean_ttft_ms"] > 0 and result["mean_itl_ms"] > 0
    assert "Successful requests" in capsys.readouterr().out


def test_sigterm_stops_every_actor_and_frees_shared_memory(server):
    assert server.children, "the server's actor processes were recorded when it became ready"
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(60) == 0, server.output()[-4000:]
    gone, alive = psutil.wait_procs(server.children, timeout=10)
    assert not alive, f"actors still running after the launcher exited: {alive}"
    prefix = f"rt{server.proc.pid}_"
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(prefix)]
    assert "server stopped (clean)" in server.output()
