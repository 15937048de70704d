"""Futex wait/wake on 32-bit words inside shared mappings, and a store-load fence.

The futex calls go through libc's syscall() with ctypes; ctypes drops the GIL around foreign
calls, so a thread parked here does not stop the other threads of its process. The futex ops are
the shared (not FUTEX_PRIVATE) ones because the word lives in memory mapped by several processes.

Parking protocol ("park word", one u32 per sleeper, see ring.py):
  sleeper: word = 1 (armed); fence(); re-check the condition; futex_wait(word, 1)
  waker:   publish; fence(); if word == 1: word = 0; futex_wake(word)
The sleeper sets the armed value itself and wakers only ever store 0, so a wake that lands between
the sleeper's re-check and its futex_wait makes the kernel's compare fail (EAGAIN) instead of being
lost; the fences make the classic store-then-load pairs (cursor / park word) sequentially
consistent, which x86's total store order alone does not (a load may pass an earlier store).
"""

from __future__ import annotations

import ctypes
import os
import platform
import threading

_SYS_FUTEX = {"x86_64": 202, "aarch64": 98}
_FUTEX_WAIT = 0
_FUTEX_WAKE = 1
_EAGAIN = 11
_EINTR = 4
_ETIMEDOUT = 110


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class Futex:
    """Bound futex syscalls. One instance per process is enough; it holds no shared state."""

    def __init__(self):
        machine = platform.machine()
        if machine not in _SYS_FUTEX:
            raise OSError(f"futex syscall number unknown for {machine}")
        self._nr = _SYS_FUTEX[machine]
        libc = ctypes.CDLL(None, use_errno=True)
        self._syscall = libc.syscall
        self._syscall.restype = ctypes.c_long
        self._syscall.argtypes = [
            ctypes.c_long, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
            ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
        ]
        # A lock-prefixed instruction (the compare-and-swap inside an uncontended lock's
        # acquire/release) is a full fence on x86; this is the cheapest one reachable from Python.
        self._fence_lock = threading.Lock()

    def wait(self, addr: int, expected: int, timeout: float | None) -> bool:
        """Sleep while the u32 at addr equals expected, at most timeout seconds.

        Returns False on timeout, True otherwise (woken, value already changed, or a signal:
        callers always re-check their condition)."""
        if timeout is None:
            ts = None
        else:
            timeout = max(timeout, 0.0)
            sec = int(timeout)
            ts = ctypes.byref(_Timespec(sec, int((timeout - sec) * 1e9)))
        if self._syscall(self._nr, addr, _FUTEX_WAIT, expected, ts, None, 0) == 0:
            return True
        err = ctypes.get_errno()
        if err == _ETIMEDOUT:
            return False
        if err in (_EAGAIN, _EINTR):
            return True
        raise OSError(err, f"futex wait failed: {os.strerror(err)}")

    def wake(self, addr: int, n: int = 1) -> int:
        """Wake up to n sleepers on the u32 at addr; returns how many were woken."""
        woken = self._syscall(self._nr, addr, _FUTEX_WAKE, n, None, None, 0)
        if woken < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"futex wake failed: {os.strerror(err)}")
        return woken

    def fence(self) -> None:
        self._fence_lock.acquire()  # free, so no wait; the call without arguments is the cheap one
        self._fence_lock.release()


def mapping_address(buf) -> int:
    """Base address of a writable buffer (an mmap); valid for as long as the mapping stays open."""
    anchor = ctypes.c_char.from_buffer(buf)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor  # release the buffer export so the mmap can be closed later

