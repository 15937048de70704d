"""What /health checks: the heartbeats the engine's actors publish in shared memory.

The scheduler beats every loop iteration, each worker from a thread, the detokenizer every time
it wakes (at least once a second): an actor whose beat is older than STALE_S is frozen (SIGSTOP),
deadlocked or starved. The scheduler also publishes its oldest batch on the workers: older than
--watchdog-timeout means the device is hung. Reading costs a few loads from one page: /health
stays cheap and never waits on the actors. It recovers by itself when the beats resume."""

from __future__ import annotations

from shm import Heartbeats

STALE_S = 5.0


class HealthCheck:
    def __init__(self, segment: str, watchdog_timeout: float):
        self.beats = Heartbeats.attach(segment)
        self.watchdog_timeout = watchdog_timeout

    def __call__(self) -> str | None:
        """Why the engine is unhealthy now, or None."""
        problems = []
        for slot in self.beats.read():
            if slot.beat_age_s is not None and slot.beat_age_s > STALE_S:
                problems.append(f"{slot.name}: no heartbeat for {slot.beat_age_s:.1f} s (frozen, deadlocked or "
                                "starved of CPU)")
            if slot.busy_for_s is not None and slot.busy_for_s > self.watchdog_timeout:
                problems.append(f"batch {slot.busy_tag} has been on the workers for {slot.busy_for_s:.0f} s, over "
                                f"--watchdog-timeout {self.watchdog_timeout:g} (the device looks hung)")
        return "; ".join(problems) or None

    def close(self) -> None:
        self.beats.close()
