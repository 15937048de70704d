"""Hub model ids (runtime.model_loader.hub), offline: no machine here reaches a hub. A snapshot laid
out in a huggingface_hub cache the way the library writes it loads with no network; an unreachable
hub (a refused port as HF_ENDPOINT) or an uncached id offline is one clear line and exit 1; the
allow-patterns, applied by huggingface_hub's own filter, keep weights, configs and tokenizer only."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys

import pytest
import torch
from huggingface_hub.utils import filter_repo_objects

from runtime.model_loader.hub import HubError, allow_patterns, is_hub_id, resolve_model_paths, use_modelscope
from runtime.model_loader.loader import locate_checkpoint
from runtime.server_args import ServerArgs
from runtime.worker.model_runner import ModelRunner, ModelRunnerConfig
from tests.model_fixtures import save_tiny_model

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REPO_ID = "tiny-org/tiny-llama"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
UNREACHABLE = "http://127.0.0.1:9"  # discard port: nothing listens, the connection is refused at once

# A realistic repository: safetensors beside the .bin pickles they replace, a GGUF, docs, images.
REPO_FILES = [
    "config.json", "generation_config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors", "pytorch_model.bin.index.json", "pytorch_model-00001-of-00002.bin",
    "pytorch_model-00002-of-00002.bin", "consolidated.pth", "model-q4_0.gguf", "tokenizer.json",
    "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt",
    "chat_template.jinja", "README.md", "LICENSE", "figures/benchmark.png", "modeling_custom.py", "onnx/model.onnx",
]


def kept(patterns: list[str]) -> set[str]:
    return set(filter_repo_objects(REPO_FILES, allow_patterns=patterns))


def test_allow_patterns_keep_safetensors_configs_and_tokenizer_only():
    files = kept(allow_patterns("auto"))
    assert files == {
        "config.json", "generation_config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors", "pytorch_model.bin.index.json", "tokenizer.json", "tokenizer_config.json",
        "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja"}
    assert not {f for f in files if f.endswith((".bin", ".pth", ".pt", ".gguf", ".onnx", ".md", ".png"))}


def test_allow_patterns_dummy_tokenizer_only_and_never_code():
    """Repository Python is never run (--trust-remote-code included), so it is never fetched."""
    assert not {f for f in kept(allow_patterns("dummy")) if f.endswith(".safetensors")}
    assert not {f for f in kept(allow_patterns("auto", tokenizer_only=True)) if f.endswith(".safetensors")}
    assert "modeling_custom.py" not in kept(allow_patterns("auto"))


def test_hub_id_detection(tmp_path):
    assert is_hub_id("Qwen/Qwen2-7B-Instruct") and is_hub_id("gpt2")
    (tmp_path / "org").mkdir()
    os.chdir(tmp_path)
    try:
        assert not is_hub_id("org")  # an existing local folder wins
    finally:
        os.chdir(REPO)
    for local in (None, "", "/no/such/folder", "./model", "~/model", "a/b/c", "model.gguf", "org/", "/"):
        assert not is_hub_id(local), local


def test_modelscope_switch():
    assert not use_modelscope({})
    assert use_modelscope({"SGLANG_USE_MODELSCOPE": "true"})
    assert use_modelscope({"RUNTIME_USE_MODELSCOPE": "1"})
    assert not use_modelscope({"SGLANG_USE_MODELSCOPE": "false"})


@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory) -> str:
    """A huggingface_hub cache holding REPO_ID's main branch at COMMIT: a tiny Llama saved by transformers."""
    cache = tmp_path_factory.mktemp("hf_cache")
    repo = cache / f"models--{REPO_ID.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    save_tiny_model("LlamaForCausalLM", str(repo / "snapshots" / COMMIT))
    return str(cache)


@pytest.mark.parametrize("environ", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": UNREACHABLE}],
                         ids=["offline", "hub-unreachable"])
def test_cached_id_loads_without_network(hf_cache, environ):
    args = ServerArgs(model_path=REPO_ID, download_dir=hf_cache, device="cpu")
    resolved = resolve_model_paths(args, environ)
    assert resolved.model_path == os.path.join(hf_cache, "models--tiny-org--tiny-llama", "snapshots", COMMIT)
    assert resolved.served_model_name == REPO_ID  # clients keep seeing the id
    assert locate_checkpoint(resolved.model_path, "auto").format == "safetensors"
    runner = ModelRunner(ModelRunnerConfig(model_path=resolved.model_path, device="cpu", max_total_tokens=32,
                                           max_running_requests=1))
    assert runner.info.architecture == "LlamaForCausalLM"
    assert torch.isfinite(next(runner.model.parameters())).all()


def test_local_paths_untouched(tmp_path):
    args = ServerArgs(model_path=str(tmp_path), tokenizer_path=None)
    assert resolve_model_paths(args, {}) is args


def test_unreachable_hub_is_one_clear_line(tmp_path):
    args = ServerArgs(model_path="no-org/not-cached", download_dir=str(tmp_path), revision="v1")
    with pytest.raises(HubError) as caught:
        resolve_model_paths(args, {"HF_ENDPOINT": UNREACHABLE})
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("--model-path no-org/not-cached@v1: cannot fetch it from Hugging Face: ")
    assert "connect" in message.lower()  # the cause: the refused connection, not only the wrapper


def test_offline_uncached_id(tmp_path):
    args = ServerArgs(model_path="no-org/not-cached", download_dir=str(tmp_path), tokenizer_path="x/y")
    with pytest.raises(HubError, match=r"^--model-path no-org/not-cached: cannot fetch it from Hugging Face: "):
        resolve_model_paths(args, {"HF_HUB_OFFLINE": "1"})


@pytest.mark.skipif(importlib.util.find_spec("modelscope") is not None, reason="modelscope is installed")
def test_modelscope_missing_library_is_clear():
    with pytest.raises(HubError, match=r"^--model-path qwen/Qwen2-0.5B: .*modelscope.*not installed.*pip install"):
        resolve_model_paths(ServerArgs(model_path="qwen/Qwen2-0.5B"), {"SGLANG_USE_MODELSCOPE": "true"})


def test_launcher_exits_1_with_one_line(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "runtime", "--model-path", "no-org/not-cached", "--port", str(port),
                           "--device", "cpu"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "no-org/not-cached" in errors[0] and "Hugging Face" in errors[0], proc.stderr
