"""Reasoning parsers and the chat reply as a message or as stream deltas: whatever the updates are cut
into, the deltas add up to the message (reasoning, content, each call's name and arguments), a call's id
and name come before its arguments, and parallel_tool_calls=false keeps one call."""

from __future__ import annotations

import random

import pytest

from runtime.constrained.chat_output import ChatOutputParser, ChatOutputStream
from runtime.constrained.reasoning import ReasoningParser
from runtime.constrained.tool_parsers import PARSERS


@pytest.mark.parametrize("name, text, reasoning, content", [
    ("deepseek-r1", "Let me think.\n</think>\n\nParis.", "Let me think.\n", "Paris."),
    ("deepseek-r1", "<think>Hmm</think>Paris.", "Hmm", "Paris."),
    ("deepseek-r1", "Still thinking when cut", "Still thinking when cut", ""),
    ("qwen3", "<think>\nHmm\n</think>\n\nParis.", "\nHmm\n", "Paris."),
    ("qwen3", "Paris.", "", "Paris."),
    ("qwen3", "<think>cut", "cut", ""),
])
def test_reasoning_split(name, text, reasoning, content):
    split = ReasoningParser(name).split(text, final=True)
    assert (split.reasoning, split.content) == (reasoning, content)


def test_unknown_reasoning_parser_is_refused():
    with pytest.raises(ValueError, match="deepseek-r1"):
        ReasoningParser("o1")


def stream_pieces(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(1, 12))))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


def replay(parser: ChatOutputParser, pieces: list[str]) -> dict:
    """Feed the pieces as streamed updates; rebuild the message from the deltas."""
    stream = ChatOutputStream(parser)
    text, reasoning, content, calls = "", "", "", []
    for k, piece in enumerate(pieces):
        text += piece
        for delta in stream.feed(text, final=k == len(pieces) - 1):
            reasoning += delta.get("reasoning_content", "")
            content += delta.get("content", "")
            for call in delta.get("tool_calls", []):
                if "id" in call:
                    assert call["index"] == len(calls) and call["function"]["arguments"] == ""
                    calls.append({"id": call["id"], "name": call["function"]["name"], "arguments": ""})
                else:
                    calls[call["index"]]["arguments"] += call["function"]["arguments"]
    return {"reasoning": reasoning, "content": content, "calls": calls, "has_calls": stream.has_calls}


CASES = [
    (ChatOutputParser(ReasoningParser("qwen3"), PARSERS["hermes"]()),
     '<think>Need the weather.</think>\n\nChecking.\n<tool_call>\n{"name": "get_weather", "arguments": '
     '{"city": "Paris"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'),
    (ChatOutputParser(None, PARSERS["llama3"]()), '{"name": "get_weather", "parameters": {"city": "Rome"}}'),
    (ChatOutputParser(ReasoningParser("deepseek-r1"), None), "I consider {json}.</think>The answer is 4."),
    (ChatOutputParser(None, PARSERS["mistral"]()), "Plain text, no calls, even with [brackets]."),
]


@pytest.mark.parametrize("parser, text", CASES)
def test_deltas_add_up_to_the_message(parser, text):
    message = parser.message(text)
    calls = [(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"] or []]
    rng = random.Random(5)
    for _ in range(25):
        got = replay(parser, stream_pieces(text, rng))
        assert got["reasoning"] == (message.get("reasoning_content") or "")
        assert [(c["name"], c["arguments"]) for c in got["calls"]] == calls
        assert got["content"].strip() == (message["content"] or "").strip()
        assert got["has_calls"] == bool(calls)


def test_message_shape():
    parser, text = CASES[0]
    message = parser.message(text)
    assert message["reasoning_content"] == "Need the weather."
    assert message["content"] == "Checking."
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_weather", "get_time"]
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in message["tool_calls"])
    only_calls = ChatOutputParser(None, PARSERS["llama3"]()).message(CASES[1][1])
    assert only_calls["content"] is None and "reasoning_content" not in only_calls
    plain = ChatOutputParser(None, PARSERS["hermes"]()).message("Hi there")
    assert plain == {"role": "assistant", "content": "Hi there", "tool_calls": None}


def test_one_call_without_parallel_tool_calls():
    parser = ChatOutputParser(None, PARSERS["hermes"](), max_calls=1)
    text = CASES[0][1].split("</think>")[1]
    assert [c["function"]["name"] for c in parser.message(text)["tool_calls"]] == ["get_weather"]
    assert [c["name"] for c in replay(parser, [text[:40], text[40:]])["calls"]] == ["get_weather"]
