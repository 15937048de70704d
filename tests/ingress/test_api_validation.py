"""Malformed request bodies, table-driven: each is answered 4xx in OpenAI's error shape, with a
message naming the field at fault, and none reaches the engine."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.ingress.api.app import create_server
from tests.fake_frontend import FakeFrontend, ServerThread, http_request, smollm2_tokenizer

CONTEXT = 256
OK_IDS = [1000, 1001, 1002]

# (path, body (bytes are sent as they are), expected status, text the error message must contain)
CASES = [
    # --- not JSON / wrong types (msgspec's path names the field)
    ("/generate", b"{", 400, "not valid JSON"),
    ("/generate", b"", 400, "body is empty"),
    ("/generate", b"[1, 2]", 400, "Expected `object`"),
    ("/generate", {"text": 5}, 400, "$.text"),
    ("/generate", {"text": "hi", "sampling_params": {"temperature": "hot"}}, 400, "$.sampling_params.temperature"),
    ("/generate", {"text": "hi", "sampling_params": {"max_new_tokens": 1.5}}, 400, "$.sampling_params.max_new_tokens"),
    ("/generate", {"text": "hi", "sampling_params": {"ignore_eos": "yes"}}, 400, "$.sampling_params.ignore_eos"),
    ("/generate", {"text": "hi", "stream": 1}, 400, "$.stream"),
    ("/generate", {"input_ids": ["a"]}, 400, "$.input_ids[0]"),
    ("/generate", {"text": "hi", "sampling_params": {"logit_bias": {"abc": 1.0}}}, 400, "logit_bias"),
    # --- unknown sampling_params keys
    ("/generate", {"text": "hi", "sampling_params": {"temprature": 0.5}}, 400, "unknown field `temprature`"),
    ("/generate", {"text": "hi", "sampling_params": {"max_tokens": 5}}, 400, "unknown field `max_tokens`"),
    # --- out-of-range sampling values (SGLang's ranges)
    ("/generate", {"text": "hi", "sampling_params": {"temperature": -0.1}}, 400, "sampling_params.temperature"),
    ("/generate", {"text": "hi", "sampling_params": {"top_p": 0}}, 400, "sampling_params.top_p"),
    ("/generate", {"text": "hi", "sampling_params": {"top_p": 1.5}}, 400, "sampling_params.top_p"),
    ("/generate", {"text": "hi", "sampling_params": {"top_k": 0}}, 400, "sampling_params.top_k"),
    ("/generate", {"text": "hi", "sampling_params": {"top_k": -2}}, 400, "sampling_params.top_k"),
    ("/generate", {"text": "hi", "sampling_params": {"min_p": 1.5}}, 400, "sampling_params.min_p"),
    ("/generate", {"text": "hi", "sampling_params": {"frequency_penalty": 2.5}}, 400, "frequency_penalty"),
    ("/generate", {"text": "hi", "sampling_params": {"presence_penalty": -3}}, 400, "presence_penalty"),
    ("/generate", {"text": "hi", "sampling_params": {"repetition_penalty": 0}}, 400, "repetition_penalty"),
    ("/generate", {"text": "hi", "sampling_params": {"repetition_penalty": 2.5}}, 400, "repetition_penalty"),
    ("/generate", {"text": "hi", "sampling_params": {"max_new_tokens": -1}}, 400, "sampling_params.max_new_tokens"),
    ("/generate", {"text": "hi", "sampling_params": {"max_new_tokens": 2, "min_new_tokens": 5}}, 400,
     "min_new_tokens"),
    ("/generate", {"text": "hi", "sampling_params": {"n": 0}}, 400, "sampling_params.n"),
    ("/generate", {"text": "hi", "sampling_params": {"seed": -1}}, 400, "sampling_params.seed"),
    ("/generate", {"text": "hi", "sampling_params": {"stop": ["ok", ""]}}, 400, "sampling_params.stop"),
    ("/generate", {"text": "hi", "sampling_params": {"stop_token_ids": [10 ** 9]}}, 400, "stop_token_ids"),
    ("/generate", {"text": "hi", "sampling_params": {"logit_bias": {"7": 1000}}}, 400, "logit_bias"),
    ("/generate", {"text": "hi", "sampling_params": {"logit_bias": {"999999999": 1}}}, 400, "logit_bias"),
    ("/generate", {"text": "hi", "sampling_params": {"regex": ""}}, 400, "sampling_params.regex"),
    # --- prompts: empty, out of vocabulary, mixed, too long for the context
    ("/generate", {}, 400, "text or input_ids"),
    ("/generate", {"text": "hi", "input_ids": OK_IDS}, 400, "text or input_ids"),
    ("/generate", {"text": ""}, 400, "text: the prompt is empty"),
    ("/generate", {"text": []}, 400, "text: the batch is empty"),
    ("/generate", {"text": ["ok", ""]}, 400, "text[1]"),
    ("/generate", {"input_ids": []}, 400, "input_ids"),
    ("/generate", {"input_ids": [[1000], []]}, 400, "input_ids[1]"),
    ("/generate", {"input_ids": [1000, [1001]]}, 400, "input_ids"),
    ("/generate", {"input_ids": [1000, -1]}, 400, "input_ids: token id -1"),
    ("/generate", {"input_ids": [1000, 10 ** 9]}, 400, "not in the vocabulary"),
    ("/generate", {"input_ids": [1000] * CONTEXT}, 400, "context length"),
    ("/generate", {"text": ["ok", "x " * 300]}, 400, "text[1]: the prompt has"),
    ("/generate", {"input_ids": [1000] * 200, "sampling_params": {"max_new_tokens": 100}}, 400,
     "sampling_params.max_new_tokens"),
    # --- other native fields
    ("/generate", {"input_ids": OK_IDS, "return_logprob": True, "logprob_start_len": 3}, 400, "logprob_start_len"),
    ("/generate", {"input_ids": OK_IDS, "return_logprob": True, "top_logprobs_num": -1}, 400, "top_logprobs_num"),
    ("/generate", {"text": "hi", "rid": ["a", "b"]}, 400, "rid"),
    ("/generate", {"text": ["a", "b"], "rid": ["a"]}, 400, "rid: has 1 entries"),
    ("/generate", {"text": ["a", "b"], "sampling_params": [{}]}, 400, "sampling_params"),
    ("/generate", {"text": "hi", "image_data": "x.png"}, 400, "image_data"),
    # --- /v1/completions
    ("/v1/completions", {"model": "m"}, 400, "prompt"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": []}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1000, "a"]}, 400, "prompt"),
    ("/v1/completions", {"prompt": ["ok", ""]}, 400, "prompt[1]"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "ten"}, 400, "$.max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 50}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "stop": [""]}, 400, "stop"),
    ("/v1/completions", {"prompt": "hi", "suffix": "end"}, 400, "suffix"),
    ("/v1/completions", {"prompt": [1000] * 200, "max_tokens": 100}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "stream_options": {"include_usage": "yes"}}, 400,
     "$.stream_options.include_usage"),
    # --- /v1/chat/completions
    ("/v1/chat/completions", {"model": "m"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"content": "x"}]}, 400, "role"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "$.messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages[0].content[0]"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "xml"}}, 400, "response_format.type"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400,
     "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": -2}, 400,
     "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}, 400,
     "tool_choice"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_p": 0}, 400, "top_p"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x " * 300}]}, 400, "context length"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "continue_final_message": True}, 400,
     "continue_final_message"),
]


@pytest.fixture(scope="module")
def served():
    frontend = FakeFrontend(tokenizer=smollm2_tokenizer(), context_length=CONTEXT)
    with ServerThread(lambda: create_server(frontend)) as server:
        yield server, frontend


@pytest.mark.parametrize("path,body,status,needle", CASES, ids=[f"{i}-{c[0]}" for i, c in enumerate(CASES)])
def test_malformed_body_is_refused_naming_the_field(served, path, body, status, needle):
    server, frontend = served
    calls_before = len(frontend.calls)
    got, headers, raw = http_request(server.url, "POST", path, body)
    assert got == status, raw
    assert headers["content-type"] == "application/json"
    error = msgspec.json.decode(raw)["error"]
    assert needle in error["message"], error
    assert error["code"] == status and error["type"] == "invalid_request_error"
    assert len(frontend.calls) == calls_before, "an invalid request reached the engine"


def test_type_errors_carry_the_field_as_param(served):
    server, _ = served
    _, _, raw = http_request(server.url, "POST", "/generate", {"text": "hi", "sampling_params": {"top_k": "x"}})
    assert msgspec.json.decode(raw)["error"]["param"] == "sampling_params.top_k"
    _, _, raw = http_request(server.url, "POST", "/v1/completions", {"prompt": "hi", "temperature": 9, "top_p": -1})
    assert msgspec.json.decode(raw)["error"]["param"] == "top_p"


def test_unknown_route_and_wrong_method(served):
    server, _ = served
    status, _, raw = http_request(server.url, "POST", "/v1/embeddingz", {})
    assert status == 404 and b"/v1/embeddingz" in raw
    status, headers, _ = http_request(server.url, "GET", "/generate")
    assert status == 405 and headers["allow"] == "OPTIONS, POST"


_FIELDS = ["text", "input_ids", "sampling_params", "rid", "return_logprob", "logprob_start_len", "top_logprobs_num",
           "return_text_in_logprobs", "stream", "prompt", "messages", "max_tokens", "n", "echo", "logprobs", "stop",
           "temperature", "top_p", "top_k", "max_new_tokens", "stream_options", "response_format", "role", "content",
           "logit_bias", "seed", "max_completion_tokens", "top_logprobs", "tools", "min_new_tokens"]
_scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 3000), st.floats(allow_nan=False, width=32),
                     st.sampled_from(["", "hi", "x" * 50, "<|im_start|>"]))
_json = st.recursive(_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(_FIELDS), inner, max_size=4)), max_leaves=12)
_bodies = st.dictionaries(st.sampled_from(_FIELDS), _json, max_size=6)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(["/generate", "/v1/completions", "/v1/chat/completions"]), body=_bodies)
def test_random_bodies_never_cause_a_server_error(served, path, body):
    server, _ = served
    status, headers, raw = http_request(server.url, "POST", path, body)
    assert status < 500, raw
    if status >= 400:
        assert msgspec.json.decode(raw)["error"]["message"]
