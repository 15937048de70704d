"""The native API (SGLang's wire format) over HTTP, on the fake frontend with the real SmolLM2
tokenizer: /generate (single, batch, n, stream, logprobs, stops), refusals and engine aborts,
client disconnects, and the service endpoints (/health*, /get_*_info, /flush_cache, /metrics)."""

from __future__ import annotations

import socket
import time

import msgspec
import pytest

from httpd import ServerConfig
from runtime.default_model import default_model_path
from runtime.ingress.api.app import create_server
from runtime.ingress.errors import RequestError
from runtime.messages import LogprobOptions, SamplingParams
from runtime.server_args import ServerArgs
from tests.fake_frontend import FakeFrontend, ServerThread, fake_logprob, http_request, sse_payloads, wait_until

PROMPT = "The capital of France is Paris, and the capital of Italy is Rome."


@pytest.fixture
def url(served):
    return served[0].url


def post(url, path, body):
    status, headers, raw = http_request(url, "POST", path, body)
    return status, (msgspec.json.decode(raw) if headers.get("content-type") == "application/json" else raw)


def test_generate_text_returns_text_ids_and_meta_info(url, fake, tokenizer):
    status, out = post(url, "/generate", {"text": PROMPT, "sampling_params": {"max_new_tokens": 5}})
    assert status == 200
    prompt_ids = tokenizer.encode(PROMPT)
    assert out["output_ids"] == prompt_ids[:5]
    assert out["text"] == tokenizer.decode(prompt_ids[:5])
    meta = out["meta_info"]
    assert meta["finish_reason"] == {"type": "length", "length": 5}
    assert (meta["prompt_tokens"], meta["completion_tokens"], meta["cached_tokens"]) == (len(prompt_ids), 5, 0)
    assert meta["id"] == fake.calls[-1].rid and meta["e2e_latency"] > 0
    assert "input_token_logprobs" not in meta
    assert fake.calls[-1].input_ids == prompt_ids and fake.calls[-1].stream is False


def test_every_sampling_param_reaches_the_engine(url, fake):
    params = {"max_new_tokens": 7, "min_new_tokens": 2, "temperature": 0.5, "top_p": 0.9, "top_k": 40, "min_p": 0.05,
              "frequency_penalty": 0.5, "presence_penalty": -0.5, "repetition_penalty": 1.2, "stop": "zzz",
              "stop_token_ids": [7, 9], "ignore_eos": True, "skip_special_tokens": False,
              "spaces_between_special_tokens": False, "no_stop_trim": True, "seed": 11, "logit_bias": {"5": -3.5}}
    status, _ = post(url, "/generate", {"input_ids": [10, 11, 12], "sampling_params": params, "rid": "my-rid"})
    assert status == 200
    call = fake.calls[-1]
    assert call.rid == "my-rid"
    assert call.sampling == SamplingParams(
        max_new_tokens=7, min_new_tokens=2, temperature=0.5, top_p=0.9, top_k=40, min_p=0.05, frequency_penalty=0.5,
        presence_penalty=-0.5, repetition_penalty=1.2, stop=["zzz"], stop_token_ids=[7, 9], ignore_eos=True,
        skip_special_tokens=False, spaces_between_special_tokens=False, no_stop_trim=True, n=1, seed=11,
        logit_bias={5: -3.5})
    assert call.logprobs == LogprobOptions()


def test_default_max_new_tokens_is_128_and_clamped_to_the_context(url, fake):
    post(url, "/generate", {"input_ids": [5] * 10})
    assert fake.calls[-1].sampling.max_new_tokens == 128
    post(url, "/generate", {"input_ids": [5] * 2000, "sampling_params": {"max_new_tokens": None}})
    assert fake.calls[-1].sampling.max_new_tokens == fake.context_length - 2000


