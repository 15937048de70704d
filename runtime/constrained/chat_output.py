"""A chat reply read with the request's reasoning parser and tool-call parser, as an OpenAI message or as
stream deltas. The reasoning parser goes first; the tool parser reads only the answer part.

Streaming (`ChatOutputStream.feed`): each update the whole text so far is parsed again, and what is new
since the last update goes out: reasoning and content deltas; for a call first its index, id, type and
name, then fragments of its arguments as they are written. The last feed (final=True) flushes what was
held back. Fed the same text, `message()` gives exactly what the deltas add up to.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from runtime.constrained.reasoning import ReasoningParser
from runtime.constrained.tool_parsers import ToolCallDraft, ToolParser


def tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ChatParse:
    reasoning: str = ""
    content: str = ""
    calls: list[ToolCallDraft] = field(default_factory=list)


@dataclass
class ChatOutputParser:
    reasoning: ReasoningParser | None = None
    tools: ToolParser | None = None
    max_calls: int | None = None  # 1 when parallel_tool_calls is false

    def parse(self, text: str, final: bool) -> ChatParse:
        out = ChatParse(content=text)
        if self.reasoning is not None:
            split = self.reasoning.split(text, final)
            out.reasoning, out.content = split.reasoning, split.content
        if self.tools is not None:
            parsed = self.tools.parse(out.content, final)
            out.content, out.calls = parsed.content, parsed.calls[:self.max_calls]
        if not final:
            out.content = out.content.rstrip()  # whitespace between calls is not content unless text follows
        return out

    def message(self, text: str) -> dict:
        """The assistant message of a finished reply: content (None when the reply is only calls),
        reasoning_content when a reasoning parser is on, tool_calls when there are calls."""
        parse = self.parse(text, True)
        content = parse.content.strip() if parse.calls else parse.content
        message: dict = {"role": "assistant", "content": content or (None if parse.calls else content)}
        if self.reasoning is not None:
            message["reasoning_content"] = parse.reasoning or None
        message["tool_calls"] = [
            {"id": tool_call_id(), "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
            for call in parse.calls] or None
        return message


class ChatOutputStream:
    """What one streamed choice has sent so far, and the deltas of its next update."""

    def __init__(self, parser: ChatOutputParser):
        self.parser = parser
        self.reasoning_sent = 0
        self.content_sent = 0
        self.args_sent: list[int] = []  # per call: characters of its arguments sent

    @property
    def has_calls(self) -> bool:
        return bool(self.args_sent)

    def feed(self, text: str, final: bool) -> list[dict]:
        """OpenAI `delta` objects for the text so far (none when nothing new can be told yet)."""
        parse = self.parser.parse(text, final)
        deltas: list[dict] = []
        if len(parse.reasoning) > self.reasoning_sent:
            deltas.append({"reasoning_content": parse.reasoning[self.reasoning_sent:]})
            self.reasoning_sent = len(parse.reasoning)
        if len(parse.content) > self.content_sent:
            piece = parse.content[self.content_sent:]
            if not self.has_calls or piece.strip():
                deltas.append({"content": piece})
            self.content_sent = len(parse.content)
        for index, call in enumerate(parse.calls):
            if index == len(self.args_sent):
                deltas.append({"tool_calls": [{"index": index, "id": tool_call_id(), "type": "function",
                                               "function": {"name": call.name, "arguments": ""}}]})
                self.args_sent.append(0)
            if len(call.arguments) > self.args_sent[index]:
                deltas.append({"tool_calls": [{"index": index,
                                               "function": {"arguments": call.arguments[self.args_sent[index]:]}}]})
                self.args_sent[index] = len(call.arguments)
        return deltas
