"""runtime.Engine on SmolLM2 (CPU): SGLang's offline example, streaming, asyncio, validation, info,
and a clean shutdown (no actor process, no shared-memory segment left). One Engine for the module;
the last tests stop it."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import psutil
import pytest

import runtime
from runtime.engine import EngineError

pytestmark = pytest.mark.slow

GREEDY = {"temperature": 0, "max_new_tokens": 8}


@pytest.fixture(scope="module")
def llm():
    engine = runtime.Engine(log_level="warning", max_running_requests=8, max_total_tokens=4096)
    engine.actor_pids = dict(engine._deployment.sup.pids())
    engine.shm_prefix = engine._deployment.sup.prefix
    try:
        yield engine
    finally:
        engine.shutdown()


def test_import_runtime_is_cheap():
    import subprocess
    import sys

    code = ("import sys, runtime; "
            "print([m for m in ('torch', 'transformers', 'runtime.engine') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert out.stdout.strip() == "[]"


def test_sglang_offline_example(llm, capsys):
    prompts = ["Hello, my name is", "The president of the United States is", "The capital of France is",
               "The future of AI is"]
    sampling_params = {"temperature": 0.8, "top_p": 0.95, "max_new_tokens": 8}
    outputs = llm.generate(prompts, sampling_params)
    for prompt, output in zip(prompts, outputs):
        print(prompt, output["text"])
    assert len(outputs) == 4
    for output in outputs:
        assert output["text"] and 1 <= output["meta_info"]["completion_tokens"] <= 8
    assert len({o["meta_info"]["id"] for o in outputs}) == 4
    assert "The capital of France is" in capsys.readouterr().out


def test_greedy_single_prompt_and_input_ids(llm):
    out = llm.generate("The capital of France is", GREEDY)
    assert isinstance(out, dict) and "Paris" in out["text"]
    again = llm.generate(input_ids=llm.frontend.encode("The capital of France is"), sampling_params=GREEDY)
    assert again["output_ids"] == out["output_ids"]
    assert again["meta_info"]["cached_tokens"] == again["meta_info"]["prompt_tokens"] - 1


def test_stream_yields_growing_text_ending_like_the_plain_call(llm):
    plain = llm.generate("The capital of France is", GREEDY)
    chunks = list(llm.generate("The capital of France is", GREEDY, stream=True))
    assert len(chunks) >= 2
    assert all(b["text"].startswith(a["text"]) for a, b in zip(chunks, chunks[1:]))
    assert chunks[-1]["text"] == plain["text"] and chunks[-1]["meta_info"]["finish_reason"] is not None


def test_leaving_a_stream_early_aborts_the_request(llm):
    chunk = next(iter(llm.generate("Once upon a time", {"max_new_tokens": 2000, "ignore_eos": True}, stream=True)))
    assert chunk["meta_info"]["finish_reason"] is None
    # The cache can only be flushed once nothing runs: the aborted request must have left.
    deadline = time.monotonic() + 30
    while not llm.flush_cache():
        assert time.monotonic() < deadline, llm.get_server_info()["internal_states"]
        time.sleep(0.2)


def test_async_generate_from_another_event_loop(llm):
    async def main():
        one, two = await asyncio.gather(llm.async_generate("The capital of France is", GREEDY),
                                        llm.async_generate("The capital of France is", GREEDY))
        chunks = [c async for c in await llm.async_generate("The capital of France is", GREEDY, stream=True)]
        return one, two, chunks

    one, two, chunks = asyncio.run(main())
    assert one["text"] == two["text"] == chunks[-1]["text"]
    assert "Paris" in one["text"]


def test_logprobs_and_n(llm):
    out = llm.generate("The capital of France is", {**GREEDY, "max_new_tokens": 3}, return_logprob=True,
                       top_logprobs_num=2)
    triples = out["meta_info"]["output_token_logprobs"]
    assert [t[1] for t in triples] == out["output_ids"]
    assert all(t[0] <= 0 for t in triples)
    assert all(len(top) == 2 for top in out["meta_info"]["output_top_logprobs"])
    several = llm.generate("Once upon a time", {"temperature": 1.0, "max_new_tokens": 4, "n": 3, "seed": 1})
    assert isinstance(several, list) and len(several) == 3


def test_prompt_logprobs_start_at_logprob_start_len_even_for_a_cached_prompt(llm):
    prompt = "The quick brown fox jumps over the lazy dog because"
    runs = [llm.generate(prompt, {**GREEDY, "max_new_tokens": 1}, return_logprob=True, logprob_start_len=3)
            for _ in range(2)]
    # The cache serves the prompt only up to the token before logprob_start_len: its logits score that token.
    assert runs[1]["meta_info"]["cached_tokens"] == 2
    first, second = (r["meta_info"]["input_token_logprobs"] for r in runs)
    n = runs[0]["meta_info"]["prompt_tokens"]
    assert len(first) == len(second) == n - 3
    assert all(a[0] is not None for a in second), "every position from logprob_start_len on is scored"
    assert [a[1] for a in first] == [b[1] for b in second]
    assert all(abs(a[0] - b[0]) < 1e-4 for a, b in zip(first, second))


@pytest.mark.parametrize("kwargs, field", [
    ({"prompt": "Hi", "sampling_params": {"temperature": -1}}, "temperature"),
    ({"prompt": "Hi", "sampling_params": {"temperatur": 0.5}}, "temperatur"),
    ({"prompt": "Hi", "sampling_params": {"top_p": "high"}}, "top_p"),
    ({"prompt": ""}, "prompt"),
    ({"input_ids": [10**9]}, "input_ids"),
    ({"prompt": "Hi", "sampling_params": {"max_new_tokens": 10**6}}, "max_new_tokens"),
    ({}, "prompt"),
])
def test_bad_requests_raise_value_errors_naming_the_field(llm, kwargs, field):
    with pytest.raises(ValueError, match=field):
        llm.generate(**kwargs)


def test_encode_pools_the_last_hidden_state(llm):
    one = llm.encode("Hi")
    both = llm.encode(["Hi", "The capital of France is"])
    assert len(one["embedding"]) == 576 and one["meta_info"]["prompt_tokens"] == 1
    assert [len(o["embedding"]) for o in both] == [576, 576]
    assert abs(sum(x * x for x in both[1]["embedding"]) - 1) < 1e-4
    assert max(abs(a - b) for a, b in zip(one["embedding"], both[0]["embedding"])) < 1e-5
    with pytest.raises(ValueError, match="input_ids"):
        llm.encode(input_ids=[10**9])


def test_unsupported_features_are_clear_errors(llm):
    with pytest.raises(ValueError, match="image_data"):
        llm.generate("Hi", image_data="cat.png")
    with pytest.raises(TypeError, match="unknown argument"):
        runtime.Engine(model_pth="x")


def test_server_info_and_flush_cache(llm):
    info = llm.get_server_info()
    assert info["max_running_requests"] == 8 and info["model_info"]["vocab_size"] == 49152
    assert isinstance(info["internal_states"][0], dict)
    assert llm.flush_cache() is True


def test_actor_death_fails_requests_then_shutdown_is_clean(llm):
    os.kill(llm.actor_pids["worker0"], signal.SIGKILL)
    with pytest.raises(EngineError):
        for _ in range(50):  # the supervisor notices within milliseconds; a request in between may still run
            llm.generate("The capital of France is", GREEDY)
    llm.shutdown()
    llm.shutdown()  # idempotent
    alive = [pid for pid in llm.actor_pids.values() if psutil.pid_exists(pid)
             and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert not alive
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(llm.shm_prefix)]
    with pytest.raises(EngineError, match="shut down"):
        llm.generate("Hi")
