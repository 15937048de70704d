"""Reasoning parsers (--reasoning-parser): split a reply into the model's reasoning (`<think>...</think>`)
and the answer, whole or streamed. Like the tool parsers they read the whole text so far and answer with
parts that only grow: a tail that may be the start of `</think>` is held back until it is not.

- `deepseek-r1`: the reply starts inside the reasoning (DeepSeek-R1's template opens `<think>` in the
  prompt; a leading `<think>` in the reply is dropped too); everything up to `</think>` is reasoning, and
  a reply cut before `</think>` is all reasoning.
- `qwen3`: reasoning only when the reply opens with `<think>` (Qwen3 with thinking on); otherwise it is all
  answer (thinking off, or a template that leaves no think block to the model).
"""

from __future__ import annotations

from dataclasses import dataclass

from runtime.constrained.tool_parsers.base import held_back

THINK_BEGIN, THINK_END = "<think>", "</think>"


@dataclass
class ReasoningSplit:
    reasoning: str
    content: str


class ReasoningParser:
    """One class for both families; `starts_in_reasoning` is the difference."""

    def __init__(self, name: str):
        if name not in REASONING_PARSERS:
            raise ValueError(f"unknown reasoning parser {name!r}; known: {', '.join(REASONING_PARSERS)}")
        self.name = name
        self.starts_in_reasoning = REASONING_PARSERS[name]
        # The grammar of a constrained reply may skip the whole block only where the model may.
        self.block_optional = not self.starts_in_reasoning

    def split(self, text: str, final: bool) -> ReasoningSplit:
        lead = len(text) - len(text.lstrip())
        body = text[lead:]
        if body.startswith(THINK_BEGIN):
            body = body[len(THINK_BEGIN):]
        elif not self.starts_in_reasoning:
            if not final and THINK_BEGIN.startswith(body):
                return ReasoningSplit("", "")  # may still open a think block
            return ReasoningSplit("", text)
        elif not final and body and THINK_BEGIN.startswith(body):
            return ReasoningSplit("", "")
        end = body.find(THINK_END)
        if end < 0:
            reasoning = body if final else body[:len(body) - held_back(body, (THINK_END,))]
            return ReasoningSplit(reasoning, "")
        return ReasoningSplit(body[:end], body[end + len(THINK_END):].lstrip())


REASONING_PARSERS = {"deepseek-r1": True, "qwen3": False}  # name -> the reply starts inside the reasoning
