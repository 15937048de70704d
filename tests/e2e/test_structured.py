"""Structured output end to end: `python -m runtime` on SmolLM2 (CPU, overlap on), one server for the module.

At temperature 1, 50 samples of each grammar (JSON schema, regex, EBNF; half streamed) all follow it; forced
tool calls always parse; a grammar that cannot finish in max_tokens ends with `length`; constrained requests
mix with free ones, logprobs, stop strings and the radix cache; a repeated schema is a compile-cache hit;
the openai client's `parse()` gets its pydantic object, a streamed chat follows its response_format; the
tool-call round trip works; a second server with `--disable-overlap-schedule` gives the same greedy constrained
outputs (the overlap loop fills each mask one step late, on the worker)."""

from __future__ import annotations

import concurrent.futures
import json
import re
import urllib.error
import urllib.request

import jsonschema
import pytest

from tests.e2e.test_server import Server

pytestmark = pytest.mark.slow

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 8},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "role": {"enum": ["admin", "user", "guest"]},
    "active": {"type": "boolean"}}, "required": ["name", "age", "role", "active"]}
PHONE = r"\(\d{3}\) \d{3}-\d{4}"
EBNF = 'root ::= answer ("," answer)? ("," answer)?\nanswer ::= "yes" | "no" | [0-9]'
EBNF_AS_REGEX = r"(yes|no|[0-9])(,(yes|no|[0-9])){0,2}"
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                            "unit": {"enum": ["C", "F"]}}, "required": ["city", "unit"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": {
             "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}}}]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def running_server(log_path, *flags: str):
    srv = Server(log_path, "--max-running-requests", "64", "--max-total-tokens", "16384", *flags)
    yield from srv.serve(stop_timeout_s=120)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from running_server(tmp_path_factory.mktemp("structured") / "server.log")


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=TIMEOUT_S)


TIMEOUT_S = 600  # a request of 50 sequences on a busy 2-core machine


def post(server, path: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(server.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


def stream_texts(server, body: dict) -> list[tuple[str, dict]]:
    """(text, final meta_info) per sequence of a streamed /generate (each event carries the whole text)."""
    request = urllib.request.Request(server.url + "/generate", data=json.dumps({**body, "stream": True}).encode(),
                                     headers={"Content-Type": "application/json"})
    last: dict[int, dict] = {}
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
        for line in response:
            if line.startswith(b"data: {"):
                event = json.loads(line[len(b"data: "):])
                last[event.get("index", 0)] = event
    return [(e["text"], e["meta_info"]) for _, e in sorted(last.items())]


def samples(server, prompt: str, grammar: dict, max_new_tokens: int) -> list[tuple[str, dict]]:
    """25 sequences unstreamed and 25 streamed, at once, temperature 1."""
    body = {"text": prompt, "sampling_params": {**grammar, "n": 25, "temperature": 1.0,
                                                "max_new_tokens": max_new_tokens}}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        whole = pool.submit(post, server, "/generate", body)
        streamed = pool.submit(stream_texts, server, body)
        status, out = whole.result()
        assert status == 200, out
        outputs = [(o["text"], o["meta_info"]) for o in out] + streamed.result()
    assert len(outputs) == 50
    for text, meta in outputs:
        assert meta["finish_reason"]["type"] == "stop", (text, meta)
    return outputs


def test_json_schema_samples_follow_the_schema(server):
    for text, _ in samples(server, "A user record as JSON:", {"json_schema": json.dumps(PERSON)}, 64):
        jsonschema.validate(json.loads(text), PERSON)


def test_regex_samples_match(server):
    for text, _ in samples(server, "Call me at", {"regex": PHONE}, 24):
        assert re.fullmatch(PHONE, text), text


def test_ebnf_samples_are_sentences_of_the_grammar(server):
    for text, _ in samples(server, "Answer briefly:", {"ebnf": EBNF}, 16):
        assert re.fullmatch(EBNF_AS_REGEX, text), text


def check_calls(message, single: bool) -> None:
    assert message.tool_calls and (len(message.tool_calls) == 1 or not single)
    for call in message.tool_calls:
        assert call.id.startswith("call_") and call.type == "function"
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_forced_tool_calls_always_parse(client):
    required = client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, tool_choice="required", n=6,
                                              temperature=1.0, max_tokens=80, parallel_tool_calls=False)
    named = client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, n=6, temperature=1.0,
                                           max_tokens=80,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}})
    for choice in required.choices + named.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        check_calls(choice.message, single=True)
    assert {c.message.tool_calls[0].function.name for c in named.choices} == {"get_weather"}


def test_forced_tool_call_streams_name_first_then_arguments(client):
    stream = client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, stream=True, max_tokens=80,
                                            tool_choice={"type": "function", "function": {"name": "get_time"}})
    chunks = [c for c in stream if c.choices]
    calls = [call for c in chunks for call in c.choices[0].delta.tool_calls or []]
    assert calls[0].id.startswith("call_") and calls[0].function.name == "get_time"
    assert calls[0].function.arguments == "" and all(c.index == 0 and c.id is None for c in calls[1:])
    arguments = "".join(c.function.arguments for c in calls[1:])
    jsonschema.validate(json.loads(arguments), SCHEMAS["get_time"])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_call_round_trip(client):
    first = client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, tool_choice="required",
                                           temperature=0.0, max_tokens=80, parallel_tool_calls=False)
    call = first.choices[0].message.tool_calls[0]
    messages = ASK + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                      {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}]
    answer = client.chat.completions.create(model="m", messages=messages, tools=TOOLS, max_tokens=12)
    assert answer.choices[0].finish_reason in ("stop", "length") and answer.choices[0].message.content