def test_batches_give_lists_with_per_prompt_params(url, fake, tokenizer):
    status, out = post(url, "/generate", {"text": ["one two three", "four five"], "rid": ["a", "b"],
                                          "sampling_params": [{"max_new_tokens": 1}, {"max_new_tokens": 2}]})
    assert status == 200
    assert [o["meta_info"]["id"] for o in out] == ["a", "b"]
    assert [o["output_ids"] for o in out] == [tokenizer.encode("one two three")[:1], tokenizer.encode("four five")[:2]]
    status, out = post(url, "/generate", {"input_ids": [[10, 11], [12, 13, 14]],
                                          "sampling_params": {"max_new_tokens": 3}})
    assert [o["output_ids"] for o in out] == [[10, 11, 10], [12, 13, 14]]


def test_n_fans_out_into_distinct_requests(url, fake):
    status, out = post(url, "/generate", {"input_ids": [10, 11, 12], "rid": "r",
                                          "sampling_params": {"n": 3, "max_new_tokens": 2, "seed": 100}})
    assert status == 200 and len(out) == 3
    assert [o["meta_info"]["id"] for o in out] == ["r-0", "r-1", "r-2"]
    assert [c.sampling.seed for c in fake.calls] == [100, 101, 102]
    assert all(c.sampling.n == 1 for c in fake.calls)


def test_stop_strings_and_stop_token_ids(url, fake, tokenizer):
    ids = tokenizer.encode(PROMPT)
    status, out = post(url, "/generate", {"text": PROMPT, "sampling_params": {"max_new_tokens": 30, "stop": " Paris"}})
    assert out["text"] == "The capital of France is"
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": " Paris"}
    status, out = post(url, "/generate", {"input_ids": ids, "sampling_params": {"max_new_tokens": 30,
                                                                              "stop_token_ids": [ids[3]]}})
    assert out["output_ids"] == ids[:4]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": ids[3]}


def test_stream_sends_cumulative_text_then_done(url, fake, tokenizer):
    ids = tokenizer.encode(PROMPT)
    status, headers, raw = http_request(url, "POST", "/generate", {"text": PROMPT, "stream": True,
                                                                    "sampling_params": {"max_new_tokens": 4}})
    assert status == 200 and headers["content-type"] == "text/event-stream"
    events = sse_payloads(raw)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert [c["output_ids"] for c in chunks] == [ids[:k] for k in range(1, 5)]
    assert [c["text"] for c in chunks] == [tokenizer.decode(ids[:k]) for k in range(1, 5)]
    assert [c["meta_info"]["finish_reason"] for c in chunks] == [None, None, None, {"type": "length", "length": 4}]
    assert fake.calls[-1].stream is True


def test_stream_carries_token_timestamps_when_the_pipeline_stamps_them(url, fake):
    """--enable-token-timestamps: the scheduler and the detokenizer stamp each update; the ingress adds its own when
    it writes the chunk. Without stamps (the default) meta_info has no timestamps."""
    body = {"input_ids": [5, 6, 7], "stream": True, "sampling_params": {"max_new_tokens": 2}}
    chunks = sse_payloads(http_request(url, "POST", "/generate", body)[2])[:-1]
    assert all("timestamps" not in c["meta_info"] for c in chunks)
    fake.token_timestamps = [1.5, 1.75]
    before = time.monotonic()
    chunks = sse_payloads(http_request(url, "POST", "/generate", body)[2])[:-1]
    for chunk in chunks:
        stamps = chunk["meta_info"]["timestamps"]
        assert stamps["scheduler"] == 1.5 and stamps["detokenizer"] == 1.75
        assert before <= stamps["ingress"] <= time.monotonic()


def test_stream_of_a_batch_tags_events_with_their_index(url, fake):
    status, _, raw = http_request(url, "POST", "/generate", {"input_ids": [[10, 11], [20, 21]], "stream": True,
                                                             "sampling_params": {"max_new_tokens": 2}})
    events = sse_payloads(raw)[:-1]
    finals = {e["index"]: e["output_ids"] for e in events if e["meta_info"]["finish_reason"]}
    assert finals == {0: [10, 11], 1: [20, 21]}


