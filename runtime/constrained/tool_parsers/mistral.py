"""Mistral: `[TOOL_CALLS]` then a JSON array of calls (v0.3 tokenizers), or one `name[ARGS]{...}` per
`[TOOL_CALLS]` (v11+ tokenizers). Text before the first marker is content.

    [TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]
    [TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}
"""

from __future__ import annotations

from runtime.constrained.tool_parsers.base import (
    CallTemplate,
    ToolCallDraft,
    ToolParse,
    ToolParser,
    append_call_objects,
    content_before,
    json_value_end,
    skip,
)

MARKER, ARGS = "[TOOL_CALLS]", "[ARGS]"


class MistralParser(ToolParser):
    name = "mistral"
    template = CallTemplate(calls_begin=MARKER + " [", calls_end="]", separator=", ",
                            call_begin='{"name": "{name}", "arguments": ', call_end="}")
    keeps_special_tokens = True  # [TOOL_CALLS], [ARGS]

    def parse(self, text: str, final: bool) -> ToolParse:
        first = text.find(MARKER)
        if first < 0:
            return ToolParse(content=content_before(text, (MARKER,), final))
        result = ToolParse(content=text[:first])
        pos = skip(text, first + len(MARKER), " \t\r\n")
        if pos < len(text) and text[pos] == "[":
            self._array(text, pos + 1, final, result)
            return result
        while pos < len(text):  # name[ARGS]{...}, repeated after further markers
            args = text.find(ARGS, pos)
            if args < 0:
                return result
            name = text[pos:args].strip()
            args_start = args + len(ARGS)
            end = json_value_end(text, args_start)
            arguments = text[args_start:end if end is not None else len(text)].strip()
            result.calls.append(ToolCallDraft(name, arguments, complete=end is not None))
            if end is None:
                return result
            pos = skip(text, end, " \t\r\n")
            if text.startswith(MARKER, pos):
                pos += len(MARKER)
            elif pos < len(text):
                return result
        return result

    @staticmethod
    def _array(text: str, pos: int, final: bool, result: ToolParse) -> None:
        append_call_objects(result, text, pos, final, " \t\r\n,")
