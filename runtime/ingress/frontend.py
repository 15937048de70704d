"""Frontend: what the HTTP API and the Engine API call. It tokenizes, validates the prompt against
the model, sends requests to the scheduler and routes the detokenizer's TextUpdates back to the
caller waiting on each request id.

Threads: everything here runs on one asyncio loop. Incoming messages arrive through `on_message`,
which the owner calls on that loop (actors.aio.AsyncMailbox: a reader thread hands batches over
with loop.call_soon_threadsafe). Outgoing messages go through an OrderedSender, which
never blocks the loop on a full ring. Long texts are tokenized (and long chats rendered) on a
helper thread, so /health and small requests never wait behind a big prompt; a text too long to
fit the context whatever its tokens is refused before any tokenizing.

Limits: a request past its deadline (--request-timeout, or its own shorter `timeout`) is aborted
and answered 504; past --max-running-requests + --max-queued-requests unfinished sequences, new
ones get 429 at once (the scheduler enforces the exact queue bound too)."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import jinja2
import msgspec

from runtime.default_model import DEFAULT_MODEL_NAME
from runtime.ingress.dispatcher import Dispatcher, merge_states
from runtime.ingress.errors import RequestError
from runtime.messages import (
    EmbeddingResult,
    EmbeddingResults,
    EngineReady,
    FlushCacheReply,
    FlushCacheRequest,
    GenerateRequest,
    LogprobOptions,
    ModelInfo,
    RequestRejected,
    SamplingParams,
    ServerInfoReply,
    ServerInfoRequest,
    TextUpdate,
    TextUpdates,
    TokenLogprobs,
)
from runtime.multimodal.media import MediaError
from runtime.server_args import ServerArgs
from shm.ring import RingTimeout

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from actors.channel import Channel
    from runtime.multimodal.inputs import ProcessedPrompt, VisionInputs

log = logging.getLogger(__name__)

REPLY_TIMEOUT_S = 60.0  # flush_cache / server_info: the scheduler answers between two steps
INLINE_TOKENIZE_CHARS = 4096  # shorter texts are tokenized on the loop: a thread hop would cost more
# apply_chat_template's own arguments (and what transformers reserves): chat_template_kwargs may not set them
RESERVED_TEMPLATE_ARGS = frozenset({"conversation", "messages", "tools", "documents", "chat_template", "tokenize",
                                    "add_generation_prompt", "continue_final_message", "return_dict",
                                    "return_tensors", "padding", "truncation", "max_length", "tokenizer_kwargs"})


class OrderedSender:
    """Puts messages on a channel in call order without blocking the event loop.

    The loop thread puts directly while the ring has room. When it is full, the message and every
    later one go to a backlog that a helper thread drains with blocking puts; the loop thread goes
    back to direct puts only once the backlog is empty and the helper has stopped, so the ring
    keeps a single writer at any time and the order is kept (an AbortRequest never overtakes the
    GenerateRequest it cancels)."""

    def __init__(self, channel):
        self.channel = channel
        self._lock = threading.Lock()
        self._backlog: collections.deque = collections.deque()
        self._draining = False

    def send(self, msg) -> None:
        with self._lock:
            if self._draining:
                self._backlog.append(msg)
                return
        try:
            self.channel.put(msg, 0.0)
            return
        except RingTimeout:
            pass
        with self._lock:
            self._backlog.append(msg)
            self._draining = True
        threading.Thread(target=self._drain, name="frontend-sender", daemon=True).start()

    def _drain(self) -> None:
        while True:
            with self._lock:
                if not self._backlog:
                    self._draining = False
                    return
                msg = self._backlog.popleft()
            self.channel.put(msg)


class _RequestStream:
    """Updates of one request waiting for its generate() iterator. A non-streamed request wakes its
    consumer only at the finish (or an error), so it costs one wake-up, not one per update."""

    __slots__ = ("stream", "updates", "waiter", "error", "timer", "embedding")

    def __init__(self, stream: bool):
        self.stream = stream
        self.updates: list[TextUpdate] = []
        self.waiter: asyncio.Future | None = None
        self.error: RequestError | None = None
        self.timer: asyncio.TimerHandle | None = None  # the request's deadline, if it has one
        self.embedding: EmbeddingResult | None = None  # an embedding request's answer

    def set_embedding(self, result: EmbeddingResult) -> None:
        self.embedding = result
        self._wake()

    def push(self, update: TextUpdate) -> None:
        self.updates.append(update)
        if self.stream or update.finish is not None:
            self._wake()

    def fail(self, error: RequestError) -> None:
        self.error = error
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


def merge_updates(updates: list[TextUpdate]) -> TextUpdate:
    """Several consecutive updates of one request as one delta."""
    if len(updates) == 1:
        return updates[0]
    last = updates[-1]
    runs = [u.logprobs for u in updates if u.logprobs is not None]
    logprobs = None
    if runs:
        logprobs = TokenLogprobs(
            token_ids=[x for r in runs for x in r.token_ids], logprobs=[x for r in runs for x in r.logprobs],
            top_ids=[x for r in runs for x in r.top_ids], top_logprobs=[x for r in runs for x in r.top_logprobs],
            ids_logprobs=[x for r in runs for x in r.ids_logprobs])
    return TextUpdate(
        rid=last.rid,
        text_delta="".join(u.text_delta for u in updates),
        new_token_ids=[t for u in updates for t in u.new_token_ids],
        meta=last.meta,
        finish=last.finish,
        logprobs=logprobs,
        prompt_logprobs=next((u.prompt_logprobs for u in updates if u.prompt_logprobs is not None), None),
        timestamps=last.timestamps,
    )


class _Gather:
    """The replies of every replica to one flush_cache / server_info request."""

    __slots__ = ("expected", "replies", "future")

    def __init__(self, expected: int, future: asyncio.Future):
        self.expected = expected
        self.replies: list = []
        self.future = future


class Frontend:
    def __init__(self, args: ServerArgs, model_info: ModelInfo, tokenizer: PreTrainedTokenizerBase | None,
                 to_scheduler: Channel | list[Channel], vision: VisionInputs | None = None):
        """`to_scheduler` is the Channel of IngressToScheduler messages, or one per data-parallel
        replica (runtime.ingress.dispatcher picks one per request); `tokenizer` is the HF tokenizer
        from runtime.tokenizer.load_tokenizer (None with --skip-tokenizer-init); `vision` reads and preprocesses
        the images of requests to a vision language model (None: the model takes no images)."""
        self.args = args
        self.model_info = model_info
        self.tokenizer = tokenizer
        self.served_model_name = args.served_model_name or args.model_path or DEFAULT_MODEL_NAME
        channels = to_scheduler if isinstance(to_scheduler, list) else [to_scheduler]
        self.dispatcher = Dispatcher([OrderedSender(c) for c in channels], args.load_balance_method)
        self._streams: dict[str, _RequestStream] = {}
        self._background: set[str] = set()  # rids of _streams below interactive priority (batch work)
        self._replies: dict[int, _Gather] = {}
        self._reply_tokens = itertools.count(1)
        self._closed: RequestError | None = None
        self.draining = False  # shutdown has begun: engine aborts are the shutdown's (503)
        self.max_chars_per_token = max_token_chars(tokenizer)
        # One thread: an HF fast tokenizer releases the GIL while encoding, and one thread keeps its state unshared.
        self._tokenize_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tokenize")
        self.max_unfinished = self.dispatcher.size * model_info.max_running_requests + args.max_queued_requests
        self.health_check = None  # () -> reason the engine is unhealthy, or None (set by the ingress actor)
        self.vision = vision

    # ------------------------------------------------------------------ tokenizer
    def _need_tokenizer(self, what: str):
        if self.tokenizer is None:
            raise RequestError(400, f"{what}: the server runs with --skip-tokenizer-init; send input_ids instead")
        return self.tokenizer

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        tokenizer = self._need_tokenizer("text")
        if not isinstance(text, str):
            raise RequestError(400, f"text: expected a string, got {type(text).__name__}")
        return tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def check_text_fits(self, text: str, field: str) -> None:
        """Every token stands for at most max_chars_per_token characters, so a longer text cannot fit the
        context, whatever it tokenizes to: refused without tokenizing it."""
        limit = self.model_info.context_length * self.max_chars_per_token
        if len(text) > limit:
            raise RequestError(400, f"{field}: {len(text)} characters cannot fit the model's context of "
                                    f"{self.model_info.context_length} tokens (at most {limit} characters: no token "
                                    f"is longer than {self.max_chars_per_token})")

    async def encode_async(self, text: str, field: str = "text") -> list[int]:
        """encode() off the event loop for long texts, after the length check."""
        if self._closed is not None:
            raise self._closed
        self._need_tokenizer(field)
        if not isinstance(text, str):
            raise RequestError(400, f"{field}: expected a string, got {type(text).__name__}")
        self.check_text_fits(text, field)
        if len(text) <= INLINE_TOKENIZE_CHARS:
            return self.encode(text)
        return await asyncio.get_running_loop().run_in_executor(self._tokenize_pool, self.encode, text)

    async def apply_chat_template_async(self, messages: list[dict], tools: list | None, add_generation_prompt: bool,
                                        continue_final_message: bool,
                                        template_kwargs: dict[str, Any] | None = None) -> list[int]:
        """apply_chat_template() off the event loop for long conversations, after the length check."""
        if self._closed is not None:
            raise self._closed
        self._need_tokenizer("messages")
        chars = sum(len(m.get("content") or "") for m in messages if isinstance(m, dict)
                    and isinstance(m.get("content"), str))
        limit = self.model_info.context_length * self.max_chars_per_token
        if chars > limit:
            raise RequestError(400, f"messages: {chars} characters of content cannot fit the model's context of "
                                    f"{self.model_info.context_length} tokens (at most {limit} characters)")
        args = (messages, tools, add_generation_prompt, continue_final_message, template_kwargs)
        if chars <= INLINE_TOKENIZE_CHARS:
            return self.apply_chat_template(*args)
        return await asyncio.get_running_loop().run_in_executor(self._tokenize_pool, self.apply_chat_template, *args)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._need_tokenizer("decode").decode(ids, skip_special_tokens=skip_special_tokens)

    def health(self) -> str | None:
        """Why the engine cannot serve now (a stale heartbeat, a hung batch, shutdown), or None."""
        if self._closed is not None:
            return self._closed.message
        if self.draining:
            return "the server is shutting down"
        return None if self.health_check is None else self.health_check()

    def apply_chat_template(self, messages: list[dict], tools: list | None, add_generation_prompt: bool,
                            continue_final_message: bool, template_kwargs: dict[str, Any] | None = None) -> list[int]:
        return render_chat(self._need_tokenizer("messages"), messages, tools, add_generation_prompt,
                           continue_final_message, template_kwargs)

    # ------------------------------------------------------------------ requests
    def _check_prompt(self, rid: str, input_ids: list[int], generates: bool = True) -> list[int]:
        if not isinstance(rid, str) or not rid:
            raise RequestError(400, "rid: must be a non-empty string")
        if rid in self._streams:
            raise RequestError(400, f"rid: a request with id {rid!r} is already running")
        try:  # strict: a float or bool here would make the scheduler fail to decode the request
            input_ids = msgspec.convert(input_ids, list[int])
        except msgspec.ValidationError as err:
            raise RequestError(400, f"input_ids: {err}") from None
        if not input_ids:
            raise RequestError(400, "input_ids: the prompt is empty")
        vocab = self.model_info.vocab_size
        low, high = min(input_ids), max(input_ids)
        if low < 0 or high >= vocab:
            bad = low if low < 0 else high
            raise RequestError(400, f"input_ids: token id {bad} at position {input_ids.index(bad)} is outside "
                                    f"the vocabulary (0..{vocab - 1})")
        if not generates and len(input_ids) > self.model_info.context_length:
            raise RequestError(400, f"input: {len(input_ids)} tokens; the model's context length is "
                                    f"{self.model_info.context_length}")
        if generates and len(input_ids) >= self.model_info.context_length:
            raise RequestError(400, f"input_ids: the prompt has {len(input_ids)} tokens; the model's context length "
                                    f"is {self.model_info.context_length}, which leaves no room to generate")
        return input_ids

    async def generate(self, rid: str, input_ids: list[int], sampling: SamplingParams, logprobs: LogprobOptions,
                       stream: bool, deadline: float | None = None, group: str | None = None, priority: int = 0,
                       images: ProcessedPrompt | None = None) -> AsyncIterator[TextUpdate]:
        """Yields the request's TextUpdate deltas (one merged delta per wake-up; for a non-streamed
        request, a single update); the last has .finish set. Leaving early aborts the request.
        `deadline` (time.monotonic()): past it the request is aborted and fails with 504.
        Requests of one `group` (the n samples of a prompt) are served by one data-parallel replica.
        Higher `priority` runs first (batch requests run below interactive ones). `images`: the prompt's images as
        VisionInputs preprocessed them (input_ids are then its ids)."""
        if self._closed is not None:
            raise self._closed
        if self.draining:
            raise RequestError(503, "the server is shutting down")
        if self.model_info.is_embedding:
            raise RequestError(400, "this server serves an embedding model (--is-embedding): use /v1/embeddings or "
                                    "/encode")
        if images is not None and images.images:
            await self.vision.wait_for_room(images)  # no await from here to the send: blocks go out in order
            if self._closed is not None:
                raise self._closed
        input_ids = self._check_prompt(rid, input_ids)
        self._check_load(priority)
        loop = asyncio.get_running_loop()
        state = _RequestStream(stream)
        started = time.time()
        self._add_stream(rid, state, priority)
        if deadline is not None:
            state.timer = loop.call_later(max(0.0, deadline - time.monotonic()), state.fail,
                                          RequestError(504, f"the request did not finish within its timeout of "
                                                            f"{deadline - time.monotonic():.3g} s; it was aborted"))
        done = False  # finished or rejected: the scheduler holds nothing for this rid any more
        try:
            prepare = None
            if images is not None and images.images:
                def prepare(replica: int, request: GenerateRequest) -> GenerateRequest:
                    # allocated right before the send: the replica's scheduler frees arena blocks in this order
                    ids, items = self.vision.place(images, replica)
                    return msgspec.structs.replace(request, input_ids=ids, images=items)
            try:
                self.dispatcher.submit(GenerateRequest(rid, input_ids, sampling, logprobs, stream, time.time(),
                                                       priority=priority), group, prepare)
            except MediaError as err:
                done = True
                raise RequestError(err.status, str(err)) from None
            while True:
                if not state.updates and state.error is None:
                    state.waiter = loop.create_future()
                    await state.waiter
                    state.waiter = None
                if state.error is not None:
                    done = state.error.status != 504  # the scheduler's refusal; after a timeout it still runs it
                    raise state.error
                update = merge_updates(state.updates)
                state.updates = []
                if update.finish is not None:
                    done = True
                    if self.args.log_requests:
                        log.info("request %s: prompt_tokens=%d completion_tokens=%d cached_tokens=%d finish=%s "
                                 "e2e=%.3fs", rid, update.meta.prompt_tokens, update.meta.completion_tokens,
                                 update.meta.cached_tokens, update.finish.type, time.time() - started)
                    yield update
                    return
                yield update
        finally:
            if state.timer is not None:
                state.timer.cancel()
            self._remove_stream(rid, state)
            if not done and self._closed is None:
                self.dispatcher.abort(rid)
            self.dispatcher.finished(rid)

    async def embed(self, rid: str, input_ids: list[int], priority: int = 0) -> EmbeddingResult:
        """The pooled final hidden state of `input_ids` (ModelInfo.pooling), as a prefill-only request.
        Cancelling the caller aborts the request."""
        if self._closed is not None:
            raise self._closed
        if self.draining:
            raise RequestError(503, "the server is shutting down")
        input_ids = self._check_prompt(rid, input_ids, generates=False)
        self._check_load(priority)
        loop = asyncio.get_running_loop()
        state = _RequestStream(False)
        self._add_stream(rid, state, priority)
        done = False
        try:
            self.dispatcher.submit(GenerateRequest(rid, input_ids, SamplingParams(), LogprobOptions(), False,
                                                   time.time(), embed=True, priority=priority))
            while state.embedding is None and state.error is None and not state.updates:
                state.waiter = loop.create_future()
                await state.waiter
                state.waiter = None
            done = True
            if state.error is not None:
                raise state.error
            if state.embedding is None:  # an abort's finish came through the detokenizer
                finish = state.updates[-1].finish
                raise RequestError(500, f"the request was aborted by the engine: "
                                        f"{(finish.message if finish else None) or 'no reason given'}")
            return state.embedding
        finally:
            self._remove_stream(rid, state)
            if not done and self._closed is None:
                self.dispatcher.abort(rid)
            self.dispatcher.finished(rid)

    def _check_load(self, priority: int) -> None:
        """429 past the bound of unfinished interactive sequences. Batch work (priority < 0) is bounded by its
        runner's window instead, and does not count here: it must not crowd interactive requests out."""
        if priority < 0:
            return
        interactive = len(self._streams) - len(self._background)
        if interactive >= self.max_unfinished:
            raise RequestError(429, f"the server is overloaded: {interactive} sequences are unfinished "
                                    f"(--max-running-requests x {self.dispatcher.size} replicas + "
                                    f"--max-queued-requests = {self.max_unfinished}); retry later")

    def _add_stream(self, rid: str, state: _RequestStream, priority: int) -> None:
        self._streams[rid] = state
        if priority < 0:
            self._background.add(rid)

    def _remove_stream(self, rid: str, state: _RequestStream) -> None:
        if self._streams.get(rid) is state:
            del self._streams[rid]
            self._background.discard(rid)

    def abort(self, rid: str) -> None:
        """Ask the scheduler to end the request; its generate() iterator then ends with finish
        type "abort". Unknown (or already finished) ids are ignored."""
        if rid in self._streams:
            self.dispatcher.abort(rid)

    def abort_all(self) -> None:
        for rid in list(self._streams):
            self.dispatcher.abort(rid)

    async def flush_cache(self) -> tuple[bool, str]:
        """Flushes every replica's cache; ok when all of them did."""
        replies = await self._ask(FlushCacheRequest, "flush_cache")
        if len(replies) == 1:
            return replies[0].ok, replies[0].message
        messages = [f"replica {i}: {r.message}" for i, r in enumerate(replies) if r.message]
        return all(r.ok for r in replies), "; ".join(messages)

    async def replica_states(self) -> list[dict]:
        """Each replica's scheduler state, by dp rank, with the sequences this ingress has unfinished there
        (and with --dp-size > 1 how many it dispatched there)."""
        states = await self._scheduler_states()
        for i, state in enumerate(states):
            load = self.dispatcher.load(i)
            state["ingress_unfinished_sequences"] = load["unfinished"]
            if len(states) > 1:
                state["dispatched"] = load["dispatched"]
        return states

    async def server_info(self) -> dict:
        """The scheduler state, summed over the replicas (runtime.ingress.dispatcher.merge_states)."""
        return merge_states(await self._scheduler_states())

    async def _scheduler_states(self) -> list[dict]:
        replies = await self._ask(ServerInfoRequest, "server_info")
        states = [{key: msgspec.msgpack.decode(value) for key, value in reply.info.items()} for reply in replies]
        return sorted(states, key=lambda state: state.get("dp_rank", 0))

    async def _ask(self, request_type, what: str) -> list[Any]:
        """Every replica's reply to request_type(token)."""
        if self._closed is not None:
            raise self._closed
        token = next(self._reply_tokens)
        gather = _Gather(self.dispatcher.size, asyncio.get_running_loop().create_future())
        self._replies[token] = gather
        try:
            self.dispatcher.broadcast(request_type(token))
            return await asyncio.wait_for(gather.future, REPLY_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise RequestError(503, f"{what}: the scheduler did not answer within {REPLY_TIMEOUT_S:.0f} s") from None
        finally:
            self._replies.pop(token, None)

    # ------------------------------------------------------------------ incoming
    def on_message(self, msg) -> None:
        """One DetokenizerToIngress or SchedulerToIngress message, on the loop thread."""
        match msg:
            case TextUpdates(updates=updates):
                streams = self._streams
                for update in updates:
                    state = streams.get(update.rid)
                    if state is not None:  # else: aborted, its late updates are dropped
                        if self.draining and update.finish is not None and update.finish.type == "abort":
                            state.fail(RequestError(503, "the server is shutting down"))  # the drain ran out
                        else:
                            state.push(update)
            case EmbeddingResults(results=results):
                for result in results:
                    state = self._streams.get(result.rid)
                    if state is not None:
                        state.set_embedding(result)
            case RequestRejected(rid=rid, status=status, message=message, param=param):
                state = self._streams.get(rid)
                if state is not None:
                    state.fail(RequestError(status, message, param))
            case EngineReady():
                pass  # the scheduler's greeting: this frontend was built with the model facts already
            case FlushCacheReply(token=token) | ServerInfoReply(token=token):
                gather = self._replies.get(token)
                if gather is not None and not gather.future.done():
                    gather.replies.append(msg)
                    if len(gather.replies) == gather.expected:
                        gather.future.set_result(gather.replies)
            case _:
                raise TypeError(f"frontend: unexpected message {type(msg).__name__}")

    @property
    def unfinished(self) -> int:
        """Sequences the engine is working on for this frontend."""
        return len(self._streams)

    def close(self, message: str = "the server is shutting down") -> None:
        """Fail every waiting request and reply with 503; later calls fail at once."""
        self._tokenize_pool.shutdown(wait=False, cancel_futures=True)
        self._closed = RequestError(503, message)
        for state in self._streams.values():
            state.fail(self._closed)
        for gather in self._replies.values():
            if not gather.future.done():
                gather.future.set_exception(self._closed)


def max_token_chars(tokenizer) -> int:
    """The most characters one token can stand for: the longest vocabulary entry (a byte-level BPE
    entry has one character per byte, a SentencePiece entry one per character; special tokens
    included). 1 without a tokenizer (ids only)."""
    if tokenizer is None:
        return 1
    return max((len(token) for token in tokenizer.get_vocab()), default=1)


def checked_template_kwargs(template_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """chat_template_kwargs, refused when they would set what the template call passes itself."""
    template_kwargs = template_kwargs or {}
    clash = sorted(set(template_kwargs) & RESERVED_TEMPLATE_ARGS)
    if clash:
        raise RequestError(400, f"chat_template_kwargs: {', '.join(clash)} cannot be set here; use the request's "
                                f"own fields", "chat_template_kwargs")
    return template_kwargs


def render_chat(tokenizer, messages: list[dict], tools: list | None, add_generation_prompt: bool,
                continue_final_message: bool, template_kwargs: dict[str, Any] | None = None) -> list[int]:
    """Chat messages -> prompt ids through the tokenizer's chat template. `template_kwargs` (OpenAI chat's
    `chat_template_kwargs`, e.g. Qwen3's `enable_thinking`) become variables of the template; they may not set
    what this call passes itself."""
    conversation = _normalize_messages(messages)
    if tools is not None and not isinstance(tools, list):
        raise RequestError(400, f"tools: expected a list, got {type(tools).__name__}")
    template_kwargs = checked_template_kwargs(template_kwargs)
    try:
        text = tokenizer.apply_chat_template(conversation, tools=tools, tokenize=False,
                                             add_generation_prompt=add_generation_prompt,
                                             continue_final_message=continue_final_message, **template_kwargs)
    except (jinja2.TemplateError, ValueError, TypeError, KeyError, IndexError) as err:
        raise RequestError(400, f"messages: the chat template cannot render them: {err}") from None
    # The template already wrote the special tokens (BOS included) as text.
    return tokenizer.encode(text, add_special_tokens=False)


def _normalize_messages(messages: list[dict]) -> list[dict]:
    """Check the shape of chat messages and flatten OpenAI text parts to one string, which is what
    chat templates expect as content."""
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "messages: expected a non-empty list")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RequestError(400, f"messages[{i}]: expected an object, got {type(message).__name__}")
        if not isinstance(message.get("role"), str):
            raise RequestError(400, f"messages[{i}].role: expected a string")
        content = message.get("content")
        if content is None:
            content = ""
        elif isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise RequestError(400, f"messages[{i}].content[{j}]: only text parts are supported")
                texts.append(part["text"])
            content = "\n".join(texts)
        elif not isinstance(content, str):
            raise RequestError(400, f"messages[{i}].content: expected a string or a list of text parts")
        out.append({**message, "content": content})
    return out
