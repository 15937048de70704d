"""`Arena`: a shared-memory region for large payloads passed by handle (one writer, one reader).

The writer allocates a block, fills it in place (np.frombuffer(view) / torch.frombuffer, or one
memcpy with put()), and sends the small `ArenaBlock` handle in a ring message; the reader maps the
block as a memoryview (zero copy) and releases it when done. Blocks are contiguous (a block that
would straddle the end starts at the beginning) and are freed in allocation order: releasing a
block frees it and every block allocated before it. A full arena makes alloc() wait, spinning
then parked on a futex word that release() clears, like a ring writer.

Layout: magic u64 | capacity u64 | data offset u64; alloc cursor u64 (line); release cursor u64
(line); writer park word u32 (line); data at 4096. Cursors only grow, as in ring.py.
"""

from __future__ import annotations

import time

import msgspec

from shm.futex import Futex, mapping_address
from shm.segment import SegmentError, attach_segment, check_name, create_segment, unlink_segment
from shm.spin import Spinner, deadline_after

MAGIC = int.from_bytes(b"RTARENA1", "little")
OFF_CAPACITY = 8
OFF_ALLOC = 64
OFF_RELEASE = 128
OFF_PARK = 192
DATA_OFFSET = 4096
DEFAULT_SPIN_S = 200e-6


class ArenaTimeout(TimeoutError):
    """alloc()/put() waited `timeout` seconds and the reader had not released enough space."""


class ArenaBlock(msgspec.Struct, frozen=True, array_like=True):
    """Handle of one block: its bytes are at cursor positions [start, start + nbytes); releasing it
    moves the release cursor to `end`."""

    start: int
    nbytes: int
    end: int


class Arena:
    def __init__(self, name: str, mm, owner: bool, spin_s: float):
        self.name = name
        self.owner = owner
        self.spin_s = spin_s
        self._spinner = Spinner(spin_s)
        self._mm = mm
        self._mv = memoryview(mm)
        self._q = self._mv.cast("Q")
        self._i = self._mv.cast("I")
        if self._q[0] != MAGIC:
            self.close()
            raise SegmentError(f"{name!r} is not an arena segment")
        self.capacity = self._q[OFF_CAPACITY // 8]
        self._base = mapping_address(mm)
        self._futex = Futex()

    @classmethod
    def create(cls, name: str, capacity_bytes: int, spin_s: float = DEFAULT_SPIN_S) -> Arena:
        check_name(name)
        Spinner(spin_s)  # validates spin_s before anything is created
        if not isinstance(capacity_bytes, int) or capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes must be a positive int, got {capacity_bytes!r}")
        capacity = (capacity_bytes + 4095) & ~4095
        mm = create_segment(name, DATA_OFFSET + capacity)
        q = memoryview(mm).cast("Q")
        q[OFF_CAPACITY // 8] = capacity
        q[0] = MAGIC
        q.release()
        return cls(name, mm, True, spin_s)

    @classmethod
    def attach(cls, name: str, spin_s: float = DEFAULT_SPIN_S) -> Arena:
        Spinner(spin_s)
        return cls(name, attach_segment(name), False, spin_s)

    # ---------------------------------------------------------------- writer
    def alloc(self, nbytes: int, timeout: float | None = None) -> tuple[ArenaBlock, memoryview]:
        """A block of `nbytes` and a writable view of it; send the block once it is filled."""
        if not isinstance(nbytes, int) or not 0 <= nbytes <= self.capacity:
            raise ValueError(f"nbytes must be an int in [0, {self.capacity}] for arena {self.name!r}, got {nbytes!r}")
        w = self._q[OFF_ALLOC // 8]
        start = w
        if (w % self.capacity) + nbytes > self.capacity:
            start = w + self.capacity - w % self.capacity  # skip the tail: blocks are contiguous
        end = start + ((nbytes + 7) & -8)
        if end - self._q[OFF_RELEASE // 8] > self.capacity:
            self._wait_released(end, deadline_after(timeout))
        self._q[OFF_ALLOC // 8] = end
        offset = DATA_OFFSET + start % self.capacity
        return ArenaBlock(start, nbytes, end), self._mv[offset:offset + nbytes]

    def can_alloc(self, nbytes: int) -> bool:
        """Whether alloc(nbytes) would get its block now, without waiting for releases."""
        w = self._q[OFF_ALLOC // 8]
        start = w if (w % self.capacity) + nbytes <= self.capacity else w + self.capacity - w % self.capacity
        return 0 <= nbytes <= self.capacity and start + ((nbytes + 7) & -8) - self._q[OFF_RELEASE // 8] <= self.capacity

    def put(self, data, timeout: float | None = None) -> ArenaBlock:
        """Copy a bytes-like object into a new block (one memcpy)."""
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        block, target = self.alloc(view.nbytes, timeout)
        target[:] = view
        target.release()
        return block

    def _wait_released(self, end: int, deadline: float | None) -> None:
        def fits() -> bool:
            return end - self._q[OFF_RELEASE // 8] <= self.capacity

        self._spinner.spin(fits, deadline)
        park = OFF_PARK // 4
        while not fits():
            self._i[park] = 1
            self._futex.fence()
            if fits():
                break
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                self._i[park] = 0
                raise ArenaTimeout(f"arena {self.name!r}: no room for a block up to position {end} within the timeout")
            self._futex.wait(self._base + OFF_PARK, 1, remaining)
        self._i[park] = 0

    # ---------------------------------------------------------------- reader
    def view(self, block: ArenaBlock) -> memoryview:
        """The block's bytes, without a copy. Release the view before close()."""
        if not isinstance(block, ArenaBlock):
            raise TypeError(f"block must be an ArenaBlock, got {type(block).__name__}")
        offset = block.start % self.capacity
        if block.nbytes < 0 or offset + block.nbytes > self.capacity or block.end > self._q[OFF_ALLOC // 8]:
            raise ValueError(f"block {block} does not belong to arena {self.name!r}")
        return self._mv[DATA_OFFSET + offset:DATA_OFFSET + offset + block.nbytes]

    def release(self, block: ArenaBlock) -> None:
        """Free `block` and every block allocated before it."""
        if block.end > self._q[OFF_RELEASE // 8]:
            self._q[OFF_RELEASE // 8] = block.end
            self._futex.fence()
            if self._i[OFF_PARK // 4]:
                self._i[OFF_PARK // 4] = 0
                self._futex.wake(self._base + OFF_PARK)

    # ---------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Unmap. Raises BufferError while views of blocks are still alive."""
        if self._mm.closed:
            return
        self._q.release()
        self._i.release()
        self._mv.release()
        try:
            self._mm.close()
        except BufferError:
            raise BufferError(f"arena {self.name!r}: release every block view before close()") from None

    def unlink(self) -> None:
        if not self.owner:
            raise SegmentError(f"only the creator of arena {self.name!r} may unlink it")
        unlink_segment(self.name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