def test_grammar_unfinished_at_max_tokens_ends_with_length(server):
    status, out = post(server, "/generate", {"text": "Letters:", "sampling_params": {
        "regex": "[a-z]{40}", "max_new_tokens": 5, "temperature": 1.0}})
    assert status == 200 and out["meta_info"]["finish_reason"] == {"type": "length", "length": 5}
    assert re.fullmatch("[a-z]*", out["text"])


def test_constrained_and_free_requests_share_batches_with_logprobs_stop_and_cache(server):
    prompt = "The capital of France is Paris. The capital of Italy is"
    constrained = {"text": prompt, "return_logprob": True, "sampling_params": {
        "regex": "( [A-Z][a-z]+)+\\.", "max_new_tokens": 16, "temperature": 0.0, "stop": ["Paris"]}}
    free = {"text": prompt, "sampling_params": {"max_new_tokens": 8, "temperature": 0.0}}
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda body: post(server, "/generate", body), [constrained, free, constrained, free]))
    assert all(status == 200 for status, _ in results), results
    (_, a), (_, f1), (_, b), (_, f2) = results
    assert a["text"] == b["text"] and f1["text"] == f2["text"]  # greedy, whatever else is in the batch
    assert re.fullmatch("( [A-Z][a-z]+)* ?\\.?", a["text"]) and "Paris" not in a["text"]
    assert len(a["meta_info"]["output_token_logprobs"]) == a["meta_info"]["completion_tokens"]
    status, again = post(server, "/generate", constrained)
    assert again["text"] == a["text"] and again["meta_info"]["cached_tokens"] > 0


def test_invalid_grammar_is_a_400_and_a_repeated_schema_is_a_cache_hit(server, client):
    status, out = post(server, "/generate", {"text": "x", "sampling_params": {"regex": "[a-"}})
    assert status == 400 and out["error"]["param"] == "sampling_params.regex"
    assert out["error"]["message"].startswith("sampling_params.regex: the grammar compiler refused it: ")
    openai = pytest.importorskip("openai")
    bad_schema = {"type": "object", "properties": {"a": {"type": "nope"}}}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="m", messages=ASK, stream=True, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": bad_schema}})
    assert err.value.body["param"] == "response_format.json_schema.schema"
    assert 'Unsupported type "nope"' in err.value.message

    def grammar_stats() -> tuple[int, int]:
        with urllib.request.urlopen(server.url + "/get_server_info", timeout=60) as response:
            state = json.load(response)["internal_states"][0]
        return state["grammar_compiles"], state["grammar_cache_hits"]

    compiles, hits = grammar_stats()
    body = {"text": "Digits:", "sampling_params": {"regex": "[0-9]{3}", "max_new_tokens": 6}}
    assert post(server, "/generate", body)[0] == 200
    assert post(server, "/generate", body)[0] == 200
    assert grammar_stats() == (compiles + 1, hits + 1)


def test_openai_parse_and_json_mode(client):
    pydantic = pytest.importorskip("pydantic")

    class City(pydantic.BaseModel):
        name: str = pydantic.Field(max_length=12)
        population_millions: int = pydantic.Field(ge=0, le=50)

    parsed = client.chat.completions.parse(model="m", messages=[{"role": "user", "content": "Describe Paris."}],
                                           response_format=City, max_tokens=60, temperature=0.0)
    assert isinstance(parsed.choices[0].message.parsed, City)
    response_format = {"type": "json_schema", "json_schema": {"name": "weather", "schema": WEATHER, "strict": True}}
    chunks = client.chat.completions.create(model="m", messages=ASK, response_format=response_format,
                                            max_tokens=60, temperature=0.0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), WEATHER)


def test_overlap_and_no_overlap_give_the_same_constrained_outputs(server, tmp_path):
    """Greedy constrained requests, all at once so that they share batches: the overlap scheduler (masks filled one
    step behind, on the worker) and `--disable-overlap-schedule` answer token for token alike."""
    bodies = [{"text": "A person:", "sampling_params": {"json_schema": json.dumps(PERSON), "max_new_tokens": 48}},
              {"text": "Call me at", "sampling_params": {"regex": PHONE, "max_new_tokens": 16}},
              {"text": "Answers:", "sampling_params": {"ebnf": EBNF, "max_new_tokens": 8}},
              {"text": "Letters:", "sampling_params": {"regex": "[a-z]{40}", "max_new_tokens": 5}}]
    bodies = [{**b, "sampling_params": {**b["sampling_params"], "temperature": 0.0}} for b in bodies]

    def answers(srv) -> list[tuple[str, dict]]:
        with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
            results = list(pool.map(lambda body: post(srv, "/generate", body), bodies))
        assert all(status == 200 for status, _ in results), results
        return [(out["text"], out["meta_info"]["finish_reason"]) for _, out in results]

    overlapped = answers(server)
    for server_without in running_server(tmp_path / "no_overlap.log", "--disable-overlap-schedule"):
        assert answers(server_without) == overlapped
    assert jsonschema.validate(json.loads(overlapped[0][0]), PERSON) is None
    assert re.fullmatch(PHONE, overlapped[1][0].strip())
