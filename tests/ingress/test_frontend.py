"""The Frontend over real shared-memory rings, with a scripted peer thread playing the scheduler and
the detokenizer: each request's reply echoes its prompt ids as text "<id>", one token per step, all
running requests advancing together in one TextUpdates message per step."""

import asyncio
import threading
import uuid

import msgspec
import pytest

from actors.aio import AsyncMailbox
from actors.channel import Channel
from actors.mailbox import Mailbox
from runtime.ingress.errors import RequestError
from runtime.ingress.frontend import Frontend, OrderedSender
from runtime.messages import (
    AbortRequest,
    DetokenizerToIngress,
    FinishReason,
    FlushCacheReply,
    FlushCacheRequest,
    GenerateRequest,
    IngressToScheduler,
    LogprobOptions,
    ModelInfo,
    RequestMeta,
    RequestRejected,
    SamplingParams,
    SchedulerToIngress,
    ServerInfoReply,
    ServerInfoRequest,
    TextUpdate,
    TextUpdates,
    TokenLogprobs,
)
from runtime.server_args import ServerArgs
from runtime.tokenizer import load_tokenizer
from shm import Ring, run_prefix, segment_name

MODEL_INFO = ModelInfo(architecture="LlamaForCausalLM", vocab_size=49152, context_length=64, eos_token_ids=[2],
                       max_total_tokens=4096, max_running_requests=16, dtype="float32", device="cpu")
GREEDY = SamplingParams(temperature=0.0)
NO_LOGPROBS = LogprobOptions()


class ScriptedPeer(threading.Thread):
    """rid prefixes pick the script: "reject" -> RequestRejected; "endless" -> never finishes (until
    aborted, then a finish of type abort, like the scheduler); otherwise the prompt is echoed."""

    def __init__(self, inbox: Channel, to_ingress: Channel, detokenizer: Channel):
        super().__init__(daemon=True)
        self.inbox, self.to_ingress, self.detokenizer = inbox, to_ingress, detokenizer
        self.received: list = []
        self.running: dict[str, tuple[GenerateRequest, int]] = {}
        self.stopping = threading.Event()

    def run(self):
        while not self.stopping.is_set():
            msg = self.inbox.get(timeout=0.002 if self.running else 0.05)
            if msg is not None:
                self.received.append(msg)
                self.handle(msg)
            elif self.running:
                self.step()

    def handle(self, msg):
        match msg:
            case GenerateRequest(rid=rid) if rid.startswith("reject"):
                self.to_ingress.put(RequestRejected(rid, 400, f"{rid} is longer than the KV pool"))
            case GenerateRequest(rid=rid):
                self.running[rid] = (msg, 0)
            case AbortRequest(rid=rid) if rid in self.running:
                del self.running[rid]
                meta = RequestMeta(prompt_tokens=1, completion_tokens=0, cached_tokens=0)
                self.detokenizer.put(TextUpdates([TextUpdate(rid, "", [], meta, FinishReason(type="abort"))]))
            case FlushCacheRequest(token=token):
                self.to_ingress.put(FlushCacheReply(token, ok=True, message="cache flushed"))
            case ServerInfoRequest(token=token):
                info = {"running": 3, "queued": 1, "cache_hit_rate": 0.25}
                self.to_ingress.put(ServerInfoReply(token, {k: msgspec.Raw(msgspec.msgpack.encode(v))
                                                            for k, v in info.items()}))

    def step(self):
        updates = []
        for rid, (req, done) in list(self.running.items()):
            token = req.input_ids[done % len(req.input_ids)]
            finished = not rid.startswith("endless") and done + 1 == len(req.input_ids)
            meta = RequestMeta(prompt_tokens=len(req.input_ids), completion_tokens=done + 1, cached_tokens=0)
            logprobs = TokenLogprobs([token], [-0.5]) if req.logprobs.return_logprob else None
            updates.append(TextUpdate(rid, f"<{token}>", [token], meta,
                                      FinishReason(type="length", length=done + 1) if finished else None, logprobs))
            if finished:
                del self.running[rid]
            else:
                self.running[rid] = (req, done + 1)
        self.detokenizer.put(TextUpdates(updates))

    def messages_of(self, kind, rid=None):
        return [m for m in list(self.received) if isinstance(m, kind) and (rid is None or m.rid == rid)]


