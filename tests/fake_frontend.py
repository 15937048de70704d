"""A test double of runtime.ingress.frontend.Frontend, and a helper that runs an HTTP server on a
background event loop.

FakeFrontend uses the real SmolLM2 tokenizer (or none, like --skip-tokenizer-init) and
"generates" deterministically: output token k is the prompt's token k (mod the prompt length),
so tests can predict every id and every piece of text. It honours max_new_tokens,
min_new_tokens, stop strings (trimmed unless no_stop_trim), stop_token_ids, EOS (unless
ignore_eos), logprobs shapes (prompt logprobs from logprob_start_len, the first prompt token
without one), streaming (one update per token) vs one final update, and it records what it was
asked (requests, aborts) for assertions."""

from __future__ import annotations

import asyncio
import functools
import http.client
import json
import threading
import time
from dataclasses import dataclass, field

import pytest
import uvloop

from httpd import HttpServer
from runtime.ingress.api.app import create_server
from runtime.ingress.errors import RequestError
from runtime.ingress.frontend import render_chat
from runtime.messages import (
    FinishReason,
    LogprobOptions,
    ModelInfo,
    RequestMeta,
    SamplingParams,
    TextUpdate,
    TokenLogprobs,
)
from runtime.server_args import ServerArgs

MODEL_NAME = "SmolLM2-135M-Instruct"
VOCAB_WITHOUT_TOKENIZER = 1000


@functools.lru_cache(maxsize=1)
def smollm2_tokenizer():
    """The SmolLM2 GGUF tokenizer, loaded once per test session (the GGUF conversion is cached on
    disk by runtime.tokenizer)."""
    from runtime.tokenizer import load_tokenizer

    return load_tokenizer(ServerArgs())


@dataclass
class GenerateCall:
    rid: str
    input_ids: list[int]
    sampling: SamplingParams
    logprobs: LogprobOptions
    stream: bool
    deadline: float | None = None
    priority: int = 0


def fake_logprob(position: int) -> float:
    return -0.125 * (position + 1)


