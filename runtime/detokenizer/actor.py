"""The detokenizer actor: TokenUpdates from the scheduler in, TextUpdates to the ingress out, one
message for one message. Each request's decoding state lives from its first update to its finish.

Spawned by the launcher with an ActorSpec whose inbound channel carries SchedulerToDetokenizer and
whose outbound channel (named by DetokenizerConfig.to_ingress) carries DetokenizerToIngress.
It wakes at least once a second to beat its slot of the run's heartbeat segment (/health)."""

from __future__ import annotations

import time

import msgspec

from actors.actor import Actor
from runtime.detokenizer.incremental import IncrementalDetokenizer, TokenTextDecoder, detokenize_batch
from runtime.messages import Shutdown, TextUpdate, TextUpdates, TokenUpdate, TokenUpdates
from runtime.server_args import ServerArgs
from runtime.tokenizer import load_tokenizer
from shm import Heartbeat

HEARTBEAT_INTERVAL_S = 1.0
GRACE_SLACK_S = 2.0  # beyond the grace period, for the scheduler's last updates and its Shutdown to arrive


class DetokenizerConfig(msgspec.Struct, forbid_unknown_fields=True):
    args: ServerArgs
    to_ingress: str = "detokenizer_to_ingress"  # name of the outbound channel in the ActorSpec
    heartbeat_segment: str = ""  # the run's Heartbeats segment ("": none)


class Detokenizer:
    """The actor's work, apart from its mailbox: turns one TokenUpdates batch into TextUpdates."""

    def __init__(self, tokenizer):
        self.decoder = TokenTextDecoder(tokenizer) if tokenizer is not None else None
        self.states: dict[str, IncrementalDetokenizer] = {}

    def _state(self, update: TokenUpdate) -> IncrementalDetokenizer:
        state = self.states.get(update.rid)
        if state is None:
            state = IncrementalDetokenizer.for_request(update.skip_special_tokens, update.spaces_between_special_tokens,
                                                       update.no_stop_trim, update.stop, update.stop_regex)
            self.states[update.rid] = state
        return state

    def handle(self, updates: list[TokenUpdate], sent_at: float = 0.0) -> TextUpdates:
        """`sent_at`: the scheduler's timestamp of the batch (--enable-token-timestamps); 0 when off."""
        if self.decoder is None:  # --skip-tokenizer-init: ids only
            texts = [""] * len(updates)
        else:
            texts = detokenize_batch(self.decoder, [(self._state(u), u.new_token_ids, u.finish) for u in updates])
            for u in updates:
                if u.finish is not None:
                    self.states.pop(u.rid, None)
        stamps = [sent_at, time.monotonic()] if sent_at else []
        return TextUpdates([TextUpdate(u.rid, text, u.new_token_ids, u.meta, u.finish, u.logprobs, u.prompt_logprobs,
                                       stamps) for u, text in zip(updates, texts)])


class DetokenizerActor(Actor):
    config_type = DetokenizerConfig

    def __init__(self, context):
        super().__init__(context)
        self.detokenizer = Detokenizer(load_tokenizer(self.config.args))
        self.to_ingress = self.ref(self.config.to_ingress)

    def run(self) -> None:
        heartbeat = Heartbeat(self.config.heartbeat_segment, self.name) if self.config.heartbeat_segment else None
        deadline = None  # after Shutdown(grace_s): the scheduler may still finish requests until then
        while True:
            if heartbeat is not None:
                heartbeat.beat()
            timeout = HEARTBEAT_INTERVAL_S if deadline is None else min(HEARTBEAT_INTERVAL_S,
                                                                        deadline - time.monotonic())
            if timeout <= 0:
                return
            match self.receive(timeout):
                case TokenUpdates(updates=updates, sent_at=sent_at):
                    self.to_ingress.send(self.detokenizer.handle(updates, sent_at))
                case Shutdown(grace_s=grace_s):
                    if grace_s <= 0:  # the scheduler's last word (after its last updates), or a stop now
                        return
                    deadline = time.monotonic() + grace_s + GRACE_SLACK_S
