"""Ring and BroadcastRing in one process (threads where a second party is needed)."""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections import deque

import msgspec
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.messages import GenerateRequest, IngressToScheduler, SamplingParams
from shm import BroadcastRing, Ring, RingTimeout, SegmentError, Waiter, run_prefix, sweep


@pytest.fixture
def prefix():
    p = f"{run_prefix()}shm{uuid.uuid4().hex[:6]}_"
    yield p
    sweep(p)


def frame_of(seq: int, size: int) -> bytes:
    """A self-describing frame: its sequence number repeated, cut to `size` bytes."""
    return (seq.to_bytes(4, "little") * (size // 4 + 1))[:size]


# ------------------------------------------------------------------------------------ frames


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.one_of(st.integers(0, 6000), st.just(-1), st.just(-2)), min_size=1, max_size=120))
def test_random_frames_wrap_around_match_a_fifo_model(prefix, ops):
    """Sizes from empty to larger than the ring (4 KiB); -1 = receive, -2 = receive as a view. A
    send that cannot finish at once times out, and a half-streamed frame is cancelled: the reader
    sees exactly the frames whose send() returned, in order, never a piece of the others."""
    name = prefix + "r"
    ring = Ring.create(name, 4096)
    try:
        model: deque[bytes] = deque()
        for seq, op in enumerate(ops):
            if op < 0:
                expected = model.popleft() if model else None
                got = ring.try_recv() if op == -1 else ring.try_recv_view()
                assert (None if got is None else bytes(got)) == expected
                if isinstance(got, memoryview):
                    got.release()
                continue
            data = frame_of(seq, op)
            try:
                ring.send(data, timeout=0)
            except RingTimeout:
                continue
            model.append(data)
        while model:
            assert ring.recv(timeout=1) == model.popleft()
        assert ring.try_recv() is None
    finally:
        ring.close()
        ring.unlink()


def test_frames_larger_than_the_ring_stream_through_it(prefix):
    ring = Ring.create(prefix + "r", 4096)
    sizes = [0, 1, 2047, 2048, 2049, 4096, 5000, 100_000, 7, 1_000_003]
    frames = [os.urandom(n) for n in sizes]
    sender = threading.Thread(target=lambda: [ring.send(f, timeout=10) for f in frames])
    sender.start()
    got = [ring.recv(timeout=10) for _ in frames]
    sender.join()
    assert [len(g) for g in got] == sizes
    assert got == frames
    ring.close()
    ring.unlink()


def test_buffers_other_than_bytes_are_sent_without_conversion(prefix):
    ring = Ring.create(prefix + "r", 1 << 16)
    ids = np.arange(1000, dtype=np.int32)
    ring.send(ids)  # a 4000-byte int32 buffer
    ring.send(memoryview(bytearray(b"abc")))
    ring.send(ids[::2].copy().data)
    assert np.array_equal(np.frombuffer(ring.recv(timeout=1), dtype=np.int32), ids)
    assert ring.recv(timeout=1) == b"abc"
    assert np.array_equal(np.frombuffer(ring.recv(timeout=1), dtype=np.int32), ids[::2])
    with pytest.raises(ValueError, match="contiguous"):
        ring.send(ids[::2])
    ring.close()
    ring.unlink()


def test_send_many_delivers_every_frame_in_order(prefix):
    ring = Ring.create(prefix + "r", 4096)
    frames = [frame_of(i, i * 37 % 3000) for i in range(200)]
    sender = threading.Thread(target=ring.send_many, args=(frames,), kwargs={"timeout": 10})
    sender.start()
    got = [ring.recv(timeout=10) for _ in frames]
    sender.join()
    assert got == frames
    ring.close()
    ring.unlink()


def test_recv_view_reads_in_place_and_holds_the_space_until_the_next_read(prefix):
    ring = Ring.create(prefix + "r", 16384)
    ring.send(b"a" * 8000)
    view = ring.recv_view(timeout=1)
    assert isinstance(view, memoryview) and view.readonly and view == b"a" * 8000
    ring.send(b"b" * 8000, timeout=0)
    with pytest.raises(RingTimeout):
        ring.send(b"c" * 8000, timeout=0.05)  # needs the space the view holds
    ring.release_view()
    ring.send(b"c" * 8000, timeout=0)
    view.release()
    assert ring.recv(timeout=1) == b"b" * 8000
    wrapped = ring.recv_view(timeout=1)  # c starts at 16016 of 16384: it wraps, so it is copied
    assert type(wrapped) is bytes and wrapped == b"c" * 8000
    ring.send(b"small")
    small = ring.recv_view(timeout=1)  # small frames are copied too: cheaper than a view
    assert type(small) is bytes and small == b"small"
    ring.close()
    ring.unlink()


