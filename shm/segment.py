"""Shared-memory segments in /dev/shm: naming, creation, attachment and cleanup.

A segment is a file in /dev/shm mapped with mmap. We open it ourselves (O_CREAT | O_EXCL, mode
0600) instead of using multiprocessing.shared_memory, whose resource_tracker process would unlink
segments behind our back when any process that attached them exits.

Naming: every segment of one server run starts with the run prefix `rt<launcher pid>_`, so the
launcher (or its supervisor) can remove all of them with `sweep(prefix)` after a crash, and a later
run can remove the leftovers of launchers that died with `sweep_stale()`.
"""

from __future__ import annotations

import mmap
import os
import re

SHM_DIR = "/dev/shm"
_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,200}$")
_PREFIX_RE = re.compile(r"^rt(\d+)_")


class SegmentError(Exception):
    """A segment name is invalid, already exists, is missing or has the wrong layout."""


def run_prefix(launcher_pid: int | None = None) -> str:
    """The name prefix owned by one server run: `rt<launcher pid>_`."""
    return f"rt{os.getpid() if launcher_pid is None else launcher_pid}_"


def segment_name(prefix: str, *parts: str) -> str:
    """Join a run prefix and name parts into one valid segment name, e.g. rt123_sched.in."""
    name = prefix + ".".join(parts)
    check_name(name)
    return name


def check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise SegmentError(
            f"invalid shared-memory segment name {name!r}: use 1-200 characters from [A-Za-z0-9_.-]"
        )


def _path(name: str) -> str:
    check_name(name)
    return os.path.join(SHM_DIR, name)


def _map(fd: int, size: int, populate: bool) -> mmap.mmap:
    # MAP_POPULATE faults every page in now: a ring's first pass would otherwise take a page fault
    # per 4 KiB in the writer and again in each reader (tens of microseconds per 64 KiB frame).
    flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if populate else 0)
    return mmap.mmap(fd, size, flags, mmap.PROT_READ | mmap.PROT_WRITE)


def create_segment(name: str, size: int, populate: bool = False) -> mmap.mmap:
    """Create /dev/shm/<name> (mode 0600, fails if it exists), size it and map it read-write
    (every page faulted in at once with `populate`).

    The new file reads as zeros: the caller writes its header, magic last."""
    if size <= 0:
        raise SegmentError(f"segment size must be positive, got {size}")
    path = _path(name)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise SegmentError(f"shared-memory segment {name!r} already exists") from None
    try:
        os.ftruncate(fd, size)
        return _map(fd, size, populate)
    except BaseException:
        os.unlink(path)
        raise
    finally:
        os.close(fd)


def attach_segment(name: str, size: int = 0, populate: bool = False) -> mmap.mmap:
    """Map an existing segment read-write (the whole file when size is 0; `populate`: see create_segment)."""
    path = _path(name)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SegmentError(f"shared-memory segment {name!r} does not exist") from None
    try:
        file_size = os.fstat(fd).st_size
        if file_size == 0 or size > file_size:
            raise SegmentError(f"shared-memory segment {name!r} has {file_size} bytes, "
                               f"expected at least {max(size, 1)}")
        return _map(fd, size or file_size, populate)
    finally:
        os.close(fd)


def unlink_segment(name: str) -> bool:
    """Remove a segment's name; mappings stay valid until closed. False if it was already gone."""
    try:
        os.unlink(_path(name))
        return True
    except FileNotFoundError:
        return False


def list_segments(prefix: str) -> list[str]:
    try:
        return sorted(n for n in os.listdir(SHM_DIR) if n.startswith(prefix))
    except FileNotFoundError:
        return []


def sweep(prefix: str) -> list[str]:
    """Unlink every segment whose name starts with `prefix` (one run's prefix); returns their names."""
    if not _PREFIX_RE.match(prefix):
        raise SegmentError(f"refusing to sweep {prefix!r}: not a run prefix like 'rt<pid>_'")
    return [name for name in list_segments(prefix) if unlink_segment(name)]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def sweep_stale() -> list[str]:
    """Unlink this user's segments of runs whose launcher process is gone; returns their names.

    A recycled pid keeps its old segments until that pid dies too (a later sweep_stale gets them)."""
    removed = []
    uid = os.getuid()
    for name in list_segments("rt"):
        match = _PREFIX_RE.match(name)
        if not match or _pid_alive(int(match.group(1))):
            continue
        try:
            if os.stat(_path(name)).st_uid != uid:
                continue
        except (FileNotFoundError, SegmentError):
            continue
        if unlink_segment(name):
            removed.append(name)
    return removed
