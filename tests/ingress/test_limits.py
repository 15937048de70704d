"""Limits on what one request may cost (issue 11): deadlines (504 and an abort), the bound on
unfinished sequences (429 + Retry-After), texts refused before tokenizing, long texts tokenized off
the event loop, caps on n / stop strings / sequences per request, the drain's 503, /health's
reason, and the small validation defects (logit_bias keys, text parts, chat content)."""

from __future__ import annotations

import asyncio
import time

import msgspec
import pytest

from runtime.ingress.errors import RequestError
from runtime.ingress.frontend import INLINE_TOKENIZE_CHARS
from runtime.messages import AbortRequest, GenerateRequest
from runtime.server_args import ServerArgs
from tests.fake_frontend import fake, http_request, served, tokenizer  # noqa: F401 (fixtures)
from tests.ingress.test_frontend import GREEDY, MODEL_INFO, NO_LOGPROBS, collect, rings, run_with_frontend  # noqa: F401

LONG_CONTEXT = msgspec.structs.replace(MODEL_INFO, context_length=8192)


# ---------------------------------------------------------------------- the Frontend


def test_a_request_past_its_deadline_fails_with_504_and_is_aborted(rings):  # noqa: F811
    async def body(frontend, peer):
        start = time.monotonic()
        with pytest.raises(RequestError) as info:
            async for _ in frontend.generate("endless-late", [5], GREEDY, NO_LOGPROBS, True, start + 0.2):
                pass
        took = time.monotonic() - start
        while not peer.messages_of(AbortRequest, "endless-late"):
            await asyncio.sleep(0.005)
        return info.value, took

    error, took = run_with_frontend(rings, body)
    assert error.status == 504 and "timeout" in error.message
    assert 0.15 < took < 2.0


def test_unfinished_sequences_are_bounded_with_429(rings):  # noqa: F811
    args = ServerArgs(max_queued_requests=2)  # MODEL_INFO has 16 rows: 18 unfinished at most

    async def body(frontend, peer):
        streams = [frontend.generate(f"endless-{i}", [1], GREEDY, NO_LOGPROBS, True) for i in range(18)]
        for stream in streams:
            await anext(stream)
        with pytest.raises(RequestError) as info:
            await collect(frontend, "one-too-many", [1])
        for stream in streams:
            await stream.aclose()
        refused_sent = bool(peer.messages_of(GenerateRequest, "one-too-many"))
        return info.value, refused_sent

    error, refused_sent = run_with_frontend(rings, body, args=args)
    assert error.status == 429 and "--max-queued-requests" in error.message
    assert not refused_sent


def test_a_text_that_cannot_fit_is_refused_without_tokenizing(rings, tokenizer):  # noqa: F811
    calls = []

    async def body(frontend, peer):
        frontend.encode = lambda text: calls.append(len(text))
        start = time.monotonic()
        with pytest.raises(RequestError) as info:
            await frontend.encode_async("x" * 6_000_000, "text")
        return info.value, time.monotonic() - start, frontend.max_chars_per_token

    error, took, max_chars = run_with_frontend(rings, body, tokenizer)
    assert error.status == 400 and error.message.startswith("text: 6000000 characters cannot fit")
    assert not calls and took < 0.1
    assert 1 < max_chars < 200


def test_long_texts_are_tokenized_off_the_event_loop(rings, tokenizer):  # noqa: F811
    text = "The quick brown fox jumps over the lazy dog. " * 2000  # 90 K characters, thousands of tokens

    async def body(frontend, peer):
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.002)
                ticks += 1

        task = asyncio.ensure_future(ticker())
        await asyncio.sleep(0.01)
        before = ticks
        ids = await frontend.encode_async(text, "text")
        during = ticks - before
        task.cancel()
        short = await frontend.encode_async("Hello", "text")
        return ids, during, short

    ids, during, short = run_with_frontend(rings, body, tokenizer, model_info=LONG_CONTEXT)
    assert len(text) > INLINE_TOKENIZE_CHARS and ids == tokenizer.encode(text)
    assert during >= 2, "the loop did not run while the long text was tokenized"
    assert short == tokenizer.encode("Hello")


def test_during_the_drain_an_engine_abort_is_a_503(rings):  # noqa: F811
    async def body(frontend, peer):
        stream = frontend.generate("endless-d", [1], GREEDY, NO_LOGPROBS, True)
        await anext(stream)
        frontend.draining = True
        frontend.abort("endless-d")  # what the scheduler does when the grace period runs out
        with pytest.raises(RequestError) as info:
            async for _ in stream:
                pass
        with pytest.raises(RequestError) as refused:
            await collect(frontend, "after", [1])
        return info.value, refused.value, frontend.health()

    error, refused, health = run_with_frontend(rings, body)
    assert (error.status, refused.status) == (503, 503)
    assert health == "the server is shutting down"


