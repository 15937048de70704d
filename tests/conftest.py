"""Suite-wide checks. After the whole suite, /dev/shm holds nothing of ours: no segment of this
test process, and no segment left behind by a server run (launcher) that has since died."""

from __future__ import annotations

import os
import re

import psutil
import pytest
import torch

# Triton reads TRITON_INTERPRET when it is first imported: set it before any test module imports
# kernels/, so on a machine without CUDA every Triton kernel runs in the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHM_DIR = "/dev/shm"
RUN_SEGMENT = re.compile(r"^rt(\d+)_")


def leftover_segments(existing_before: set[str]) -> list[str]:
    leftovers = []
    for name in os.listdir(SHM_DIR):
        match = RUN_SEGMENT.match(name)
        if not match or name in existing_before:
            continue
        owner = int(match.group(1))
        # Segments of other live launchers (a server someone runs beside the suite) are not ours.
        if owner == os.getpid() or not psutil.pid_exists(owner):
            leftovers.append(name)
    return sorted(leftovers)


@pytest.fixture(scope="session", autouse=True)
def no_shared_memory_left_behind():
    before = set(os.listdir(SHM_DIR))
    yield
    leftovers = leftover_segments(before)
    assert not leftovers, f"the test suite left shared-memory segments in {SHM_DIR}: {leftovers}"
