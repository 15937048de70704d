"""On CUDA (skipped elsewhere): `python -m runtime` serving the Llama-3-8B architecture with dummy weights
(.models/llama-3-8b-dummy: config and real tokenizer; RUNTIME_GPU_MODEL overrides) on the GPU, with CUDA graphs,
answering curl on the native /generate and the openai client on completions and chat. The weights are random, so
the text is gibberish: the tests check shapes, finish reasons and usage."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = os.environ.get("RUNTIME_GPU_MODEL", os.path.join(REPO, ".models", "llama-3-8b-dummy"))
READY_TIMEOUT_S = 300
MAX_TOKENS = 12

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.skipif(not os.path.isdir(MODEL), reason=f"no model folder at {MODEL}")]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "runtime", "--model-path", MODEL, "--load-format", "dummy",
                                 "--port", str(port), "--max-running-requests", "16", "--cuda-graph-max-bs", "16",
                                 "--served-model-name", "dummy-8b"],
                                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while "Ready: serving" not in log_path.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the server did not get ready (exit {proc.poll()}):\n{log_path.read_text()[-4000:]}")
        time.sleep(0.5)
    yield f"http://127.0.0.1:{port}"
    proc.send_signal(signal.SIGTERM)
    try:
        assert proc.wait(60) == 0, log_path.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "captured" in log_path.read_text()  # the worker took the CUDA-graph path


def test_curl_generate(server):
    body = {"text": "The capital of France is", "sampling_params": {"max_new_tokens": MAX_TOKENS,
                                                                     "temperature": 0, "ignore_eos": True}}
    if shutil.which("curl"):
        out = subprocess.run(["curl", "-sS", "-f", server + "/generate", "-H", "Content-Type: application/json",
                              "-d", json.dumps(body)], capture_output=True, text=True, timeout=120, check=True).stdout
    else:
        import urllib.request

        request = urllib.request.Request(server + "/generate", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        out = urllib.request.urlopen(request, timeout=120).read().decode()
    reply = json.loads(out)
    assert isinstance(reply["text"], str)
    assert reply["meta_info"]["completion_tokens"] == MAX_TOKENS
    assert reply["meta_info"]["finish_reason"]["type"] == "length"


def test_openai_completions_and_chat(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server + "/v1", api_key="none")
    completion = client.completions.create(model="dummy-8b", prompt=["Hello", "Once upon a time"],
                                           max_tokens=MAX_TOKENS, temperature=0.8, extra_body={"ignore_eos": True})
    assert len(completion.choices) == 2
    assert all(choice.finish_reason == "length" for choice in completion.choices)
    assert completion.usage.completion_tokens == 2 * MAX_TOKENS

    chat = client.chat.completions.create(model="dummy-8b", messages=[{"role": "user", "content": "Say hi."}],
                                          max_tokens=MAX_TOKENS, extra_body={"ignore_eos": True})
    assert chat.choices[0].finish_reason == "length"
    assert isinstance(chat.choices[0].message.content, str)
    assert chat.usage.completion_tokens == MAX_TOKENS and chat.usage.prompt_tokens > 5

    stream = client.chat.completions.create(model="dummy-8b", messages=[{"role": "user", "content": "Count."}],
                                            max_tokens=MAX_TOKENS, stream=True, extra_body={"ignore_eos": True})
    finishes = [chunk.choices[0].finish_reason for chunk in stream if chunk.choices and chunk.choices[0].finish_reason]
    assert finishes == ["length"]
