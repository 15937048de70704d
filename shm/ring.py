"""Shared-memory rings: `Ring` (one writer, one reader) and `BroadcastRing` (one writer, N readers).

Segment layout (all offsets 8-byte aligned; "line" = its own 64-byte cache line):

    0     magic u64 | n_readers u32 | version u32 | capacity u64 | data offset u64
    64    write cursor u64 (line)            72  stream-open flag u32 (a chunked frame is half written)
    128   writer park word u32 (line)      136  wake-at u64: read position a parked writer waits for
    192   reader park words u32[n_readers]
    512   reader i: read cursor u64 (one line each)
    ...   reader i: doorbell slot (128 bytes): generation u32 | target reader u32 | name length u32 | name
    data  capacity bytes (a power of two), at a 4096-aligned offset

Cursors are byte positions that only grow (2**64 never wraps in practice); position p lives at
data + (p % capacity). A record is an 8-byte header (kind << 32 | payload length) and the payload
padded to 8 bytes; a payload may wrap around the end of the data area, a header never does.

Memory ordering: the writer copies a record in, then publishes it with ONE aligned 8-byte store of
the write cursor (a memoryview cast to 'Q' assigns through a single 64-bit move; aligned 8-byte
stores are atomic on x86-64, and total store order makes the record's bytes visible before the
cursor). A reader loads the cursor, then the record, and frees the space with one 8-byte store of
its read cursor. So a reader sees whole records or nothing: a writer killed mid-copy leaves the
cursor where it was. Frames bigger than half the ring stream through it as START/CONT records that
the reader reassembles; it returns only whole frames. This relies on x86-64's ordering; on a
weaker architecture (aarch64) the cursor stores would need release/acquire barriers.

Waiting: spin (up to `spin_s`, adaptively: spin.py), then park on a futex word in the segment
(protocol in futex.py). The writer fences after every publish (a parked reader must never miss a frame); a reader does a
cheap unfenced check of the writer's park word after each read and a fenced one before it parks
itself, so a writer waiting for space is woken at the latest by the reader's next recv.
"""

from __future__ import annotations

import mmap
import time

from shm.futex import Futex, mapping_address
from shm.segment import SegmentError, attach_segment, check_name, create_segment, unlink_segment
from shm.spin import Spinner, deadline_after

MAGIC = int.from_bytes(b"RTRING01", "little")
VERSION = 1
MAX_READERS = 64
MIN_CAPACITY = 4096
MAX_CAPACITY = 1 << 32  # record lengths are u32 and records are at most half the ring

OFF_NREADERS = 8
OFF_CAPACITY = 16
OFF_DATA = 24
OFF_WCUR = 64
OFF_STREAM_OPEN = 72
OFF_WPARK = 128
OFF_WAKE_AT = 136
OFF_RPARK = 192
OFF_RCUR = 512
READER_LINE = 64
BELL_SLOT = 128
# The same header words as indices into the segment's u64 (_q) and u32 (_i) views.
NREADERS_I = OFF_NREADERS // 4
VERSION_I = NREADERS_I + 1
CAPACITY_Q = OFF_CAPACITY // 8
DATA_Q = OFF_DATA // 8
WCUR_Q = OFF_WCUR // 8
STREAM_OPEN_I = OFF_STREAM_OPEN // 4
WPARK_I = OFF_WPARK // 4
WAKE_AT_Q = OFF_WAKE_AT // 8
RPARK_I = OFF_RPARK // 4  # reader 0's park word; reader i's is RPARK_I + i
BELL_NAME_MAX = BELL_SLOT - 12

KIND_WHOLE = 0
KIND_START = 1  # payload: u64 total frame length, then the first bytes of the frame
KIND_CONT = 2
KIND_ABORT = 3  # discard the partly received stream (its writer timed out or died)

DEFAULT_SPIN_S = 200e-6
BATCH_PUBLISH_BYTES = 16384  # send_many publishes at least this often, so the reader starts early
WRITER_RECHECK_S = 0.01  # a parked writer re-checks for room this often
VIEW_MIN_BYTES = 4096  # try_recv_view copies smaller frames: cheaper than a memoryview


class RingTimeout(TimeoutError):
    """send() waited `timeout` seconds for space and the ring stayed full."""