def open_ring(tag: str, name: str, capacity: int = 1 << 16):
    return Ring.create(segment_name(run_prefix(), "test_frontend", tag, name), capacity)


@pytest.fixture
def rings():
    tag = uuid.uuid4().hex[:8]
    owned = [open_ring(tag, n) for n in ("to_scheduler", "scheduler_to_ingress", "detokenizer_to_ingress")]
    yield owned
    for ring in owned:
        ring.close()
        ring.unlink()


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ServerArgs())


def run_with_frontend(rings, body, tokenizer=None, args=None, model_info=MODEL_INFO):
    """Run `body(frontend, peer)` on a fresh loop, the Frontend fed by an AsyncMailbox."""
    to_sched, sched_out, detok_out = rings
    peer = ScriptedPeer(Channel("in", Ring.attach(to_sched.name), IngressToScheduler),
                        Channel("s2i", Ring.attach(sched_out.name), SchedulerToIngress),
                        Channel("d2i", Ring.attach(detok_out.name), DetokenizerToIngress))
    peer.start()

    async def main():
        frontend = Frontend(args or ServerArgs(), model_info, tokenizer,
                            Channel("to_scheduler", to_sched, IngressToScheduler))
        mailbox = Mailbox([Channel("s2i", sched_out, SchedulerToIngress),
                           Channel("d2i", detok_out, DetokenizerToIngress)])
        reader = AsyncMailbox(mailbox, frontend.on_message).start()
        try:
            return await asyncio.wait_for(body(frontend, peer), 20)
        finally:
            await reader.close()

    try:
        return asyncio.run(main())
    finally:
        peer.stopping.set()
        peer.join()


async def collect(frontend, rid, ids, stream=True, logprobs=NO_LOGPROBS):
    return [u async for u in frontend.generate(rid, ids, GREEDY, logprobs, stream)]


def test_concurrent_requests_get_their_own_updates(rings):
    prompts = {f"r{i}": [100 + i * 10 + k for k in range(3 + i)] for i in range(8)}

    async def body(frontend, peer):
        results = await asyncio.gather(*(collect(frontend, rid, ids) for rid, ids in prompts.items()))
        return dict(zip(prompts, results))

    results = run_with_frontend(rings, body)
    for rid, updates in results.items():
        ids = prompts[rid]
        assert all(u.rid == rid for u in updates)
        assert [t for u in updates for t in u.new_token_ids] == ids
        assert "".join(u.text_delta for u in updates) == "".join(f"<{t}>" for t in ids)
        assert updates[-1].finish == FinishReason(type="length", length=len(ids))
        assert all(u.finish is None for u in updates[:-1])
        assert updates[-1].meta.completion_tokens == len(ids)


def test_non_streamed_request_yields_one_merged_update(rings):
    ids = [7, 8, 9, 10, 11]

    async def body(frontend, peer):
        return await collect(frontend, "whole", ids, stream=False, logprobs=LogprobOptions(return_logprob=True))

    (update,) = run_with_frontend(rings, body)
    assert update.text_delta == "<7><8><9><10><11>"
    assert update.new_token_ids == ids
    assert update.logprobs.token_ids == ids and update.logprobs.logprobs == [-0.5] * 5
    assert update.finish.type == "length"


def test_closing_the_iterator_early_sends_abort(rings):
    async def body(frontend, peer):
        stream = frontend.generate("endless-1", [5, 6], GREEDY, NO_LOGPROBS, True)
        first = await anext(stream)
        await stream.aclose()
        while not peer.messages_of(AbortRequest, "endless-1"):
            await asyncio.sleep(0.005)
        return first, peer

    first, peer = run_with_frontend(rings, body)
    assert first.rid == "endless-1" and first.finish is None
    assert len(peer.messages_of(GenerateRequest, "endless-1")) == 1
    assert len(peer.messages_of(AbortRequest, "endless-1")) == 1


