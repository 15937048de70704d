"""Rings across real processes: random frames, a producer SIGKILLed mid-write, a slow broadcast
reader, and an idle reader's CPU use."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
import uuid
import zlib
from pathlib import Path

import psutil
import pytest

from shm import BroadcastRing, Ring, Waiter, run_prefix, sweep

REPO = Path(__file__).resolve().parents[2]

# A child writes frames described by a seed: frame k has size sizes[k] and is filled with a pattern
# that encodes (k, size), so the reader can check every byte without the child telling it.
CHILD_COMMON = """
import random, sys, time
from shm import Ring, BroadcastRing
def frame(k, size):
    unit = k.to_bytes(4, 'little') + size.to_bytes(4, 'little')
    return (unit * (size // 8 + 1))[:size]
def sizes(seed, count, top):
    rnd = random.Random(seed)
    return [rnd.choice([rnd.randrange(0, 64), rnd.randrange(0, 4096), rnd.randrange(0, top)]) for _ in range(count)]
"""


def frame(k: int, size: int) -> bytes:
    unit = k.to_bytes(4, "little") + size.to_bytes(4, "little")
    return (unit * (size // 8 + 1))[:size]


def spawn(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD_COMMON + code, *args], cwd=REPO)


def child_sizes(seed: int, count: int, top: int) -> list[int]:
    namespace: dict = {}
    exec(CHILD_COMMON.replace("from shm import Ring, BroadcastRing", ""), namespace)
    return namespace["sizes"](seed, count, top)


@pytest.fixture
def prefix():
    p = f"{run_prefix()}shm{uuid.uuid4().hex[:6]}_"
    yield p
    sweep(p)


def test_random_frames_across_processes(prefix):
    """Random sizes, from empty to 6x the ring, through a 16 KiB ring from another process."""
    ring = Ring.create(prefix + "r", 16384)
    seed, count = 1234, 400
    child = spawn(
        "ring = Ring.attach(sys.argv[1])\n"
        "for k, n in enumerate(sizes(int(sys.argv[2]), int(sys.argv[3]), 100_000)):\n"
        "    ring.send(frame(k, n), timeout=20)\n",
        prefix + "r", str(seed), str(count),
    )
    try:
        for k, n in enumerate(child_sizes(seed, count, 100_000)):
            got = ring.recv(timeout=20)
            assert got is not None, f"frame {k} never came"
            assert len(got) == n and got == frame(k, n), f"frame {k} damaged"
        assert child.wait(20) == 0
        assert ring.recv(timeout=0.05) is None
    finally:
        child.kill()
        child.wait()
        ring.close()
        ring.unlink()


def test_producer_killed_mid_write_leaves_only_whole_frames(prefix):
    """The child sends big frames back to back (whole ones of 1 MiB and streamed ones of 6 MiB
    through a 4 MiB ring), so SIGKILL lands inside a copy. The reader gets intact frames numbered
    0, 1, 2, ... then times out cleanly; a new writer cancels any half stream and is heard."""
    ring = Ring.create(prefix + "r", 4 << 20)
    child = spawn(
        "ring = Ring.attach(sys.argv[1])\n"
        "k = 0\n"
        "while True:\n"
        "    ring.send(frame(k, (1 << 20) if k % 3 else (6 << 20) + k))\n"
        "    k += 1\n",
        prefix + "r",
    )
    received = 0
    flowing = threading.Event()

    def kill_when_flowing():
        if flowing.wait(60):
            time.sleep(0.2)  # a few more frames, then die wherever the child is
        child.send_signal(signal.SIGKILL)

    killer = threading.Thread(target=kill_when_flowing, daemon=True)
    killer.start()
    try:
        while True:
            got = ring.recv(timeout=1.5 if flowing.is_set() else 30)
            if got is None:
                break
            size = (1 << 20) if received % 3 else (6 << 20) + received
            assert len(got) == size and got == frame(received, size), f"frame {received} torn"
            received += 1
            if received == 3:
                flowing.set()
        assert child.wait(5) == -signal.SIGKILL
        assert received >= 3, "the child should have sent a few frames before it died"

        # A restarted producer: a half-written stream (if the kill hit one) is cancelled.
        successor = spawn("Ring.attach(sys.argv[1]).send(b'successor', timeout=5)\n", prefix + "r")
        assert successor.wait(20) == 0
        assert ring.recv(timeout=5) == b"successor"
    finally:
        flowing.set()
        child.kill()
        child.wait()
        ring.close()
        ring.unlink()


def test_broadcast_across_processes_with_a_slow_reader(prefix):
    name = prefix + "b"
    n_readers, count = 3, 120
    writer = BroadcastRing.create(name, 8192, n_readers)
    results = [Ring.create(f"{prefix}res{i}", 4096) for i in range(n_readers)]
    readers = [
        spawn(
            "r = BroadcastRing.attach(sys.argv[1], int(sys.argv[2]))\n"
            "import zlib\n"
            "crc, n = 0, 0\n"
            "while (data := r.recv(timeout=20)) != b'end':\n"
            "    crc, n = zlib.crc32(data, crc), n + 1\n"
            "    if sys.argv[2] == '0': time.sleep(0.002)\n"
            "Ring.attach(sys.argv[3]).send(f'{n} {crc}'.encode())\n",
            name, str(i), f"{prefix}res{i}",
        )
        for i in range(n_readers)
    ]
    try:
        crc = 0
        for k, n in enumerate(child_sizes(7, count, 20_000)):
            data = frame(k, n)
            crc = zlib.crc32(data, crc)
            writer.send(data, timeout=20)
        writer.send(b"end", timeout=20)
        for i in range(n_readers):
            assert results[i].recv(timeout=20) == f"{count} {crc}".encode(), f"reader {i} lost or reordered frames"
            assert readers[i].wait(10) == 0
    finally:
        for p in readers:
            p.kill()
            p.wait()
        for r in [writer, *results]:
            r.close()
            r.unlink()


def test_idle_reader_uses_no_cpu_and_wakes_on_a_frame(prefix):
    """Five parked readers (an actor's worth of processes on a 2-core machine) must not burn a core."""
    rings = [Ring.create(f"{prefix}idle{i}", 4096) for i in range(5)]
    replies = [Ring.create(f"{prefix}reply{i}", 4096) for i in range(5)]
    children = [
        spawn(
            "inbox, reply = Ring.attach(sys.argv[1]), Ring.attach(sys.argv[2])\n"
            "reply.send(b'parking')\n"
            "reply.send(inbox.recv())\n",
            f"{prefix}idle{i}", f"{prefix}reply{i}",
        )
        for i in range(5)
    ]
    try:
        for reply in replies:
            assert reply.recv(timeout=30) == b"parking"
        time.sleep(0.1)  # well past the spin phase
        procs = [psutil.Process(c.pid) for c in children]
        before = [p.cpu_times() for p in procs]
        time.sleep(1.0)
        after = [p.cpu_times() for p in procs]
        used = [a.user + a.system - b.user - b.system for a, b in zip(after, before)]
        assert max(used) <= 0.02, f"idle readers used CPU seconds per second: {used}"
        for i, ring in enumerate(rings):
            ring.send(f"wake {i}".encode())
        for i, reply in enumerate(replies):
            assert reply.recv(timeout=10) == f"wake {i}".encode()
        for c in children:
            assert c.wait(10) == 0
    finally:
        for c in children:
            c.kill()
            c.wait()
        for r in [*rings, *replies]:
            r.close()
            r.unlink()


def test_waiter_wakes_for_a_frame_on_any_ring_from_other_processes(prefix):
    rings = [Ring.create(f"{prefix}mb{i}", 4096) for i in range(3)]
    waiter = Waiter(rings)
    try:
        for target in (2, 0, 1, 2):
            child = spawn("time.sleep(0.3); Ring.attach(sys.argv[1]).send(b'ping')\n", f"{prefix}mb{target}")
            start = time.monotonic()
            ready = waiter.wait(timeout=10)
            assert ready == [rings[target]], f"expected ring {target} ready, got {ready}"
            assert time.monotonic() - start < 5
            assert rings[target].try_recv() == b"ping"
            assert child.wait(10) == 0
        assert waiter.wait(timeout=0.05) == []
    finally:
        waiter.close()
        for r in rings:
            r.close()
            r.unlink()