def test_a_writer_waiting_on_space_held_by_a_view_is_woken_by_the_next_read(prefix):
    ring = Ring.create(prefix + "r", 16384)
    ring.send(b"a" * 8000)
    view = ring.recv_view(timeout=1)
    sender = threading.Thread(target=lambda: [ring.send(b"b" * 8000, timeout=5), ring.send(b"c" * 8000, timeout=5)])
    sender.start()
    assert ring.recv_view(timeout=5) == b"b" * 8000
    assert ring.recv(timeout=5) == b"c" * 8000  # the writer needed the first view's space
    sender.join(5)
    view.release()
    ring.close()
    ring.unlink()


# ------------------------------------------------------------------------------------ blocking


def test_full_ring_blocks_the_writer_until_the_reader_frees_space(prefix):
    ring = Ring.create(prefix + "r", 4096)
    frames = [frame_of(i, 1000) for i in range(20)]  # 20 KB through a 4 KiB ring
    done = threading.Event()

    def send_all():
        for f in frames:
            ring.send(f)
        done.set()

    sender = threading.Thread(target=send_all)
    sender.start()
    assert not done.wait(0.3), "writer should be blocked on a full ring"
    got = [ring.recv(timeout=5) for _ in frames]
    assert done.wait(5)
    sender.join()
    assert got == frames
    ring.close()
    ring.unlink()


def test_draining_a_full_ring_wakes_the_writer_per_quarter_ring_not_per_frame(prefix):
    writer = Ring.create(prefix + "r", 4096)
    reader = Ring.attach(prefix + "r")
    wakes = []
    real_wake = reader._futex.wake
    reader._futex.wake = lambda addr, n=1: wakes.append(addr) or real_wake(addr, n)
    frames = [frame_of(i, 56) for i in range(2000)]  # 64-byte records, 128 KB through 4 KiB
    sender = threading.Thread(target=lambda: [writer.send(f, timeout=10) for f in frames])
    sender.start()
    time.sleep(0.2)  # the writer fills the ring and parks
    got = [reader.recv(timeout=10) for _ in frames]
    sender.join(10)
    assert got == frames
    assert len(wakes) <= 2000 // 16 + 20, f"{len(wakes)} wake-ups for 2000 frames"
    reader.close()
    writer.close()
    writer.unlink()


def test_send_timeout_raises_ring_timeout_and_loses_nothing(prefix):
    ring = Ring.create(prefix + "r", 4096)
    ring.send(b"a" * 2000)
    ring.send(b"b" * 2000)
    start = time.monotonic()
    with pytest.raises(RingTimeout, match=prefix + "r"):
        ring.send(b"c" * 2000, timeout=0.1)
    assert 0.09 <= time.monotonic() - start < 2
    assert ring.recv(timeout=1) == b"a" * 2000
    ring.send(b"c" * 2000, timeout=0.1)
    assert ring.recv(timeout=1) == b"b" * 2000
    assert ring.recv(timeout=1) == b"c" * 2000
    ring.close()
    ring.unlink()


def test_recv_timeout_returns_none(prefix):
    ring = Ring.create(prefix + "r", 4096)
    start = time.monotonic()
    assert ring.recv(timeout=0.1) is None
    assert 0.09 <= time.monotonic() - start < 2
    assert ring.recv(timeout=0) is None
    assert ring.try_recv() is None
    ring.close()
    ring.unlink()


def test_a_thread_parked_in_recv_does_not_hold_the_gil(prefix):
    ring = Ring.create(prefix + "r", 4096)
    received = []
    reader = threading.Thread(target=lambda: received.append(ring.recv(timeout=10)))
    reader.start()
    time.sleep(0.05)  # the reader has parked on the futex
    count, end = 0, time.monotonic() + 0.2
    while time.monotonic() < end:
        count += 1
    ring.send(b"wake")
    reader.join(5)
    assert received == [b"wake"]
    assert count > 10_000, f"main thread starved while the reader waited ({count} iterations)"
    ring.close()
    ring.unlink()


# ------------------------------------------------------------------------------------ broadcast


