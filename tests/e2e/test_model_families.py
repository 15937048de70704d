"""A family beyond Llama served end to end: `python -m runtime` on a tiny random Mixtral checkpoint (MoE routing,
expert weights, sliding-window-free Mistral attention) written by transformers, driven over HTTP with token ids
(--skip-tokenizer-init: the checkpoint has no tokenizer); batched greedy answers must be transformers' greedy tokens.
And a checkpoint of an architecture we do not serve is refused at start with a message naming it and the supported
ones. Every family's numerics are checked without a server in tests/models/test_tiny.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request

import pytest
import torch

from runtime.models import MODEL_REGISTRY
from tests.e2e.test_server import REPO, checkpoint_server
from tests.model_fixtures import save_tiny_model

pytestmark = pytest.mark.slow

PROMPTS = [[5, 17, 33, 2, 90, 41, 7, 64, 12, 3, 99, 18], [8, 8, 21], [70, 1, 2, 3, 4, 5, 6, 7, 8, 9], [44]]
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("mixtral"))
    reference = save_tiny_model("MixtralForCausalLM", folder)
    for srv in checkpoint_server(folder, tmp_path_factory.mktemp("server") / "server.log"):
        yield srv, reference


def test_served_mixtral_answers_with_transformers_greedy_tokens(mixtral):
    server, reference = mixtral
    status, out = server.post("/generate", {"input_ids": PROMPTS, "sampling_params": {
        "temperature": 0, "max_new_tokens": NEW_TOKENS, "ignore_eos": True}})
    assert status == 200, out
    assert len(out) == len(PROMPTS)
    for prompt, answer in zip(PROMPTS, out):
        output = answer["output_ids"]
        assert len(output) == NEW_TOKENS
        with torch.no_grad():
            logits = reference(torch.tensor([prompt + output[:-1]])).logits[0, len(prompt) - 1:]
        assert output == logits.argmax(-1).tolist()


def test_model_info_names_the_architecture(mixtral):
    server, _ = mixtral
    with urllib.request.urlopen(server.url + "/get_model_info", timeout=30) as response:
        info = json.load(response)
    assert info["architectures"] == ["MixtralForCausalLM"] and info["vocab_size"] == 128


def test_unsupported_architecture_is_refused_with_the_supported_list(tmp_path):
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "n_embd": 64}))
    env = {**os.environ, "PYTHONPATH": REPO}
    proc = subprocess.run([sys.executable, "-m", "runtime", "--model-path", str(folder), "--load-format", "dummy",
                           "--skip-tokenizer-init", "--device", "cpu"], capture_output=True, text=True, timeout=300,
                          cwd=REPO, env=env)
    assert proc.returncode != 0
    assert "unsupported architecture ['GPT2LMHeadModel']" in proc.stderr
    assert ", ".join(MODEL_REGISTRY) in proc.stderr
