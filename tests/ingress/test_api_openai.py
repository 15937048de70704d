"""The OpenAI-compatible API through the official `openai` client, on the fake frontend with the
real SmolLM2 tokenizer and chat template."""

from __future__ import annotations

import copy

import openai
import pytest

from httpd import ServerConfig
from runtime.ingress.api.app import create_server
from runtime.ingress.errors import RequestError
from runtime.ingress.frontend import render_chat
from runtime.messages import LogprobOptions
from runtime.server_args import ServerArgs
from tests.fake_frontend import FakeFrontend, ServerThread, fake_logprob

PROMPT = "Once upon a time there was a tiny language model."


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served[0].url + "/v1", api_key="unused", max_retries=0, timeout=10)


def chat_prompt_ids(tokenizer, messages, add_generation_prompt=True, continue_final_message=False):
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         continue_final_message=continue_final_message)
    return tokenizer.encode(text, add_special_tokens=False)


def test_models_lists_the_served_model(client, fake):
    models = client.models.list().data
    assert [m.id for m in models] == [fake.served_model_name]
    assert models[0].model_extra["max_model_len"] == fake.context_length
    assert client.models.retrieve(fake.served_model_name).id == fake.served_model_name
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("some-other-model")


def test_completion_of_a_string(client, fake, tokenizer):
    ids = tokenizer.encode(PROMPT)
    out = client.completions.create(model="m", prompt=PROMPT, max_tokens=4, temperature=0.3, top_p=0.8, seed=5)
    assert out.object == "text_completion" and out.model == fake.served_model_name
    assert out.choices[0].text == tokenizer.decode(ids[:4])
    assert out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (len(ids), 4,
                                                                                              len(ids) + 4)
    sampling = fake.calls[-1].sampling
    assert (sampling.max_new_tokens, sampling.temperature, sampling.top_p, sampling.seed) == (4, 0.3, 0.8, 5)


def test_completion_defaults_are_openais(client, fake):
    client.completions.create(model="m", prompt=[10, 11, 12])
    sampling = fake.calls[-1].sampling
    assert (sampling.max_new_tokens, sampling.temperature, sampling.top_p) == (16, 1.0, 1.0)


def test_completion_prompt_forms_and_n(client, fake, tokenizer):
    out = client.completions.create(model="m", prompt=["alpha beta", "gamma"], max_tokens=1, n=2)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert [c.text for c in out.choices] == ["alpha"] * 2 + ["gamma"] * 2
    prompt_lens = [len(tokenizer.encode("alpha beta")), len(tokenizer.encode("gamma"))]
    assert out.usage.prompt_tokens == sum(prompt_lens)  # each prompt counted once, whatever n
    assert out.usage.completion_tokens == 4
    out = client.completions.create(model="m", prompt=[[1000, 1001], [2000, 2001, 2002]], max_tokens=3)
    assert [c.text for c in out.choices] == [tokenizer.decode([1000, 1001, 1000]), tokenizer.decode([2000, 2001, 2002])]


def test_completion_echo_with_logprobs(client, fake, tokenizer):
    ids = tokenizer.encode(PROMPT)
    out = client.completions.create(model="m", prompt=PROMPT, max_tokens=2, echo=True, logprobs=1)
    choice = out.choices[0]
    assert choice.text == PROMPT + tokenizer.decode(ids[:2])
    logprobs = choice.logprobs
    assert logprobs.tokens == [tokenizer.decode([t]) for t in ids + ids[:2]]
    assert logprobs.token_logprobs == [None] + [fake_logprob(p) for p in range(1, len(ids))] + [fake_logprob(0),
                                                                                               fake_logprob(1)]
    assert logprobs.top_logprobs[0] is None and len(logprobs.top_logprobs[-1]) == 1
    assert logprobs.text_offset[:2] == [0, len(logprobs.tokens[0])]
    assert fake.calls[-1].logprobs == LogprobOptions(True, 0, 1)


def test_completion_stop_string(client, fake):
    out = client.completions.create(model="m", prompt=PROMPT, max_tokens=30, stop=[" tiny"])
    assert out.choices[0].text == "Once upon a time there was a"
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].model_extra["matched_stop"] == " tiny"


