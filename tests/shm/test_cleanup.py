"""Segment lifecycle: run prefixes, sweep of one run, sweep of dead runs, nothing left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from shm import BroadcastRing, Ring, SegmentError, Waiter, list_segments, run_prefix, segment_name, sweep, sweep_stale

REPO = Path(__file__).resolve().parents[2]


def test_run_prefix_and_segment_names():
    assert run_prefix(4242) == "rt4242_"
    assert run_prefix() == f"rt{os.getpid()}_"
    assert segment_name("rt4242_", "sched", "in") == "rt4242_sched.in"
    with pytest.raises(SegmentError, match="name"):
        segment_name("rt4242_", "bad/part")


def test_sweep_removes_one_run_and_nothing_else():
    mine = f"{run_prefix()}shm{uuid.uuid4().hex[:6]}_"
    other = f"{run_prefix()}shm{uuid.uuid4().hex[:6]}_"
    rings = [Ring.create(mine + "a", 4096), BroadcastRing.create(mine + "b", 4096, 2), Ring.create(other + "a", 4096)]
    try:
        assert sorted(sweep(mine)) == [mine + "a", mine + "b"]
        assert list_segments(mine) == []
        assert list_segments(other) == [other + "a"]
        assert sweep(mine) == []
    finally:
        for r in rings:
            r.close()
        sweep(other)
    assert list_segments(other) == []


@pytest.mark.parametrize("prefix", ["", "rt", "rt_", "foo", "rtx1_", "/dev/shm/rt1_"])
def test_sweep_refuses_anything_but_a_run_prefix(prefix):
    with pytest.raises(SegmentError, match="run prefix"):
        sweep(prefix)


def test_sweep_stale_removes_the_segments_of_a_sigkilled_launcher():
    """A stand-in launcher creates its run's rings (and a Waiter doorbell) and is SIGKILLed: its
    segments outlive it until sweep_stale(); segments of live runs (ours) stay."""
    code = (
        "import sys\n"
        "from shm import Ring, BroadcastRing, Waiter, run_prefix\n"
        "p = run_prefix()\n"
        "rings = [Ring.create(p + 'in', 4096), Ring.create(p + 'ctl', 4096),"
        " BroadcastRing.create(p + 'plan', 4096, 2)]\n"
        "waiter = Waiter(rings[:2])\n"
        "print('ready', flush=True)\n"
        "sys.stdin.read()\n"
    )
    launcher = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    ours = Ring.create(f"{run_prefix()}shm{uuid.uuid4().hex[:6]}_live", 4096)
    try:
        assert launcher.stdout.readline() == b"ready\n"
        dead_prefix = run_prefix(launcher.pid)
        assert len(list_segments(dead_prefix)) == 3
        launcher.send_signal(signal.SIGKILL)
        launcher.wait(10)
        assert len(list_segments(dead_prefix)) == 3  # the kernel does not clean /dev/shm
        removed = sweep_stale()
        assert sorted(n for n in removed if n.startswith(dead_prefix)) == sorted(
            dead_prefix + s for s in ("in", "ctl", "plan")
        )
        assert list_segments(dead_prefix) == []
        assert os.path.exists(f"/dev/shm/{ours.name}")
    finally:
        launcher.kill()
        launcher.wait()
        ours.close()
        ours.unlink()


def test_waiter_close_and_unlinked_home_ring_do_not_break_writers():
    p = f"{run_prefix()}shm{uuid.uuid4().hex[:6]}_"
    home, other = Ring.create(p + "home", 4096), Ring.create(p + "other", 4096)
    writer = Ring.attach(p + "other")
    waiter = Waiter([home, other])
    assert waiter.wait(timeout=0.01) == []
    home.close()
    home.unlink()  # the doorbell's segment is gone: writers of `other` must not fail
    other._i[other._rpark_i] = 1  # as if a wait were in progress: the writer rings the doorbell
    writer.send(b"x")
    assert other.recv(timeout=1) == b"x"
    waiter.close()
    writer.close()
    other.close()
    other.unlink()
    assert list_segments(p) == []


def test_this_process_left_no_segments_of_its_own_shm_tests():
    """Runs after the shm tests collected before it; each of them unlinks what it made."""
    assert list_segments(run_prefix() + "shm") == []