def test_broadcast_slow_reader_makes_the_writer_wait_and_nobody_loses_a_frame(prefix):
    name = prefix + "b"
    writer = BroadcastRing.create(name, 4096, n_readers=3)
    readers = [BroadcastRing.attach(name, i) for i in range(3)]
    frames = [frame_of(i, (i * 131) % 2500) for i in range(150)]
    results: list[list[bytes]] = [[] for _ in readers]

    def read(index: int):
        for _ in frames:
            results[index].append(readers[index].recv(timeout=10))
            if index == 2:
                time.sleep(0.001)  # the slow one

    threads = [threading.Thread(target=read, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    start = time.monotonic()
    for f in frames:
        writer.send(f, timeout=10)
    elapsed = time.monotonic() - start
    for t in threads:
        t.join(10)
    assert all(r == frames for r in results)
    # 150 frames of ~1.2 KB through 4 KiB: the writer must have waited for the slow reader.
    assert elapsed > 0.05
    for r in readers:
        r.close()
    writer.close()
    writer.unlink()


def test_broadcast_streams_large_frames_to_every_reader(prefix):
    name = prefix + "b"
    writer = BroadcastRing.create(name, 8192, n_readers=2)
    readers = [BroadcastRing.attach(name, i) for i in range(2)]
    big = os.urandom(300_000)
    results = [None, None]
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, readers[i].recv(timeout=10)))
               for i in range(2)]
    for t in threads:
        t.start()
    writer.send(big, timeout=10)
    for t in threads:
        t.join(10)
    assert results == [big, big]
    for r in readers:
        r.close()
    writer.close()
    writer.unlink()


# ------------------------------------------------------------------------------------ bad input


def test_bad_arguments_get_errors_naming_the_field(prefix):
    with pytest.raises(ValueError, match="capacity_bytes"):
        Ring.create(prefix + "r", 0)
    with pytest.raises(ValueError, match="capacity_bytes"):
        Ring.create(prefix + "r", "big")
    with pytest.raises(SegmentError, match="name"):
        Ring.create("bad/name", 4096)
    with pytest.raises(ValueError, match="n_readers"):
        BroadcastRing.create(prefix + "b", 4096, n_readers=0)
    with pytest.raises(SegmentError, match="does not exist"):
        Ring.attach(prefix + "missing")
    ring = Ring.create(prefix + "r", 4096)
    with pytest.raises(SegmentError, match="already exists"):
        Ring.create(prefix + "r", 4096)
    with pytest.raises(TypeError, match="bytes-like"):
        ring.send("text")
    with pytest.raises(TypeError, match="timeout"):
        ring.recv(timeout="soon")
    ring.send(b"x" * 3000)
    with pytest.raises(TypeError, match="timeout"):
        ring.send(b"x" * 3000, timeout="soon")
    other = Ring.attach(prefix + "r")
    with pytest.raises(SegmentError, match="creator"):
        other.unlink()
    other.close()
    other.close()  # idempotent
    broadcast = BroadcastRing.create(prefix + "b", 4096, n_readers=2)
    with pytest.raises(SegmentError, match="BroadcastRing"):
        Ring.attach(prefix + "b")
    with pytest.raises(ValueError, match="reader_index"):
        BroadcastRing.attach(prefix + "b", 2)
    with open(f"/dev/shm/{prefix}junk", "wb") as f:
        f.write(b"\0" * 8192)
    with pytest.raises(SegmentError, match="not a ring"):
        Ring.attach(prefix + "junk")
    for r in (ring, broadcast):
        r.close()
        r.unlink()


def test_segment_is_private_to_its_user(prefix):
    ring = Ring.create(prefix + "r", 4096)
    assert os.stat(f"/dev/shm/{prefix}r").st_mode & 0o777 == 0o600
    ring.close()
    ring.unlink()
    assert not os.path.exists(f"/dev/shm/{prefix}r")


def test_unlinked_ring_keeps_working_for_mapped_users(prefix):
    ring = Ring.create(prefix + "r", 4096)
    peer = Ring.attach(prefix + "r")
    ring.unlink()
    ring.send(b"still here")
    assert peer.recv(timeout=1) == b"still here"
    peer.close()
    ring.close()


# ------------------------------------------------------------------------------------ codec


def test_messages_survive_the_ring_and_garbage_raises_a_typed_decode_error(prefix):
    decoder = msgspec.msgpack.Decoder(IngressToScheduler)  # what an actor's Channel decodes with
    ring = Ring.create(prefix + "r", 1 << 16)
    msg = GenerateRequest(rid="r1", input_ids=list(range(20_000)), sampling=SamplingParams(max_new_tokens=3))
    ring.send(msgspec.msgpack.encode(msg))
    assert decoder.decode(ring.recv(timeout=1)) == msg
    for garbage in (b"", b"\xc1", b"\x93\x01\x02", msgspec.msgpack.encode(msg)[:-5], b"\x81\xa4type\xa4nope"):
        with pytest.raises(msgspec.DecodeError):
            decoder.decode(garbage)
    ring.close()
    ring.unlink()


