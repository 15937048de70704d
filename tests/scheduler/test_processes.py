"""The scheduler and worker actors as real processes (Supervisor, shared-memory rings, a tiny
random-weight model): scripts/bench_overlap.py serves one workload with and without overlap and
fails unless both give the same greedy tokens."""

import importlib.util
import json
import sys
from pathlib import Path

from tests.model_fixtures import save_tiny_model

BENCH = Path(__file__).resolve().parents[2] / "scripts" / "bench_overlap.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_overlap", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_worker_and_scheduler_processes_serve_identically_with_and_without_overlap(tmp_path):
    save_tiny_model("LlamaForCausalLM", str(tmp_path / "model"))
    out = tmp_path / "bench.json"
    status = load_bench().main(["--model-path", str(tmp_path / "model"), "--device", "cpu", "--num-prompts", "4",
                                "--input-len", "12", "--output-len", "6", "--vocab-limit", "128",
                                "--max-running-requests", "4", "--timeout", "120", "--output", str(out)])
    report = json.loads(out.read_text())
    assert status == 0 and report["identical"]
    assert [r["mode"] for r in report["results"]] == ["no overlap", "overlap"]
    for r in report["results"]:
        assert r["output_tokens"] == 4 * 6 and r["batches"] >= 6
        assert 0.0 <= r["worker_idle_fraction"] <= 1.0
