"""Clients nobody here wrote, against `python -m runtime` on SmolLM2 (CPU): SGLang's frontend
language (multi-turn gen, fork, choices, streaming, run_batch, logprobs; skipped when the sglang
package is not installed, see scripts/install.sh), prompt logprobs checked position by position
against transformers (native /generate, token_ids_logprob, /v1/completions echo, /v1/score), and
the openai client on /v1/responses and /tokenize, custom logit processors (SGLang's wire form) beside
plain requests in one batch, and /abort_request's answer.

One server for the module."""

from __future__ import annotations

import json
import math
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from runtime.default_model import default_model_path
from runtime.worker.custom_logit_processor import CustomLogitProcessor
from tests.e2e.test_server import Server
from tests.model_fixtures import hf_smollm2

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("compat")
    srv = Server(folder / "server.log", "--max-running-requests", "8", "--max-total-tokens", "4096",
                 "--storage-dir", str(folder / "store"), "--enable-custom-logit-processor")
    yield from srv.serve()


@pytest.fixture(scope="module")
def reference(server):
    """transformers' log-probabilities for PROMPT + " Paris": [position, vocab], row i predicting token i + 1."""
    status, out = server.post("/tokenize", {"prompt": PROMPT + " Paris"})
    assert status == 200, out
    ids = out["tokens"]
    model = hf_smollm2(default_model_path())
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return ids, torch.log_softmax(logits, dim=-1)


def close(a: float, b: float) -> bool:
    return abs(a - b) < 2e-3


def test_prompt_logprobs_line_up_with_transformers(server, reference):
    ids, logprobs = reference
    prompt = ids[:-1]  # PROMPT alone
    wanted = [ids[-1], 11]
    status, out = server.post("/generate", {"input_ids": prompt, "return_logprob": True, "logprob_start_len": 0,
                                            "top_logprobs_num": 2, "token_ids_logprob": wanted,
                                            "sampling_params": {"max_new_tokens": 1, "temperature": 0}})
    assert status == 200, out
    meta = out["meta_info"]
    entries = meta["input_token_logprobs"]
    assert [e[1] for e in entries] == prompt and entries[0][0] is None and meta["input_top_logprobs"][0] is None
    for i in range(1, len(prompt)):
        assert close(entries[i][0], logprobs[i - 1, prompt[i]].item()), i
        assert meta["input_top_logprobs"][i][0][1] == int(logprobs[i - 1].argmax())
        assert [e[1] for e in meta["input_token_ids_logprobs"][i]] == wanted
        assert close(meta["input_token_ids_logprobs"][i][0][0], logprobs[i - 1, wanted[0]].item())
    last = logprobs[len(prompt) - 1]
    token = out["output_ids"][0]
    assert token == int(last.argmax()) == ids[-1]  # " Paris"
    assert close(meta["output_token_logprobs"][0][0], last[token].item())
    assert close(meta["output_token_ids_logprobs"][0][1][0], last[11].item())
    # logprob_start_len k: tokens k.. with their logprobs, none missing
    status, out = server.post("/generate", {"input_ids": prompt, "return_logprob": True, "logprob_start_len": 2,
                                            "sampling_params": {"max_new_tokens": 0}})
    assert out["output_ids"] == [] and out["meta_info"]["finish_reason"] == {"type": "length", "length": 0}
    entries = out["meta_info"]["input_token_logprobs"]
    assert [e[1] for e in entries] == prompt[2:]
    assert all(close(e[0], logprobs[2 + j - 1, e[1]].item()) for j, e in enumerate(entries))


def test_completions_echo_logprobs_and_score(server, reference):
    ids, logprobs = reference
    status, out = server.post("/v1/completions", {"prompt": PROMPT, "max_tokens": 1, "temperature": 0, "echo": True,
                                                  "logprobs": 1})
    assert status == 200, out
    choice = out["choices"][0]
    assert choice["text"] == PROMPT + " Paris"
    lp = choice["logprobs"]
    assert lp["tokens"][0] == "The" and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["text_offset"][:3] == [0, 3, 11]
    assert all(close(lp["token_logprobs"][i], logprobs[i - 1, ids[i]].item()) for i in range(1, len(ids)))
    paris, london = ids[-1], 4528  # " Paris", " London"
    status, out = server.post("/v1/score", {"query": "The capital of France", "items": [" is"],
                                            "label_token_ids": [paris, london]})
    assert status == 200, out
    assert out["scores"][0][0] == pytest.approx(math.exp(logprobs[len(ids) - 2, paris].item()), rel=1e-2)
    assert out["scores"][0][0] > out["scores"][0][1]


