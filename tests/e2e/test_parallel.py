"""Tensor, data and multi-node parallelism end to end on the CPU (gloo): `python -m runtime` with --tp, --dp and
--nnodes as subprocesses, answers compared with one rank's greedy tokens (transformers' for the tiny model, which
one rank equals: tests/models/test_tiny.py; our single-rank ModelRunner's for the default model).

Servers start with a small KV pool (--max-total-tokens): several workers share the machine's memory."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from shm import sweep_stale

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
READY_TIMEOUT_S = 300
NEW_TOKENS = 6
STOP_WITHIN_S = 10.0
SMALL_POOL = ["--device", "cpu", "--max-total-tokens", "2048", "--max-running-requests", "16"]


def free_port(count: int = 1) -> int:
    """A port p with p .. p + count - 1 free on 127.0.0.1."""
    for _ in range(100):
        port = random.randrange(20000, 60000)
        try:
            for p in range(port, port + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port")


class Launcher:
    """`python -m runtime <flags>` with its output in a log file."""

    def __init__(self, log_path, *flags: str, ready_line: str = "Ready: serving"):
        self.port = free_port()
        self.log_path = log_path
        self.ready_line = ready_line
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "runtime", "--port", str(self.port), *flags],
                                         stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        self.url = f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while self.ready_line not in self.output():
            if self.proc.poll() is not None:
                pytest.fail(f"exited with {self.proc.returncode} before it was ready:\n{self.output()[-4000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"not ready within {READY_TIMEOUT_S} s:\n{self.output()[-4000:]}")
            time.sleep(0.3)

    def get(self, path: str) -> tuple[int, str]:
        with urllib.request.urlopen(self.url + path, timeout=60) as response:
            return response.status, response.read().decode()

    def post(self, path: str, body: dict) -> tuple[int, dict]:
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as err:
            return err.code, json.load(err)

    def greedy(self, input_ids: list[int], **params) -> dict:
        status, out = self.post("/generate", {"input_ids": input_ids, "sampling_params": {
            "temperature": 0, "max_new_tokens": NEW_TOKENS, "ignore_eos": True, **params}})
        assert status == 200, out
        return out

    def kill(self) -> None:
        """SIGKILL the launcher: its actors die with it (PR_SET_PDEATHSIG); its segments are swept."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        sweep_stale()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                pass
        self.kill()


def stops_within(launcher: Launcher, seconds: float) -> float:
    start = time.monotonic()
    try:
        launcher.proc.wait(seconds)
    except subprocess.TimeoutExpired:
        launcher.kill()
        pytest.fail(f"still running {seconds:.0f} s after its peer died:\n{launcher.output()[-3000:]}")
    return time.monotonic() - start


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama (4 heads, 2 KV heads: shards over 2 ranks), 16 prompts and transformers' greedy tokens."""
    from tests.model_fixtures import hf_greedy, save_tiny_model

    folder = str(tmp_path_factory.mktemp("tiny") / "model")
    model = save_tiny_model("LlamaForCausalLM", folder)
    rng = random.Random(0)
    prompts = [[rng.randrange(2, 128) for _ in range(rng.randrange(3, 12))] for _ in range(16)]
    return folder, prompts, [hf_greedy(model, p, NEW_TOKENS)[1] for p in prompts]


def test_tp3_on_the_default_model_answers_as_one_rank(tmp_path):
    import torch

    from runtime.worker.model_runner import ModelRunner, ModelRunnerConfig
    from tests.model_fixtures import SMOLLM2_PROMPTS, PlanDriver

    server = Launcher(tmp_path / "tp3.log", "--tp", "3", *SMALL_POOL)
    try:
        torch.manual_seed(0)  # one rank in this process while the server's three load
        runner = ModelRunner(ModelRunnerConfig(device="cpu", max_total_tokens=1024, max_running_requests=8))
        one_rank = PlanDriver(runner).generate(SMOLLM2_PROMPTS, NEW_TOKENS)
        del runner
        server.wait_ready()
        with ThreadPoolExecutor(len(SMOLLM2_PROMPTS)) as pool:  # one batch: every step is 62 collectives
            outputs = list(pool.map(server.greedy, SMOLLM2_PROMPTS))
        assert [out["output_ids"] for out in outputs] == one_rank
        status, out = server.post("/generate", {"text": "The capital of France is",
                                                "sampling_params": {"temperature": 0, "max_new_tokens": 4}})
        assert status == 200 and "Paris" in out["text"], out
        assert "replica 0 (scheduler on node 0): node 0: tp 0-2 = worker0-2 on gpu 0-2" in server.output()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def dp2tp2(tiny, tmp_path_factory):
    folder = tiny[0]
    server = Launcher(tmp_path_factory.mktemp("dp") / "dp2tp2.log", "--model-path", folder, "--skip-tokenizer-init",
                      "--dp", "2", "--tp", "2", "--enable-metrics", *SMALL_POOL)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def replica_states(server: Launcher) -> list[dict]:
    status, body = server.get("/get_server_info")
    assert status == 200
    return json.loads(body)["internal_states"]


