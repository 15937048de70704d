"""The xgrammar calls for each grammar kind, shared by the ingress (parse only, to validate) and the
workers (compile against the tokenizer's vocabulary), so both read a grammar the same way.

JSON is generated compactly: `any_whitespace=False` gives `{"a": 1, "b": [2, 3]}` (the separators
", " and ": "), so a model cannot stall in whitespace, and strict mode keeps objects to the schema's
properties (what OpenAI's strict mode promises, and what SGLang and vLLM do with xgrammar)."""

from __future__ import annotations

import re

import xgrammar as xgr

from runtime.messages import GrammarSpec

KINDS = ("json_schema", "json_object", "regex", "ebnf", "structural_tag")
JSON_OBJECT_SCHEMA = '{"type": "object"}'
_JSON_OPTIONS = {"any_whitespace": False, "strict_mode": True}
# xgrammar prefixes its messages with "[time] /path/file.cc:line: "; the rest is what a user needs.
_LOCATION_PREFIX = re.compile(r"^\[[\d:]+\] [^ ]+:\d+: ")


def parse(spec: GrammarSpec) -> xgr.Grammar:
    """The grammar without a vocabulary: raises ValueError/RuntimeError when the source is invalid."""
    match spec.kind:
        case "json_schema":
            return xgr.Grammar.from_json_schema(spec.source, **_JSON_OPTIONS)
        case "json_object":
            return xgr.Grammar.from_json_schema(JSON_OBJECT_SCHEMA, **_JSON_OPTIONS)
        case "regex":
            return xgr.Grammar.from_regex(spec.source)
        case "ebnf":
            return xgr.Grammar.from_ebnf(spec.source)
        case "structural_tag":
            return xgr.Grammar.from_structural_tag(spec.source)
    raise ValueError(f"unknown grammar kind {spec.kind!r}")


def compile_grammar(compiler: xgr.GrammarCompiler, spec: GrammarSpec) -> xgr.CompiledGrammar:
    match spec.kind:
        case "json_schema":
            return compiler.compile_json_schema(spec.source, **_JSON_OPTIONS)
        case "json_object":
            return compiler.compile_json_schema(JSON_OBJECT_SCHEMA, **_JSON_OPTIONS)
        case "regex":
            return compiler.compile_regex(spec.source)
        case "ebnf":
            return compiler.compile_grammar(spec.source)
        case "structural_tag":
            return compiler.compile_structural_tag(spec.source)
    raise ValueError(f"unknown grammar kind {spec.kind!r}")


def compiler_message(err: Exception) -> str:
    """The compiler's own words, without its source location, on one line."""
    lines = [_LOCATION_PREFIX.sub("", line).strip() for line in str(err).strip().splitlines()]
    return " ".join(line for line in lines if line) or type(err).__name__
