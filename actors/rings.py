"""RingSpec -> shm ring objects: created by the supervisor (the owner), attached by actors."""

from __future__ import annotations

from typing import Any

from actors.spec import ChannelSpec, RingSpec
from shm import BroadcastRing, Ring


def create_ring(spec: RingSpec) -> Any:
    if spec.n_readers:
        return BroadcastRing.create(spec.segment, spec.capacity, spec.n_readers)
    return Ring.create(spec.segment, spec.capacity)


def attach_reader(spec: ChannelSpec) -> Any:
    if spec.ring.n_readers:
        if not 0 <= spec.reader_index < spec.ring.n_readers:
            raise ValueError(
                f"channel {spec.name!r}: reader_index {spec.reader_index} is outside 0..{spec.ring.n_readers - 1}"
            )
        return BroadcastRing.attach(spec.ring.segment, spec.reader_index)
    return Ring.attach(spec.ring.segment)


def attach_writer(spec: ChannelSpec) -> Any:
    if spec.ring.n_readers:
        return BroadcastRing.attach(spec.ring.segment, 0)  # any reader index; this end only sends
    return Ring.attach(spec.ring.segment)