def test_completion_stream_matches_the_non_streamed_text(client, fake, tokenizer):
    whole = client.completions.create(model="m", prompt=PROMPT, max_tokens=6).choices[0].text
    chunks = list(client.completions.create(model="m", prompt=PROMPT, max_tokens=6, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert fake.calls[-1].stream is True


def test_chat_completion(client, fake, tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    ids = chat_prompt_ids(tokenizer, messages)
    out = client.chat.completions.create(model="m", messages=messages, max_tokens=5)
    choice = out.choices[0]
    assert out.object == "chat.completion"
    assert choice.message.role == "assistant"
    assert choice.message.content == tokenizer.decode(ids[:5], skip_special_tokens=True)
    assert choice.finish_reason == "length"
    assert out.usage.prompt_tokens == len(ids)
    assert fake.chat_calls[-1] == (messages, None, True, False)
    assert fake.calls[-1].input_ids == ids


def test_chat_template_kwargs_reach_the_template(client, fake, tokenizer):
    """SGLang's and vLLM's `chat_template_kwargs` (Qwen3's enable_thinking...) are variables of the template;
    they may not override the arguments the server passes itself."""
    messages = [{"role": "user", "content": "Hi"}]
    client.chat.completions.create(model="m", messages=messages, max_tokens=1,
                                   extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert fake.template_kwargs[-1] == {"enable_thinking": False}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="m", messages=messages, max_tokens=1,
                                       extra_body={"chat_template_kwargs": {"add_generation_prompt": False}})
    assert err.value.body["param"] == "chat_template_kwargs"
    assert "add_generation_prompt cannot be set here" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="m", messages=messages, max_tokens=1,
                                       extra_body={"chat_template_kwargs": ["enable_thinking"]})
    assert "chat_template_kwargs" in err.value.message


def test_render_chat_passes_template_variables(tokenizer):
    thinking = copy.copy(tokenizer)
    thinking.chat_template = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                              "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}")
    messages = [{"role": "user", "content": "Hi"}]
    plain = render_chat(thinking, messages, None, True, False)
    off = render_chat(thinking, messages, None, True, False, {"enable_thinking": False})
    assert thinking.decode(plain) == "Hi" and thinking.decode(off) == "Hi<think></think>"


def test_chat_defaults_fill_the_context_at_temperature_one(client, fake, tokenizer):
    messages = [{"role": "user", "content": "Hi"}]
    client.chat.completions.create(model="m", messages=messages, max_tokens=None, stop="<|im_start|>")
    sampling = fake.calls[-1].sampling
    assert sampling.temperature == 1.0
    assert sampling.max_new_tokens == fake.context_length - len(chat_prompt_ids(tokenizer, messages))
    client.chat.completions.create(model="m", messages=messages, max_completion_tokens=3, max_tokens=9)
    assert fake.calls[-1].sampling.max_new_tokens == 3  # max_completion_tokens wins


def test_chat_text_parts_and_assistant_prefill(client, fake, tokenizer):
    messages = [{"role": "user", "content": [{"type": "text", "text": "Line one"}, {"type": "text", "text": "two"}]},
                {"role": "assistant", "content": "Sure, here"}]
    client.chat.completions.create(model="m", messages=messages, max_tokens=2)
    sent, tools, add_generation_prompt, continue_final = fake.chat_calls[-1]
    assert sent[0] == {"role": "user", "content": "Line one\ntwo"}
    assert (add_generation_prompt, continue_final) == (False, True)
    expected = chat_prompt_ids(tokenizer, sent, add_generation_prompt=False, continue_final_message=True)
    assert fake.calls[-1].input_ids == expected


def test_chat_logprobs_and_n(client, fake, tokenizer):
    messages = [{"role": "user", "content": "Count"}]
    ids = chat_prompt_ids(tokenizer, messages)
    out = client.chat.completions.create(model="m", messages=messages, max_tokens=3, n=2, logprobs=True,
                                         top_logprobs=2)
    assert [c.index for c in out.choices] == [0, 1]
    content = out.choices[1].logprobs.content
    assert [c.token for c in content] == [tokenizer.decode([t]) for t in ids[:3]]
    assert [c.logprob for c in content] == [fake_logprob(k) for k in range(3)]
    assert [len(c.top_logprobs) for c in content] == [2, 2, 2]
    assert content[0].bytes == list(content[0].token.encode())
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == 6


def test_chat_stream(client, fake, tokenizer):
    messages = [{"role": "user", "content": "Stream please"}]
    whole = client.chat.completions.create(model="m", messages=messages, max_tokens=5).choices[0].message.content
    chunks = list(client.chat.completions.create(model="m", messages=messages, max_tokens=5, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 5


def test_errors_reach_the_client_with_status_and_field(client, fake):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="m", prompt="hi", temperature=-1)
    assert err.value.status_code == 400 and "temperature" in err.value.message
    assert err.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError, match="response_format"):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}],
                                       response_format={"type": "yaml"})
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="m", prompt=[10] * 2000, max_tokens=100)
    assert fake.calls == []  # nothing invalid reached the engine


def test_overload_is_503_also_for_streams(client, fake):
    fake.reject = RequestError(503, "too busy")
    with pytest.raises(openai.InternalServerError) as err:
        client.completions.create(model="m", prompt="hi")
    assert err.value.status_code == 503
    with pytest.raises(openai.InternalServerError, match="too busy"):
        list(client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], stream=True))


def test_unknown_fields_are_ignored(client, fake):
    out = client.completions.create(model="m", prompt=[1000, 1001], max_tokens=1,
                                    extra_body={"some_future_field": {"a": 1}, "top_k": 5})
    assert out.choices[0].text
    assert fake.calls[-1].sampling.top_k == 5


def test_engine_abort_mid_stream_is_an_error_event(client, fake):
    fake.abort_after = 2
    with pytest.raises(openai.APIError, match="the worker failed"):
        list(client.completions.create(model="m", prompt=[10, 11, 12], max_tokens=5, stream=True))


def test_api_key_through_the_client(tokenizer):
    frontend = FakeFrontend(tokenizer=tokenizer, args=ServerArgs(api_key="k-123"))
    with ServerThread(lambda: create_server(frontend, ServerConfig.from_args(frontend.args))) as server:
        bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        good = openai.OpenAI(base_url=server.url + "/v1", api_key="k-123", max_retries=0)
        assert good.completions.create(model="m", prompt="hi", max_tokens=1).choices[0].text == "hi"
