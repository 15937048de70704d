"""`Heartbeats`: one shared-memory page where each actor of a run publishes that it is alive.

Every actor owns one named slot and writes only its own: `beat()` stores the current
CLOCK_MONOTONIC time (the same clock in every process of the machine), and `set_busy(tag, since)`
says that work handed to another process (a batch on the workers) has been waiting since
`since`. A reader (the HTTP ingress answering /health) sees each slot's age without asking the
actor anything, so a frozen actor (SIGSTOP, a deadlock) cannot make it wait.

Layout: magic u64 | slot count u64 | then 64-byte slots: beat ns u64, busy since ns u64 (0: not
busy), busy tag u64, name (up to 40 bytes UTF-8, NUL padded). Aligned 8-byte stores and loads
do not tear, so no lock is needed.
"""

from __future__ import annotations

import time

import msgspec

from shm.segment import SegmentError, attach_segment, create_segment

MAGIC = int.from_bytes(b"RTBEATS1", "little")
HEADER_BYTES = 64
SLOT_BYTES = 64
NAME_OFFSET = 24
MAX_NAME_BYTES = SLOT_BYTES - NAME_OFFSET


class SlotState(msgspec.Struct, frozen=True):
    name: str
    beat_age_s: float | None  # None: never beat yet
    busy_for_s: float | None  # None: not busy
    busy_tag: int


class Heartbeats:
    def __init__(self, name: str, mm, owner: bool):
        self.name = name
        self.owner = owner
        self._mm = mm
        self._q = memoryview(mm).cast("Q")
        if self._q[0] != MAGIC:
            self.close()
            raise SegmentError(f"{name!r} is not a heartbeat segment")
        count = self._q[1]
        self.slots: dict[str, int] = {}
        for i in range(count):
            base = HEADER_BYTES + i * SLOT_BYTES
            raw = bytes(mm[base + NAME_OFFSET: base + SLOT_BYTES]).rstrip(b"\0")
            self.slots[raw.decode()] = base // 8

    @classmethod
    def create(cls, name: str, slot_names: list[str]) -> Heartbeats:
        """The owner (the launcher) creates the segment with one slot per actor name."""
        if len(set(slot_names)) != len(slot_names):
            raise ValueError(f"heartbeat slot names must be distinct: {slot_names}")
        mm = create_segment(name, HEADER_BYTES + SLOT_BYTES * max(1, len(slot_names)))
        for i, slot in enumerate(slot_names):
            encoded = slot.encode()
            if not 0 < len(encoded) <= MAX_NAME_BYTES:
                mm.close()
                raise ValueError(f"heartbeat slot name {slot!r}: 1-{MAX_NAME_BYTES} bytes")
            base = HEADER_BYTES + i * SLOT_BYTES + NAME_OFFSET
            mm[base: base + len(encoded)] = encoded
        q = memoryview(mm).cast("Q")
        q[1] = len(slot_names)
        q[0] = MAGIC  # last: a reader never sees a half-made segment
        q.release()
        return cls(name, mm, owner=True)

    @classmethod
    def attach(cls, name: str) -> Heartbeats:
        return cls(name, attach_segment(name), owner=False)

    def _index(self, slot: str) -> int:
        try:
            return self.slots[slot]
        except KeyError:
            raise KeyError(f"heartbeat segment {self.name!r} has no slot {slot!r} (has: {sorted(self.slots)})") \
                from None

    def beat(self, slot: str) -> None:
        self._q[self._index(slot)] = time.monotonic_ns()

    def set_busy(self, slot: str, tag: int, since_ns: int) -> None:
        """Work `tag` has waited since `since_ns` (time.monotonic_ns()); since_ns 0: nothing waits."""
        i = self._index(slot)
        self._q[i + 2] = tag
        self._q[i + 1] = since_ns

    def read(self) -> list[SlotState]:
        now = time.monotonic_ns()
        out = []
        for slot, i in self.slots.items():
            beat, busy = self._q[i], self._q[i + 1]
            out.append(SlotState(slot, None if beat == 0 else max(0, now - beat) / 1e9,
                                 None if busy == 0 else max(0, now - busy) / 1e9, self._q[i + 2]))
        return out

    def close(self) -> None:
        self._q.release()
        self._mm.close()


class Heartbeat:
    """One actor's end: its slot in a run's Heartbeats."""

    def __init__(self, segment: str, slot: str):
        self.beats = Heartbeats.attach(segment)
        self.slot = slot
        self._index = self.beats._index(slot)
        self.beat()

    def beat(self) -> None:
        self.beats._q[self._index] = time.monotonic_ns()

    def set_busy(self, tag: int, since_ns: int) -> None:
        self.beats.set_busy(self.slot, tag, since_ns)

    def close(self) -> None:
        self.beats.close()
