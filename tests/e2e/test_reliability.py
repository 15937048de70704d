"""A whole server (`python -m runtime`) treated as a hostile client would (issue 11), on a tiny random
Llama (ids only, --skip-tokenizer-init, so it starts in seconds): the port bound before anything
loads, no secret on any command line, readable process titles, /health while an actor is frozen,
request deadlines, a brief soak (scripts/soak.py), a graceful drain on SIGTERM (exit 0, one final
answer per client) and final answers when an actor dies under the clients' feet.

One server for the module (the drain test stops it, last); the child-death test starts its own."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SECRET = "sk-soak-secret-0123456789"
READY_TIMEOUT_S = 300
LONG = {"max_new_tokens": 4000, "ignore_eos": True}  # far longer than any test waits


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.model_fixtures import TINY_COMMON

    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(LlamaConfig(**{**TINY_COMMON, "max_position_embeddings": 8192})).save_pretrained(folder)
    return str(folder)


class Server:
    def __init__(self, log_path, model: str, *flags: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.log = open(log_path, "w")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "runtime", "--model-path", model, "--skip-tokenizer-init", "--device", "cpu",
             "--port", str(self.port), "--api-key", SECRET, "--max-total-tokens", "65536",
             "--max-running-requests", "16", "--log-level", "warning", *flags],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        self.children: list[psutil.Process] = []

    def output(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"the server exited with {self.proc.returncode}:\n{self.output()[-4000:]}")
            try:
                if self.request("GET", "/health", timeout=2)[0] == 200:
                    self.children = psutil.Process(self.proc.pid).children()
                    return
            except OSError:
                pass
            time.sleep(0.3)
        pytest.fail(f"not healthy within {READY_TIMEOUT_S} s:\n{self.output()[-4000:]}")

    def request(self, method: str, path: str, body: dict | None = None, timeout: float = 60):
        """(status, headers, body bytes)."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            headers = {"Authorization": f"Bearer {SECRET}"}
            data = None
            if body is not None:
                data = json.dumps(body).encode()
                headers["Content-Type"] = "application/json"
            connection.request(method, path, body=data, headers=headers)
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            connection.close()

    def child(self, title: str) -> psutil.Process:
        return next(p for p in self.children if p.cmdline()[:1] == [title])

    def kill(self) -> None:
        """Stop what is left: SIGTERM first (the launcher frees the run's shared memory), then SIGKILL."""
        from shm import sweep

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                pass
        for process in [self.proc, *self.children]:
            try:
                process.kill()
            except (psutil.NoSuchProcess, ProcessLookupError):
                pass
        self.proc.wait(30)
        sweep(f"rt{self.proc.pid}_")
        self.log.close()


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("server") / "server.log", tiny_model, "--graceful-shutdown-timeout", "3")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.kill()


