"""Grammars from requests, on the ingress: the fields a client may constrain its output with become one
`GrammarSpec`, checked here (a 400 naming the field and quoting the compiler) so that a worker never sees
a grammar it cannot compile.

Sources, one per request:
- native `sampling_params`: `json_schema` (a JSON string or object), `regex`, `ebnf`, `structural_tag`
  (xgrammar's structural tag as JSON, or SGLang's older `{"structures": [...], "triggers": [...]}`);
- OpenAI `response_format`: `{"type": "json_object"}`, `{"type": "json_schema", "json_schema": {"name",
  "schema", "strict"}}`, `{"type": "structural_tag", ...}`, and the same SGLang extras as top-level fields;
- forced tool calls (`tool_choice: "required"` or a named function), built by `tool_calls_format`.
With a reasoning parser a chat grammar is put after the model's `<think>...</think>` block
(`after_reasoning`), which stays free text.
"""

from __future__ import annotations

import collections
import hashlib
import json
from typing import Any

from xgrammar import structural_tag as st

from runtime.constrained import backend
from runtime.messages import GrammarSpec

# Distinct grammars whose validation is remembered (a repeated schema is not parsed again).
VALIDATION_CACHE_SIZE = 1024
THINK_BEGIN, THINK_END = "<think>", "</think>"


class GrammarError(ValueError):
    """A grammar the compiler refuses: `field` is the request field at fault."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = f"{field}: {message}"


def grammar_spec(kind: str, source: str) -> GrammarSpec:
    digest = hashlib.sha256(f"{kind}\0{source}".encode()).hexdigest()[:32]
    return GrammarSpec(key=digest, kind=kind, source=source)


class GrammarValidator:
    """Parses each distinct grammar once with the xgrammar compiler (no vocabulary needed) and remembers
    the verdict, least recently used first out."""

    def __init__(self, capacity: int = VALIDATION_CACHE_SIZE):
        self.capacity = capacity
        self._verdicts: collections.OrderedDict[str, str | None] = collections.OrderedDict()

    def check(self, spec: GrammarSpec, field: str) -> GrammarSpec:
        if spec.key in self._verdicts:
            self._verdicts.move_to_end(spec.key)
            error = self._verdicts[spec.key]
        else:
            try:
                backend.parse(spec)
                error = None
            except (RuntimeError, ValueError) as err:
                error = backend.compiler_message(err)
            self._verdicts[spec.key] = error
            if len(self._verdicts) > self.capacity:
                self._verdicts.popitem(last=False)
        if error is not None:
            raise GrammarError(field, f"the grammar compiler refused it: {error}")
        return spec


# ----------------------------------------------------------------------------------------------------
# request fields -> GrammarSpec
# ----------------------------------------------------------------------------------------------------


def from_fields(json_schema: Any, regex: str | None, ebnf: str | None, structural_tag: Any,
                name) -> tuple[GrammarSpec, str] | None:
    """SGLang's grammar fields (at most one may be given) as a spec and the name of the field it came
    from; `name(field)` spells a field as the request does."""
    given = [(field, value) for field, value in (("json_schema", json_schema), ("regex", regex), ("ebnf", ebnf),
                                                  ("structural_tag", structural_tag)) if value is not None]
    if not given:
        return None
    if len(given) > 1:
        fields = " and ".join(name(field) for field, _ in given)
        raise GrammarError(name(given[1][0]), f"give only one grammar per request ({fields} were both given)")
    field, value = given[0]
    if field == "json_schema":
        return grammar_spec("json_schema", _schema_text(value, name(field))), name(field)
    if field == "structural_tag":
        return grammar_spec("structural_tag", structural_tag_json(value, name(field))), name(field)
    if not isinstance(value, str) or not value:
        raise GrammarError(name(field), "expected a non-empty string")
    return grammar_spec(field, value), name(field)


def from_response_format(response_format: dict) -> GrammarSpec | None:
    """OpenAI's `response_format` (as a dict); None for `{"type": "text"}`."""
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return grammar_spec("json_object", "")
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict):
            raise GrammarError("response_format.json_schema", "expected an object with `name` and `schema`")
        schema = spec.get("schema", spec.get("schema_"))
        if schema is None:
            raise GrammarError("response_format.json_schema.schema", "required: the JSON schema to follow")
        return grammar_spec("json_schema", _schema_text(schema, "response_format.json_schema.schema"))
    if kind == "structural_tag":
        body = {k: v for k, v in response_format.items() if k != "type"}
        return grammar_spec("structural_tag", structural_tag_json(body, "response_format"))
    raise GrammarError("response_format.type", f"must be one of text, json_object, json_schema, structural_tag; "
                                               f"got {kind!r}")