def _layout(n_readers: int) -> tuple[int, int]:
    bell_off = OFF_RCUR + READER_LINE * n_readers
    data_off = (bell_off + BELL_SLOT * n_readers + 4095) & ~4095
    return bell_off, data_off


def _round_capacity(capacity_bytes: int) -> int:
    if not isinstance(capacity_bytes, int) or not 0 < capacity_bytes <= MAX_CAPACITY:
        raise ValueError(f"capacity_bytes must be an int in [1, {MAX_CAPACITY}], got {capacity_bytes!r}")
    return max(MIN_CAPACITY, 1 << (capacity_bytes - 1).bit_length())


def _as_byte_view(data):
    """bytes pass through; any other buffer becomes a flat unsigned-byte memoryview (no copy)."""
    if type(data) is bytes:
        return data
    try:
        view = memoryview(data)
    except TypeError:
        raise TypeError("ring frames must be bytes-like (bytes, bytearray, memoryview), "
                        f"got {type(data).__name__}") from None
    if view.format != "B" or view.ndim != 1:
        if not view.c_contiguous:
            raise ValueError("ring frames must be C-contiguous buffers")
        view = view.cast("B")
    return view


class _BellTarget:
    """A writer's mapping of the page that holds the park word a Waiter sleeps on."""

    def __init__(self, mm: mmap.mmap, reader_index: int):
        self._mm = mm
        self._view = memoryview(mm)
        self.words = self._view.cast("I")
        self.park_index = RPARK_I + reader_index
        self.park_address = mapping_address(mm) + OFF_RPARK + 4 * reader_index

    def close(self) -> None:
        self.words.release()
        self._view.release()
        self._mm.close()


