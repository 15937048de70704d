"""What the kernel tests share: the device they run on, the dtypes and tolerances, the relative error
measure, and a fresh random seed per test. On a machine without CUDA, tests/conftest.py has set
TRITON_INTERPRET=1 before anything imported triton, so the kernels run in Triton's interpreter."""

from __future__ import annotations

import random

import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# Triton's interpreter computes bf16 dot products on the raw bits and truncates float32 -> bf16 instead of
# rounding, so on the CPU the 16-bit path is exercised with fp16; the GPU run covers bf16 as well.
DTYPES = [torch.float32, torch.bfloat16, torch.float16] if CUDA else [torch.float32, torch.float16]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.fixture
def seed() -> int:
    value = random.randrange(2**31)
    torch.manual_seed(value)
    return value
