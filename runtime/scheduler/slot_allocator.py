"""Scheduler-side accounting of the worker's two tables: KV slots and request-table rows.

The worker owns the tensors (the KV pool and req_to_token); the scheduler only hands out indices.
KV slot 0 is a padding slot that is never handed out, so a pool of `num_slots` usable slots has
indices 1..num_slots.
"""

from __future__ import annotations


class SlotAllocator:
    def __init__(self, num_slots: int):
        if num_slots <= 0:
            raise ValueError(f"SlotAllocator: num_slots must be positive, got {num_slots}")
        self.num_slots = num_slots
        # A stack: the most recently freed slots are handed out first (warm in the device cache).
        self._free = list(range(num_slots, 0, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def alloc(self, n: int) -> list[int] | None:
        """n slots, or None (and nothing taken) when fewer than n are free."""
        if n > len(self._free):
            return None
        if n == 0:
            return []
        slots = self._free[-n:]
        del self._free[-n:]
        return slots

    def free(self, slots: list[int]) -> None:
        self._free.extend(slots)

    def free_slots(self) -> list[int]:
        return list(self._free)


class ReqTable:
    """Rows of the worker's request table (req_to_token), one per running request."""

    def __init__(self, num_rows: int):
        if num_rows <= 0:
            raise ValueError(f"ReqTable: num_rows must be positive, got {num_rows}")
        self.num_rows = num_rows
        self._free = list(range(num_rows - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def alloc(self) -> int | None:
        return self._free.pop() if self._free else None

    def free(self, row: int) -> None:
        self._free.append(row)

    def free_rows(self) -> list[int]:
        return list(self._free)
