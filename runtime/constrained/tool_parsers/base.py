"""What every tool-call parser shares: the result types, the template a family writes calls with (used to
force calls through a grammar), and partial-JSON helpers.

A parser reads the whole text generated so far and says which part is surely content and which calls
it holds. It is called again on every streamed update with a longer text, so its answers grow: content
and the arguments of a call only ever get longer, and a call's name is reported only once complete
(`ToolCallStream` in chat_output.py turns successive answers into OpenAI deltas). Arguments are the
model's own JSON text, so the streamed fragments add up to exactly the final arguments string.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

_DECODER = json.JSONDecoder()


@dataclass
class ToolCallDraft:
    name: str
    arguments: str  # JSON text of the arguments so far (the whole object once `complete`)
    complete: bool = False


@dataclass
class ToolParse:
    content: str  # text outside tool calls; while streaming, without a tail that may start a call marker
    calls: list[ToolCallDraft] = field(default_factory=list)


@dataclass(frozen=True)
class CallTemplate:
    """How a family writes its calls: calls_begin, call (separator call)*, calls_end, where one call is
    call_begin (with the function name for `{name}`), the arguments as a JSON object, call_end."""

    calls_begin: str
    calls_end: str
    separator: str
    call_begin: str
    call_end: str


class ToolParser:
    """Base of the per-family parsers (one module each)."""

    name = ""
    template: CallTemplate | None = None  # None: forced calls use the generic JSON form (json_calls.py)
    # Markers that are special tokens in the family's tokenizer: the detokenizer must keep them.
    keeps_special_tokens = False

    def parse(self, text: str, final: bool) -> ToolParse:
        raise NotImplementedError


def held_back(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of one of `markers`: text that may
    still turn into a marker and must not be sent as content yet."""
    longest = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), longest, -1):
            if text.endswith(marker[:n]):
                longest = n
                break
    return longest


def content_before(text: str, markers: tuple[str, ...], final: bool) -> str:
    return text if final else text[:len(text) - held_back(text, markers)]


def json_value_end(text: str, start: int) -> int | None:
    """End of the JSON value starting at `start` (after whitespace), or None while it is incomplete (or
    invalid: the caller cannot tell, and keeps reading)."""
    while start < len(text) and text[start] in " \t\r\n":
        start += 1
    try:
        return _DECODER.raw_decode(text, start)[1]
    except json.JSONDecodeError:
        return None


_CALL_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*')


def call_object(text: str, start: int, final: bool) -> tuple[ToolCallDraft | None, int | None]:
    """The call written as `{"name": "f", "arguments": {...}}` (or "parameters") at text[start:]: the draft
    (None until the name is complete) and the end of the object (None while incomplete)."""
    head = _CALL_HEAD.match(text, start)
    if head is None:
        return _reordered_call(text, start) if final else (None, None)
    name = json.loads(f'"{head.group(1)}"')
    args_start = head.end()
    args_end = json_value_end(text, args_start)
    if args_end is None:
        return ToolCallDraft(name, text[args_start:].rstrip() if final else text[args_start:]), None
    close = re.compile(r"\s*\}").match(text, args_end)
    draft = ToolCallDraft(name, text[args_start:args_end], complete=True)
    return draft, close.end() if close else None


def _reordered_call(text: str, start: int) -> tuple[ToolCallDraft | None, int | None]:
    """A complete call object whose keys are not name-first: read it whole."""
    end = json_value_end(text, start)
    if end is None:
        return None, None
    obj = json.loads(text[start:end])
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None, None
    args = obj.get("arguments", obj.get("parameters", {}))
    return ToolCallDraft(obj["name"], json.dumps(args, ensure_ascii=False), complete=True), end


def append_call_objects(result: ToolParse, text: str, pos: int, final: bool, separators: str) -> ToolParse:
    """Add to `result` the call objects written one after the other from text[pos:], with any of `separators`
    between them; stops at anything else or at an incomplete object. Returns `result`."""
    while True:
        pos = skip(text, pos, separators)
        if pos >= len(text) or text[pos] != "{":
            return result
        draft, end = call_object(text, pos, final)
        if draft is not None:
            result.calls.append(draft)
        if end is None:
            return result
        pos = end


def skip(text: str, pos: int, chars: str) -> int:
    while pos < len(text) and text[pos] in chars:
        pos += 1
    return pos
