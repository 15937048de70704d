"""The detokenizer's batch handling in process, and the actor itself in a child process."""

import uuid

import msgspec
import pytest

from actors.spec import ActorSpec
from actors.supervisor import Supervisor
from runtime.detokenizer.actor import Detokenizer, DetokenizerConfig
from runtime.messages import FinishReason, RequestMeta, TextUpdates, TokenLogprobs, TokenUpdate, TokenUpdates
from runtime.server_args import ServerArgs
from runtime.tokenizer import load_tokenizer
from shm import run_prefix

META = RequestMeta(prompt_tokens=3, completion_tokens=1, cached_tokens=0)
DONE = FinishReason(type="length", length=8)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ServerArgs())


def token_update(rid, ids, finish=None, **flags):
    return TokenUpdate(rid, ids, META, finish, **flags)


def test_batches_route_text_per_request_and_drop_state_at_finish(tokenizer):
    detok = Detokenizer(tokenizer)
    a, b = tokenizer.encode("日本語 and more"), tokenizer.encode("😀 smile")
    text = {"a": "", "b": ""}
    steps = max(len(a), len(b))
    for i in range(steps):
        updates = [token_update(rid, ids[i:i + 1], DONE if i == len(ids) - 1 else None)
                   for rid, ids in (("a", a), ("b", b)) if i < len(ids)]
        out = detok.handle(updates)
        assert [u.rid for u in out.updates] == [u.rid for u in updates]
        assert [u.new_token_ids for u in out.updates] == [u.new_token_ids for u in updates]
        for u in out.updates:
            text[u.rid] += u.text_delta
    assert text == {"a": "日本語 and more", "b": "😀 smile"}
    assert detok.states == {}


def test_flags_come_from_the_first_update_and_extras_pass_through(tokenizer):
    detok = Detokenizer(tokenizer)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    logprobs = TokenLogprobs([im_end], [-0.1])
    first = token_update("r", tokenizer.encode("Hi"), skip_special_tokens=False)
    last = token_update("r", [im_end], DONE, logprobs=logprobs, skip_special_tokens=False)
    out = [detok.handle([u]).updates[0] for u in (first, last)]
    assert "".join(u.text_delta for u in out) == "Hi <|im_end|>"
    assert out[1].logprobs == logprobs and out[1].finish == DONE and out[1].meta == META


def test_stop_string_trimmed_at_finish(tokenizer):
    detok = Detokenizer(tokenizer)
    ids = tokenizer.encode("result: 42 STOP")
    out = detok.handle([token_update("s", ids, FinishReason(type="stop", matched="STOP"))])
    assert out.updates[0].text_delta == "result: 42 "


def test_without_tokenizer_only_ids_pass():
    out = Detokenizer(None).handle([token_update("x", [5, 6], DONE)])
    assert out.updates[0].text_delta == "" and out.updates[0].new_token_ids == [5, 6]


def test_actor_process_round_trip(tokenizer):
    prefix = f"{run_prefix()}{uuid.uuid4().hex[:8]}_"
    sup = Supervisor(prefix=prefix, ready_timeout=120)
    try:
        inbound = sup.channel("scheduler_to_detokenizer", "runtime.messages:SchedulerToDetokenizer", 1 << 16)
        outbound = sup.channel("detokenizer_to_ingress", "runtime.messages:DetokenizerToIngress", 1 << 16)
        config = DetokenizerConfig(ServerArgs(), to_ingress="detokenizer_to_ingress")
        sup.start(ActorSpec("detokenizer", "runtime.detokenizer:DetokenizerActor",
                            msgspec.Raw(msgspec.json.encode(config)), inbound=[inbound], outbound=[outbound]))
        to_actor, from_actor = sup.connect(inbound, writer=True), sup.connect(outbound)
        ids = tokenizer.encode("Grüße 🌍!")
        text = ""
        for i, token in enumerate(ids):
            to_actor.put(TokenUpdates([token_update("p", [token], DONE if i == len(ids) - 1 else None)]))
            reply = from_actor.get(timeout=30)
            assert isinstance(reply, TextUpdates) and reply.updates[0].new_token_ids == [token]
            text += reply.updates[0].text_delta
        assert text == "Grüße 🌍!"
        to_actor.close()
        from_actor.close()
        assert sup.stop(grace_s=0.0) == 0
    finally:
        sup.stop()


def test_token_timestamps_pass_through_with_the_detokenizers_own(tokenizer):
    """--enable-token-timestamps: the scheduler's stamp of the batch and the detokenizer's reach every TextUpdate."""
    import time

    detok = Detokenizer(tokenizer)
    assert detok.handle([token_update("a", [5])]).updates[0].timestamps == []  # off: nothing stamped
    before = time.monotonic()
    out = detok.handle([token_update("a", [6]), token_update("b", [7])], sent_at=12.5)
    for update in out.updates:
        scheduler, detokenizer = update.timestamps
        assert scheduler == 12.5 and before <= detokenizer <= time.monotonic()
