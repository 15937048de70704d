"""Channel: one shared-memory ring plus a msgspec msgpack codec for one message union."""

from __future__ import annotations

import types
import typing
from typing import Any, Generic, TypeVar

import msgspec

T = TypeVar("T")


class ChannelDecodeError(Exception):
    """A frame on a channel did not decode as the channel's message union (a bug, never user input)."""

    def __init__(self, channel: str, message_type: str, cause: Exception, size: int):
        super().__init__(f"channel {channel!r}: a {size}-byte frame is not a valid {message_type}: {cause}")
        self.channel = channel


def union_members(message_type: Any) -> tuple[type, ...]:
    if typing.get_origin(message_type) in (typing.Union, types.UnionType):
        return typing.get_args(message_type)
    return (message_type,)


class Channel(Generic[T]):
    """Typed end of a ring. `ring` is anything with send/recv/try_recv (Ring, a BroadcastRing end).

    put() refuses a message outside the union (TypeError naming the channel) instead of letting the
    receiver fail to decode it; get() returns None on timeout; a bad frame raises ChannelDecodeError.
    """

    def __init__(self, name: str, ring: Any, message_type: Any):
        self.name = name
        self.ring = ring
        self.members = union_members(message_type)
        self.type_name = " | ".join(m.__name__ for m in self.members)
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(message_type)

    def put(self, msg: T, timeout: float | None = None) -> None:
        if type(msg) not in self.members:
            raise TypeError(f"channel {self.name!r} carries {self.type_name}, not {type(msg).__name__}")
        self.ring.send(self._encoder.encode(msg), timeout)

    def get(self, timeout: float | None = None) -> T | None:
        data = self.ring.recv(timeout)
        return None if data is None else self.decode(data)

    def try_get(self) -> T | None:
        data = self.ring.try_recv()
        return None if data is None else self.decode(data)

    def decode(self, data: bytes | memoryview) -> T:
        try:
            return self._decoder.decode(data)
        except msgspec.DecodeError as e:  # ValidationError is a DecodeError too
            raise ChannelDecodeError(self.name, self.type_name, e, len(data)) from e

    def close(self) -> None:
        self.ring.close()

    def __repr__(self) -> str:
        return f"Channel({self.name!r}, {self.type_name})"
