"""The one place that calls xgrammar's compiler (on the workers): a GrammarSpec becomes a compiled grammar.

JSON is generated compactly everywhere (`any_whitespace=False`: `{"a": 1, "b": [2, 3]}` with the separators
", " and ": "), so a model cannot stall in whitespace, and in strict mode (objects hold the schema's
properties only: what OpenAI's strict mode promises, and what SGLang and vLLM do with xgrammar). Inside a
structural tag a JSON value is embedded as the EBNF of that same compact grammar.

Composed kinds (built by the ingress, runtime/constrained/grammars.py):
- "tool_calls": calls_begin, then calls to the tools (call_begin(name), the arguments as JSON following the
  tool's schema, call_end) joined by the separator, then calls_end: nothing else, at least one call;
- "reasoning": `[<think>] free text </think>`, up to two newlines, then the inner grammar; the whole block
  optional (Qwen3) or only its opening tag (DeepSeek-R1's template opens it in the prompt).
"""

from __future__ import annotations

import json
import re
from typing import Any

import xgrammar as xgr
from xgrammar import structural_tag as st

from runtime.messages import GrammarSpec

JSON_OBJECT_SCHEMA = '{"type": "object"}'
THINK_BEGIN, THINK_END = "<think>", "</think>"
_JSON_OPTIONS = {"any_whitespace": False, "strict_mode": True}
# xgrammar prefixes its messages with "[time] /path/file.cc:line: "; the rest is what a user needs.
_LOCATION_PREFIX = re.compile(r"^\[[\d:]+\] [^ ]+:\d+: ")


def compile_grammar(compiler: xgr.GrammarCompiler, spec: GrammarSpec) -> xgr.CompiledGrammar:
    """Raises (RuntimeError, ValueError, ...) when the source is not a grammar the compiler takes."""
    match spec.kind:
        case "json_schema":
            return compiler.compile_json_schema(spec.source, **_JSON_OPTIONS)
        case "json_object":
            return compiler.compile_json_schema(JSON_OBJECT_SCHEMA, **_JSON_OPTIONS)
        case "regex":
            return compiler.compile_regex(spec.source)
        case "ebnf":
            return compiler.compile_grammar(spec.source)
        case "structural_tag" | "tool_calls" | "reasoning":
            return compiler.compile_structural_tag(st.StructuralTag(format=_format(spec.kind, spec.source)))
    raise ValueError(f"unknown grammar kind {spec.kind!r}")


def compiler_message(err: Exception) -> str:
    """The compiler's own words, without its source location, on one line."""
    lines = [_LOCATION_PREFIX.sub("", line).strip() for line in str(err).strip().splitlines()]
    return " ".join(line for line in lines if line) or type(err).__name__


def _format(kind: str, source: str) -> Any:
    """A grammar as a structural-tag format, to be composed with others."""
    match kind:
        case "json_schema":
            return _json(source)
        case "json_object":
            return _json(JSON_OBJECT_SCHEMA)
        case "regex":
            return st.RegexFormat(pattern=source)
        case "ebnf":
            return st.GrammarFormat(grammar=source)
        case "structural_tag":
            return _structural_tag(json.loads(source))
        case "tool_calls":
            return _tool_calls(json.loads(source))
        case "reasoning":
            return _reasoning(json.loads(source))
    raise ValueError(f"unknown grammar kind {kind!r}")


def _json(schema: str) -> st.GrammarFormat:
    return st.GrammarFormat(grammar=str(xgr.Grammar.from_json_schema(schema, **_JSON_OPTIONS)))


def _structural_tag(tag: dict) -> Any:
    """xgrammar's `{"format": {...}}`, or SGLang's older `{"structures": [{"begin", "schema", "end"}],
    "triggers": [...]}`: text until a trigger, then one of the tagged JSON values."""
    if "structures" not in tag:
        return st.StructuralTag.model_validate({"type": "structural_tag", **tag}).format
    tags = [st.TagFormat(begin=s["begin"], content=_json(json.dumps(s["schema"])), end=s["end"])
            for s in tag["structures"]]
    return st.TriggeredTagsFormat(triggers=tag.get("triggers", []), tags=tags)


def _tool_calls(spec: dict) -> Any:
    template = spec["template"]
    tags = [st.TagFormat(begin=template["call_begin"].replace("{name}", tool["name"]),
                         content=_json(json.dumps(tool["parameters"] or {"type": "object"})),
                         end=template["call_end"]) for tool in spec["tools"]]
    calls = st.TagsWithSeparatorFormat(tags=tags, separator=template["separator"], at_least_one=spec["at_least_one"],
                                       stop_after_first=spec["single"])
    elements = [st.ConstStringFormat(value=template["calls_begin"])] if template["calls_begin"] else []
    elements.append(calls)
    if template["calls_end"]:
        elements.append(st.ConstStringFormat(value=template["calls_end"]))
    return elements[0] if len(elements) == 1 else st.SequenceFormat(elements=elements)


def _reasoning(spec: dict) -> Any:
    opening: Any = st.ConstStringFormat(value=THINK_BEGIN)
    if not spec["block_optional"]:
        opening = st.OptionalFormat(content=opening)
    block: Any = st.SequenceFormat(elements=[
        opening,
        st.TagFormat(begin="", content=st.AnyTextFormat(excludes=[THINK_END]), end=THINK_END),
        st.RegexFormat(pattern=r"\n{0,2}"),
    ])
    if spec["block_optional"]:
        block = st.OptionalFormat(content=block)
    return st.SequenceFormat(elements=[block, _format(spec["kind"], spec["source"])])