class _RingSegment:
    """One mapped ring segment, with the writer's and the readers' operations on it.

    A process uses it as the writer (send) or as reader `reader_index` (recv), never both at once
    from two threads; the creator owns the name (unlink)."""

    def __init__(self, name: str, mm: mmap.mmap, owner: bool, reader_index: int, spin_s: float):
        self.name = name
        self.owner = owner
        self.reader_index = reader_index
        self.spin_s = spin_s
        self._writer_spin = Spinner(spin_s)
        self._reader_spin = Spinner(spin_s)
        self._mm = mm
        self._mv = memoryview(mm)
        self._q = self._mv.cast("Q")
        self._i = self._mv.cast("I")
        self._base = mapping_address(mm)
        self._futex = Futex()
        self._bell_targets: dict[int, tuple[int, _BellTarget | None]] = {}  # reader -> (generation, target)
        self._home = None  # (i32 view, index, address) of a Waiter's doorbell when one is set
        self._stream_view: memoryview | None = None
        fence_lock = self._futex._fence_lock
        self._fence_acquire = fence_lock.acquire
        self._fence_release = fence_lock.release

        q = self._q
        mapped = len(mm)
        if mapped < 4096:
            self.close()
            raise SegmentError(f"{name!r} is not a ring segment ({mapped} bytes)")
        self.n_readers = self._i[NREADERS_I]
        self.capacity = q[CAPACITY_Q]
        self._data = q[DATA_Q]
        self._data_end = self._data + self.capacity
        self._mask = self.capacity - 1
        self._bell_off, data_off = _layout(max(self.n_readers, 1))
        problem = None
        if q[0] != MAGIC or self._i[VERSION_I] != VERSION:
            problem = SegmentError(f"{name!r} is not a ring segment of version {VERSION}")
        elif not 1 <= self.n_readers <= MAX_READERS or self._data != data_off or mapped < self._data_end:
            problem = SegmentError(f"ring segment {name!r} has an inconsistent header ({mapped} bytes mapped)")
        elif not isinstance(reader_index, int) or not 0 <= reader_index < self.n_readers:
            problem = ValueError(f"reader_index must be an int in [0, {self.n_readers}), got {reader_index!r}")
        if problem is not None:
            self.close()
            raise problem

        # writer state
        self._wpos = q[WCUR_Q]
        self._space_limit = 0  # slowest read cursor + capacity, as last seen
        self._refresh_space()
        # Largest record sent whole; 0 while a half-sent stream (our timeout, or a previous writer
        # that died) must first be cancelled with an ABORT record.
        self._whole_limit = 0 if self._i[STREAM_OPEN_I] else self.capacity // 2
        self._broadcast = self.n_readers > 1
        self._no_parked_readers = bytes(4 * self.n_readers)

        # reader state
        self._rcur_q = (OFF_RCUR + READER_LINE * reader_index) // 8
        self._rpark_i = RPARK_I + reader_index
        self._rpos = q[self._rcur_q]
        self._wseen = self._rpos
        self._stream: bytearray | None = None
        self._stream_fill = 0
        self._view_out = False  # a frame was handed out as a view: its space is not released yet

    # ---------------------------------------------------------------- creation
    @classmethod
    def _create(cls, name: str, capacity_bytes: int, n_readers: int, spin_s: float):
        check_name(name)
        Spinner(spin_s)  # validates spin_s before anything is created
        if not isinstance(n_readers, int) or not 1 <= n_readers <= MAX_READERS:
            raise ValueError(f"n_readers must be an int in [1, {MAX_READERS}], got {n_readers!r}")
        capacity = _round_capacity(capacity_bytes)
        _, data_off = _layout(n_readers)
        mm = create_segment(name, data_off + capacity, populate=True)
        header = memoryview(mm)
        q, i = header.cast("Q"), header.cast("I")
        i[NREADERS_I] = n_readers
        i[VERSION_I] = VERSION
        q[CAPACITY_Q] = capacity
        q[DATA_Q] = data_off
        q[0] = MAGIC  # last: an attacher that sees the magic sees the whole header
        del q, i
        header.release()
        return cls(name, mm, True, 0, spin_s)

    @classmethod
    def _attach(cls, name: str, reader_index: int, spin_s: float):
        Spinner(spin_s)
        return cls(name, attach_segment(name, populate=True), False, reader_index, spin_s)

    def close(self) -> None:
        """Unmap (idempotent). Does not remove the name: see unlink()."""
        if self._mm.closed:
            return
        self._stream_view = None
        for _, target in self._bell_targets.values():
            if target is not None:
                target.close()
        self._bell_targets.clear()
        self._home = None
        self._q.release()
        self._i.release()
        self._mv.release()
        self._mm.close()

    def unlink(self) -> None:
        """Remove the segment's name (owner only); mapped users keep working until they close."""
        if not self.owner:
            raise SegmentError(f"only the creator of ring {self.name!r} may unlink it")
        unlink_segment(self.name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"{type(self).__name__}({self.name!r}, capacity={self.capacity}, readers={self.n_readers})"

    # ---------------------------------------------------------------- writer
    def send(self, data, timeout: float | None = None) -> None:
        """Append one frame; blocks while the ring is full. RingTimeout after `timeout` seconds."""
        if type(data) is not bytes:
            data = _as_byte_view(data)
        n = len(data)
        w = self._wpos
        record = 8 + ((n + 7) & -8)
        # _whole_limit is 0 while an aborted stream awaits its ABORT record: everything goes slow.
        if record > self._whole_limit or w + record > self._space_limit:
            self._send_slow(data, n, timeout)
            return
        off = self._data + (w & self._mask)
        q = self._q
        q[off >> 3] = n
        off += 8
        end = off + n
        if end <= self._data_end:
            self._mm[off:end] = data
        else:
            self._copy_in_wrapped(off, data, n)
        w += record
        self._wpos = w
        q[WCUR_Q] = w  # the single 8-byte store that publishes the frame
        self._fence_acquire()
        self._fence_release()
        if self._i[RPARK_I] or self._broadcast:
            self._wake_parked_readers()

    def send_many(self, frames, timeout: float | None = None) -> None:
        """send() each frame (`timeout` bounds each wait for space), publishing the write cursor
        once per BATCH_PUBLISH_BYTES instead of once per frame (fewer fences and cache-line
        transfers for runs of small frames)."""
        unpublished = 0
        for data in frames:
            if type(data) is not bytes:
                data = _as_byte_view(data)
            n = len(data)
            w = self._wpos
            record = 8 + ((n + 7) & -8)
            if record > self._whole_limit or w + record > self._space_limit:
                if unpublished:
                    self._publish(w)
                    unpublished = 0
                self._send_slow(data, n, timeout)
                continue
            off = self._data + (w & self._mask)
            self._q[off >> 3] = n
            off += 8
            end = off + n
            if end <= self._data_end:
                self._mm[off:end] = data
            else:
                self._copy_in_wrapped(off, data, n)
            self._wpos = w + record
            unpublished += record
            if unpublished >= BATCH_PUBLISH_BYTES:
                self._publish(self._wpos)
                unpublished = 0
        if unpublished:
            self._publish(self._wpos)

    def _publish(self, w: int) -> None:
        self._wpos = w
        self._q[WCUR_Q] = w
        self._fence_acquire()
        self._fence_release()
        if self._i[RPARK_I] or self._broadcast:
            self._wake_parked_readers()

    def _wake_parked_readers(self) -> None:
        if self._mm[OFF_RPARK:OFF_RPARK + 4 * self.n_readers] != self._no_parked_readers:
            for index in range(self.n_readers):
                if self._i[RPARK_I + index]:
                    self._wake_reader(index)

    def _copy_in_wrapped(self, start: int, data, n: int) -> None:
        """Copy a payload that runs past the end of the data area in two pieces."""
        view = memoryview(data)  # slicing bytes would copy
        first = self._data_end - start
        self._mm[start:self._data_end] = view[:first]
        self._mm[self._data:self._data + n - first] = view[first:]

    def _refresh_space(self) -> int:
        """Re-read the slowest reader's cursor; returns the free bytes."""
        q = self._q
        if self.n_readers == 1:
            rmin = q[OFF_RCUR // 8]
        else:
            rmin = min(q[(OFF_RCUR + READER_LINE * i) // 8] for i in range(self.n_readers))
        self._space_limit = rmin + self.capacity
        return self._space_limit - self._wpos

    def _wait_space(self, record: int, deadline: float | None) -> None:
        """Wait until `record` bytes are free: spin, then park on the writer park word."""
        if self._writer_spin.spin(lambda: self._refresh_space() >= record, deadline):
            return
        # Parked, ask to be woken only once a quarter of the ring is free (or `record`, if more):
        # waking for every record the reader frees would cost a wake-up per frame while the
        # reader drains a full ring, and the frames queued ahead of ours must be read first anyway.
        self._q[WAKE_AT_Q] = max(0, self._wpos + max(record, self.capacity // 4) - self.capacity)
        park = WPARK_I
        while True:
            self._i[park] = 1
            self._futex.fence()
            if self._refresh_space() >= record:
                self._i[park] = 0
                return
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                self._i[park] = 0
                raise RingTimeout(
                    f"ring {self.name!r}: no room for a {record}-byte record "
                    f"(capacity {self.capacity}) within the send timeout"
                )
            # Re-check now and then: a reader that stops reading short of the wake-at point may
            # have freed enough for this record already.
            recheck = WRITER_RECHECK_S if remaining is None else min(remaining, WRITER_RECHECK_S)
            self._futex.wait(self._base + OFF_WPARK, 1, recheck)

    def _send_slow(self, data, n: int, timeout: float | None) -> None:
        """A full ring, a frame bigger than half the ring, or the first send after an aborted stream."""
        deadline = deadline_after(timeout)
        if self._whole_limit == 0:
            self._wait_space(8, deadline)
            self._q[(self._data + (self._wpos & self._mask)) >> 3] = KIND_ABORT << 32
            self._publish(self._wpos + 8)
            self._i[STREAM_OPEN_I] = 0
            self._whole_limit = self.capacity // 2
        record = 8 + ((n + 7) & -8)
        if record > self._whole_limit:
            self._send_stream(data, n, deadline)
            return
        self._wait_space(record, deadline)
        off = self._data + (self._wpos & self._mask)
        self._q[off >> 3] = n
        if off + 8 + n <= self._data_end:
            self._mm[off + 8:off + 8 + n] = data
        else:
            self._copy_in_wrapped(off + 8, data, n)
        self._publish(self._wpos + record)

    def _send_stream(self, data, n: int, deadline: float | None) -> None:
        """Stream a frame bigger than half the ring as a START record (carrying the total length)
        and CONT records, each as large as the free space allows."""
        if type(data) is bytes:
            data = memoryview(data)
        max_chunk = self.capacity // 2 - 16
        sent = 0
        while sent < n:
            prefix = 8 if sent == 0 else 0
            # Wait for a useful amount of space, not for a few bytes at a time.
            want = min(self.capacity // 8, 8 + prefix + ((n - sent + 7) & -8))
            try:
                self._wait_space(want, deadline)
            except BaseException:  # RingTimeout, or KeyboardInterrupt while waiting
                if sent:
                    self._whole_limit = 0  # the readers hold part of it: cancel it on the next send
                raise
            free = self._space_limit - self._wpos
            chunk = min(n - sent, max_chunk, (free - 8 - prefix) & -8)
            w = self._wpos
            off = self._data + (w & self._mask)
            if prefix:
                self._i[STREAM_OPEN_I] = 1
                self._q[off >> 3] = (KIND_START << 32) | (chunk + 8)
                self._q[(self._data + ((w + 8) & self._mask)) >> 3] = n
            else:
                self._q[off >> 3] = (KIND_CONT << 32) | chunk
            start = self._data + ((w + 8 + prefix) & self._mask)
            piece = data[sent:sent + chunk]
            if start + chunk <= self._data_end:
                self._mm[start:start + chunk] = piece
            else:
                self._copy_in_wrapped(start, piece, chunk)
            sent += chunk
            self._publish(w + 8 + prefix + ((chunk + 7) & -8))
        self._i[STREAM_OPEN_I] = 0

    def _wake_reader(self, index: int) -> None:
        self._i[RPARK_I + index] = 0
        generation = self._i[(self._bell_off + BELL_SLOT * index) // 4]
        target = None
        if generation:
            cached = self._bell_targets.get(index)
            if cached is None or cached[0] != generation:
                cached = (generation, self._map_bell(index))
                self._bell_targets[index] = cached
            target = cached[1]
        if target is None:
            self._futex.wake(self._base + OFF_RPARK + 4 * index)
        else:
            target.words[target.park_index] = 0
            self._futex.wake(target.park_address)

    def _map_bell(self, index: int) -> _BellTarget | None:
        """Map the page holding the park word a Waiter sleeps on for reader `index`; None when the
        reader has no doorbell (any more) or its home ring is gone."""
        old = self._bell_targets.pop(index, None)
        if old is not None and old[1] is not None:
            old[1].close()
        slot = self._bell_off + BELL_SLOT * index
        target_reader = self._i[slot // 4 + 1]
        name_len = self._i[slot // 4 + 2]
        if name_len == 0:
            return None
        name = self._mm[slot + 12:slot + 12 + name_len].decode()
        try:
            return _BellTarget(attach_segment(name, 4096), target_reader)
        except SegmentError:
            return None

    # ---------------------------------------------------------------- reader
    def try_recv(self) -> bytes | None:
        """The next whole frame, or None if none is complete yet."""
        r = self._rpos
        if r == self._wseen:
            self._wseen = self._q[WCUR_Q]
            if r == self._wseen:
                return None
        off = self._data + (r & self._mask)
        header = self._q[off >> 3]
        if header < 4294967296 and self._stream is None:  # KIND_WHOLE
            start = off + 8
            end = start + header
            if end <= self._data_end:
                frame = self._mm[start:end]
            else:
                frame = self._mm[start:self._data_end] + self._mm[self._data:self._data + end - self._data_end]
            r += 8 + ((header + 7) & ~7)
            self._rpos = r
            self._q[self._rcur_q] = r
            if self._i[WPARK_I]:  # the writer waits for space
                self._wake_writer()
            return frame
        return self._recv_records()

    def _wake_writer(self) -> None:
        """The writer is parked: wake it if our published read cursor reached its wake-at point
        (a reader that is about to park has read everything, so it always has)."""
        if self._q[self._rcur_q] >= self._q[WAKE_AT_Q]:
            self._i[WPARK_I] = 0
            self._futex.wake(self._base + OFF_WPARK)

    def _recv_records(self) -> bytes | None:
        """General path: consume available records until a whole frame is assembled."""
        while True:
            r = self._rpos
            if r == self._wseen:
                self._wseen = self._q[WCUR_Q]
                if r == self._wseen:
                    return None
            off = self._data + (r & self._mask)
            header = self._q[off >> 3]
            kind, length = header >> 32, header & 0xFFFFFFFF
            frame = None
            if kind == KIND_WHOLE:
                if self._stream is not None:
                    raise SegmentError(f"ring {self.name!r}: whole frame inside a chunked frame (corrupt)")
                frame = self._read_payload(off + 8, length)
            elif kind == KIND_START:
                total = self._q[(self._data + ((r + 8) & self._mask)) >> 3]
                self._stream = bytearray(total)
                self._stream_view = memoryview(self._stream)
                self._stream_fill = 0
                frame = self._take_chunk(r + 16, length - 8)
            elif kind == KIND_CONT:
                if self._stream is None:
                    raise SegmentError(f"ring {self.name!r}: continuation without a chunked frame start")
                frame = self._take_chunk(r + 8, length)
            elif kind == KIND_ABORT:
                self._stream = self._stream_view = None
            else:
                raise SegmentError(f"ring {self.name!r}: unknown record kind {kind} (corrupt)")
            r += 8 + ((length + 7) & ~7)
            self._rpos = r
            self._q[self._rcur_q] = r
            if self._i[WPARK_I]:
                self._wake_writer()
            if frame is not None:
                return frame

    def _read_payload(self, start: int, length: int) -> bytes:
        end = start + length
        if end <= self._data_end:
            return self._mm[start:end]
        return self._mm[start:self._data_end] + self._mm[self._data:self._data + end - self._data_end]

    def _take_chunk(self, pos: int, length: int) -> bytes | None:
        """Copy `length` stream bytes at cursor position `pos` into the reassembly buffer."""
        fill = self._stream_fill
        if fill + length > len(self._stream):
            raise SegmentError(f"ring {self.name!r}: chunked frame overruns its declared length (corrupt)")
        start = self._data + (pos & self._mask)
        first = min(length, self._data_end - start)
        self._stream_view[fill:fill + first] = self._mv[start:start + first]
        if first < length:
            self._stream_view[fill + first:fill + length] = self._mv[self._data:self._data + length - first]
        self._stream_fill = fill + length
        if self._stream_fill < len(self._stream):
            return None
        frame = bytes(self._stream)
        self._stream_view.release()
        self._stream = self._stream_view = None
        return frame

    def recv(self, timeout: float | None = None) -> bytes | None:
        """The next whole frame; waits up to `timeout` seconds (None: forever). None on timeout."""
        frame = self.try_recv()
        return frame if frame is not None else self._wait_for(self.try_recv, timeout)

    def _wait_for(self, try_read, timeout: float | None):
        """Wait until `try_read()` returns a frame, or None once `timeout` seconds have passed."""
        deadline = deadline_after(timeout)
        while True:
            if not self._wait_readable(deadline):
                return None
            frame = try_read()
            if frame is not None:
                return frame

    def try_recv_view(self) -> memoryview | bytes | None:
        """Like try_recv(), but a whole frame of at least VIEW_MIN_BYTES that does not wrap around
        comes back as a read-only memoryview into the ring, without a copy (others come back as
        bytes: copying a small frame is cheaper than making a view). The frame's space stays
        reserved until the next read call on this ring (any recv*/try_recv*, or release_view()):
        decode or copy the view before then, and drop it before close()."""
        if self._view_out:
            self.release_view()
        r = self._rpos
        if r == self._wseen:
            self._wseen = self._q[WCUR_Q]
            if r == self._wseen:
                return None
        off = self._data + (r & self._mask)
        header = self._q[off >> 3]
        start = off + 8
        end = start + header
        if header < 4294967296 and end <= self._data_end and self._stream is None:
            r += 8 + ((header + 7) & -8)
            self._rpos = r
            if header >= VIEW_MIN_BYTES:
                self._view_out = True  # r is published by the next read call
                return self._mv[start:end].toreadonly()
            frame = self._mm[start:end]
            self._q[self._rcur_q] = r
            if self._i[WPARK_I]:
                self._wake_writer()
            return frame
        return self.try_recv()

    def recv_view(self, timeout: float | None = None) -> memoryview | bytes | None:
        """recv() with try_recv_view()'s zero-copy result and its rules."""
        frame = self.try_recv_view()
        return frame if frame is not None else self._wait_for(self.try_recv_view, timeout)

    def release_view(self) -> None:
        """Free the space of the frame last returned as a view (no-op if there is none)."""
        self._view_out = False
        if self._q[self._rcur_q] != self._rpos:
            self._q[self._rcur_q] = self._rpos
            if self._i[WPARK_I]:
                self._wake_writer()

    def readable(self) -> bool:
        """True if unread records are waiting (possibly only part of a chunked frame)."""
        if self._rpos != self._wseen:
            return True
        self._wseen = self._q[WCUR_Q]
        return self._rpos != self._wseen

    def _arm(self) -> None:
        self._q[self._rcur_q] = self._rpos  # a frame held as a view is released before we sleep
        if self._home is not None:
            home_i, home_index, _ = self._home
            home_i[home_index] = 1
        self._i[self._rpark_i] = 1

    def _disarm(self) -> None:
        self._i[self._rpark_i] = 0
        if self._home is not None:
            home_i, home_index, _ = self._home
            home_i[home_index] = 0

    def _park_address(self) -> int:
        return self._home[2] if self._home is not None else self._base + OFF_RPARK + 4 * self.reader_index

    def _check_after_fence(self) -> bool:
        """Called armed and fenced: wake a writer waiting for the space we freed; True if readable."""
        if self._i[WPARK_I]:
            self._wake_writer()
        return self.readable()

    def _wait_readable(self, deadline: float | None) -> bool:
        self.release_view()
        if self._reader_spin.spin(self.readable, deadline):
            return True
        while True:
            self._arm()
            self._futex.fence()
            if self._check_after_fence():
                self._disarm()
                return True
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                self._disarm()
                return False
            self._futex.wait(self._park_address(), 1, remaining)
            self._disarm()

    # ---------------------------------------------------------------- doorbell (Waiter support)
    def _set_doorbell(self, home: _RingSegment | None) -> None:
        """Make writers of this reader ring the park word of `home` (another ring's reader in this
        process) so one futex wait covers several rings; None restores the ring's own word.
        Writers notice the change by the slot's generation, which is written last."""
        slot = self._bell_off + BELL_SLOT * self.reader_index
        if home is None:
            self._home = None
            self._i[slot // 4 + 2] = 0
        else:
            name = home.name.encode()
            if len(name) > BELL_NAME_MAX:
                raise SegmentError(f"ring name {home.name!r} is too long for a doorbell ({BELL_NAME_MAX} bytes max)")
            self._mm[slot + 12:slot + 12 + len(name)] = name
            self._i[slot // 4 + 1] = home.reader_index
            self._i[slot // 4 + 2] = len(name)
            self._home = (home._i, home._rpark_i, home._base + OFF_RPARK + 4 * home.reader_index)
        self._i[slot // 4] = (self._i[slot // 4] + 1) & 0xFFFFFFFF or 1


class Ring(_RingSegment):
    """Single-producer single-consumer ring of variable-size frames in a /dev/shm segment."""

    @classmethod
    def create(cls, name: str, capacity_bytes: int, spin_s: float = DEFAULT_SPIN_S) -> Ring:
        """Create the segment (mode 0600; the caller owns the name and unlinks it)."""
        return cls._create(name, capacity_bytes, 1, spin_s)

    @classmethod
    def attach(cls, name: str, spin_s: float = DEFAULT_SPIN_S) -> Ring:
        ring = cls._attach(name, 0, spin_s)
        if ring.n_readers != 1:
            ring.close()
            raise SegmentError(f"{name!r} is a broadcast ring: attach it with BroadcastRing.attach")
        return ring


class BroadcastRing(_RingSegment):
    """One writer, N readers: every reader receives every frame; the writer waits for the slowest."""

    @classmethod
    def create(cls, name: str, capacity_bytes: int, n_readers: int, spin_s: float = DEFAULT_SPIN_S) -> BroadcastRing:
        return cls._create(name, capacity_bytes, n_readers, spin_s)

    @classmethod
    def attach(cls, name: str, reader_index: int = 0, spin_s: float = DEFAULT_SPIN_S) -> BroadcastRing:
        """Attach as reader `reader_index` (the writer attaches too, with any index, to send)."""
        return cls._attach(name, reader_index, spin_s)
