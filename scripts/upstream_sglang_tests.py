"""Run SGLang's own server tests, unchanged, against this server (`python -m runtime` on the default model).

    python scripts/upstream_sglang_tests.py SGLANG_CHECKOUT \
        test/registered/openai_server/basic/test_openai_server.py test/registered/core/test_srt_endpoint.py

SGLANG_CHECKOUT is an SGLang source tree, or any folder holding its test files at the same relative paths (the
test files are never copied into this repository). Their utilities come from the installed `sglang` package
(`pip install --no-deps sglang==0.5.23`; their imports also need dill datasets sentencepiece partial-json-parser
uvicorn fastapi einops). Before collection a pytest plugin points sglang.test.test_utils at our server:
popen_launch_server starts `python -m runtime` on the port of the test's base URL, and the test model names
become a tokenizer folder written from the default model's GGUF, so `get_tokenizer(...)` works offline. Tests
that cannot pass on the default model are deselected, each with its reason (DESELECTED below), and the run ends
with a table of every test's outcome.

Extra pytest arguments follow `--` (e.g. `-- -k test_completion -x`). One server runs at a time."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import types
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from runtime.default_model import DEFAULT_MODEL_NAME, default_model_path  # noqa: E402

# The test modules' model names (sglang.test.test_utils) that we replace with the default model.
MODEL_NAME_CONSTANTS = ("DEFAULT_SMALL_MODEL_NAME_FOR_TEST", "DEFAULT_MODEL_NAME_FOR_TEST",
                        "DEFAULT_SMALL_MODEL_NAME_FOR_TEST_BASE")

READY_LINE = "Ready: serving "  # runtime/launcher.py, once the warm-up request has been answered

# SGLang flags with the same meaning here: passed through, with their value when they take one.
PASSED_FLAGS = {"--enable-custom-logit-processor": 0, "--enable-metrics": 0, "--disable-radix-cache": 0,
                "--chunked-prefill-size": 1, "--max-running-requests": 1, "--max-total-tokens": 1,
                "--context-length": 1, "--is-embedding": 0, "--served-model-name": 1, "--chat-template": 1,
                "--tool-call-parser": 1, "--reasoning-parser": 1, "--disable-overlap-schedule": 0}
# GPU-only tuning flags, dropped: they size or shape GPU memory and kernels, and the default model runs on the
# CPU here (--device is what popen_launch_server adds from its device probe).
DROPPED_FLAGS = {"--mem-fraction-static": 1, "--cuda-graph-max-bs": 1, "--cuda-graph-max-bs-decode": 1,
                 "--attention-backend": 1, "--device": 1, "--disable-cuda-graph": 0}


@dataclass(frozen=True)
class Deselection:
    category: str  # bigger model | longer context | GPU-only | refused by design
    reason: str


LLAMA_VOCAB = "bigger model: its token ids are Llama-3.2-1B-Instruct's (SGLang's test model)"
DESELECTED = {
    "test_srt_endpoint.py::TestSRTEndpoint::test_logprob_with_chunked_prefill": Deselection(
        "longer context", "a 72k-token prompt; SmolLM2 has 8k positions"),
    "test_srt_endpoint.py::TestSRTEndpoint::test_logprob_mixed": Deselection(
        "longer context", "prompts of 10k and 50k tokens; SmolLM2 has 8k positions"),
    "test_srt_endpoint.py::TestSRTEndpoint::test_cache_tokens": Deselection(
        "longer context", "prompts of 10k and 11k tokens; SmolLM2 has 8k positions"),
    "test_srt_endpoint.py::TestSRTEndpoint::test_logit_bias": Deselection(
        "bigger model", "biases token 60704 (' Paris' for Llama-3.2); SmolLM2's vocabulary has 49152 ids"),
    "test_srt_endpoint.py::TestSRTEndpoint::test_logit_bias_isolation": Deselection(
        "bigger model", "biases token 60704 (' Paris' for Llama-3.2); SmolLM2's vocabulary has 49152 ids"),
    "test_srt_endpoint.py::TestTokenizeDetokenize::test_openai_tokenize_chat_messages": Deselection(
        "bigger model", "wants `tools` to change the prompt; SmolLM2's chat template renders no tools"),
    "test_srt_endpoint.py::TestTokenizeDetokenize::test_detokenize_invalid_tokens": Deselection(
        "refused by design", "token id -1 is the client's error: a 400 naming `tokens`, where SGLang answers 500"),
    "test_openai_server.py::TestOpenAIServer::test_response_prefill": Deselection(
        "bigger model", "wants Llama-3.1-8B's extraction; SmolLM2-135M continues the JSON with another field"),
    "test_openai_server.py::TestOpenAIServerv1Responses::test_response_prefill": Deselection(
        "bigger model", "wants Llama-3.1-8B's extraction; SmolLM2-135M continues the JSON with another field"),
    **{f"test_openai_server.py::TestOpenAIServerv1Responses::{name}": Deselection(
        "bigger model", "wants the reply to end within 16/32 tokens (Llama-3.2's short answer); SmolLM2-135M's runs "
        "on, and a reply cut by max_output_tokens is `incomplete` (a response.incomplete event), as OpenAI and "
        "SGLang 0.5.23 answer") for name in ("test_response", "test_response_stream", "test_response_completion",
                                             "test_response_completion_stream")},
    "test_openai_server.py::TestOpenAIV1Rerank": Deselection(
        "bigger model", "needs a cross-encoder reranker checkpoint (DEFAULT_SMALL_CROSS_ENCODER_MODEL_NAME_FOR_TEST)"),
    "test_openai_server.py::TestOpenAIServerCustomLogitProcessor": Deselection(
        "bigger model", "forces token ids 0-31 and compares the text: ordinary characters in Llama-3.2's "
        "vocabulary, but SmolLM2's ids 0-16 are special tokens (left out of the text; 0 and 2 end the output)"),
}


class ServerLauncher:
    """popen_launch_server's replacement: our server on the base URL's port, the arguments translated."""

    def __init__(self, work_dir: Path, model_name: str):
        self.work_dir = work_dir
        self.model_name = model_name
        self.launched: set[int] = set()
        self.count = 0

    def translate(self, other_args) -> list[str]:
        args = [str(a) for a in (other_args or [])]
        flags: list[str] = []
        i = 0
        while i < len(args):
            flag = args[i]
            if flag in PASSED_FLAGS:
                flags += args[i:i + 1 + PASSED_FLAGS[flag]]
                i += 1 + PASSED_FLAGS[flag]
            elif flag in DROPPED_FLAGS:
                i += 1 + DROPPED_FLAGS[flag]
            else:
                raise ValueError(f"upstream_sglang_tests: no translation for the server flag {flag!r}")
        return flags

    def __call__(self, model, base_url, timeout, api_key=None, other_args=None, env=None,
                 return_stdout_stderr=None, device="auto", pd_separated=False, num_replicas=None):
        if model != self.model_name:
            raise ValueError(f"upstream_sglang_tests: the test wants the model {model!r}; only the default model "
                             "is served (deselect the test with its reason)")
        if pd_separated or num_replicas is not None:
            raise ValueError("upstream_sglang_tests: prefill/decode disaggregation is not served")
        port = base_url.rsplit(":", 1)[1]
        command = [sys.executable, "-m", "runtime", "--port", port, *self.translate(other_args)]
        if api_key is not None:
            command += ["--api-key", api_key]
        self.count += 1
        log_path = self.work_dir / f"server-{self.count}.log"
        if return_stdout_stderr:
            stdout, stderr = return_stdout_stderr
        else:
            stdout = stderr = open(log_path, "w")
        process = subprocess.Popen(command, cwd=REPO, env={**os.environ, **(env or {})}, stdout=stdout,
                                   stderr=stderr)
        self.launched.add(process.pid)
        print(f"\n[upstream_sglang_tests] {' '.join(command[1:])}  (log: {log_path})", flush=True)
        self.wait_ready(process, base_url, api_key, timeout, None if return_stdout_stderr else log_path)
        return process

    def wait_ready(self, process, base_url, api_key, timeout, log_path: Path | None) -> None:
        """Until the launcher logs its ready line (after its warm-up request), or without our own log, until
        /health_generate answers."""
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode} before it was ready; see {log_path}")
            if log_path is not None:
                if READY_LINE in log_path.read_text(errors="replace"):
                    return
                time.sleep(1)
                continue
            try:
                request = urllib.request.Request(base_url + "/health_generate", headers=headers)
                with urllib.request.urlopen(request, timeout=30) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(1)
        self.stop(process.pid)
        raise TimeoutError(f"the server was not ready within {timeout} s; see {log_path}")

    def stop(self, pid: int) -> bool:
        """SIGTERM first, so that the launcher unlinks its shared memory; False for a process not ours."""
        if pid not in self.launched:
            return False
        self.launched.discard(pid)
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    return True
            except ChildProcessError:
                return True
            time.sleep(0.2)
        return True


def write_tokenizer_folder(folder: Path) -> None:
    """A Hugging Face tokenizer folder from the default model's GGUF (tokenizer and chat template)."""
    if (folder / "tokenizer_config.json").exists():
        return
    from transformers import AutoTokenizer

    gguf = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
    tokenizer.save_pretrained(folder)