def test_cancelled_task_sends_abort(rings):
    async def body(frontend, peer):
        started = asyncio.Event()

        async def consume():
            async for _ in frontend.generate("endless-2", [5], GREEDY, NO_LOGPROBS, False):
                started.set()

        task = asyncio.create_task(consume())
        while not peer.messages_of(GenerateRequest, "endless-2"):
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        while not peer.messages_of(AbortRequest, "endless-2"):
            await asyncio.sleep(0.005)
        return started.is_set()

    assert run_with_frontend(rings, body) is False  # non-streamed: nothing was yielded before the finish


def test_abort_by_rid_ends_the_stream_with_abort_finish(rings):
    async def body(frontend, peer):
        updates = []
        async for update in frontend.generate("endless-3", [9], GREEDY, NO_LOGPROBS, True):
            updates.append(update)
            if len(updates) == 2:
                frontend.abort("endless-3")
        frontend.abort("endless-3")  # finished: ignored, nothing sent
        return updates, peer

    updates, peer = run_with_frontend(rings, body)
    assert updates[-1].finish == FinishReason(type="abort")
    assert len(peer.messages_of(AbortRequest, "endless-3")) == 1


def test_rejected_request_raises_request_error(rings):
    async def body(frontend, peer):
        with pytest.raises(RequestError) as info:
            await collect(frontend, "reject-1", [1, 2, 3])
        ok = await collect(frontend, "after", [4])  # the frontend keeps serving
        return info.value, ok, peer

    error, ok, peer = run_with_frontend(rings, body)
    assert (error.status, error.message) == (400, "reject-1 is longer than the KV pool")
    assert not peer.messages_of(AbortRequest, "reject-1")
    assert ok[-1].text_delta == "<4>"


def test_flush_cache_and_server_info_round_trips(rings):
    async def body(frontend, peer):
        flushed, info = await asyncio.gather(frontend.flush_cache(), frontend.server_info())
        return flushed, info, await frontend.server_info()

    flushed, info, again = run_with_frontend(rings, body)
    assert flushed == (True, "cache flushed")
    assert info == again == {"running": 3, "queued": 1, "cache_hit_rate": 0.25}


@pytest.mark.parametrize("rid,ids,needle", [
    ("bad-vocab", [1, 49152], "token id 49152 at position 1"),
    ("bad-negative", [-1], "token id -1 at position 0"),
    ("bad-empty", [], "empty"),
    ("bad-long", list(range(64)), "context length is 64"),
    ("bad-float", [1, 2.5], "input_ids: Expected `int`, got `float`"),
    ("", [1], "rid"),
])
def test_invalid_prompts_are_refused_before_sending(rings, rid, ids, needle):
    async def body(frontend, peer):
        with pytest.raises(RequestError) as info:
            await collect(frontend, rid, ids)
        await asyncio.sleep(0.05)
        return info.value, peer

    error, peer = run_with_frontend(rings, body)
    assert error.status == 400 and needle in error.message
    assert not peer.messages_of(GenerateRequest)


def test_duplicate_rid_is_refused(rings):
    async def body(frontend, peer):
        stream = frontend.generate("endless-dup", [3], GREEDY, NO_LOGPROBS, True)
        await anext(stream)
        with pytest.raises(RequestError, match="already running"):
            await collect(frontend, "endless-dup", [3])
        await stream.aclose()

    run_with_frontend(rings, body)


def test_close_fails_waiting_requests_with_503(rings):
    async def body(frontend, peer):
        task = asyncio.ensure_future(collect(frontend, "endless-4", [1]))
        while not peer.messages_of(GenerateRequest, "endless-4"):
            await asyncio.sleep(0.005)
        frontend.close()
        with pytest.raises(RequestError) as info:
            await task
        with pytest.raises(RequestError):
            await frontend.flush_cache()
        return info.value

    assert run_with_frontend(rings, body).status == 503


