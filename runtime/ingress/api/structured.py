"""Constrained decoding on the HTTP side: the grammar of a request from its fields (native `sampling_params`,
OpenAI `response_format` and SGLang's extras). A malformed field is a 400 naming it here; a grammar the
compiler refuses is refused by the workers' compile with a 400 naming the same field (GrammarSpec.field)."""

from __future__ import annotations

import msgspec

from httpd import HttpError
from runtime.constrained.grammars import (
    GrammarError,
    after_reasoning,
    from_fields,
    from_response_format,
    grammar_spec,
    json_object_text,
)
from runtime.constrained.reasoning import ReasoningParser
from runtime.ingress.api.protocol import FieldNames, NativeSamplingParams, ResponseFormat
from runtime.messages import GrammarSpec


def check_grammar(frontend, spec: GrammarSpec) -> GrammarSpec:
    """`spec` if this server can constrain with it, else HttpError(400) naming its field."""
    if frontend.args.grammar_backend == "none":
        raise HttpError(400, f"{spec.field}: constrained decoding is off on this server (--grammar-backend none)",
                        spec.field)
    if frontend.tokenizer is None:
        raise HttpError(400, f"{spec.field}: constrained decoding needs the tokenizer; the server runs with "
                             "--skip-tokenizer-init", spec.field)
    return spec


def sampling_grammar(frontend, params: NativeSamplingParams, name: FieldNames) -> GrammarSpec | None:
    """The grammar of SGLang's `json_schema` / `regex` / `ebnf` / `structural_tag` sampling fields."""
    try:
        spec = from_fields(params.json_schema, params.regex, params.ebnf, params.structural_tag, name)
    except GrammarError as err:
        raise HttpError(400, err.message, err.field) from None
    return None if spec is None else check_grammar(frontend, spec)


def response_format_grammar(frontend, response_format: ResponseFormat | None) -> GrammarSpec | None:
    if response_format is None:
        return None
    fields = {k: v for k, v in msgspec.structs.asdict(response_format).items() if v is not None}
    try:
        spec = from_response_format(fields)
    except GrammarError as err:
        raise HttpError(400, err.message, err.field) from None
    return None if spec is None else check_grammar(frontend, spec)


def text_format_grammar(frontend, kind: str, schema) -> GrammarSpec | None:
    """The Responses API's `text.format`: {"type": "text" | "json_object"} or {"type": "json_schema", "name": ...,
    "schema": {...}, "strict": ...} (flat, unlike chat's response_format)."""
    if kind == "text":
        return None
    if kind == "json_object":
        return check_grammar(frontend, grammar_spec("json_object", "", "text.format"))
    if kind == "json_schema":
        if schema is None:
            raise HttpError(400, "text.format.schema: required with type json_schema", "text.format.schema")
        try:
            source = json_object_text(schema, "text.format.schema")
        except GrammarError as err:
            raise HttpError(400, err.message, err.field) from None
        return check_grammar(frontend, grammar_spec("json_schema", source, "text.format.schema"))
    raise HttpError(400, f"text.format.type: must be one of text, json_object, json_schema; got {kind!r}",
                    "text.format.type")


def request_grammar(frontend, params: NativeSamplingParams, response_format: ResponseFormat | None,
                    name: FieldNames) -> GrammarSpec | None:
    """One grammar from an OpenAI request: `response_format`, or one of SGLang's extra fields."""
    from_format = response_format_grammar(frontend, response_format)
    from_extras = sampling_grammar(frontend, params, name)
    if from_format is not None and from_extras is not None:
        raise HttpError(400, "response_format: cannot be combined with json_schema, regex, ebnf or structural_tag "
                             "(one grammar per request)", "response_format")
    return from_format or from_extras


def reasoning_grammar(spec: GrammarSpec | None, reasoning: ReasoningParser | None) -> GrammarSpec | None:
    """With a reasoning parser, a chat grammar starts after the model's think block."""
    if spec is None or reasoning is None:
        return spec
    return after_reasoning(spec, reasoning.block_optional)
