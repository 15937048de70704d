"""The generic form of forced calls (families without a template, or no --tool-call-parser), read back:
- `tool_choice: "required"`: a JSON array `[{"name": "f", "parameters": {...}}, ...]`;
- a named function: the reply is its arguments object."""

from __future__ import annotations

from runtime.constrained.tool_parsers.base import (
    ToolCallDraft,
    ToolParse,
    ToolParser,
    append_call_objects,
    json_value_end,
    skip,
)


class JsonArrayParser(ToolParser):
    name = "json_array"

    def parse(self, text: str, final: bool) -> ToolParse:
        result = ToolParse(content="")
        pos = skip(text, 0, " \t\r\n")
        if pos >= len(text) or text[pos] != "[":
            return ToolParse(content=text if final else "")
        return append_call_objects(result, text, pos + 1, final, " \t\r\n,")


class NamedArgumentsParser(ToolParser):
    """The reply of a request that named its function: all of it is that function's arguments."""

    name = "named"

    def __init__(self, function_name: str):
        self.function_name = function_name

    def parse(self, text: str, final: bool) -> ToolParse:
        start = skip(text, 0, " \t\r\n")
        end = json_value_end(text, start)
        arguments = text[start:end] if end is not None else (text[start:].rstrip() if final else text[start:])
        return ToolParse(content="", calls=[ToolCallDraft(self.function_name, arguments, complete=end is not None)])