def test_ordered_sender_does_not_block_on_a_full_ring(rings):
    to_sched = rings[0]
    channel = Channel("to_scheduler", to_sched, IngressToScheduler)
    sender = OrderedSender(channel)
    big = [1] * 3000  # ~3 KB of msgpack per request: the 64 KiB ring fills after ~20
    for i in range(60):  # nobody reads yet: a blocking put would hang here
        sender.send(GenerateRequest(f"q{i}", big, GREEDY))
    sender.send(AbortRequest("q59"))
    reader = Channel("in", Ring.attach(to_sched.name), IngressToScheduler)
    got = [reader.get(timeout=5) for _ in range(61)]
    assert [m.rid for m in got] == [f"q{i}" for i in range(60)] + ["q59"]
    assert isinstance(got[-1], AbortRequest)


def test_tokenizer_calls(rings, tokenizer):
    async def body(frontend, peer):
        messages = [{"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]}]
        ids = frontend.apply_chat_template(messages, None, add_generation_prompt=True, continue_final_message=False)
        started = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Wel"}]
        cont = frontend.apply_chat_template(started, None, add_generation_prompt=False, continue_final_message=True)
        errors = []
        for bad in ([], [{"content": "x"}], [{"role": "user", "content": [{"type": "image_url"}]}],
                    [{"role": "user", "content": 5}]):
            with pytest.raises(RequestError) as info:
                frontend.apply_chat_template(bad, None, True, False)
            errors.append(info.value)
        with pytest.raises(RequestError, match="chat template cannot render"):
            frontend.apply_chat_template([{"role": "user", "content": "x"}], None, True, True)
        return frontend.decode(ids), frontend.decode(cont), frontend.encode("Hello"), errors, frontend

    text, cont, hello, errors, frontend = run_with_frontend(rings, body, tokenizer)
    assert text.endswith("<|im_start|>user\nHi\nthere<|im_end|>\n<|im_start|>assistant\n")
    assert cont.endswith("<|im_start|>assistant\nWel")
    assert hello == tokenizer.encode("Hello")
    assert [e.status for e in errors] == [400] * 4
    assert "messages: expected a non-empty list" in errors[0].message
    assert "messages[0].role" in errors[1].message
    assert "messages[0].content[0]" in errors[2].message
    assert "messages[0].content: expected a string" in errors[3].message
    assert frontend.served_model_name == "SmolLM2-135M-Instruct"


def test_without_tokenizer_text_calls_are_refused(rings):
    async def body(frontend, peer):
        with pytest.raises(RequestError, match="--skip-tokenizer-init"):
            frontend.encode("hi")
        with pytest.raises(RequestError, match="--skip-tokenizer-init"):
            frontend.apply_chat_template([{"role": "user", "content": "x"}], None, True, False)
        return await collect(frontend, "ids-only", [5, 6])

    updates = run_with_frontend(rings, body, None, ServerArgs(skip_tokenizer_init=True, served_model_name="m"))
    assert [t for u in updates for t in u.new_token_ids] == [5, 6]


def test_log_requests_logs_each_finished_request(rings, caplog):
    async def body(frontend, peer):
        return await collect(frontend, "logged", [5, 6, 7], stream=False)

    with caplog.at_level("INFO", logger="runtime.ingress.frontend"):
        run_with_frontend(rings, body, args=ServerArgs(log_requests=True))
    (line,) = [r.getMessage() for r in caplog.records if "logged" in r.getMessage()]
    assert "prompt_tokens=3" in line and "completion_tokens=3" in line and "finish=length" in line

    caplog.clear()
    with caplog.at_level("INFO", logger="runtime.ingress.frontend"):
        run_with_frontend(rings, body)
    assert not [r for r in caplog.records if "logged" in r.getMessage()]


def test_merged_updates_keep_the_latest_token_timestamps():
    from runtime.ingress.frontend import merge_updates
    from runtime.messages import RequestMeta, TextUpdate

    meta = RequestMeta(prompt_tokens=2, completion_tokens=2, cached_tokens=0)
    first = TextUpdate(rid="r", text_delta="a", new_token_ids=[1], meta=meta, timestamps=[1.0, 1.1])
    second = TextUpdate(rid="r", text_delta="b", new_token_ids=[2], meta=meta, timestamps=[2.0, 2.1])
    merged = merge_updates([first, second])
    assert merged.text_delta == "ab" and merged.new_token_ids == [1, 2] and merged.timestamps == [2.0, 2.1]
