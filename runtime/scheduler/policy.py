"""Which waiting requests are considered first for admission.

fcfs: queue order (arrival; retracted requests go back to the front, they are older).
lpm:  longest cached prefix first, so requests sharing a prefix run while it is still cached;
      computing every match costs a tree walk per request, so above LPM_MAX_QUEUE waiting requests
      it falls back to fcfs (SGLang does the same, at 128).
"""

from __future__ import annotations

from runtime.scheduler.radix_cache import RadixCache
from runtime.scheduler.request_state import Req

LPM_MAX_QUEUE = 128
POLICIES = ("fcfs", "lpm")


class SchedulePolicy:
    def __init__(self, name: str, cache: RadixCache | None):
        if name not in POLICIES:
            raise ValueError(f"schedule_policy must be one of {', '.join(POLICIES)}, got {name!r}")
        # Without a prefix cache every match is empty: lpm is fcfs.
        self.name = name if cache is not None else "fcfs"
        self.cache = cache

    def order(self, waiting: list[Req]) -> list[Req]:
        if self.name == "fcfs" or len(waiting) > LPM_MAX_QUEUE:
            return waiting
        # sorted() is stable: equal matches keep queue order.
        return sorted(waiting, key=lambda req: -self.cache.prefix_len(req.prompt_ids + req.output_ids))