@dataclass
class FakeFrontend:
    tokenizer: object = None
    args: ServerArgs = field(default_factory=lambda: ServerArgs(enable_metrics=True))
    context_length: int = 2048
    token_delay_s: float = 0.0  # between streamed tokens
    cached_tokens: int = 0  # reported in every RequestMeta
    reject: RequestError | None = None  # raised by every generate() while set
    abort_after: int | None = None  # the engine "fails" requests after this many tokens
    flush_ok: bool = True
    token_timestamps: list[float] = field(default_factory=list)  # every update's, as --enable-token-timestamps does
    record_calls: bool = True  # keep every GenerateCall in .calls (off for benchmarks: memory grows)
    unhealthy: str | None = None  # what health() reports
    vision: object = None  # a text-only model: no VisionInputs

    def __post_init__(self):
        tokenizer = self.tokenizer
        vocab = len(tokenizer) if tokenizer is not None else VOCAB_WITHOUT_TOKENIZER
        eos = [tokenizer.eos_token_id] if tokenizer is not None else [2]
        self.model_info = ModelInfo(architecture="LlamaForCausalLM", vocab_size=vocab,
                                    context_length=self.context_length, eos_token_ids=eos, max_total_tokens=65536,
                                    max_running_requests=64, dtype="float32", device="cpu")
        self.served_model_name = self.args.served_model_name or MODEL_NAME
        self._token_texts = [f" <{i}>" for i in range(VOCAB_WITHOUT_TOKENIZER)]
        self.calls: list[GenerateCall] = []
        self.chat_calls: list[tuple[list[dict], list | None, bool, bool]] = []
        self.template_kwargs: list[dict | None] = []  # chat_template_kwargs of each chat call
        self.aborted: list[str] = []  # rids whose generate() was closed before finishing
        self.abort_seen = threading.Event()
        self.running: set[str] = set()
        self._abort_requested: set[str] = set()

    def reset(self) -> None:
        """Back to the defaults between tests that share one server."""
        self.reject = None
        self.abort_after = None
        self.token_delay_s = 0.0
        self.token_timestamps = []
        self.flush_ok = True
        self.unhealthy = None
        self.calls.clear()
        self.chat_calls.clear()
        self.template_kwargs.clear()

    # ------------------------------------------------------------------ tokenizer

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self.tokenizer is None:
            raise RequestError(400, "text: the server runs with --skip-tokenizer-init; send input_ids instead")
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    async def encode_async(self, text: str, field: str = "text") -> list[int]:
        if self.tokenizer is not None and len(text) > self.context_length * 64:
            raise RequestError(400, f"{field}: {len(text)} characters cannot fit the model's context")
        return self.encode(text)

    async def apply_chat_template_async(self, *args) -> list[int]:
        return self.apply_chat_template(*args)

    def health(self) -> str | None:
        return self.unhealthy

    @property
    def unfinished(self) -> int:
        return len(self.running)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        if self.tokenizer is None:
            texts = self._token_texts  # like a detokenizer's vocabulary table
            return "".join([texts[i] if 0 <= i < VOCAB_WITHOUT_TOKENIZER else f" <{i}>" for i in ids])
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], tools: list | None, add_generation_prompt: bool,
                            continue_final_message: bool, template_kwargs: dict | None = None) -> list[int]:
        self.chat_calls.append((messages, tools, add_generation_prompt, continue_final_message))
        self.template_kwargs.append(template_kwargs)
        if self.tokenizer is None:
            raise RequestError(400, "messages: the server runs with --skip-tokenizer-init")
        return render_chat(self.tokenizer, messages, tools, add_generation_prompt, continue_final_message,
                           template_kwargs)

    # ------------------------------------------------------------------ generation

    def expected_ids(self, input_ids: list[int], count: int) -> list[int]:
        return [input_ids[k % len(input_ids)] for k in range(count)]

    async def generate(self, rid: str, input_ids: list[int], sampling: SamplingParams, logprobs: LogprobOptions,
                       stream: bool, deadline: float | None = None, group: str | None = None,
                       priority: int = 0, images=None):
        if self.record_calls:
            self.calls.append(GenerateCall(rid, list(input_ids), sampling, logprobs, stream, deadline, priority))
        if self.reject is not None:
            raise self.reject
        if rid in self.running:
            raise RequestError(400, f"rid: a request with id {rid!r} is already running")
        self.running.add(rid)
        finished = False  # set before the last update is handed out, as the real Frontend does
        try:
            output: list[int] = []
            sent_text, sent_tokens = "", 0
            while True:
                finish = None
                if rid in self._abort_requested:
                    finish = FinishReason("abort", message="aborted on request")
                elif self.abort_after is not None and len(output) >= self.abort_after:
                    finish = FinishReason("abort", message="the worker failed", status_code=500)
                elif len(output) >= sampling.max_new_tokens:
                    finish = FinishReason("length", length=sampling.max_new_tokens)
                else:
                    token = input_ids[len(output) % len(input_ids)]
                    output.append(token)
                    finish = self._check_stop(output, token, sampling)
                if finish is not None or stream:
                    if self.tokenizer is None and not sampling.stop:  # decoding is concatenation: no re-decode
                        delta = self.decode(output[sent_tokens:])
                        text = sent_text + delta
                    else:
                        text = self._text(output, sampling, finish)
                        delta = text[len(sent_text):]
                    update = self._update(rid, input_ids, output, sent_tokens, delta, finish, logprobs)
                    sent_text, sent_tokens = text, len(output)
                    finished = finish is not None
                    yield update
                    if finished:
                        return
                await asyncio.sleep(self.token_delay_s)  # one decode step
        finally:
            self.running.discard(rid)
            self._abort_requested.discard(rid)
            if not finished:
                self.aborted.append(rid)
                self.abort_seen.set()

    def _check_stop(self, output: list[int], token: int, sampling: SamplingParams) -> FinishReason | None:
        if len(output) < sampling.min_new_tokens:
            return None
        if token in sampling.stop_token_ids:
            return FinishReason("stop", matched=token)
        if not sampling.ignore_eos and token in self.model_info.eos_token_ids:
            return FinishReason("stop", matched=token)
        if sampling.stop:
            text = self.decode(output, sampling.skip_special_tokens)
            for stop in sampling.stop:
                if stop in text:
                    return FinishReason("stop", matched=stop)
        if len(output) >= sampling.max_new_tokens:
            return FinishReason("length", length=sampling.max_new_tokens)
        return None

    def _text(self, output: list[int], sampling: SamplingParams, finish: FinishReason | None) -> str:
        text = self.decode(output, sampling.skip_special_tokens)
        if finish is not None and isinstance(finish.matched, str) and not sampling.no_stop_trim:
            text = text[:text.index(finish.matched)]
        return text

    def _update(self, rid, input_ids, output, sent_tokens, delta, finish, options: LogprobOptions) -> TextUpdate:
        new_ids = output[sent_tokens:]
        token_logprobs = prompt_logprobs = None
        if options.return_logprob:
            positions = range(sent_tokens, len(output))
            top = options.top_logprobs_num
            wanted = options.token_ids_logprob
            token_logprobs = TokenLogprobs(
                token_ids=list(new_ids), logprobs=[fake_logprob(p) for p in positions],
                top_ids=[[(t + k) % self.model_info.vocab_size for k in range(top)] for t in new_ids],
                top_logprobs=[[fake_logprob(p) - k for k in range(top)] for p in positions],
                ids_logprobs=[[fake_logprob(p) - 1 - k for k in range(len(wanted))] for p in positions] if wanted
                else [])
            if sent_tokens == 0 and options.logprob_start_len >= 0:
                start = options.logprob_start_len
                ids = input_ids[start:]
                scored = range(max(start, 1), len(input_ids))  # the first prompt token has no logprob
                prompt_logprobs = TokenLogprobs(
                    token_ids=ids, logprobs=[fake_logprob(p) for p in scored],
                    top_ids=[[input_ids[p]] * top for p in scored] if top else [],
                    top_logprobs=[[fake_logprob(p)] * top for p in scored] if top else [],
                    ids_logprobs=[[fake_logprob(p) - 1 - k for k in range(len(wanted))] for p in scored] if wanted
                    else [])
        meta = RequestMeta(prompt_tokens=len(input_ids), completion_tokens=len(output),
                           cached_tokens=self.cached_tokens)
        return TextUpdate(rid=rid, text_delta=delta, new_token_ids=new_ids, meta=meta, finish=finish,
                          logprobs=token_logprobs, prompt_logprobs=prompt_logprobs, timestamps=self.token_timestamps)

    def abort(self, rid: str) -> None:
        if rid in self.running:
            self._abort_requested.add(rid)

    def abort_all(self) -> None:
        self._abort_requested.update(self.running)

    async def flush_cache(self) -> tuple[bool, str]:
        return (True, "") if self.flush_ok else (False, "requests are running")

    async def server_info(self) -> dict:
        # The keys of runtime.scheduler.core.SchedulerCore.server_info() that the HTTP layer reads.
        return {"running": len(self.running), "queued": 3, "token_usage": 0.25, "cache_hit_rate": 0.5,
                "retractions": 2, "max_total_tokens": self.model_info.max_total_tokens}

    async def replica_states(self) -> list[dict]:
        return [await self.server_info()]


