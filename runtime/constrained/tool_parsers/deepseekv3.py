"""DeepSeek-V3 (and R1): calls in a block of special markers, the arguments as a fenced JSON object.

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather
    ```json
    {"city": "Paris"}
    ```<｜tool▁call▁end｜><｜tool▁calls▁end｜>
"""

from __future__ import annotations

from runtime.constrained.tool_parsers.base import (
    CallTemplate,
    ToolCallDraft,
    ToolParse,
    ToolParser,
    content_before,
    json_value_end,
)

CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
FENCE = "```json"


class DeepSeekV3Parser(ToolParser):
    name = "deepseekv3"
    template = CallTemplate(calls_begin=CALLS_BEGIN, calls_end=CALLS_END, separator="\n",
                            call_begin=CALL_BEGIN + "function" + SEP + "{name}\n" + FENCE + "\n",
                            call_end="\n```" + CALL_END)
    keeps_special_tokens = True

    def parse(self, text: str, final: bool) -> ToolParse:
        begin = text.find(CALLS_BEGIN)
        if begin < 0:
            return ToolParse(content=content_before(text, (CALLS_BEGIN,), final))
        result = ToolParse(content=text[:begin])
        pos = begin + len(CALLS_BEGIN)
        while True:
            call = text.find(CALL_BEGIN, pos)
            if call < 0:
                return result
            sep = text.find(SEP, call)
            fence = text.find(FENCE, sep) if sep >= 0 else -1
            if fence < 0:
                return result  # the name is complete once its fence starts
            name = text[sep + len(SEP):fence].strip()
            args_start = fence + len(FENCE)
            while args_start < len(text) and text[args_start] in " \t\r\n":
                args_start += 1
            end = json_value_end(text, args_start)
            if end is None:
                close = text.find(CALL_END, args_start)
                stop = close if close >= 0 else len(text)
                body = text[args_start:stop]
                if final or close >= 0:
                    body = body.rstrip().removesuffix("```").rstrip()
                result.calls.append(ToolCallDraft(name, body))
                if close < 0:
                    return result
                pos = close + len(CALL_END)
                continue
            result.calls.append(ToolCallDraft(name, text[args_start:end], complete=True))
            close = text.find(CALL_END, end)
            if close < 0:
                return result
            pos = close + len(CALL_END)