def _schema_text(value: Any, field: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, dict)):
        raise GrammarError(field, "expected a JSON schema (an object, or a JSON string of one)")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise GrammarError(field, f"not valid JSON: {err}") from None
        if not isinstance(value, dict):
            raise GrammarError(field, "expected a JSON object")
    return json.dumps(value, ensure_ascii=False)


def structural_tag_json(value: Any, field: str) -> str:
    """xgrammar's structural tag (`{"format": {...}}`) as canonical JSON. SGLang's older form
    `{"structures": [{"begin", "schema", "end"}], "triggers": [...]}` is converted: text until a trigger,
    then one of the tagged JSON structures."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise GrammarError(field, f"not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise GrammarError(field, "expected a structural tag object")
    try:
        if "structures" in value:
            tags = [st.TagFormat(begin=s["begin"], content=_json_format(s["schema"]), end=s["end"])
                    for s in value["structures"]]
            tag = st.StructuralTag(format=st.TriggeredTagsFormat(triggers=value.get("triggers", []), tags=tags))
        else:
            tag = st.StructuralTag.model_validate({"type": "structural_tag", **value})
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise GrammarError(field, f"not a valid structural tag: {backend.compiler_message(err)}") from None
    return tag.model_dump_json()


# ----------------------------------------------------------------------------------------------------
# composed grammars: a JSON value inside a tag, tool calls, a reasoning block first
# ----------------------------------------------------------------------------------------------------


def _json_format(schema: Any) -> st.GrammarFormat:
    """A JSON value following `schema`, written compactly as everywhere else (backend.py)."""
    text = json.dumps(schema if schema is not None else {"type": "object"})
    spec = grammar_spec("json_schema", text)
    return st.GrammarFormat(grammar=str(backend.parse(spec)))


def _as_format(spec: GrammarSpec) -> Any:
    match spec.kind:
        case "json_schema":
            return st.GrammarFormat(grammar=str(backend.parse(spec)))
        case "json_object":
            return st.GrammarFormat(grammar=str(backend.parse(spec)))
        case "regex":
            return st.RegexFormat(pattern=spec.source)
        case "ebnf":
            return st.GrammarFormat(grammar=spec.source)
    return st.StructuralTag.model_validate_json(spec.source).format


def after_reasoning(spec: GrammarSpec, block_optional: bool) -> GrammarSpec:
    """`spec` after a free-text reasoning block `<think> ... </think>` and up to two newlines.
    block_optional: the whole block may be missing (Qwen3 without thinking); otherwise the block is always
    there and only its opening tag may be missing (DeepSeek-R1's template opens it in the prompt)."""
    opening: Any = st.ConstStringFormat(value=THINK_BEGIN)
    if not block_optional:
        opening = st.OptionalFormat(content=opening)
    block: Any = st.SequenceFormat(elements=[
        opening,
        st.TagFormat(begin="", content=st.AnyTextFormat(excludes=[THINK_END]), end=THINK_END),
        st.RegexFormat(pattern=r"\n{0,2}"),
    ])
    if block_optional:
        block = st.OptionalFormat(content=block)
    tag = st.StructuralTag(format=st.SequenceFormat(elements=[block, _as_format(spec)]))
    return grammar_spec("structural_tag", tag.model_dump_json())


def tool_calls_format(tools: list[dict], template, at_least_one: bool, single: bool) -> GrammarSpec:
    """Calls to `tools` (OpenAI function tools, already validated) written with `template` (a
    tool_parsers.CallTemplate): nothing but the calls, at least one, only one when `single`."""
    tags = [st.TagFormat(begin=template.call_begin.replace("{name}", tool["function"]["name"]),
                         content=_json_format(tool["function"].get("parameters")), end=template.call_end)
            for tool in tools]
    calls = st.TagsWithSeparatorFormat(tags=tags, separator=template.separator, at_least_one=at_least_one,
                                       stop_after_first=single)
    elements = [e for e in (template.calls_begin and st.ConstStringFormat(value=template.calls_begin), calls,
                            template.calls_end and st.ConstStringFormat(value=template.calls_end)) if e]
    tag = st.StructuralTag(format=elements[0] if len(elements) == 1 else st.SequenceFormat(elements=elements))
    return grammar_spec("structural_tag", tag.model_dump_json())


def json_tool_calls_schema(tools: list[dict], single: bool) -> GrammarSpec:
    """The generic form of forced calls, for families without a template: a JSON array of
    `{"name": ..., "parameters": {...}}` (at least one item; exactly one when `single`)."""
    items = [{"type": "object", "properties": {"name": {"const": tool["function"]["name"]},
                                               "parameters": tool["function"].get("parameters") or {"type": "object"}},
              "required": ["name", "parameters"]} for tool in tools]
    schema: dict = {"type": "array", "minItems": 1, "items": items[0] if len(items) == 1 else {"anyOf": items}}
    if single:
        schema["maxItems"] = 1
    return grammar_spec("json_schema", json.dumps(schema, ensure_ascii=False))
