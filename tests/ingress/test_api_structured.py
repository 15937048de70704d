"""Structured output over HTTP, on the fake frontend (no model): which grammar each request field gives
the engine (and which field a compile error will name), refusals of malformed fields, tools and tool_choice,
the assistant tool_calls round trip, and replies read by the tool-call and reasoning parsers, whole and
streamed (the fake engine echoes the prompt, so a system message is the reply). What only the compiler can
refuse is refused by the workers: tests/scheduler/test_grammar_gate.py, tests/e2e/test_structured.py."""

from __future__ import annotations

import json

import msgspec
import pytest

from runtime.ingress.api.app import create_server
from runtime.server_args import ServerArgs
from tests.fake_frontend import FakeFrontend, ServerThread, http_request, sse_payloads

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": SCHEMA}},
         {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
USER = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def server(tokenizer):
    frontend = FakeFrontend(tokenizer=tokenizer)
    with ServerThread(lambda: create_server(frontend)) as thread:
        yield thread, frontend


@pytest.fixture
def api(server):
    """(post, frontend): post(path, body, **flags) runs with those server flags."""
    thread, frontend = server
    frontend.reset()

    def post(path, body, **flags):
        frontend.args = ServerArgs(**flags)
        status, _, raw = http_request(thread.url, "POST", path, body)
        return status, (sse_payloads(raw) if body.get("stream") else msgspec.json.decode(raw))

    return post, frontend


def grammar_of(frontend, index=-1):
    return frontend.calls[index].sampling.grammar


def test_native_fields_give_the_grammar_to_every_sequence(api):
    post, fake = api
    status, _ = post("/generate", {"text": "hi", "sampling_params": {"json_schema": json.dumps(SCHEMA), "n": 3,
                                                                      "max_new_tokens": 2}})
    assert status == 200 and len(fake.calls) == 3
    assert {c.sampling.grammar.key for c in fake.calls} == {grammar_of(fake).key}
    assert grammar_of(fake).kind == "json_schema" and json.loads(grammar_of(fake).source) == SCHEMA
    assert grammar_of(fake).field == "sampling_params.json_schema"
    for field, value in [("regex", "[a-z]+"), ("ebnf", 'root ::= "a"'), ("json_schema", SCHEMA),
                         ("structural_tag", {"structures": [{"begin": "<f>", "schema": SCHEMA, "end": "</f>"}],
                                             "triggers": ["<f>"]})]:
        assert post("/generate", {"text": "hi", "sampling_params": {field: value, "max_new_tokens": 1}})[0] == 200
        assert (grammar_of(fake).kind, grammar_of(fake).field) == (field, "sampling_params." + field)
    post("/generate", {"text": "hi", "sampling_params": {"max_new_tokens": 1}})
    assert grammar_of(fake) is None


def test_openai_response_format_and_extras(api):
    post, fake = api
    for path, extra in [("/v1/completions", {"prompt": "hi"}), ("/v1/chat/completions", {"messages": USER})]:
        body = {**extra, "max_tokens": 1, "response_format": {"type": "json_schema", "json_schema": {
            "name": "w", "schema": SCHEMA, "strict": True}}}
        assert post(path, body)[0] == 200 and grammar_of(fake).kind == "json_schema"
        assert grammar_of(fake).field == "response_format.json_schema.schema"
        assert post(path, {**extra, "max_tokens": 1, "response_format": {"type": "json_object"}})[0] == 200
        assert grammar_of(fake).kind == "json_object"
        assert post(path, {**extra, "max_tokens": 1, "regex": "[0-9]+"})[0] == 200
        assert (grammar_of(fake).kind, grammar_of(fake).field) == ("regex", "regex")
        assert post(path, {**extra, "max_tokens": 1, "response_format": {"type": "text"}})[0] == 200
        assert grammar_of(fake) is None


@pytest.mark.parametrize("path, body, param, words", [
    ("/generate", {"text": "hi", "sampling_params": {"json_schema": "{", "regex": "a"}}, "sampling_params.regex",
     "only one grammar"),
    ("/generate", {"text": "hi", "sampling_params": {"json_schema": "{"}}, "sampling_params.json_schema",
     "not valid JSON"),
    ("/generate", {"text": "hi", "sampling_params": {"regex": ""}}, "sampling_params.regex", "non-empty"),
    ("/v1/chat/completions", {"messages": USER, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x"}}}, "response_format.json_schema.schema", "required"),
    ("/v1/chat/completions", {"messages": USER, "response_format": {"type": "json_object"}, "regex": "a"},
     "response_format", "one grammar per request"),
    ("/v1/chat/completions", {"messages": USER, "tools": [{"type": "function", "function": {"name": "a b"}}]},
     "tools[0].function.name", "letters, digits"),
    ("/v1/chat/completions", {"messages": USER, "tools": TOOLS + TOOLS[:1]}, "tools[2].function.name",
     "defined twice"),
    ("/v1/chat/completions", {"messages": USER, "tools": [{"type": "retrieval"}]}, "tools[0].type", "function"),
    ("/v1/chat/completions", {"messages": USER, "tools": TOOLS, "tool_choice": {"type": "function", "function": {
        "name": "nope"}}}, "tool_choice.function.name", "'nope' is not one of the tools"),
    ("/v1/chat/completions", {"messages": USER, "tool_choice": "required"}, "tool_choice", "needs at least one"),
    ("/v1/chat/completions", {"messages": USER, "tools": TOOLS, "tool_choice": "maybe"}, "tool_choice", "must be"),
    ("/v1/chat/completions", {"messages": USER, "tools": [{"type": "function", "function": {
        "name": "f", "parameters": "not a schema"}}]}, "tools[0].function.parameters", "JSON schema object"),
    ("/v1/chat/completions", {"messages": USER, "tools": TOOLS, "tool_choice": "required",
                              "response_format": {"type": "json_object"}}, "tool_choice", "cannot be combined"),
    ("/v1/chat/completions", {"messages": USER + [{"role": "assistant", "tool_calls": [{"id": "1", "function": {
        "name": "f", "arguments": "{bad"}}]}]}, "messages[1].tool_calls[0].function.arguments", "not valid JSON"),
])
def test_refusals_name_the_field(api, path, body, param, words):
    post, fake = api
    status, error = post(path, body)
    assert status == 400 and error["error"]["param"] == param and words in error["error"]["message"], error
    assert fake.calls == []


def test_backend_none_refuses_grammars(api):
    post, fake = api
    status, error = post("/generate", {"text": "hi", "sampling_params": {"regex": "a"}}, grammar_backend="none")
    assert status == 400 and "--grammar-backend none" in error["error"]["message"]


def test_tool_choice_decides_template_tools_and_grammar(api):
    post, fake = api
    assert post("/v1/chat/completions", {"messages": USER, "tools": TOOLS, "max_tokens": 1})[0] == 200
    assert fake.chat_calls[-1][1] == TOOLS and grammar_of(fake) is None  # auto
    post("/v1/chat/completions", {"messages": USER, "tools": TOOLS, "tool_choice": "none", "max_tokens": 1})
    assert fake.chat_calls[-1][1] is None and grammar_of(fake) is None
    post("/v1/chat/completions", {"messages": USER, "tools": TOOLS, "tool_choice": "required", "max_tokens": 1,
                                  "parallel_tool_calls": False})
    schema = json.loads(grammar_of(fake).source)  # no parser: a JSON array of {name, parameters}
    assert schema["type"] == "array" and schema["maxItems"] == 1
    assert [s["properties"]["name"]["const"] for s in schema["items"]["anyOf"]] == ["get_weather", "get_time"]
    post("/v1/chat/completions", {"messages": USER, "tools": TOOLS, "max_tokens": 1,
                                  "tool_choice": {"type": "function", "function": {"name": "get_weather"}}})
    assert json.loads(grammar_of(fake).source) == SCHEMA  # named: the arguments object itself
    post("/v1/chat/completions", {"messages": USER, "tools": TOOLS, "tool_choice": "required", "max_tokens": 1},
         tool_call_parser="llama3")
    forced = json.loads(grammar_of(fake).source)
    assert (grammar_of(fake).kind, grammar_of(fake).field) == ("tool_calls", "tools")
    assert forced["template"]["call_begin"] == '{"name": "{name}", "parameters": ' and forced["single"] is False
    assert [t["name"] for t in forced["tools"]] == ["get_weather", "get_time"]
    assert fake.calls[-1].sampling.skip_special_tokens is False  # <|python_tag|> must survive detokenizing


def test_assistant_tool_calls_and_tool_results_reach_the_template(api):
    post, fake = api
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}
    messages = USER + [{"role": "assistant", "content": None, "tool_calls": [call]},
                       {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    assert post("/v1/chat/completions", {"messages": messages, "tools": TOOLS, "max_tokens": 1})[0] == 200
    seen = fake.chat_calls[-1][0]
    assert seen[1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"city": "Rome"}}
    assert seen[2] == {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}


REPLY = 'I should look.</think>Checking. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n' \
        '</tool_call>'


def reply_request(stream: bool) -> dict:
    """The fake engine echoes the prompt: this system message comes back as the reply (after 'system\\n')."""
    return {"messages": [{"role": "system", "content": REPLY}, {"role": "user", "content": "x"}], "tools": TOOLS,
            "max_tokens": 200, "stream": stream}


def test_reply_is_split_into_reasoning_content_and_tool_calls(api):
    post, fake = api
    flags = dict(tool_call_parser="hermes", reasoning_parser="deepseek-r1")
    status, body = post("/v1/chat/completions", {**reply_request(False), "response_format": {"type": "json_object"}},
                        **flags)
    wrapped = json.loads(grammar_of(fake).source)  # the grammar comes after the reasoning block
    assert grammar_of(fake).kind == "reasoning" and wrapped["kind"] == "json_object"
    assert wrapped["block_optional"] is False  # DeepSeek-R1 always reasons first
    status, body = post("/v1/chat/completions", reply_request(False), **flags)
    choice = body["choices"][0]
    assert status == 200 and choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["reasoning_content"] == "system\nI should look." and message["content"] == "Checking."
    [call] = message["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}

    status, events = post("/v1/chat/completions", reply_request(True), **flags)
    deltas = [e["choices"][0]["delta"] for e in events[:-1] if e["choices"]]
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == message["reasoning_content"]
    assert "".join(d.get("content") or "" for d in deltas).strip() == "Checking."
    calls = [c for d in deltas for c in d.get("tool_calls", [])]
    assert calls[0]["id"].startswith("call_") and calls[0]["function"] == {"name": "get_weather", "arguments": ""}
    assert "".join(c["function"]["arguments"] for c in calls[1:]) == '{"city": "Paris"}'
    assert [e["choices"][0]["finish_reason"] for e in events[:-1] if e["choices"]][-1] == "tool_calls"

    status, body = post("/v1/chat/completions", {**reply_request(False), "separate_reasoning": False}, **flags)
    assert "reasoning_content" not in body["choices"][0]["message"]
    status, body = post("/v1/chat/completions", reply_request(False))  # no parsers: all content
    assert body["choices"][0]["message"]["content"].endswith("</tool_call>")
    assert body["choices"][0]["finish_reason"] == "stop"