# ---------------------------------------------------------------------- the HTTP API


@pytest.fixture
def url(served):  # noqa: F811
    return served[0].url


def post(url, path, body, headers=None):
    status, response_headers, raw = http_request(url, "POST", path, body, headers)
    return status, response_headers, msgspec.json.decode(raw) if raw else None


def test_more_than_64_stop_strings_are_refused(url, fake):  # noqa: F811
    status, _, out = post(url, "/generate", {"text": "Hi", "sampling_params": {"stop": [f"s{i}" for i in range(65)]}})
    assert status == 400 and out["error"]["param"] == "sampling_params.stop" and "64" in out["error"]["message"]
    status, _, out = post(url, "/v1/completions", {"prompt": "Hi", "stop": [f"s{i}" for i in range(65)]})
    assert status == 400 and out["error"]["param"] == "stop"


def test_n_and_the_sequences_of_one_request_are_capped_before_any_work(url, fake):  # noqa: F811
    status, _, out = post(url, "/generate", {"text": ["a"] * 20, "sampling_params": {"n": 128}})
    assert status == 400 and "--max-seqs-per-request" in out["error"]["message"] and "2560" in out["error"]["message"]
    status, _, out = post(url, "/generate", {"text": "a", "sampling_params": {"n": 129}})
    assert status == 400 and out["error"]["param"] == "sampling_params.n"
    status, _, out = post(url, "/v1/completions", {"prompt": ["a"] * 9, "n": 128})
    assert status == 400 and "--max-seqs-per-request" in out["error"]["message"]
    status, _, out = post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "n": 129})
    assert status == 400 and out["error"]["param"] == "n"
    assert fake.calls == []


def test_an_overloaded_engine_answers_429_with_retry_after(url, fake):  # noqa: F811
    fake.reject = RequestError(429, "the scheduler's queue is full")
    for path, body in (("/generate", {"text": "Hi"}), ("/generate", {"text": "Hi", "stream": True}),
                       ("/v1/completions", {"prompt": "Hi"})):
        status, headers, out = post(url, path, body)
        assert status == 429 and headers["retry-after"] == "1", path
        assert out["error"]["message"] == "the scheduler's queue is full"


def test_the_timeout_field_sets_a_deadline_and_may_only_shorten_the_servers(url, fake):  # noqa: F811
    before = time.monotonic()
    status, _, _ = post(url, "/generate", {"text": "Hi", "timeout": 30, "sampling_params": {"max_new_tokens": 2}})
    assert status == 200 and before + 29 < fake.calls[-1].deadline < time.monotonic() + 30
    status, _, _ = post(url, "/v1/completions", {"prompt": "Hi", "max_tokens": 2})
    assert status == 200 and fake.calls[-1].deadline is None  # no --request-timeout, no field
    for bad in (0, -1, "soon"):
        status, _, out = post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}],
                                                            "timeout": bad})
        assert status == 400 and out["error"]["param"] == "timeout"


def test_health_is_503_with_the_reason(url, fake):  # noqa: F811
    fake.unhealthy = "scheduler: no heartbeat for 7.0 s"
    status, _, out = http_request(url, "GET", "/health")
    assert status == 503 and b"scheduler: no heartbeat for 7.0 s" in out
    fake.unhealthy = None
    assert http_request(url, "GET", "/health")[0] == 200


def test_a_non_integer_logit_bias_key_names_the_field(url, fake):  # noqa: F811
    status, _, out = post(url, "/generate", {"text": "Hi", "sampling_params": {"logit_bias": {"abc": 1}}})
    assert status == 400 and out["error"]["param"] == "sampling_params.logit_bias"
    assert "keys are token ids" in out["error"]["message"]
    status, _, out = post(url, "/v1/completions", {"prompt": "Hi", "logit_bias": {"1": "high"}})
    assert status == 400 and out["error"]["param"] == "logit_bias"


def test_chat_messages_need_content_and_text_parts_need_text(url, fake):  # noqa: F811
    status, _, out = post(url, "/v1/chat/completions", {"messages": [{"role": "user"}]})
    assert status == 400 and out["error"]["param"] == "messages[0].content"
    status, _, out = post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text"}]}]})
    assert status == 400 and out["error"]["param"] == "messages[0].content[0].text"
    assert "needs a `text` string" in out["error"]["message"]
    calls = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    status, _, _ = post(url, "/v1/chat/completions", {"max_tokens": 2, "messages": [
        {"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": calls},
        {"role": "tool", "tool_call_id": "c1", "content": "1"}]})
    assert status == 200  # an assistant turn that only calls tools has no content


def test_post_bodies_must_be_json(url, fake):  # noqa: F811
    status, _, out = post(url, "/generate", b'{"text": "Hi"}', {"Content-Type": "text/plain"})
    assert status == 415 and out["error"]["param"] == "Content-Type"
    assert fake.calls == []
