"""Channel codec, Mailbox fairness and blocking, and actor context building (in one process)."""

from __future__ import annotations

import threading
import time

import msgspec
import pytest

from actors.actor import Actor, open_context
from actors.channel import Channel, ChannelDecodeError
from actors.mailbox import Mailbox
from actors.spec import ActorSpec, ChannelSpec, RingSpec
from runtime.messages import AbortRequest, GenerateRequest, IngressToScheduler, SamplingParams, Shutdown
from shm import Ring, list_segments
from tests.actors_fixtures import TO_ECHO, EchoActor, EchoConfig, Ping, ToEcho, unique_prefix


@pytest.fixture
def prefix():
    p = unique_prefix()
    yield p
    assert not list_segments(p), "segments left behind"


@pytest.fixture
def rings(prefix):
    made = []

    def make(name: str, capacity: int = 1 << 16) -> Ring:
        ring = Ring.create(prefix + name, capacity)
        made.append(ring)
        return ring

    yield make
    for ring in made:
        ring.close()
        ring.unlink()


def test_channel_round_trip_keeps_types_and_fields(rings):
    ring = rings("ingress")
    tx = Channel("to_scheduler", ring, IngressToScheduler)
    rx = Channel("to_scheduler", Ring.attach(ring.name), IngressToScheduler)
    sent = [
        GenerateRequest("r1", [1, 2, 3], SamplingParams(max_new_tokens=7, temperature=0.0)),
        AbortRequest("r1"),
        Shutdown(grace_s=1.5),
    ]
    for msg in sent:
        tx.put(msg)
    got = [rx.get(timeout=1.0) for _ in sent]
    assert got == sent
    assert [type(m) for m in got] == [GenerateRequest, AbortRequest, Shutdown]
    assert rx.try_get() is None
    assert rx.get(timeout=0.01) is None
    rx.close()


def test_channel_refuses_a_message_outside_its_union(rings):
    tx = Channel("to_scheduler", rings("ingress"), IngressToScheduler)
    with pytest.raises(TypeError, match="to_scheduler.*Ping"):
        tx.put(Ping(1))


def test_garbage_frame_raises_a_typed_error_naming_the_channel(rings):
    ring = rings("ingress")
    rx = Channel("to_scheduler", Ring.attach(ring.name), IngressToScheduler)
    ring.send(b"\xc1 not msgpack")
    with pytest.raises(ChannelDecodeError, match="to_scheduler") as info:
        rx.get(timeout=1.0)
    assert info.value.channel == "to_scheduler"
    # valid msgpack of the wrong shape is refused too
    ring.send(msgspec.msgpack.encode({"type": "generate", "rid": 5}))
    with pytest.raises(ChannelDecodeError, match="to_scheduler"):
        rx.try_get()
    rx.close()


def test_mailbox_is_fair_between_a_busy_and_a_quiet_channel(rings):
    busy, quiet = rings("busy"), rings("quiet")
    busy_tx = Channel("busy", busy, ToEcho)
    quiet_tx = Channel("quiet", quiet, ToEcho)
    mailbox = Mailbox([Channel("busy", Ring.attach(busy.name), ToEcho),
                       Channel("quiet", Ring.attach(quiet.name), ToEcho)])
    for n in range(50):
        busy_tx.put(Ping(n, "busy"))
    for n in range(3):
        quiet_tx.put(Ping(n, "quiet"))
    first = [mailbox.get(timeout=1.0).text for _ in range(6)]
    assert first.count("quiet") == 3  # interleaved, not after the 50 busy ones
    rest = mailbox.drain(100)
    assert len(rest) == 47 and all(m.text == "busy" for m in rest)
    assert [m.n for m in rest] == list(range(3, 50))  # order within a channel is kept
    mailbox.close()


def test_mailbox_get_parks_then_wakes_on_any_channel(rings):
    a, b = rings("a"), rings("b")
    mailbox = Mailbox([Channel("a", Ring.attach(a.name), ToEcho),
                       Channel("b", Ring.attach(b.name), ToEcho)])
    t0 = time.monotonic()
    assert mailbox.get(timeout=0.1) is None
    assert time.monotonic() - t0 >= 0.09

    sender = threading.Timer(0.05, lambda: Channel("b", b, ToEcho).put(Ping(7, "late")))
    sender.start()
    msg = mailbox.get(timeout=5.0)
    sender.join()
    assert msg == Ping(7, "late")
    mailbox.close()


def test_open_context_decodes_config_and_names_a_bad_field(rings, prefix):
    inbound = rings("echo_in")
    outbound = rings("echo_out")
    spec = ActorSpec(
        "echo",
        "tests.actors_fixtures:EchoActor",
        config=msgspec.Raw(b'{"greeting": "hello"}'),
        inbound=[ChannelSpec("to_echo", RingSpec(inbound.name, 1 << 16), TO_ECHO)],
        outbound=[ChannelSpec("from_echo", RingSpec(outbound.name, 1 << 16), "tests.actors_fixtures:FromEcho")],
    )
    actor = EchoActor(open_context(spec, EchoActor.config_type))
    assert actor.config == EchoConfig(greeting="hello")
    assert isinstance(actor, Actor)
    with pytest.raises(KeyError, match="no outbound channel 'nope'"):
        actor.ref("nope")
    actor.close()

    bad = msgspec.structs.replace(spec, config=msgspec.Raw(b'{"greeting": 5}'))
    with pytest.raises(ValueError, match=r"actor 'echo': invalid config.*\$\.greeting"):
        open_context(bad, EchoActor.config_type)
    unknown = msgspec.structs.replace(spec, config=msgspec.Raw(b'{"greting": "x"}'))
    with pytest.raises(ValueError, match="greting"):
        open_context(unknown, EchoActor.config_type)