def test_logprobs_in_sglang_layout(url, fake, tokenizer):
    ids = tokenizer.encode("Hello world again")
    status, out = post(url, "/generate", {"input_ids": ids, "return_logprob": True, "logprob_start_len": 0,
                                          "top_logprobs_num": 2, "return_text_in_logprobs": True,
                                          "sampling_params": {"max_new_tokens": 2}})
    assert status == 200
    meta = out["meta_info"]
    text = lambda t: tokenizer.decode([t])  # noqa: E731
    assert meta["input_token_logprobs"] == [[None, ids[0], text(ids[0])]] + [
        [fake_logprob(p), ids[p], text(ids[p])] for p in range(1, len(ids))]
    assert meta["output_token_logprobs"] == [[fake_logprob(k), ids[k], text(ids[k])] for k in range(2)]
    assert meta["output_top_logprobs"][1] == [[fake_logprob(1), ids[1], text(ids[1])],
                                              [fake_logprob(1) - 1, ids[1] + 1, text(ids[1] + 1)]]
    assert meta["input_top_logprobs"][0] is None and len(meta["input_top_logprobs"]) == len(ids)
    assert fake.calls[-1].logprobs == LogprobOptions(True, 0, 2)
    status, out = post(url, "/generate", {"input_ids": ids, "return_logprob": True,
                                          "sampling_params": {"max_new_tokens": 1}})
    assert out["meta_info"]["input_token_logprobs"] == []
    assert out["meta_info"]["output_token_logprobs"] == [[fake_logprob(0), ids[0], None]]


def test_refusals_keep_their_status_streamed_or_not(url, fake):
    fake.reject = RequestError(503, "the engine is overloaded")
    for stream in (False, True):
        status, headers, raw = http_request(url, "POST", "/generate", {"input_ids": [1, 2], "stream": stream})
        assert status == 503
        assert msgspec.json.decode(raw)["error"]["message"] == "the engine is overloaded"


def test_engine_abort_is_an_error_and_an_error_event_in_a_stream(url, fake):
    fake.abort_after = 2
    status, out = post(url, "/generate", {"input_ids": [10, 11, 12], "sampling_params": {"max_new_tokens": 5}})
    assert status == 500 and "the worker failed" in out["error"]["message"]
    status, _, raw = http_request(url, "POST", "/generate", {"input_ids": [10, 11, 12], "stream": True,
                                                             "sampling_params": {"max_new_tokens": 5}})
    events = sse_payloads(raw)
    assert status == 200 and events[-1] == "[DONE]"
    assert [e["output_ids"] for e in events[:2]] == [[10], [10, 11]]
    assert "the worker failed" in events[2]["error"]["message"] and events[2]["error"]["code"] == 500


def _raw_post(port: int, path: str, body: dict) -> socket.socket:
    payload = msgspec.json.encode(body)
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(b"POST %b HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b"
                 % (path.encode(), len(payload), payload))
    return sock


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_aborts_the_request(served, fake, stream):
    server, _ = served
    fake.token_delay_s = 0.02
    fake.abort_seen.clear()
    fake.aborted.clear()
    sock = _raw_post(server.port, "/generate", {"input_ids": [10, 11, 12], "rid": f"leaver-{stream}", "stream": stream,
                                                "sampling_params": {"max_new_tokens": 1000}})
    if stream:
        assert b"data: " in sock.recv(4096)
    else:
        assert wait_until(lambda: f"leaver-{stream}" in fake.running)  # generating, no answer yet
    sock.close()
    assert fake.abort_seen.wait(2), "closing the connection did not abort the request"
    assert fake.aborted == [f"leaver-{stream}"]


def test_health_endpoints(url, fake):
    assert http_request(url, "GET", "/health")[0] == 200
    status, _, body = http_request(url, "GET", "/health_generate")
    assert (status, body) == (200, b"")
    assert fake.calls[-1].sampling.max_new_tokens == 1
    fake.reject = RequestError(503, "overloaded")
    status, _, body = http_request(url, "GET", "/health_generate")
    assert status == 503 and b"overloaded" in body


