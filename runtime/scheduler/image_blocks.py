"""ImageBlockLedger: when the image arena's blocks may be reused.

The ingress puts each request's image tensors in one arena block, allocated right before it sends the request, so
blocks reach this scheduler in allocation order. A block is freed (Arena.release frees it and every older block) once
its request has finished and every batch planned before that has come back from the workers: no batch in flight, and
no later admission (a retracted request prefills again), can still read it. Blocks are released strictly in order: a
finished request's block waits for older ones still in use.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from runtime.messages import GenerateRequest
from shm.arena import ArenaBlock


@dataclass(eq=False)
class _Entry:
    arena: str
    block: ArenaBlock
    done_after_batch: int | None = None  # None: the request still runs; else the last batch planned when it ended


class ImageBlockLedger:
    def __init__(self):
        self._queue: deque[_Entry] = deque()
        self._running: dict[str, _Entry] = {}

    def add(self, msg: GenerateRequest, last_batch: int, accepted: bool) -> None:
        """A request arrived; `accepted`: the scheduler queued it (else it is done already)."""
        if not msg.images:
            return
        tensor = max((t for item in msg.images for t in item.tensors.values()), key=lambda t: t.block.end)
        entry = _Entry(tensor.arena, tensor.block, None if accepted else last_batch)
        self._queue.append(entry)
        if accepted:
            self._running[msg.rid] = entry

    def finished(self, rid: str, last_batch: int) -> None:
        entry = self._running.pop(rid, None)
        if entry is not None:
            entry.done_after_batch = last_batch

    def releasable(self, oldest_in_flight: int) -> list[tuple[str, ArenaBlock]]:
        """The newest block of each arena that may be released now (`oldest_in_flight`: the id of the oldest batch
        not come back yet, or the next batch id when none is in flight)."""
        newest: dict[str, ArenaBlock] = {}
        while self._queue and self._queue[0].done_after_batch is not None \
                and self._queue[0].done_after_batch < oldest_in_flight:
            entry = self._queue.popleft()
            newest[entry.arena] = entry.block
        return list(newest.items())

    def __len__(self) -> int:
        return len(self._queue)