def test_openai_client_responses_and_messages(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    first = client.responses.create(model="default", input="What is the capital of France?", temperature=0,
                                    max_output_tokens=12)
    assert "Paris" in first.output_text
    second = client.responses.create(model="default", input="Repeat the city name once.", temperature=0,
                                     previous_response_id=first.id, max_output_tokens=8)
    assert second.previous_response_id == first.id and second.output_text
    assert client.responses.retrieve(second.id).output_text == second.output_text
    request = urllib.request.Request(server.url + "/v1/messages", headers={"Content-Type": "application/json"},
                                     data=json.dumps({"model": "x", "max_tokens": 12, "temperature": 0, "messages": [
                                         {"role": "user", "content": "What is the capital of France?"}]}).encode())
    with urllib.request.urlopen(request, timeout=120) as response:
        message = json.load(response)
    assert "Paris" in message["content"][0]["text"]


def test_sglang_frontend_program(server):
    sgl = pytest.importorskip("sglang")
    backend = sgl.RuntimeEndpoint(server.url)  # /get_model_info, then the frontend's calls below

    @sgl.function
    def multi_turn(s, question):
        s += sgl.user(question)
        s += sgl.assistant(sgl.gen("first", max_tokens=8, temperature=0))
        s += sgl.user("Say it again.")
        s += sgl.assistant(sgl.gen("second", max_tokens=8, temperature=0))

    @sgl.function
    def forked(s):
        s += PROMPT
        forks = s.fork(2)
        for f, n in zip(forks, (3, 5)):
            f += sgl.gen("x", max_tokens=n, temperature=0)
        s += forks[0]["x"] + "|" + forks[1]["x"]

    @sgl.function
    def choose(s):
        s += PROMPT
        s += sgl.gen("city", choices=[" London", " Paris", " Berlin"])

    @sgl.function
    def with_logprobs(s):
        s += PROMPT
        s += sgl.gen("y", max_tokens=3, temperature=0, return_logprob=True, logprob_start_len=0, top_logprobs_num=2)

    state = multi_turn.run(question="What is the capital of France?", backend=backend)
    assert "Paris" in state["first"] and state["second"]
    state = forked.run(backend=backend)
    assert state.text().startswith(PROMPT + " Paris")
    assert choose.run(backend=backend)["city"] == " Paris"
    streamed = with_logprobs.run(stream=True, backend=backend)
    pieces = list(streamed.text_iter("y"))
    state = with_logprobs.run(backend=backend)
    assert "".join(pieces).startswith(" Paris") and state["y"].startswith(" Paris")
    meta = state.get_meta_info("y")
    assert meta["input_token_logprobs"][0][0] is None and len(meta["input_token_logprobs"]) == 5
    states = multi_turn.run_batch([{"question": "What is the capital of France?"}, {"question": "Hi"}],
                                  backend=backend)
    assert len(states) == 2 and "Paris" in states[0]["first"]


def test_custom_logit_processor_forces_its_rows_only(server):
    class ForceToken(CustomLogitProcessor):  # local: dill sends the class itself, the worker never imports tests/
        def __call__(self, logits, custom_param_list):
            for i, params in enumerate(custom_param_list):
                logits[i, :] = -float("inf")
                logits[i, params["token_id"]] = 0.0
            return logits

    processor = ForceToken.to_str()

    def native(token_id):
        body = {"text": PROMPT, "sampling_params": {"temperature": 0, "max_new_tokens": 6}}
        if token_id is not None:
            body["custom_logit_processor"] = processor
            body["sampling_params"]["custom_params"] = {"token_id": token_id}
        return server.post("/generate", body)

    with ThreadPoolExecutor(6) as pool:  # forced and plain requests share batches
        results = list(pool.map(native, [300, None, 301, None, 302, None]))
    plain = results[1][1]["output_ids"]
    for token_id, (status, out) in zip([300, None, 301, None, 302, None], results):
        assert status == 200, out
        assert out["output_ids"] == ([token_id] * 6 if token_id is not None else plain)
    assert plain != [plain[0]] * 6
    status, out = server.post("/v1/chat/completions", {
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0,
        "custom_logit_processor": processor, "custom_params": {"token_id": 300}})
    assert status == 200 and out["usage"]["completion_tokens"] == 3, out
    status, out = server.post("/generate", {"text": PROMPT, "custom_logit_processor": "not json"})
    assert status == 400 and out["error"]["param"] == "custom_logit_processor"


def test_abort_request_answers_the_output_so_far(server):
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("r", server.post("/generate", {
        "text": PROMPT, "rid": "to-abort", "sampling_params": {"max_new_tokens": 2000, "ignore_eos": True}})))
    thread.start()
    time.sleep(3)
    request = urllib.request.Request(server.url + "/abort_request", data=json.dumps({"rid": "to-abort"}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200
    thread.join(60)
    status, out = result["r"]
    assert status == 200 and out["meta_info"]["finish_reason"]["type"] == "abort", out
    assert out["meta_info"]["completion_tokens"] < 2000
