"""A launcher process (tests/actors_fixtures.py run as a script) under signals: SIGTERM/SIGINT stop
it gracefully; SIGKILL leaves no orphan actor processes, and sweep_stale() removes its segments."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time

import psutil
import pytest

from shm import list_segments, sweep_stale

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def start_launcher(grace_s: float) -> tuple[subprocess.Popen, dict]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.actors_fixtures", "-", str(grace_s)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    ready, _, _ = select.select([proc.stdout], [], [], 30.0)
    if not ready:
        proc.kill()
        pytest.fail(f"launcher not ready in 30 s; stderr:\n{proc.communicate()[1]}")
    line = proc.stdout.readline()
    if not line:
        pytest.fail(f"launcher exited with {proc.wait()}; stderr:\n{proc.communicate()[1]}")
    return proc, json.loads(line)


def wait_gone(pids, timeout: float = 5.0) -> list[int]:
    """The pids still alive (zombies count as gone) after up to `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.02)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_to_launcher_stops_actors_gracefully(sig):
    proc, started = start_launcher(grace_s=2.0)
    assert started["pinged"] == {"type": "result", "count": 20, "ok": True, "detail": ""}
    assert started["prefix"] == f"rt{proc.pid}_"
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert json.loads(out) == {"exit_codes": {"echo": 0, "pinger": 0}, "status": 0}
    for name in ("echo", "pinger"):  # each actor handled Shutdown in its own loop (its log line)
        assert f"[{name} {started['pids'][name]}] INFO tests.actors_fixtures: got Shutdown(grace_s=2.0)" in err
    assert wait_gone(started["pids"].values()) == []
    assert list_segments(started["prefix"]) == []


def test_sigkill_of_launcher_leaves_no_orphans_and_sweep_stale_cleans_up():
    proc, started = start_launcher(grace_s=2.0)
    children = [p.pid for p in psutil.Process(proc.pid).children()]
    assert sorted(children) == sorted(started["pids"].values())
    assert len(list_segments(started["prefix"])) >= 7  # 3 channels + 2 control rings per actor
    proc.kill()
    proc.communicate(timeout=10)
    assert wait_gone(children) == []  # PR_SET_PDEATHSIG took them down with their parent
    sweep_stale()  # what a later run does (tests running beside us may have swept already)
    assert list_segments(started["prefix"]) == []