def test_dp2_tp2_serves_concurrent_requests_from_both_replicas(dp2tp2, tiny):
    _, prompts, references = tiny
    before = replica_states(dp2tp2)
    with ThreadPoolExecutor(len(prompts)) as pool:
        outputs = list(pool.map(dp2tp2.greedy, prompts))
    assert [out["output_ids"] for out in outputs] == references
    after = replica_states(dp2tp2)
    assert [s["dp_rank"] for s in after] == [0, 1]
    for old, new in zip(before, after):
        assert new["dispatched"] - old["dispatched"] == len(prompts) // 2  # round robin
        assert new["generated_tokens"] - old["generated_tokens"] == len(prompts) // 2 * NEW_TOKENS
        assert new["ingress_unfinished_sequences"] == new["running"] == new["queued"] == 0
    status, metrics = dp2tp2.get("/metrics")
    assert 'sglang:num_running_reqs{dp_rank="0"' in metrics and 'sglang:token_usage{dp_rank="1"' in metrics


def test_show_placement_lists_every_rank_of_every_replica(dp2tp2):
    out = subprocess.run([sys.executable, "scripts/show_placement.py", "--pid", str(dp2tp2.proc.pid)], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    rows = {line.split()[0]: line.split()[1:4] for line in out.splitlines()[1:]}
    assert rows["worker3"] == ["1", "1", "0"] and rows["worker0"] == ["0", "0", "0"]  # dp, tp, node
    assert rows["scheduler1"][0] == "1" and set(rows) >= {"ingress", "detokenizer", "scheduler0"}


def test_the_samples_of_one_request_share_one_replica_and_flush_cache_flushes_all(dp2tp2, tiny):
    _, prompts, _ = tiny
    before = replica_states(dp2tp2)
    status, out = dp2tp2.post("/generate", {"input_ids": prompts[0], "sampling_params": {
        "temperature": 0.8, "max_new_tokens": 2, "n": 4}})
    assert status == 200 and len(out) == 4
    grown = sorted(new["dispatched"] - old["dispatched"] for old, new in zip(before, replica_states(dp2tp2)))
    assert grown == [0, 4]
    assert all(s["cached_tokens"] > 0 for s in replica_states(dp2tp2))
    status, text = dp2tp2.get("/flush_cache")
    assert status == 200 and "Cache flushed" in text
    assert [s["cached_tokens"] for s in replica_states(dp2tp2)] == [0, 0]


def two_nodes(folder: str, tmp_path) -> list[Launcher]:
    """Two launchers on this machine as nodes 0 and 1 of a --tp 2 server, one rank each."""
    flags = ["--model-path", folder, "--skip-tokenizer-init", "--tp", "2", "--nnodes", "2",
             "--dist-init-addr", f"127.0.0.1:{free_port(2)}", *SMALL_POOL]
    return [Launcher(tmp_path / "node0.log", *flags, "--node-rank", "0"),
            Launcher(tmp_path / "node1.log", *flags, "--node-rank", "1", ready_line="Ready: node 1 runs workers")]


@pytest.mark.parametrize("killed", [1, 0])
def test_two_nodes_answer_as_one_and_stop_together(tiny, tmp_path, killed):
    folder, prompts, references = tiny
    nodes = two_nodes(folder, tmp_path)
    try:
        for node in nodes:
            node.wait_ready()
        for prompt, expected in list(zip(prompts, references))[:4]:
            assert nodes[0].greedy(prompt)["output_ids"] == expected
        nodes[killed].kill()
        survivor = nodes[1 - killed]
        took = stops_within(survivor, STOP_WITHIN_S)
        assert survivor.proc.returncode == 1
        lost = "lost contact with node 0" if killed == 0 else "lost contact with a node of the group"
        assert lost in survivor.output(), survivor.output()[-3000:]
        print(f"node {1 - killed} stopped {took:.1f} s after node {killed} was killed")
    finally:
        for node in nodes:
            node.stop()
