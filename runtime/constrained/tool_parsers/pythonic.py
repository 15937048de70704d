"""Pythonic calls (Llama 3.2 / 4 style): a Python list of calls with keyword arguments, maybe between
`<|python_start|>` and `<|python_end|>`.

    [get_weather(city="Paris"), get_time(zone="CET", hour24=True)]

The list is read with `ast` once it is complete; arguments become JSON (True -> true, None -> null).
A reply that is not such a list is content."""

from __future__ import annotations

import ast
import json
import re

from runtime.constrained.tool_parsers.base import ToolCallDraft, ToolParse, ToolParser, held_back

START, END = "<|python_start|>", "<|python_end|>"
_LIST_START = re.compile(r"\[\s*[A-Za-z_][\w.]*\s*\(")
_LIST_START_PREFIX = re.compile(r"(\[\s*([A-Za-z_][\w.]*\s*)?)?")


class PythonicParser(ToolParser):
    name = "pythonic"
    keeps_special_tokens = True  # <|python_start|>

    def parse(self, text: str, final: bool) -> ToolParse:
        stripped = text.strip()
        body = stripped.removeprefix(START)
        end = body.find(END)
        body = (body[:end] if end >= 0 else body[:len(body) - held_back(body, (END,))]).strip()
        if _LIST_START.match(body) is None:
            may_become_calls = START.startswith(stripped) or _LIST_START_PREFIX.fullmatch(body) is not None
            return ToolParse(content="" if not final and may_become_calls else text)
        calls = _calls(body)
        if calls is None:  # incomplete (or not a list of calls after all)
            return ToolParse(content=text if final else "")
        return ToolParse(content="", calls=calls)


def _calls(body: str) -> list[ToolCallDraft] | None:
    try:
        tree = ast.parse(body, mode="eval")
    except SyntaxError:
        return None
    if not isinstance(tree.body, ast.List):
        return None
    calls = []
    for node in tree.body.elts:
        if not isinstance(node, ast.Call) or node.args:
            return None
        name = ast.unparse(node.func)
        arguments = {}
        for keyword in node.keywords:
            if keyword.arg is None:
                return None
            try:
                arguments[keyword.arg] = ast.literal_eval(keyword.value)
            except ValueError:
                arguments[keyword.arg] = ast.unparse(keyword.value)
        calls.append(ToolCallDraft(name, json.dumps(arguments, ensure_ascii=False), complete=True))
    return calls
