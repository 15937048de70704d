"""LogLimiter: at most `burst` log lines per `period_s` for messages a client can trigger at will
(malformed requests, clients that stop reading), so no client can flood the server's log."""

from __future__ import annotations

import logging
import time


class LogLimiter:
    def __init__(self, burst: int = 10, period_s: float = 60.0):
        self.burst = burst
        self.period_s = period_s
        self._window_start = -period_s
        self._lines = 0
        self._suppressed = 0

    def log(self, logger: logging.Logger, level: int, message: str, *args, exc_info: bool = False) -> None:
        now = time.monotonic()
        if now - self._window_start >= self.period_s:
            if self._suppressed:
                logger.warning("%d similar log lines were suppressed in the last %g s", self._suppressed,
                               self.period_s)
            self._window_start, self._lines, self._suppressed = now, 0, 0
        if self._lines >= self.burst:
            self._suppressed += 1
            return
        self._lines += 1
        logger.log(level, message, *args, exc_info=exc_info)
