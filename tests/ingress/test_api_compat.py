"""Wire compatibility with SGLang's clients, on the fake frontend: every sampling key some SGLang
version sends (null meaning the default) and nothing else, stop_regex validation, token_ids_logprob,
custom_logit_processor refusals, the renamed endpoints, /tokenize, /detokenize, /abort_request,
/v1/models, and the first prompt token of prompt logprobs (native and /v1/completions echo)."""

from __future__ import annotations

import threading

import msgspec
import pytest

from tests.fake_frontend import fake_logprob, http_request, wait_until

PROMPT = "The capital of France is"

# What SGLang's frontend (0.5.5+) sends for a plain sgl.gen, nulls included.
FRONTEND_SAMPLING = {"skip_special_tokens": True, "spaces_between_special_tokens": True, "max_new_tokens": 4,
                     "min_new_tokens": 0, "n": 1, "stop": [], "stop_token_ids": [], "stop_regex": [],
                     "temperature": 0.0, "top_p": 1.0, "top_k": -1, "min_p": 0.0, "frequency_penalty": 0.0,
                     "presence_penalty": 0.0, "ignore_eos": False, "regex": None, "json_schema": None}


@pytest.fixture
def url(served):
    return served[0].url


def post(url, path, body):
    status, headers, raw = http_request(url, "POST", path, body)
    return status, msgspec.json.decode(raw) if raw else None


def test_the_frontends_sampling_params_are_accepted(url, fake):
    status, out = post(url, "/generate", {"text": PROMPT, "sampling_params": FRONTEND_SAMPLING})
    assert status == 200, out
    assert out["meta_info"]["completion_tokens"] == 4


def test_null_means_the_default_for_every_key(url, fake):
    nulls = {key: None for key in ("max_new_tokens", "min_new_tokens", "temperature", "top_p", "top_k", "min_p",
                                   "frequency_penalty", "presence_penalty", "repetition_penalty", "stop",
                                   "stop_token_ids", "stop_regex", "ignore_eos", "skip_special_tokens",
                                   "spaces_between_special_tokens", "no_stop_trim", "n", "seed", "sampling_seed",
                                   "logit_bias", "stream_interval", "custom_params", "beam_width", "watermark",
                                   "json_schema", "regex", "ebnf", "structural_tag")}
    status, out = post(url, "/generate", {"text": PROMPT, "sampling_params": nulls})
    assert status == 200, out
    sampling = fake.calls[-1].sampling
    assert (sampling.temperature, sampling.top_k, sampling.max_new_tokens, sampling.n) == (1.0, -1, 128, 1)


def test_newer_sglang_keys_have_their_meaning(url, fake):
    params = {"max_new_tokens": 6, "stop_regex": r"\d+ apples", "stream_interval": 3, "sampling_seed": -7,
              "custom_params": {"k": 1}, "beam_width": 1, "watermark": {"enabled": False}}
    status, out = post(url, "/generate", {"text": PROMPT, "sampling_params": params})
    assert status == 200, out
    sampling = fake.calls[-1].sampling
    assert sampling.stop_regex == [r"\d+ apples"] and sampling.stream_interval == 3
    assert sampling.seed == (-7) % 2**63


@pytest.mark.parametrize("params,field", [
    ({"stop_regexp": "x"}, "stop_regexp"),  # no SGLang knows it: a typo stays a 400
    ({"stop_regex": "("}, "sampling_params.stop_regex"),
    ({"stop_regex": ["ok", ""]}, "sampling_params.stop_regex"),
    ({"stop_regex": "a*"}, "sampling_params.stop_regex"),  # matches the empty string: would stop at once
    ({"stop_regex": "x" * 300}, "sampling_params.stop_regex"),
    ({"stream_interval": 0}, "sampling_params.stream_interval"),
    ({"beam_width": 4}, "sampling_params.beam_width"),
    ({"watermark": {"enabled": True}}, "sampling_params.watermark"),
    ({"sampling_seed": 2**64}, "sampling_params.sampling_seed"),
])
def test_bad_or_unknown_sampling_keys_are_a_400_naming_the_field(url, fake, params, field):
    status, out = post(url, "/generate", {"text": PROMPT, "sampling_params": params})
    assert status == 400, out
    assert field in out["error"]["message"]
    assert not fake.calls


@pytest.mark.parametrize("path,body", [
    ("/generate", {"text": PROMPT, "custom_logit_processor": "{\"callable\": \"gASV...\"}"}),
    ("/v1/completions", {"prompt": PROMPT, "custom_logit_processor": "x"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "custom_logit_processor": "x"}),
])
def test_custom_logit_processor_is_refused_never_unpickled(url, fake, path, body):
    status, out = post(url, path, body)
    assert status == 400 and out["error"]["param"] == "custom_logit_processor"
    assert "--enable-custom-logit-processor" in out["error"]["message"] and "unpickle" in out["error"]["message"]
    assert not fake.calls


def test_prompt_logprobs_from_zero_lead_with_the_first_token(url, fake, tokenizer):
    ids = tokenizer.encode(PROMPT)
    status, out = post(url, "/generate", {"text": PROMPT, "sampling_params": {"max_new_tokens": 2},
                                          "return_logprob": True, "logprob_start_len": 0, "top_logprobs_num": 1,
                                          "return_text_in_logprobs": True})
    assert status == 200
    meta = out["meta_info"]
    assert [entry[1] for entry in meta["input_token_logprobs"]] == ids
    assert meta["input_token_logprobs"][0] == [None, ids[0], tokenizer.decode([ids[0]])]
    assert [entry[0] for entry in meta["input_token_logprobs"][1:]] == [fake_logprob(p) for p in range(1, len(ids))]
    assert meta["input_top_logprobs"][0] is None and len(meta["input_top_logprobs"]) == len(ids)


