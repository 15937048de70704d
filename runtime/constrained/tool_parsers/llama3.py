"""Llama 3.1 / 3.2 JSON tool calling: the reply is the call, `{"name": ..., "parameters": {...}}`, maybe
after `<|python_tag|>`; several calls are separated by `;`. Text before `<|python_tag|>` is content; a
reply that does not start with a call object is all content."""

from __future__ import annotations

import re

from runtime.constrained.tool_parsers.base import CallTemplate, ToolParse, ToolParser, append_call_objects

PYTHON_TAG = "<|python_tag|>"
_CALL_START = '{"name"'


class Llama3Parser(ToolParser):
    name = "llama3"
    template = CallTemplate(calls_begin="", calls_end="", separator=";",
                            call_begin='{"name": "{name}", "parameters": ', call_end="}")
    keeps_special_tokens = True  # <|python_tag|>

    def parse(self, text: str, final: bool) -> ToolParse:
        tag = text.find(PYTHON_TAG)
        if tag >= 0:
            return self._calls(text[:tag], text, tag + len(PYTHON_TAG), final)
        stripped = text.lstrip()
        compact = re.sub(r"\s+", "", stripped)
        if compact.startswith(_CALL_START):
            return self._calls("", text, len(text) - len(stripped), final)
        if not final and (_CALL_START.startswith(compact) or PYTHON_TAG.startswith(stripped)):
            return ToolParse(content="")  # may still become a call
        return ToolParse(content=text)

    def _calls(self, content: str, text: str, pos: int, final: bool) -> ToolParse:
        return append_call_objects(ToolParse(content=content), text, pos, final, " \t\r\n;")