class ServerThread:
    """Runs an HttpServer on 127.0.0.1 (a free port) on a uvloop loop in a background thread.

        with ServerThread(lambda: create_server(frontend)) as server:
            requests.get(server.url + "/health")
    """

    def __init__(self, make_server):
        self._make_server = make_server
        self.loop = uvloop.new_event_loop()
        self.server: HttpServer | None = None
        self._thread = threading.Thread(target=self.loop.run_forever, name="http-server", daemon=True)

    def __enter__(self) -> ServerThread:
        self._thread.start()

        async def start():
            self.server = self._make_server()
            await self.server.start("127.0.0.1", 0)

        asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(0.5), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def call(self, fn, *args):
        """Run fn(*args) on the server's loop and return its result (to touch server state safely)."""
        done = threading.Event()
        box = []

        def run():
            box.append(fn(*args))
            done.set()

        self.loop.call_soon_threadsafe(run)
        done.wait(10)
        return box[0]


def wait_until(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def http_request(base_url: str, method: str, path: str, body=None, headers: dict | None = None):
    """(status, headers, body bytes) of one request; `body` may be bytes or a JSON-able object, sent as
    application/json unless `headers` name another Content-Type."""
    host, _, port = base_url.removeprefix("http://").partition(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        if body is not None and not isinstance(body, bytes):
            body = json.dumps(body).encode()
        headers = dict(headers or {})
        if body and not any(k.lower() == "content-type" for k in headers):
            headers["Content-Type"] = "application/json"
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def sse_payloads(raw: bytes) -> list:
    """The `data:` payloads of an SSE body, JSON-decoded ("[DONE]" stays a string)."""
    out = []
    for event in raw.decode().split("\n\n"):
        if event.startswith("data: "):
            data = event[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


# Fixtures of the API tests: one server on the fake frontend per test module, reset between tests.


@pytest.fixture(scope="module")
def tokenizer():
    return smollm2_tokenizer()


@pytest.fixture(scope="module")
def served(tokenizer):
    frontend = FakeFrontend(tokenizer=tokenizer)
    with ServerThread(lambda: create_server(frontend)) as server:
        yield server, frontend


@pytest.fixture
def fake(served):
    frontend = served[1]
    frontend.reset()
    return frontend
