"""`Spinner`: how long to poll before parking on a futex, adapted to what spinning achieves.

Spinning pays when the answer comes within microseconds (a ping-pong between two actors on idle
cores): it saves the futex wake-up, tens of microseconds in a VM. It hurts when the answer is far
off (a reader waiting for the next decode step wastes the whole budget) and when the machine is
oversubscribed (the 2-core CI box runs five actors: the spinner takes the core the peer needs,
and a scheduler favours tasks that slept over tasks that spun). Measured under load 8 on 2 cores,
64-byte ping-pong p50: 430 us spinning 200 us, 53 us yielding while spinning, 21 us parking at once.

So: poll purely for PURE_SPIN_S, then poll with sched_yield() in between (it returns at once
when nobody else wants the core, and lets a peer that was woken onto our core run), up to the
current budget. A wait answered within QUICK_ANSWER_S grows the budget toward `max_s`; one that
ends parked halves it (down to 0: park at once); one answered later but while spinning leaves it
(a peer that needs 30 us to decode and answer a 64 KiB frame is still worth spinning for). While
the budget is below QUICK_ANSWER_S, every PROBE_EVERY-th wait spins the whole `max_s` anyway, so a
machine that calms down is noticed, and so is a peer that was parked too (two sides that both
park answer each other only after a futex wake-up each, which alone would never look quick).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

PURE_SPIN_S = 5e-6
QUICK_ANSWER_S = 100e-6
MIN_BUDGET_S = 1e-6
PROBE_EVERY = 16


def deadline_after(timeout: float | None) -> float | None:
    """time.monotonic() deadline of a `timeout` in seconds (None: wait for ever)."""
    if timeout is None:
        return None
    if not isinstance(timeout, (int, float)) or timeout != timeout:
        raise TypeError(f"timeout must be a number of seconds or None, got {timeout!r}")
    return time.monotonic() + max(timeout, 0.0)


class Spinner:
    def __init__(self, max_s: float):
        if not isinstance(max_s, (int, float)) or not 0 <= max_s < 1:
            raise ValueError(f"spin_s must be a number of seconds in [0, 1), got {max_s!r}")
        self.max_s = float(max_s)
        self.budget_s = self.max_s
        self._waits = 0

    def spin(self, ready: Callable[[], bool], deadline: float | None) -> bool:
        """Poll ready() within the budget (never past deadline); True as soon as it holds, False
        when the caller should park."""
        if self.max_s == 0:
            return ready()
        budget = self.budget_s
        self._waits += 1
        if budget < QUICK_ANSWER_S and self._waits % PROBE_EVERY == 0:
            budget = self.max_s
        start = time.monotonic()
        end = start + budget
        if deadline is not None and deadline < end:
            end = deadline
        pure_end = start + PURE_SPIN_S
        while True:
            for _ in range(16):
                if ready():
                    self._adapt(time.monotonic() - start)
                    return True
            now = time.monotonic()
            if now >= end:
                self._adapt(None)
                return False
            if now >= pure_end:
                os.sched_yield()

    def _adapt(self, answered_after_s: float | None) -> None:
        if answered_after_s is None:  # parked: spinning did not pay
            half = self.budget_s / 2
            self.budget_s = half if half >= MIN_BUDGET_S else 0.0
        elif answered_after_s <= QUICK_ANSWER_S:
            self.budget_s = min(self.max_s, 2 * self.budget_s + 2 * answered_after_s + MIN_BUDGET_S)
        # An answer later than QUICK_ANSWER_S but within the budget leaves it as it is.