def test_a_busy_port_fails_before_anything_loads(tiny_model):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {**os.environ, "PYTHONPATH": REPO}
        started = time.monotonic()
        out = subprocess.run([sys.executable, "-m", "runtime", "--model-path", tiny_model, "--port", str(port)],
                             capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
        took = time.monotonic() - started
    assert out.returncode == 1
    assert f"--port {port}" in out.stderr and "in use" in out.stderr
    assert "starting actor" not in out.stderr  # refused before any actor process existed
    assert took < 10  # a sanity bound (loading a model would take longer); scripts/startup_time.py measures


def test_no_secret_on_any_command_line_and_readable_titles(server):
    titles = sorted(p.cmdline()[0] for p in server.children)
    assert titles == ["runtime: detokenizer", "runtime: ingress", "runtime: scheduler", "runtime: worker 0"]
    for process in [psutil.Process(server.proc.pid), *server.children]:
        with open(f"/proc/{process.pid}/cmdline", "rb") as f:
            assert SECRET.encode() not in f.read(), process.cmdline()[0]
    assert psutil.Process(server.proc.pid).cmdline()[0] == "runtime: launcher"


def test_health_reports_a_frozen_scheduler_and_recovers(server):
    scheduler = server.child("runtime: scheduler")
    scheduler.suspend()
    try:
        deadline = time.monotonic() + 20
        status = 200
        while status == 200 and time.monotonic() < deadline:
            status, _, body = server.request("GET", "/health", timeout=5)
            time.sleep(0.5)
        assert status == 503 and b"scheduler: no heartbeat" in body
    finally:
        scheduler.resume()
    deadline = time.monotonic() + 20
    while server.request("GET", "/health", timeout=5)[0] != 200:
        assert time.monotonic() < deadline, "/health did not recover"
        time.sleep(0.2)


def test_a_request_past_its_timeout_is_answered_504(server):
    started = time.monotonic()
    status, _, body = server.request("POST", "/generate", {"input_ids": [5, 6, 7], "timeout": 0.5,
                                                           "sampling_params": LONG})
    assert status == 504 and b"timeout" in body
    assert time.monotonic() - started < 10


def test_brief_soak(server):
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    try:
        import soak
    finally:
        sys.path.pop(0)
    result = soak.main(["--url", server.url, "--launcher-pid", str(server.proc.pid), "--api-key", SECRET,
                        "--requests", "100", "--duration", "15", "--concurrency", "16", "--seed", "11"])
    assert result["violations"] == []
    assert result["ok"], result
    assert result["requests"] >= 16 and result["outcomes"]["answered"] > 0  # how many fit in 15 s depends on the box


def stream_events(server: Server, body: dict, events: list, done: threading.Event) -> None:
    """Reads an SSE response event by event into `events` (the status first)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        connection.request("POST", "/generate", body=json.dumps(body).encode(),
                           headers={"Authorization": f"Bearer {SECRET}", "Content-Type": "application/json"})
        response = connection.getresponse()
        events.append(response.status)
        buffer = b""
        while True:
            piece = response.read1(65536) if hasattr(response, "read1") else response.read(65536)
            if not piece:
                break
            buffer += piece
        events.extend(e for e in buffer.decode().split("\n\n") if e)
    except (OSError, http.client.HTTPException) as err:
        events.append(f"no final answer: {type(err).__name__}")
    finally:
        connection.close()
        done.set()


def start_clients(server: Server):
    """Three streamed and three plain requests that will not finish for a long while, and two short ones."""
    streams, plain = [], []
    for i in range(3):
        events, done = [], threading.Event()
        threading.Thread(target=stream_events, args=(server, {"input_ids": [9, i + 3], "stream": True,
                                                              "sampling_params": LONG}, events, done),
                         daemon=True).start()
        streams.append((events, done))
    for i in range(3):
        box, done = [], threading.Event()

        def plain_request(box=box, done=done, i=i):
            try:
                box.append(server.request("POST", "/generate", {"input_ids": [7, i + 3], "sampling_params": LONG}))
            except (OSError, http.client.HTTPException) as err:
                box.append(f"no final answer: {type(err).__name__}")
            done.set()

        threading.Thread(target=plain_request, daemon=True).start()
        plain.append((box, done))
    short = [server.request("POST", "/generate", {"input_ids": [4, 5], "sampling_params": {"max_new_tokens": 2}})]
    return streams, plain, short


def assert_final_answers(streams, plain, expected_status: int) -> None:
    for events, done in streams:
        assert done.wait(30), "a streamed client is still waiting"
        assert events[0] == 200 and events[-1] == "data: [DONE]", events[-3:]
        error = json.loads(events[-2].removeprefix("data: "))
        assert error["error"]["code"] == expected_status, error
    for box, done in plain:
        assert done.wait(30), "a client is still waiting"
        status, _, body = box[0]
        assert status == expected_status, box[0]
        assert json.loads(body)["error"]["code"] == expected_status


def test_sigterm_drains_answers_everyone_and_exits_0(server):
    streams, plain, short = start_clients(server)
    assert short[0][0] == 200
    time.sleep(1.0)  # every long request is running
    prefix = f"rt{server.proc.pid}_"
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    status, headers, body = server.request("POST", "/generate", {"input_ids": [1, 2], "sampling_params": {}})
    assert status == 503 and headers.get("Connection") == "close" and b"shutting down" in body
    assert_final_answers(streams, plain, 503)  # the 3 s of grace ran out: answered 503, not cut
    assert server.proc.wait(30) == 0, server.output()[-3000:]
    gone, alive = psutil.wait_procs(server.children, timeout=10)
    assert not alive
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(prefix)]


def test_when_an_actor_dies_every_client_still_gets_a_final_answer(tiny_model, tmp_path):
    srv = Server(tmp_path / "server.log", tiny_model)
    try:
        srv.wait_ready()
        streams, plain, _ = start_clients(srv)
        time.sleep(1.0)
        srv.child("runtime: scheduler").kill()
        assert_final_answers(streams, plain, 503)
        assert srv.proc.wait(30) == 1
        assert "actor 'scheduler'" in srv.output() and "SIGKILL" in srv.output()
    finally:
        srv.kill()
