"""shm.Heartbeats: slots by name, ages and busy times read by another handle of the segment."""

from __future__ import annotations

import time

import pytest

from shm import Heartbeat, Heartbeats, SegmentError, run_prefix, segment_name
from shm.segment import create_segment, unlink_segment


@pytest.fixture
def segment():
    name = segment_name(run_prefix(), f"beats{time.monotonic_ns()}")
    yield name
    unlink_segment(name)


def test_beats_and_busy_times_are_seen_by_a_reader(segment):
    owner = Heartbeats.create(segment, ["scheduler", "worker0"])
    reader = Heartbeats.attach(segment)
    try:
        assert [(s.name, s.beat_age_s, s.busy_for_s) for s in reader.read()] == [("scheduler", None, None),
                                                                                  ("worker0", None, None)]
        beat = Heartbeat(segment, "worker0")  # beats once when attached
        time.sleep(0.2)
        beat.set_busy(7, time.monotonic_ns() - 3_000_000_000)
        worker = {s.name: s for s in reader.read()}["worker0"]
        assert 0.15 < worker.beat_age_s < 5 and 2.9 < worker.busy_for_s < 10 and worker.busy_tag == 7
        beat.beat()
        beat.set_busy(0, 0)
        worker = {s.name: s for s in reader.read()}["worker0"]
        assert worker.beat_age_s < 0.15 and worker.busy_for_s is None
        with pytest.raises(KeyError, match="no slot 'worker9'"):
            Heartbeat(segment, "worker9")
        beat.close()
    finally:
        reader.close()
        owner.close()


def test_a_segment_that_is_not_a_heartbeat_page_is_refused(segment):
    create_segment(segment, 4096).close()
    with pytest.raises(SegmentError):
        Heartbeats.attach(segment)
