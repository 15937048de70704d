"""`Waiter`: one thread blocks until any of several rings (an actor's mailbox) has data.

The first ring's reader park word becomes the mailbox's doorbell: the Waiter tells the writers of
the other rings (through a doorbell slot in each ring's header) to clear and wake that word as
well as their own, so one futex wait covers every ring. Rings must be read by this process only.
"""

from __future__ import annotations

import time

from shm.ring import _RingSegment
from shm.spin import Spinner, deadline_after


class Waiter:
    def __init__(self, rings: list[_RingSegment], spin_s: float | None = None):
        if not rings:
            raise ValueError("Waiter needs at least one ring")
        if len({id(r) for r in rings}) != len(rings):
            raise ValueError("Waiter got the same ring twice")
        self.rings = list(rings)
        self.spin_s = max(r.spin_s for r in rings) if spin_s is None else spin_s
        self._spinner = Spinner(self.spin_s)
        self._home = self.rings[0]
        self._next = 0  # rotating start for fairness
        self._interrupted = False
        for ring in self.rings[1:]:
            ring._set_doorbell(self._home)

    def close(self) -> None:
        """Give every ring its own park word back (the rings stay open)."""
        for ring in self.rings[1:]:
            if not ring._mm.closed:
                ring._set_doorbell(None)

    def interrupt(self) -> None:
        """Make a wait() in progress (or the next one) return [] now; callable from any thread."""
        self._interrupted = True
        home = self._home
        home._i[home._rpark_i] = 0
        home._futex.wake(home._park_address())

    def ready(self) -> list[_RingSegment]:
        """Rings with unread data, starting one further each call so no ring starves."""
        n = len(self.rings)
        start = self._next
        self._next = (start + 1) % n
        return [ring for k in range(n) if (ring := self.rings[(start + k) % n]).readable()]

    def wait(self, timeout: float | None = None) -> list[_RingSegment]:
        """Block until at least one ring has data (empty list on timeout). Data may be part of a
        chunked frame, so a ready ring's try_recv() can still return None."""
        ready = self.ready()
        if ready or self._consume_interrupt():
            return ready
        deadline = deadline_after(timeout)
        if self._spinner.spin(self._any_readable, deadline):
            return [] if self._consume_interrupt() else self.ready()
        home = self._home
        futex = home._futex
        while True:
            for ring in self.rings:  # the home ring first: its word is the doorbell
                ring._arm()
            futex.fence()
            woke = False
            for ring in self.rings:
                woke = ring._check_after_fence() or woke
            if woke:
                self._disarm()
                return self.ready()
            remaining = None if deadline is None else deadline - time.monotonic()
            if self._consume_interrupt() or (remaining is not None and remaining <= 0):
                self._disarm()
                return []
            futex.wait(home._park_address(), 1, remaining)
            self._disarm()

    def _consume_interrupt(self) -> bool:
        if self._interrupted:
            self._interrupted = False
            return True
        return False

    def _any_readable(self) -> bool:
        for ring in self.rings:
            if ring.readable():
                return True
        return self._interrupted

    def _disarm(self) -> None:
        for ring in self.rings:
            ring._disarm()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
