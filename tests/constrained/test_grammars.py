"""Grammars from request fields (runtime/constrained/grammars.py) and their compilation (backend.py): which
spec each field gives, refusals naming the field, the compiler's messages, the reasoning block in front of a
grammar, and forced tool calls: every text the forcing grammar allows (random walks over a character
vocabulary) parses with the family's own parser into calls of the given tools with arguments that follow
their schemas."""

from __future__ import annotations

import json
import random

import jsonschema
import pytest

from runtime.constrained import backend
from runtime.constrained.grammars import (
    GrammarError,
    after_reasoning,
    from_fields,
    from_response_format,
    grammar_spec,
    json_object_text,
    json_tool_calls_schema,
    tool_calls_format,
)
from runtime.constrained.tool_parsers import PARSERS, JsonArrayParser, NamedArgumentsParser
from tests.constrained.char_vocab import char_compiler, matches, sample_grammar

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["name", "age"]}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 5}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"enum": ["CET", "UTC"]}, "h24": {"type": "boolean"}},
        "required": ["zone", "h24"]}}},
]


def native_name(field: str) -> str:
    return "sampling_params." + field


@pytest.fixture(scope="module")
def compiler():
    return char_compiler()


def test_each_field_gives_its_kind_and_keys_differ_by_source():
    spec = from_fields(json.dumps(PERSON), None, None, None, native_name)
    assert (spec.kind, spec.field) == ("json_schema", "sampling_params.json_schema")
    assert json.loads(spec.source) == PERSON
    same = from_fields(PERSON, None, None, None, native_name)  # an object works like its JSON text
    assert same.key == spec.key
    regex = from_fields(None, r"\d+", None, None, native_name)
    ebnf = from_fields(None, None, 'root ::= "a"', None, native_name)
    assert (regex.kind, ebnf.kind) == ("regex", "ebnf")
    assert len({spec.key, regex.key, ebnf.key, grammar_spec("regex", r"\d*").key}) == 4
    assert from_fields(None, None, None, None, native_name) is None


def test_property_order_of_a_schema_is_kept(compiler):
    spec = from_fields(json.dumps(PERSON), None, None, None, native_name)
    assert matches(compiler, spec, '{"name": "Ann", "age": 7}')
    assert not matches(compiler, spec, '{"age": 7, "name": "Ann"}')


@pytest.mark.parametrize("fields, field, words", [
    ((None, "a", "b", None), "sampling_params.ebnf", "only one grammar"),
    (("{nope", None, None, None), "sampling_params.json_schema", "not valid JSON"),
    (("[1, 2]", None, None, None), "sampling_params.json_schema", "expected a JSON object"),
    ((None, "", None, None), "sampling_params.regex", "non-empty"),
    ((None, None, None, "[1]"), "sampling_params.structural_tag", "expected a JSON object"),
])
def test_malformed_fields_name_the_field(fields, field, words):
    with pytest.raises(GrammarError) as err:
        from_fields(*fields, native_name)
    assert err.value.field == field and words in err.value.message


@pytest.mark.parametrize("spec, words", [
    (grammar_spec("regex", "(ab"), "parenthesis is not closed"),
    (grammar_spec("ebnf", "root ::= missing"), 'Rule "missing" is not defined'),
    (grammar_spec("json_schema", '{"type": "nope"}'), 'Unsupported type "nope"'),
    (grammar_spec("structural_tag", '{"format": {"type": "nonsense"}}'), "nonsense"),
])
def test_compiler_messages_without_their_source_location(compiler, spec, words):
    with pytest.raises((RuntimeError, ValueError)) as err:
        backend.compile_grammar(compiler, spec)
    message = backend.compiler_message(err.value)
    assert words in message and ".cc:" not in message and "\n" not in message


def test_response_formats(compiler):
    assert from_response_format({"type": "text"}) is None
    obj = from_response_format({"type": "json_object"})
    assert matches(compiler, obj, '{"a": [1, {"b": null}]}') and not matches(compiler, obj, "[1]")
    schema = from_response_format({"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON,
                                                                            "strict": True}})
    assert schema.kind == "json_schema" and json.loads(schema.source) == PERSON
    for bad, field in [({"type": "yaml"}, "response_format.type"),
                       ({"type": "json_schema"}, "response_format.json_schema"),
                       ({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format.json_schema.schema")]:
        with pytest.raises(GrammarError) as err:
            from_response_format(bad)
        assert err.value.field == field


def test_sglang_structural_tag_becomes_triggered_tags(compiler):
    legacy = {"structures": [{"begin": "<f>", "schema": PERSON, "end": "</f>"}], "triggers": ["<f>"]}
    spec = grammar_spec("structural_tag", json_object_text(json.dumps(legacy), "structural_tag"))
    assert matches(compiler, spec, 'Hi <f>{"name": "Bo", "age": 3}</f> bye')
    assert not matches(compiler, spec, 'Hi <f>{"name": 3}</f>')


@pytest.mark.parametrize("block_optional", [False, True])
def test_reasoning_block_comes_first_and_stays_free(compiler, block_optional):
    spec = after_reasoning(grammar_spec("json_schema", json.dumps(PERSON)), block_optional)
    answer = '{"name": "Al", "age": 5}'
    assert matches(compiler, spec, "<think>any {text} here</think>\n\n" + answer)
    assert matches(compiler, spec, "only closing</think>" + answer) is not block_optional  # DeepSeek-R1's form
    assert matches(compiler, spec, answer) is block_optional  # Qwen3 may skip the block
    assert not matches(compiler, spec, "<think>x</think>not json")


def check_calls(calls, tools, single):
    assert calls and (len(calls) == 1 or not single)
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    for call in calls:
        assert call.complete and call.name in schemas
        jsonschema.validate(json.loads(call.arguments), schemas[call.name])


@pytest.mark.parametrize("family", ["hermes", "llama3", "mistral", "deepseekv3"])
@pytest.mark.parametrize("single", [False, True])
def test_forced_calls_in_each_family_format_always_parse(compiler, family, single):
    parser = PARSERS[family]()
    spec = tool_calls_format(TOOLS, parser.template, at_least_one=True, single=single)
    rng = random.Random(7)
    for _ in range(20):
        text = sample_grammar(compiler, spec, rng)
        assert text is not None
        parsed = parser.parse(text, final=True)
        assert parsed.content.strip() == "", text
        check_calls(parsed.calls, TOOLS, single)


def test_named_function_in_a_family_format_calls_only_it(compiler):
    parser = PARSERS["hermes"]()
    spec = tool_calls_format(TOOLS[1:], parser.template, at_least_one=True, single=True)
    rng = random.Random(1)
    for _ in range(10):
        calls = parser.parse(sample_grammar(compiler, spec, rng), final=True).calls
        assert [c.name for c in calls] == ["get_time"]


@pytest.mark.parametrize("single", [False, True])
def test_generic_forced_calls_parse_as_json(compiler, single):
    spec = json_tool_calls_schema(TOOLS, single)
    rng = random.Random(3)
    for _ in range(20):
        text = sample_grammar(compiler, spec, rng)
        check_calls(JsonArrayParser().parse(text, final=True).calls, TOOLS, single)
    named = grammar_spec("json_schema", json.dumps(TOOLS[0]["function"]["parameters"]))
    for _ in range(10):
        calls = NamedArgumentsParser("get_weather").parse(sample_grammar(compiler, named, rng), final=True).calls
        check_calls(calls, TOOLS[:1], single=True)