def test_model_and_server_info(url, fake):
    status, _, raw = http_request(url, "GET", "/get_model_info")
    info = msgspec.json.decode(raw)
    assert status == 200 and info["is_generation"] is True
    assert info["context_length"] == fake.context_length and info["vocab_size"] == fake.model_info.vocab_size
    assert set(info) >= {"model_path", "tokenizer_path", "served_model_name", "architectures"}
    # Without --model-path the tokenizer path names the default model's file, so clients (bench_serving) can load
    # its tokenizer; model_path names the model the GGUF holds, so clients (SGLang's frontend) recognise its family.
    assert info["tokenizer_path"] == info["gguf_file"] == default_model_path()
    assert info["model_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert msgspec.json.decode(http_request(url, "GET", "/model_info")[2]) == info
    status, _, raw = http_request(url, "GET", "/server_info")
    assert http_request(url, "GET", "/get_server_info")[0] == 200
    info = msgspec.json.decode(raw)
    assert info["max_body_bytes"] == fake.args.max_body_bytes
    assert info["internal_states"][0]["token_usage"] == 0.25
    assert info["max_total_num_tokens"] == fake.model_info.max_total_tokens  # SGLang's top-level name
    assert info["model_info"]["context_length"] == fake.context_length


def test_flush_cache(url, fake):
    status, _, body = http_request(url, "POST", "/flush_cache")
    assert (status, body) == (200, b"Cache flushed.\n")
    fake.flush_ok = False
    status, _, body = http_request(url, "GET", "/flush_cache")
    assert status == 400 and b"requests are running" in body


def test_encode_wants_text_or_input_ids(url, fake):
    status, out = post(url, "/encode", {"rid": "x"})
    assert status == 400
    assert out["error"]["message"] == "give exactly one of text or input_ids"


def test_metrics_count_requests_and_read_scheduler_state(url, fake):
    before = http_request(url, "GET", "/metrics")[2].decode()
    post(url, "/generate", {"input_ids": [10, 11, 12], "sampling_params": {"max_new_tokens": 4}})
    status, headers, raw = http_request(url, "GET", "/metrics")
    text = raw.decode()
    assert status == 200 and headers["content-type"].startswith("text/plain")

    def value(body, name):
        line = next(line for line in body.splitlines() if line.startswith(name + "{"))
        return float(line.rsplit(" ", 1)[1])

    assert value(text, "sglang:generation_tokens_total") - value(before, "sglang:generation_tokens_total") == 4
    assert value(text, "sglang:prompt_tokens_total") - value(before, "sglang:prompt_tokens_total") == 3
    assert value(text, "sglang:time_to_first_token_seconds_count") > value(before,
                                                                           "sglang:time_to_first_token_seconds_count")
    assert value(text, "sglang:e2e_request_latency_seconds_count") >= 1
    assert value(text, "sglang:token_usage") == 0.25
    assert value(text, "sglang:cache_hit_rate") == 0.5
    assert value(text, "sglang:num_queue_reqs") == 3
    assert value(text, "sglang:num_retractions_total") == 2
    assert 'sglang:num_requests_total{finish_reason="length"' in text


def test_without_tokenizer_text_is_refused_and_ids_work():
    frontend = FakeFrontend(tokenizer=None, args=ServerArgs(skip_tokenizer_init=True))
    config = ServerConfig(read_timeout=5, keepalive_timeout=5)
    with ServerThread(lambda: create_server(frontend, config)) as server:
        status, _, raw = http_request(server.url, "POST", "/generate", {"text": "hi"})
        assert status == 400 and b"skip-tokenizer-init" in raw
        status, _, raw = http_request(server.url, "POST", "/generate",
                                      {"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 2}})
        assert status == 200 and msgspec.json.decode(raw)["output_ids"] == [5, 6]
        status, _, raw = http_request(server.url, "POST", "/v1/completions",
                                      {"prompt": [5, 6], "echo": True, "max_tokens": 1})
        assert status == 400 and b"skip-tokenizer-init" in raw
        assert http_request(server.url, "GET", "/metrics")[0] == 404  # --enable-metrics is off
        assert http_request(server.url, "GET", "/health_generate")[0] == 200
