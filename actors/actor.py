"""Actor: the base class of an actor process (its config, its mailbox, its outbound refs).

The base is deliberately thin: subclasses write their own `run()` loop (the scheduler's loop is
not purely message-driven) and dispatch with `match msg:`, using `receive(timeout)` to wait.

    class EchoActor(Actor):
        config_type = EchoConfig
        def run(self):
            while True:
                match self.receive():
                    case Ping(n=n): self.ref("replies").send(Pong(n=n))
                    case Shutdown(): return
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

import msgspec

from actors.channel import Channel
from actors.mailbox import Mailbox
from actors.rings import attach_reader, attach_writer
from actors.spec import ActorSpec, ChannelSpec, resolve

T = TypeVar("T")


class ActorRef(Generic[T]):
    """Typed handle to another actor's mailbox: encodes a message and pushes it onto the ring."""

    def __init__(self, channel: Channel[T]):
        self.channel = channel
        self.name = channel.name

    def send(self, msg: T, timeout: float | None = None) -> None:
        """Blocks while the ring is full (back-pressure); shm's RingTimeout after `timeout` seconds."""
        self.channel.put(msg, timeout)

    def __repr__(self) -> str:
        return f"ActorRef({self.name!r})"


@dataclass
class ActorContext:
    name: str
    config: Any
    mailbox: Mailbox
    refs: dict[str, ActorRef]


class Actor:
    # msgspec type the JSON config decodes into (a Struct, usually); None keeps the raw JSON bytes.
    config_type: ClassVar[Any] = None

    def __init__(self, context: ActorContext):
        self.name = context.name
        self.config = context.config
        self.mailbox = context.mailbox
        self.refs = context.refs
        self.log = logging.getLogger(type(self).__module__)  # the process title in each line names the actor

    def ready_info(self) -> bytes:
        """Bytes reported with Ready once __init__ returned (e.g. a msgspec-encoded ModelInfo)."""
        return b""

    def run(self) -> None:
        """The actor's loop. Return to exit with status 0; raise to exit non-zero."""
        raise NotImplementedError

    def receive(self, timeout: float | None = None) -> Any | None:
        return self.mailbox.get(timeout)

    def ref(self, name: str) -> ActorRef:
        try:
            return self.refs[name]
        except KeyError:
            raise KeyError(f"actor {self.name!r} has no outbound channel {name!r} (has: {sorted(self.refs)})") from None

    def close(self) -> None:
        self.mailbox.close()
        for ref in self.refs.values():
            ref.channel.close()


def decode_config(spec: ActorSpec, config_type: Any) -> Any:
    if config_type is None:
        return bytes(spec.config)
    try:
        return msgspec.json.decode(spec.config, type=config_type)
    except msgspec.DecodeError as e:  # the message names the field, e.g. "... - at `$.port`"
        raise ValueError(f"actor {spec.name!r}: invalid config: {e}") from None


def open_context(spec: ActorSpec, config_type: Any, control: ChannelSpec | None = None) -> ActorContext:
    """Attach the spec's rings (they must exist) and build the actor's mailbox and refs.
    The control channel, when given, is read last in the mailbox's round-robin."""
    config = decode_config(spec, config_type)
    inbound = list(spec.inbound) + ([control] if control is not None else [])
    opened: list[Any] = []
    try:
        channels = []
        for cs in inbound:
            ring = attach_reader(cs)
            opened.append(ring)
            channels.append(Channel(cs.name, ring, resolve(cs.message_type)))
        refs: dict[str, ActorRef] = {}
        for cs in spec.outbound:
            ring = attach_writer(cs)
            opened.append(ring)
            refs[cs.name] = ActorRef(Channel(cs.name, ring, resolve(cs.message_type)))
    except BaseException:
        for ring in opened:
            ring.close()
        raise
    return ActorContext(spec.name, config, Mailbox(channels), refs)
