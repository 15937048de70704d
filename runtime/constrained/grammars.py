"""Grammars from requests, on the ingress: the fields a client may constrain its output with become one
`GrammarSpec`. Plain Python (the ingress imports no torch, and xgrammar does): the shape of each field is
checked here, a 400 naming the field; what only the compiler can judge (an unsupported schema keyword, a
malformed regex) is judged by the workers' compile (backend.py), which refuses the request with a 400 that
names the same field and quotes the compiler.

Sources, one per request:
- native `sampling_params`: `json_schema` (a JSON string or object), `regex`, `ebnf`, `structural_tag`
  (xgrammar's structural tag as JSON, or SGLang's older `{"structures": [...], "triggers": [...]}`);
- OpenAI `response_format`: `{"type": "json_object"}`, `{"type": "json_schema", "json_schema": {"name",
  "schema", "strict"}}`, `{"type": "structural_tag", ...}`, and SGLang's extras as top-level fields;
- forced tool calls (`tool_choice: "required"` or a named function): `tool_calls` (a family's format) or a
  JSON schema (the generic form).
With a reasoning parser a chat grammar is put after the model's `<think>...</think>` block (`after_reasoning`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from runtime.messages import GrammarSpec


class GrammarError(ValueError):
    """A grammar field that is malformed: `field` is the request field at fault."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = f"{field}: {message}"


def grammar_spec(kind: str, source: str, field: str = "") -> GrammarSpec:
    digest = hashlib.sha256(f"{kind}\0{source}".encode()).hexdigest()[:32]
    return GrammarSpec(key=digest, kind=kind, source=source, field=field)


def from_fields(json_schema: Any, regex: str | None, ebnf: str | None, structural_tag: Any,
                name) -> GrammarSpec | None:
    """SGLang's grammar fields (at most one may be given) as a spec; `name(field)` spells a field as the
    request does ("sampling_params.regex" or "regex")."""
    given = [(field, value) for field, value in (("json_schema", json_schema), ("regex", regex), ("ebnf", ebnf),
                                                  ("structural_tag", structural_tag)) if value is not None]
    if not given:
        return None
    if len(given) > 1:
        fields = " and ".join(name(field) for field, _ in given)
        raise GrammarError(name(given[1][0]), f"give only one grammar per request ({fields} were both given)")
    field, value = given[0]
    if field in ("json_schema", "structural_tag"):
        return grammar_spec(field, json_object_text(value, name(field)), name(field))
    if not isinstance(value, str) or not value:
        raise GrammarError(name(field), "expected a non-empty string")
    return grammar_spec(field, value, name(field))


def from_response_format(response_format: dict) -> GrammarSpec | None:
    """OpenAI's `response_format` (as a dict); None for `{"type": "text"}`."""
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return grammar_spec("json_object", "", "response_format")
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict):
            raise GrammarError("response_format.json_schema", "expected an object with `name` and `schema`")
        schema = spec.get("schema", spec.get("schema_"))
        if schema is None:
            raise GrammarError("response_format.json_schema.schema", "required: the JSON schema to follow")
        field = "response_format.json_schema.schema"
        return grammar_spec("json_schema", json_object_text(schema, field), field)
    if kind == "structural_tag":
        body = {k: v for k, v in response_format.items() if k != "type"}
        return grammar_spec("structural_tag", json_object_text(body, "response_format"), "response_format")
    raise GrammarError("response_format.type", f"must be one of text, json_object, json_schema, structural_tag; "
                                               f"got {kind!r}")


def json_object_text(value: Any, field: str) -> str:
    """A JSON object given as an object or as its JSON text, as compact JSON text (key order kept: a schema's
    property order is the order the output follows)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise GrammarError(field, f"not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise GrammarError(field, "expected a JSON object")
    return json.dumps(value, ensure_ascii=False)


def after_reasoning(spec: GrammarSpec, block_optional: bool) -> GrammarSpec:
    """`spec` after a free-text reasoning block `<think> ... </think>` (backend.py builds it).
    block_optional: the whole block may be missing (Qwen3 without thinking); otherwise the block is always
    there and only its opening tag may be missing (DeepSeek-R1's template opens it in the prompt)."""
    source = json.dumps({"block_optional": block_optional, "kind": spec.kind, "source": spec.source})
    return grammar_spec("reasoning", source, spec.field)


def tool_calls_format(tools: list[dict], template, at_least_one: bool, single: bool) -> GrammarSpec:
    """Calls to `tools` (OpenAI function tools, checked) written with `template` (a tool_parsers.CallTemplate):
    nothing but the calls, at least one, only one when `single`; each call's arguments follow its tool's
    schema (backend.py builds it)."""
    source = json.dumps({
        "template": dataclasses.asdict(template),
        "tools": [{"name": t["function"]["name"], "parameters": t["function"].get("parameters")} for t in tools],
        "at_least_one": at_least_one, "single": single}, ensure_ascii=False)
    return grammar_spec("tool_calls", source, "tools")


def json_tool_calls_schema(tools: list[dict], single: bool) -> GrammarSpec:
    """The generic form of forced calls, for families without a template: a JSON array of
    `{"name": ..., "parameters": {...}}` (at least one item; exactly one when `single`)."""
    items = [{"type": "object", "properties": {"name": {"const": tool["function"]["name"]},
                                               "parameters": tool["function"].get("parameters") or {"type": "object"}},
              "required": ["name", "parameters"]} for tool in tools]
    schema: dict = {"type": "array", "minItems": 1, "items": items[0] if len(items) == 1 else {"anyOf": items}}
    if single:
        schema["maxItems"] = 1
    return grammar_spec("json_schema", json.dumps(schema, ensure_ascii=False), "tools")
