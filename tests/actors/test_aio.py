"""AsyncMailbox: ring messages reach an asyncio (uvloop) loop that keeps running its own timers."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import uvloop

from actors.aio import AsyncMailbox
from actors.channel import Channel, ChannelDecodeError
from actors.mailbox import Mailbox
from actors.spec import ActorSpec
from actors.supervisor import Supervisor
from shm import Ring, list_segments
from tests.actors_fixtures import FROM_ECHO, TO_ECHO, Ping, Pong, ToEcho, unique_prefix


@pytest.fixture
def ring_pair():
    """(writer channel, reader mailbox) over two rings, as an ingress would read two mailboxes."""
    prefix = unique_prefix()
    owners = [Ring.create(prefix + "a", 1 << 14), Ring.create(prefix + "b", 1 << 14)]
    writers = [Channel("a", owners[0], ToEcho), Channel("b", owners[1], ToEcho)]
    mailbox = Mailbox([Channel(o.name[len(prefix):], Ring.attach(o.name), ToEcho) for o in owners])
    yield writers, mailbox
    mailbox.close()
    for ring in owners:
        ring.close()
        ring.unlink()
    assert list_segments(prefix) == []


def test_messages_arrive_on_the_loop_while_its_timers_keep_running(ring_pair):
    writers, mailbox = ring_pair
    arrivals: list[tuple[int, int, int]] = []  # (n, ticks when it arrived, thread id)

    def sender():
        for n in range(40):
            writers[n % 2].put(Ping(n))
            time.sleep(0.004)

    async def main():
        ticks = 0

        async def tick():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.002)
                ticks += 1

        ticker = asyncio.create_task(tick())
        box = AsyncMailbox(mailbox, lambda m: arrivals.append((m.n, ticks, threading.get_ident()))).start()
        thread = threading.Thread(target=sender)
        thread.start()
        while len(arrivals) < 40:
            await asyncio.sleep(0.01)
        thread.join()
        await box.close()
        assert box.finished.done() and box.finished.exception() is None
        ticker.cancel()
        return threading.get_ident()

    loop_thread = uvloop.run(main())
    assert sorted(n for n, _, _ in arrivals) == list(range(40))
    assert all(t == loop_thread for _, _, t in arrivals)  # on_message ran on the loop's thread
    ticks_seen = [t for _, t, _ in arrivals]
    assert ticks_seen == sorted(ticks_seen) and ticks_seen[-1] - ticks_seen[0] >= 10


def test_an_idle_reader_thread_does_not_burn_cpu(ring_pair):
    _, mailbox = ring_pair

    async def main():
        box = AsyncMailbox(mailbox, lambda m: None).start()
        await asyncio.sleep(0.1)
        cpu0, wall0 = time.process_time(), time.monotonic()
        await asyncio.sleep(0.6)
        used = time.process_time() - cpu0
        wall = time.monotonic() - wall0
        await box.close()
        return used, wall

    used, wall = uvloop.run(main())
    assert used < 0.25 * wall, f"idle process used {used:.3f} s CPU in {wall:.3f} s"


def test_a_bad_frame_or_a_failing_handler_completes_finished_with_the_error(ring_pair):
    writers, mailbox = ring_pair

    async def run_until_finished(on_message):
        box = AsyncMailbox(mailbox, on_message).start()
        try:
            await asyncio.wait_for(asyncio.shield(box.finished), 5.0)
        finally:
            await box.close()

    writers[0].ring.send(b"\xc1garbage")
    with pytest.raises(ChannelDecodeError, match="channel 'a'"):
        uvloop.run(run_until_finished(lambda m: None))

    def handler(msg):
        raise ValueError(f"cannot handle {msg.n}")

    writers[1].put(Ping(9))
    with pytest.raises(ValueError, match="cannot handle 9"):
        uvloop.run(run_until_finished(handler))


def test_async_actor_process_answers_and_stops_on_shutdown():
    sup = Supervisor(prefix=unique_prefix(), ready_timeout=30.0, exit_slack_s=2.0)
    try:
        to_echo = sup.channel("to_echo", TO_ECHO, 1 << 14)
        from_echo = sup.channel("from_echo", FROM_ECHO, 1 << 14)
        sup.start(ActorSpec("aecho", "tests.actors_fixtures:AsyncEchoActor", inbound=[to_echo], outbound=[from_echo]))
        tx, rx = sup.connect(to_echo, writer=True), sup.connect(from_echo)
        ticks = []
        for n in range(5):
            tx.put(Ping(n))
            reply = rx.get(timeout=10.0)
            assert isinstance(reply, Pong) and reply.n == n
            ticks.append(int(reply.by.removeprefix("ticks=")))
            time.sleep(0.05)
        assert ticks == sorted(ticks) and ticks[-1] > ticks[0]  # its timer ran between messages
        assert sup.stop(1.0) == 0
        assert sup.exit_codes == {"aecho": 0}
    finally:
        sup.stop(0.0)
    assert list_segments(sup.prefix) == []
