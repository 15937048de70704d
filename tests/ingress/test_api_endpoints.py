"""The newer endpoints on the fake frontend: /v1/score, the Anthropic Messages API and the OpenAI
Responses API (through the openai client: create, stream, retrieve, delete, previous_response_id
chaining, kept in a real durable store that a second server on the same folder still reads)."""

from __future__ import annotations

import json

import msgspec
import pytest

from runtime.ingress.api.app import create_server
from runtime.ingress.store import Store
from runtime.ingress.store.responses import ResponseStore
from tests.fake_frontend import FakeFrontend, ServerThread, fake_logprob, http_request

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    return tmp_path_factory.mktemp("store")


@pytest.fixture(scope="module")
def server(tokenizer, storage):
    frontend = FakeFrontend(tokenizer=tokenizer)
    store = Store.open(storage)
    with ServerThread(lambda: create_server(frontend, responses=ResponseStore(store))) as server:
        yield server, frontend
    store.close()


@pytest.fixture
def fake(server):
    server[1].reset()
    return server[1]


@pytest.fixture
def url(server):
    return server[0].url


@pytest.fixture
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def post(url, path, body):
    status, headers, raw = http_request(url, "POST", path, body)
    return status, raw


def sse_events(raw: bytes) -> list[tuple[str | None, dict]]:
    """(event name, data) of each server-sent event."""
    out = []
    for block in raw.decode().split("\n\n"):
        name, data = None, None
        for line in block.splitlines():
            if line.startswith("event: "):
                name = line[len("event: "):]
            elif line.startswith("data: "):
                data = json.loads(line[len("data: "):])
        if data is not None:
            out.append((name, data))
    return out


# ---------------------------------------------------------------------- /v1/score


def test_score_gives_label_probabilities_after_query_plus_item(url, fake, tokenizer):
    status, raw = post(url, "/v1/score", {"query": "Is Paris in France?", "items": [" Yes", " No"],
                                          "label_token_ids": [11, 12], "return_token_logprobs": True})
    assert status == 200, raw
    out = msgspec.json.decode(raw)
    calls = fake.calls[-2:]
    assert [c.input_ids for c in calls] == [tokenizer.encode("Is Paris in France? Yes"),
                                            tokenizer.encode("Is Paris in France? No")]
    assert all(c.logprobs.token_ids_logprob == [11, 12] and c.sampling.max_new_tokens == 1 for c in calls)
    # the fake's label logprobs at the first output position: fake_logprob(0) - 1 - k
    expected = [fake_logprob(0) - 1, fake_logprob(0) - 2]
    assert out["token_logprobs"] == [expected, expected]
    assert out["scores"][0] == pytest.approx([2.718281828 ** lp for lp in expected])
    assert out["object"] == "scoring" and out["usage"]["prompt_tokens"] == sum(len(c.input_ids) for c in calls)


def test_score_softmax_temperature_item_first_and_token_ids(url, fake):
    status, raw = post(url, "/v1/score", {"query": [5, 6], "items": [[7], [8, 9]], "label_token_ids": [[1, 2], [3]],
                                          "apply_softmax": True, "temperature": 0.5, "item_first": True})
    assert status == 200, raw
    out = msgspec.json.decode(raw)
    assert [c.input_ids for c in fake.calls[-2:]] == [[7, 5, 6], [8, 9, 5, 6]]
    assert [c.logprobs.token_ids_logprob for c in fake.calls[-2:]] == [[1, 2], [3]]
    assert out["scores"][1] == [1.0] and sum(out["scores"][0]) == pytest.approx(1.0)
    assert out["scores"][0][0] > out["scores"][0][1]  # higher logprob, sharpened by the temperature
    for body, field in (({"query": "q", "items": ["a"], "label_token_ids": [1], "temperature": 2}, "temperature"),
                        ({"query": "q", "items": ["a"]}, "label_token_ids"),
                        ({"query": "q", "items": [[1]], "label_token_ids": [1]}, "items"),
                        ({"query": "q", "items": ["a", "b"], "label_token_ids": [[1]]}, "label_token_ids")):
        status, raw = post(url, "/v1/score", body)
        assert status == 400 and msgspec.json.decode(raw)["error"]["param"] == field


# ---------------------------------------------------------------------- /v1/messages (Anthropic)


def anthropic_request(**extra):
    return {"model": "any", "max_tokens": 5, "system": "Be brief.",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "Hello"}]}], **extra}


def test_anthropic_message(url, fake, tokenizer):
    status, raw = post(url, "/v1/messages", anthropic_request())
    assert status == 200, raw
    out = msgspec.json.decode(raw)
    call = fake.calls[-1]
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    assert fake.chat_calls[-1] == (conversation, None, True, False)
    assert call.sampling.max_new_tokens == 5
    assert out["type"] == "message" and out["role"] == "assistant" and out["id"].startswith("msg_")
    assert out["content"] == [{"type": "text", "text": tokenizer.decode(call.input_ids[:5], skip_special_tokens=True)}]
    assert out["stop_reason"] == "max_tokens" and out["stop_sequence"] is None
    assert out["usage"]["input_tokens"] == len(call.input_ids) and out["usage"]["output_tokens"] == 5
    status, raw = post(url, "/v1/messages/count_tokens", anthropic_request())
    assert status == 200 and msgspec.json.decode(raw) == {"input_tokens": len(call.input_ids)}


