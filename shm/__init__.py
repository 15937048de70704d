"""Shared-memory transport: rings of msgspec frames between actor processes (see ring.py)."""

from shm.arena import Arena, ArenaBlock, ArenaTimeout
from shm.heartbeat import Heartbeat, Heartbeats
from shm.ring import BroadcastRing, Ring, RingTimeout
from shm.segment import SegmentError, list_segments, run_prefix, segment_name, sweep, sweep_stale
from shm.waiter import Waiter

__all__ = [
    "Arena", "ArenaBlock", "ArenaTimeout", "BroadcastRing", "Heartbeat", "Heartbeats", "Ring", "RingTimeout",
    "SegmentError", "Waiter",
    "list_segments", "run_prefix", "segment_name", "sweep", "sweep_stale",
]
