"""Each tool-call parser on outputs written in its family's documented format: calls, the content around
them, replies that are not calls, and streaming: fed every prefix of the text, what a parser reports only
grows (content, the list of calls, each call's arguments), names appear only when complete, and the last
answer equals the parse of the whole text."""

from __future__ import annotations

import json

import pytest

from runtime.constrained.tool_parsers import PARSERS, JsonArrayParser, NamedArgumentsParser
from runtime.constrained.tool_parsers.deepseekv3 import CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, SEP


def ds_call(name: str, args: str) -> str:
    return f"{CALL_BEGIN}function{SEP}{name}\n```json\n{args}\n```{CALL_END}"


WEATHER, TIME = '{"city": "Paris", "days": [1, 2]}', '{"zone": "CET", "24h": true}'

# (parser, recorded output, expected content, expected [(name, arguments)])
RECORDED = [
    # Qwen2.5 / Hermes: <tool_call> JSON </tool_call>, text may come first
    ("hermes", f'<tool_call>\n{{"name": "get_weather", "arguments": {WEATHER}}}\n</tool_call>', "",
     [("get_weather", WEATHER)]),
    ("qwen25", f'Let me check both.\n<tool_call>\n{{"name": "get_weather", "arguments": {WEATHER}}}\n</tool_call>\n'
               f'<tool_call>\n{{"name": "get_time", "arguments": {TIME}}}\n</tool_call>', "Let me check both.",
     [("get_weather", WEATHER), ("get_time", TIME)]),
    ("hermes", "The capital of France is Paris.", "The capital of France is Paris.", []),
    # Llama 3.1 JSON tool calling, with or without <|python_tag|>, ';' between calls
    ("llama3", f'{{"name": "get_weather", "parameters": {WEATHER}}}', "", [("get_weather", WEATHER)]),
    ("llama3", f'<|python_tag|>{{"name": "get_weather", "parameters": {WEATHER}}}; '
               f'{{"name": "get_time", "parameters": {TIME}}}', "", [("get_weather", WEATHER), ("get_time", TIME)]),
    ("llama3", '{"answer": 42} is JSON, not a call', '{"answer": 42} is JSON, not a call', []),
    # Mistral: [TOOL_CALLS] with a JSON array (v0.3) or name[ARGS]{...} (v11)
    ("mistral", f'[TOOL_CALLS] [{{"name": "get_weather", "arguments": {WEATHER}}}, '
                f'{{"name": "get_time", "arguments": {TIME}}}]', "", [("get_weather", WEATHER), ("get_time", TIME)]),
    ("mistral", f"[TOOL_CALLS]get_weather[ARGS]{WEATHER}[TOOL_CALLS]get_time[ARGS]{TIME}", "",
     [("get_weather", WEATHER), ("get_time", TIME)]),
    ("mistral", "No tools needed: [1, 2].", "No tools needed: [1, 2].", []),
    # DeepSeek-V3: special markers, fenced JSON arguments
    ("deepseekv3", f"Sure.{CALLS_BEGIN}{ds_call('get_weather', WEATHER)}\n{ds_call('get_time', TIME)}{CALLS_END}",
     "Sure.", [("get_weather", WEATHER), ("get_time", TIME)]),
    # Pythonic (Llama 3.2 / 4)
    ("pythonic", '[get_weather(city="Paris", days=[1, 2]), get_time(zone="CET", h24=True, tz=None)]', "",
     [("get_weather", WEATHER), ("get_time", '{"zone": "CET", "h24": true, "tz": null}')]),
    ("pythonic", "<|python_start|>[get_weather(city='Paris', days=[1, 2])]<|python_end|>", "",
     [("get_weather", WEATHER)]),
    ("pythonic", "[1, 2, 3] are numbers", "[1, 2, 3] are numbers", []),
]


def parser_for(name: str):
    return {"json_array": JsonArrayParser, "named": lambda: NamedArgumentsParser("get_weather")}.get(
        name, PARSERS.get(name))()


@pytest.mark.parametrize("name, text, content, calls", RECORDED)
def test_recorded_outputs(name, text, content, calls):
    parsed = parser_for(name).parse(text, final=True)
    assert parsed.content.strip() == content
    assert [(c.name, json.loads(c.arguments)) for c in parsed.calls] == [(n, json.loads(a)) for n, a in calls]
    assert all(c.complete for c in parsed.calls)


@pytest.mark.parametrize("name, text, content, calls", RECORDED + [
    ("json_array", f'[{{"name": "get_weather", "parameters": {WEATHER}}}, {{"name": "get_time", "parameters": '
                   f'{TIME}}}]', "", [("get_weather", WEATHER), ("get_time", TIME)]),
    ("named", WEATHER, "", [("get_weather", WEATHER)]),
])
def test_streamed_answers_only_grow(name, text, content, calls):
    parser = parser_for(name)
    content_so_far, arguments = "", []
    for end in range(len(text) + 1):
        parsed = parser.parse(text[:end], final=False)
        assert parsed.content.startswith(content_so_far), text[:end]
        content_so_far = parsed.content
        assert len(parsed.calls) >= len(arguments)
        for i, call in enumerate(parsed.calls):
            assert call.name in [n for n, _ in calls], f"partial name {call.name!r} at {text[:end]!r}"
            if i < len(arguments):
                assert call.arguments.startswith(arguments[i]), text[:end]
        arguments = [c.arguments for c in parsed.calls]
    final = parser.parse(text, final=True)
    assert final.content.startswith(content_so_far)
    assert [c.arguments.startswith(a) for c, a in zip(final.calls, arguments)] == [True] * len(arguments)
    if name not in ("pythonic",):  # pythonic arguments are converted to JSON, the others are the model's text
        assert [c.arguments for c in final.calls] == [a for _, a in calls]


@pytest.mark.parametrize("name, marker", [("hermes", "<tool_call>"), ("mistral", "[TOOL_CALLS]"),
                                          ("deepseekv3", CALLS_BEGIN)])
def test_a_possible_marker_start_is_held_back_until_it_is_not(name, marker):
    parser = PARSERS[name]()
    for cut in range(1, len(marker)):
        assert parser.parse("Hello " + marker[:cut], final=False).content == "Hello "
    assert parser.parse("Hello " + marker[:2] + "x", final=False).content == "Hello " + marker[:2] + "x"
    assert parser.parse("Hello " + marker[:2], final=True).content == "Hello " + marker[:2]


def test_truncated_call_keeps_its_arguments_so_far():
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par'
    [call] = PARSERS["hermes"]().parse(text, final=True).calls
    assert (call.name, call.arguments, call.complete) == ("get_weather", '{"city": "Par', False)


def test_keys_in_another_order_are_read_once_complete():
    text = '<tool_call>\n{"arguments": {"x": 1}, "name": "f"}\n</tool_call>'
    [call] = PARSERS["hermes"]().parse(text, final=True).calls
    assert (call.name, json.loads(call.arguments)) == ("f", {"x": 1})