@settings(max_examples=200, deadline=None)
@given(garbage=st.binary(max_size=64))
def test_random_bytes_decode_or_raise_decode_error(garbage):
    try:
        msgspec.msgpack.Decoder(IngressToScheduler).decode(garbage)
    except msgspec.DecodeError:
        pass


def test_a_stream_cut_by_a_timeout_is_cancelled_not_delivered(prefix):
    ring = Ring.create(prefix + "r", 4096)
    ring.send(b"first" * 300)  # 1500 bytes, leaves ~2.5 KiB free
    with pytest.raises(RingTimeout):
        ring.send(b"S" * 10_000, timeout=0.05)  # streams ~2.5 KiB of it, then times out
    assert ring.recv(timeout=1) == b"first" * 300
    assert ring.try_recv() is None  # the reader holds part of the stream, never returns it
    ring.send(b"next", timeout=1)  # cancels the cut stream first
    assert ring.recv(timeout=1) == b"next"
    assert ring.try_recv() is None
    ring.close()
    ring.unlink()


def test_attaching_a_truncated_or_foreign_segment_is_refused(prefix):
    for size in (8, 4096, 20000):
        with open(f"/dev/shm/{prefix}bad{size}", "wb") as f:
            f.write(b"\x07" * size)
        with pytest.raises(SegmentError, match="not a ring"):
            Ring.attach(f"{prefix}bad{size}")
        os.unlink(f"/dev/shm/{prefix}bad{size}")
    ring = Ring.create(prefix + "r", 1 << 16)
    os.truncate(f"/dev/shm/{prefix}r", 8192)  # header intact, data area cut off
    with pytest.raises(SegmentError, match="inconsistent"):
        Ring.attach(prefix + "r")
    ring.close()
    ring.unlink()


# ------------------------------------------------------------------------------------ waiter


def test_waiter_covers_a_broadcast_reader_and_rotates_its_ready_list(prefix):
    ring = Ring.create(prefix + "r", 4096)
    plans = BroadcastRing.create(prefix + "b", 4096, n_readers=2)
    reader1 = BroadcastRing.attach(prefix + "b", 1)
    reader0 = BroadcastRing.attach(prefix + "b", 0)
    waiter = Waiter([ring, reader1])
    timer = threading.Timer(0.2, plans.send, args=(b"plan",))
    timer.start()
    start = time.monotonic()
    assert waiter.wait(timeout=5) == [reader1]  # parked on the ring's word, rung by the broadcast
    assert 0.15 < time.monotonic() - start < 4
    assert reader1.try_recv() == b"plan" and reader0.try_recv() == b"plan"
    ring.send(b"x")
    plans.send(b"y")
    orders = {tuple(r.name for r in waiter.wait(timeout=1)) for _ in range(4)}
    assert orders == {(ring.name, reader1.name), (reader1.name, ring.name)}  # fair start
    waiter.close()
    plans.send(b"z")
    assert [reader1.recv(timeout=1) for _ in range(2)] == [b"y", b"z"]  # own park word again
    timer.join()
    for r in (reader0, reader1, ring, plans):
        r.close()
    ring.unlink()
    plans.unlink()


def test_waiter_interrupt_wakes_a_waiting_thread(prefix):
    rings = [Ring.create(prefix + "a", 4096), Ring.create(prefix + "b", 4096)]
    waiter = Waiter(rings)
    result = []
    thread = threading.Thread(target=lambda: result.append(waiter.wait(timeout=10)))
    thread.start()
    time.sleep(0.1)
    start = time.monotonic()
    waiter.interrupt()
    thread.join(5)
    assert result == [[]] and time.monotonic() - start < 1
    assert waiter.wait(timeout=0.01) == []
    with pytest.raises(ValueError, match="same ring"):
        Waiter([rings[0], rings[0]])
    with pytest.raises(ValueError, match="at least one"):
        Waiter([])
    waiter.close()
    for r in rings:
        r.close()
        r.unlink()


def test_a_new_ring_takes_no_page_faults_on_its_first_pass():
    """Ring segments are mapped with MAP_POPULATE: the first pass over a fresh 4 MiB ring would otherwise fault in
    every 4 KiB page in the writer and again in the reader (the cold-ring cost of the first mid-size frames)."""
    import resource

    name = run_prefix() + "populated"
    writer = Ring.create(name, 4 << 20)
    reader = Ring.attach(name)
    frame = os.urandom(64 * 1024)
    try:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(48):  # 3 MiB: most of the data area
            writer.send(frame)
            assert reader.try_recv() == frame
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    finally:
        reader.close()
        writer.close()
        writer.unlink()
    assert faults < 200, f"{faults} page faults on the first pass (a cold ring takes several hundred)"
