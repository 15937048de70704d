"""Qwen2.5 / Hermes: each call is a JSON object in its own tag, text may come before.

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>
"""

from __future__ import annotations

from runtime.constrained.tool_parsers.base import CallTemplate, ToolParse, ToolParser, call_object, content_before

BEGIN, END = "<tool_call>", "</tool_call>"


class HermesParser(ToolParser):
    name = "hermes"
    template = CallTemplate(calls_begin="", calls_end="", separator="\n",
                            call_begin=BEGIN + '\n{"name": "{name}", "arguments": ', call_end="}\n" + END)

    def parse(self, text: str, final: bool) -> ToolParse:
        result = ToolParse(content="")
        pos = 0
        while True:
            begin = text.find(BEGIN, pos)
            if begin < 0:
                result.content += content_before(text[pos:], (BEGIN,), final)
                return result
            result.content += text[pos:begin]
            end = text.find(END, begin)
            body = text[begin + len(BEGIN):end if end >= 0 else len(text)]
            draft, _ = call_object(body, 0, final or end >= 0)
            if draft is not None:
                result.calls.append(draft)
            if end < 0:
                return result
            pos = end + len(END)