def test_anthropic_stream_and_stop_sequence(url, fake, tokenizer):
    # the fake generates the prompt again: "system\nBe brief." and so on
    prompt_text = tokenizer.decode(tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
        add_generation_prompt=True), skip_special_tokens=True)
    stop = "brief"
    status, raw = post(url, "/v1/messages", anthropic_request(stream=True, max_tokens=200, stop_sequences=[stop]))
    assert status == 200, raw
    events = sse_events(raw)
    names = [name for name, _ in events]
    assert names[:2] == ["message_start", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert all(data["type"] == name for name, data in events)
    text = "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta")
    assert text == prompt_text[:prompt_text.index(stop)]
    delta = events[-2][1]
    assert delta["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": stop}
    assert delta["usage"]["output_tokens"] > 0


def test_anthropic_refusals(url, fake):
    for body, field in ((anthropic_request(max_tokens=None), "max_tokens"),
                        (anthropic_request(tools=[{"name": "x"}]), "tools"),
                        (anthropic_request(messages=[{"role": "user", "content": [{"type": "image"}]}]),
                         "messages[0].content[0]")):
        status, raw = post(url, "/v1/messages", body)
        assert status == 400 and msgspec.json.decode(raw)["error"]["param"] == field


# ---------------------------------------------------------------------- /v1/responses


def test_responses_create_retrieve_and_chain(client, fake, tokenizer):
    first = client.responses.create(model="any", input="Hello there", instructions="Be brief.", max_output_tokens=4)
    call = fake.calls[-1]
    assert fake.chat_calls[-1][0] == [{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": "Hello there"}]
    assert first.status == "incomplete" and first.incomplete_details.reason == "max_output_tokens"
    assert first.output_text == tokenizer.decode(call.input_ids[:4], skip_special_tokens=True)
    assert first.usage.input_tokens == len(call.input_ids) and first.usage.output_tokens == 4
    assert client.responses.retrieve(first.id).output_text == first.output_text

    second = client.responses.create(model="any", input=[{"role": "user", "content": "And then?"}],
                                     previous_response_id=first.id, max_output_tokens=3)
    # instructions are not carried over; the previous output is the assistant's turn
    assert fake.chat_calls[-1][0] == [{"role": "user", "content": "Hello there"},
                                      {"role": "assistant", "content": first.output_text},
                                      {"role": "user", "content": "And then?"}]
    assert second.previous_response_id == first.id
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="any", input="x", previous_response_id="resp_nope")
    client.responses.delete(second.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(second.id)


def test_responses_stream(client, fake):
    # the fake repeats the prompt, up to the <|im_end|> (EOS) that ends the template's first turn: "completed"
    with client.responses.stream(model="any", input="Hi", max_output_tokens=100) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert "response.output_text.delta" in kinds and kinds[-1] == "response.completed"
    assert final.status == "completed" and final.output_text != ""
    assert client.responses.retrieve(final.id).output_text == final.output_text
    with client.responses.create(model="any", input="Hi", max_output_tokens=2, stream=True) as events:
        assert [event.type for event in events][-1] == "response.incomplete"  # cut by max_output_tokens


def test_responses_not_stored_and_refusals(client, fake, url):
    response = client.responses.create(model="any", input="Hi", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)
    for body, field in (({"input": "x", "tools": [{"type": "web_search"}]}, "tools"),
                        ({"input": "x", "text": {"format": {"type": "xml"}}}, "text.format.type"),
                        ({"input": [{"type": "function_call_output", "call_id": "c"}]}, "input[0]"),
                        ({}, "input")):
        status, raw = post(url, "/v1/responses", body)
        assert status == 400 and msgspec.json.decode(raw)["error"]["param"] == field


def test_responses_text_format_is_a_grammar(fake, url):
    """The Responses API's flat `text.format` constrains like chat's response_format and is echoed back."""
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    fmt = {"type": "json_schema", "name": "w", "schema": schema, "strict": True}
    status, raw = post(url, "/v1/responses", {"input": "hi", "max_output_tokens": 1, "text": {"format": fmt}})
    assert status == 200 and msgspec.json.decode(raw)["text"]["format"] == fmt
    grammar = fake.calls[-1].sampling.grammar
    assert (grammar.kind, grammar.field) == ("json_schema", "text.format.schema")
    status, _ = post(url, "/v1/responses", {"input": "hi", "max_output_tokens": 1,
                                            "text": {"format": {"type": "json_object"}}})
    assert status == 200 and fake.calls[-1].sampling.grammar.kind == "json_object"
    assert post(url, "/v1/responses", {"input": "hi", "max_output_tokens": 1})[0] == 200
    assert fake.calls[-1].sampling.grammar is None
    for bad, param in (({"type": "json_schema", "name": "w"}, "text.format.schema"),
                       ({"type": "json_schema", "schema": "{"}, "text.format.schema")):
        status, raw = post(url, "/v1/responses", {"input": "hi", "text": {"format": bad}})
        assert status == 400 and msgspec.json.decode(raw)["error"]["param"] == param


def test_stored_responses_survive_a_new_server_on_the_same_store(client, fake, storage, tokenizer):
    response = client.responses.create(model="any", input="Remember me", max_output_tokens=2)
    other = FakeFrontend(tokenizer=tokenizer)
    store = Store.open(storage)
    try:
        with ServerThread(lambda: create_server(other, responses=ResponseStore(store))) as server:
            again = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
            assert again.responses.retrieve(response.id).output_text == response.output_text
    finally:
        store.close()