def test_token_ids_logprob_on_both_sides(url, fake, tokenizer):
    ids = tokenizer.encode(PROMPT)
    wanted = [5, 17]
    status, out = post(url, "/generate", {"text": PROMPT, "sampling_params": {"max_new_tokens": 2},
                                          "return_logprob": True, "logprob_start_len": 0,
                                          "token_ids_logprob": wanted})
    assert status == 200, out
    assert fake.calls[-1].logprobs.token_ids_logprob == wanted
    meta = out["meta_info"]
    assert len(meta["input_token_ids_logprobs"]) == len(ids) and meta["input_token_ids_logprobs"][0] is None
    assert meta["input_token_ids_logprobs"][1] == [[fake_logprob(1) - 1, 5, None], [fake_logprob(1) - 2, 17, None]]
    assert meta["output_token_ids_logprobs"] == [[[fake_logprob(p) - 1, 5, None], [fake_logprob(p) - 2, 17, None]]
                                                 for p in range(2)]
    # A batch may give one list per prompt; ids outside the vocabulary, or without return_logprob: 400
    status, _ = post(url, "/generate", {"text": [PROMPT, "Hi"], "return_logprob": True,
                                        "token_ids_logprob": [[1], [2, 3]], "sampling_params": {"max_new_tokens": 1}})
    assert status == 200 and [c.logprobs.token_ids_logprob for c in fake.calls[-2:]] == [[1], [2, 3]]
    for body in ({"return_logprob": True, "token_ids_logprob": [10**9]}, {"token_ids_logprob": [1]}):
        status, out = post(url, "/generate", {"text": PROMPT, **body})
        assert status == 400 and out["error"]["param"] == "token_ids_logprob"


def test_completions_echo_logprobs_start_at_the_first_token_with_offsets(url, fake, tokenizer):
    ids = tokenizer.encode(PROMPT)
    status, out = post(url, "/v1/completions", {"prompt": PROMPT, "max_tokens": 1, "echo": True, "logprobs": 0})
    assert status == 200
    logprobs = out["choices"][0]["logprobs"]
    texts = [tokenizer.decode([i]) for i in ids]
    assert logprobs["tokens"][:len(ids)] == texts
    assert logprobs["token_logprobs"][0] is None
    offsets, position = [], 0
    for text in logprobs["tokens"]:
        offsets.append(position)
        position += len(text)
    assert logprobs["text_offset"] == offsets and logprobs["text_offset"][:3] == [0, 3, 11]  # "The", " capital"


def test_renamed_and_new_endpoints(url, fake, tokenizer):
    for old, new in (("/get_model_info", "/model_info"), ("/get_server_info", "/server_info")):
        assert http_request(url, "GET", old)[0] == http_request(url, "GET", new)[0] == 200
    status, cards = http_request(url, "GET", "/v1/models")[::2]
    card = msgspec.json.decode(cards)["data"][0]
    assert card["root"] == card["id"] == fake.served_model_name


def test_tokenize_and_detokenize(url, fake, tokenizer):
    ids = tokenizer.encode(PROMPT)
    for prefix in ("", "/v1"):
        status, out = post(url, f"{prefix}/tokenize", {"prompt": PROMPT})
        assert status == 200 and out == {"tokens": ids, "count": len(ids), "max_model_len": fake.context_length}
        status, out = post(url, f"{prefix}/detokenize", {"tokens": ids})
        assert status == 200 and out == {"text": PROMPT}
    status, out = post(url, "/tokenize", {"prompt": [PROMPT, "Hi"], "add_special_tokens": False})
    assert out["tokens"] == [tokenizer.encode(PROMPT, add_special_tokens=False), tokenizer.encode("Hi")]
    assert out["count"] == [len(t) for t in out["tokens"]]
    status, out = post(url, "/tokenize", {"messages": [{"role": "user", "content": "Hi"}]})
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert status == 200 and out["tokens"] == tokenizer.encode(chat, add_special_tokens=False)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    for choice, rendered in (("auto", tools), ("none", None)):  # tool_choice none: no tools in the prompt
        post(url, "/v1/tokenize", {"messages": [{"role": "user", "content": "Hi"}], "tools": tools,
                                   "tool_choice": choice})
        assert fake.chat_calls[-1][1] == rendered
    eos = tokenizer.eos_token_id
    status, out = post(url, "/detokenize", {"tokens": [[ids[0], eos], [ids[1]]], "skip_special_tokens": False})
    assert out["text"] == [tokenizer.decode([ids[0], eos]), tokenizer.decode([ids[1]])]
    for path, body, field in (("/tokenize", {}, "prompt"), ("/detokenize", {"tokens": [10**9]}, "tokens"),
                              ("/detokenize", {}, "tokens")):
        status, out = post(url, path, body)
        assert status == 400 and out["error"]["param"] == field


def test_abort_request_ends_a_running_request(url, fake):
    fake.token_delay_s = 0.02
    result = {}

    def run():
        result["response"] = post(url, "/generate", {"text": PROMPT, "rid": "long-one",
                                                     "sampling_params": {"max_new_tokens": 500}})

    thread = threading.Thread(target=run)
    thread.start()
    assert wait_until(lambda: "long-one" in fake.running)
    assert post(url, "/abort_request", {"rid": "long-one"})[0] == 200
    thread.join(10)
    status, out = result["response"]  # SGLang's answer: the output so far, finish type abort, no error status
    assert status == 200 and out["meta_info"]["finish_reason"] == {"type": "abort", "message": "aborted on request"}
    assert 0 < out["meta_info"]["completion_tokens"] < 500 and out["text"]
    assert post(url, "/abort_request", {})[0] == 400