def install_torchvision_placeholder() -> None:
    """sglang's config package imports InternVL's image transforms, which import torchvision at module level;
    no torchvision build matches the CPU torch installed here, and no test run here uses those transforms. A
    placeholder module lets the import succeed; using any of its names raises. transformers and datasets probe
    torchvision's presence with importlib.util.find_spec, which a spec-less module in sys.modules breaks, so they
    are imported (and their probes cached) first."""
    import datasets  # noqa: F401
    from transformers.utils import import_utils

    import_utils.is_torchvision_available()

    def placeholder(name: str) -> types.ModuleType:
        module = types.ModuleType(name)

        def missing(attribute: str):
            if attribute.startswith("__"):
                raise AttributeError(attribute)

            def unavailable(*args, **kwargs):
                raise ImportError(f"{name}.{attribute}: torchvision is not installed (placeholder)")

            return type(attribute, (), {"__init__": unavailable, "__getattr__": lambda self, a: unavailable()})

        module.__getattr__ = missing
        return module

    names = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")
    for name in names:
        sys.modules.setdefault(name, placeholder(name))
    sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
    sys.modules["torchvision.transforms"].functional = sys.modules["torchvision.transforms.functional"]


class UpstreamPlugin:
    def __init__(self, work_dir: Path):
        self.work_dir = work_dir
        self.launcher = ServerLauncher(work_dir, DEFAULT_MODEL_NAME)
        self.deselected: dict[str, Deselection] = {}
        self.outcomes: dict[str, str] = {}

    def pytest_configure(self, config) -> None:
        # The test modules import these names at import time: patch them before collection.
        import sglang.srt.utils
        import sglang.test.test_utils as test_utils

        for name in MODEL_NAME_CONSTANTS:
            setattr(test_utils, name, DEFAULT_MODEL_NAME)
        test_utils.popen_launch_server = self.launcher
        original_kill = sglang.srt.utils.kill_process_tree

        def kill_process_tree(parent_pid, *args, **kwargs):
            self.launcher.stop(parent_pid)
            return original_kill(parent_pid, *args, **kwargs)

        sglang.srt.utils.kill_process_tree = kill_process_tree

    def pytest_collection_modifyitems(self, config, items) -> None:
        kept = []
        for item in items:
            key = item.nodeid.rsplit("/", 1)[-1]
            found = next((d for prefix, d in DESELECTED.items() if key == prefix or key.startswith(prefix + "::")),
                         None)
            if found is None:
                kept.append(item)
            else:
                self.deselected[key] = found
        if len(kept) != len(items):
            config.hook.pytest_deselected(items=[i for i in items if i not in kept])
            items[:] = kept

    def pytest_runtest_logreport(self, report) -> None:
        key = report.nodeid.rsplit("/", 1)[-1]
        if report.when == "call" or report.outcome != "passed":
            if report.outcome == "failed" and report.when != "call":
                self.outcomes[key] = f"error ({report.when})"
            elif key not in self.outcomes or report.when == "call":
                self.outcomes[key] = report.outcome

    def pytest_terminal_summary(self, terminalreporter) -> None:
        write = terminalreporter.write_line
        rows = [(key, outcome, "") for key, outcome in self.outcomes.items()]
        rows += [(key, "deselected", f"{d.category}: {d.reason}") for key, d in self.deselected.items()]
        width = max((len(r[0]) for r in rows), default=10)
        write("")
        write(f"{'test':<{width}}  {'outcome':<12}  reason")
        for key, outcome, reason in rows:
            write(f"{key:<{width}}  {outcome:<12}  {reason}")
        counts: dict[str, int] = {}
        for _, outcome, _ in rows:
            counts[outcome] = counts.get(outcome, 0) + 1
        write("totals: " + ", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items())))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sglang_path", help="an SGLang checkout, or a folder with its test files")
    parser.add_argument("tests", nargs="+", help="test files, relative to sglang_path")
    parser.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "upstream-sglang-run"),
                        help="server logs and the tokenizer folder")
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args, pytest_args = parser.parse_args(argv[:split]), argv[split + 1:]

    work_dir = Path(args.work_dir).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    # The tests pass the model name both to get_tokenizer and to the server: a folder of that name in the
    # working directory makes get_tokenizer load it offline, and the server serves the same name.
    write_tokenizer_folder(work_dir / DEFAULT_MODEL_NAME)
    os.chdir(work_dir)
    os.environ["SGLANG_TEST_MAX_RETRY"] = "0"  # a failure is reported, not retried away
    os.environ["HF_HUB_OFFLINE"] = "1"
    install_torchvision_placeholder()

    import pytest

    root = Path(args.sglang_path).resolve()
    files = [str(root / t) for t in args.tests]
    return pytest.main([*files, "--rootdir", str(root), "-p", "no:cacheprovider", "-p", "no:xdist", "-q",
                        *pytest_args], plugins=[UpstreamPlugin(work_dir)])


if __name__ == "__main__":
    sys.exit(main())
