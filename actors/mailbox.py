"""Mailbox: an actor's inbound channels, read fairly, blocking without burning CPU when idle."""

from __future__ import annotations

import time
from typing import Any

from actors.channel import Channel
from shm import Waiter


class Mailbox:
    """Round-robin over several channels: after a message from channel i, channel i+1 is tried
    first, so a busy channel cannot starve a quiet one (e.g. Shutdown on the control channel).
    An empty mailbox parks in shm's Waiter (a futex wait) until any of its rings has a frame."""

    def __init__(self, channels: list[Channel]):
        if not channels:
            raise ValueError("a mailbox needs at least one channel")
        self.channels = channels
        self._waiter = Waiter([c.ring for c in channels]) if len(channels) > 1 else None
        self._next = 0

    def try_get(self) -> Any | None:
        n = len(self.channels)
        for k in range(n):
            i = (self._next + k) % n
            msg = self.channels[i].try_get()
            if msg is not None:
                self._next = (i + 1) % n
                return msg
        return None

    def get(self, timeout: float | None = None) -> Any | None:
        """The next message, or None after `timeout` seconds (None: wait for ever)."""
        if self._waiter is None:
            return self.channels[0].get(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            msg = self.try_get()
            if msg is not None:
                return msg
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return None
            self._waiter.wait(remaining)

    def drain(self, max_messages: int) -> list[Any]:
        """Up to `max_messages` messages that are already there, without waiting."""
        out: list[Any] = []
        while len(out) < max_messages:
            msg = self.try_get()
            if msg is None:
                break
            out.append(msg)
        return out

    def close(self) -> None:
        if self._waiter is not None:
            self._waiter.close()
        for channel in self.channels:
            channel.close()
