"""Tool-call parsers, one module per model family, chosen with --tool-call-parser (SGLang's names)."""

from __future__ import annotations

from runtime.constrained.tool_parsers.base import CallTemplate, ToolCallDraft, ToolParse, ToolParser
from runtime.constrained.tool_parsers.deepseekv3 import DeepSeekV3Parser
from runtime.constrained.tool_parsers.hermes import HermesParser
from runtime.constrained.tool_parsers.json_calls import JsonArrayParser, NamedArgumentsParser
from runtime.constrained.tool_parsers.llama3 import Llama3Parser
from runtime.constrained.tool_parsers.mistral import MistralParser
from runtime.constrained.tool_parsers.pythonic import PythonicParser

PARSERS: dict[str, type[ToolParser]] = {
    "llama3": Llama3Parser,
    "qwen25": HermesParser,
    "hermes": HermesParser,
    "mistral": MistralParser,
    "deepseekv3": DeepSeekV3Parser,
    "pythonic": PythonicParser,
}

__all__ = ["PARSERS", "CallTemplate", "JsonArrayParser", "NamedArgumentsParser", "ToolCallDraft", "ToolParse",
           "ToolParser"]
