"""Arena: large payloads by handle, zero copy on the reader side, FIFO release, back-pressure."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from pathlib import Path

import msgspec
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shm import Arena, ArenaBlock, ArenaTimeout, Ring, SegmentError, run_prefix, sweep

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def prefix():
    p = f"{run_prefix()}shm{uuid.uuid4().hex[:6]}_"
    yield p
    sweep(p)


def test_reader_sees_the_writers_bytes_without_a_copy(prefix):
    writer = Arena.create(prefix + "a", 1 << 20)
    reader = Arena.attach(prefix + "a")
    embeddings = np.random.default_rng(0).standard_normal((64, 96)).astype(np.float32)
    block = writer.put(embeddings)
    view = reader.view(block)
    shared = np.frombuffer(view, dtype=np.float32).reshape(64, 96)
    assert np.array_equal(shared, embeddings)
    block2, target = writer.alloc(8)
    np.frombuffer(target, dtype=np.int64)[0] = 7
    assert np.frombuffer(reader.view(block2), dtype=np.int64)[0] == 7
    target.release()
    # The reader's array is the shared memory itself: a write through the writer's mapping shows.
    np.frombuffer(writer.view(block), dtype=np.float32)[0] = 123.0
    assert shared[0, 0] == 123.0
    del shared
    view.release()
    reader.release(block2)
    reader.close()
    writer.close()
    writer.unlink()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.one_of(st.integers(0, 5000), st.just(-1)), min_size=1, max_size=80))
def test_random_blocks_wrap_around_and_free_in_order(prefix, ops):
    arena = Arena.create(prefix + "a", 8192)
    try:
        live: deque[tuple[ArenaBlock, bytes]] = deque()
        for seq, op in enumerate(ops):
            if op < 0:
                if live:
                    block, data = live.popleft()
                    view = arena.view(block)
                    assert view == data
                    view.release()
                    arena.release(block)
                continue
            data = bytes([seq % 256]) * op
            try:
                block = arena.put(data, timeout=0)
            except ArenaTimeout:
                continue
            assert block.start % arena.capacity + block.nbytes <= arena.capacity  # contiguous
            live.append((block, data))
        for block, data in live:  # every live block still holds its own bytes
            view = arena.view(block)
            assert view == data
            view.release()
    finally:
        arena.close()
        arena.unlink()


def test_full_arena_blocks_alloc_until_release_and_times_out(prefix):
    arena = Arena.create(prefix + "a", 8192)
    first = arena.put(b"x" * 6000)
    with pytest.raises(ArenaTimeout, match=prefix + "a"):
        arena.put(b"y" * 6000, timeout=0.05)
    result = []
    thread = threading.Thread(target=lambda: result.append(arena.put(b"y" * 6000, timeout=5)))
    thread.start()
    time.sleep(0.1)
    assert result == []  # still waiting
    arena.release(first)
    thread.join(5)
    view = arena.view(result[0])
    assert view == b"y" * 6000
    view.release()
    arena.close()
    arena.unlink()


def test_bad_input_names_the_field(prefix):
    with pytest.raises(ValueError, match="capacity_bytes"):
        Arena.create(prefix + "a", -1)
    arena = Arena.create(prefix + "a", 4096)
    with pytest.raises(ValueError, match="nbytes"):
        arena.alloc(4097)
    with pytest.raises(TypeError, match="ArenaBlock"):
        arena.view((0, 10, 16))
    with pytest.raises(ValueError, match="does not belong"):
        arena.view(ArenaBlock(0, 100, 104))  # never allocated
    ring = Ring.create(prefix + "r", 4096)
    with pytest.raises(SegmentError, match="not an arena"):
        Arena.attach(prefix + "r")
    held = arena.view(arena.put(b"abc"))
    with pytest.raises(BufferError, match="release every block view"):
        arena.close()
    held.release()
    arena.close()
    ring.close()
    for r in (arena, ring):
        r.unlink()


def test_block_handles_travel_in_ring_messages_across_processes(prefix):
    """A child puts 20 images of 1 MiB in the arena and sends their handles over a ring."""
    arena = Arena.create(prefix + "a", 4 << 20)  # room for 4: the child waits for releases
    ring = Ring.create(prefix + "r", 4096)
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, msgspec\n"
         "from shm import Arena, Ring\n"
         "arena, ring = Arena.attach(sys.argv[1]), Ring.attach(sys.argv[2])\n"
         "for k in range(20):\n"
         "    block, view = arena.alloc(1 << 20, timeout=20)\n"
         "    view[:] = bytes([k]) * (1 << 20)\n"
         "    view.release()\n"
         "    ring.send(msgspec.msgpack.encode(block), timeout=20)\n",
         prefix + "a", prefix + "r"],
        cwd=REPO,
    )
    decoder = msgspec.msgpack.Decoder(ArenaBlock)
    try:
        for k in range(20):
            block = decoder.decode(ring.recv(timeout=20))
            view = arena.view(block)
            image = np.frombuffer(view, dtype=np.uint8)
            assert image.shape == (1 << 20,) and image.min() == image.max() == k
            del image
            view.release()
            arena.release(block)
        assert child.wait(20) == 0
    finally:
        child.kill()
        child.wait()
        arena.close()
        ring.close()
        arena.unlink()
        ring.unlink()


def test_can_alloc_says_whether_alloc_would_wait(prefix):
    arena = Arena.create(prefix + "a", 8192)
    try:
        first, view = arena.alloc(5000)
        view.release()
        assert arena.can_alloc(3000) and not arena.can_alloc(3300)
        second, view = arena.alloc(3000)
        view.release()
        assert not arena.can_alloc(1000)  # 192 bytes left at the end: a block of 1000 needs the released start
        arena.release(first)
        assert arena.can_alloc(5000) and not arena.can_alloc(5200)  # skips the tail, waits for nothing up to 5000
        assert not arena.can_alloc(9000)
    finally:
        arena.close()
