"""What the kernel tests share: the device they run on, the dtypes and tolerances, the relative error
measure, a fresh random seed per test, and ahead-of-time compiles for Hopper (no GPU needed). On a machine
without CUDA, tests/conftest.py has set TRITON_INTERPRET=1 before anything imported triton, so the kernels run in
Triton's interpreter."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

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


def compile_for_sm90(kernel, signature: dict, constants: dict, aligned: list[str], tiles=None,
                     num_warps: int = 4) -> str:
    """Compile `kernel` ahead of time for Hopper (no GPU needed: Triton ships ptxas) as its JIT would specialise it
    for Llama-3-8B's shapes: pointers and the named integers divisible by 16. `tiles`, when given, has num_warps and
    num_stages. Returns the PTX. Only outside Triton's interpreter (see facts_without_interpreter)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(signature) + list(constants)
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    options = ({"num_warps": num_warps} if tiles is None else
               {"num_warps": tiles.num_warps, "num_stages": tiles.num_stages})
    source = ASTSource(kernel, {**signature, **dict.fromkeys(constants, "constexpr")}, constants, attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]


def facts_without_interpreter(module: str, function: str):
    """Call module.function() in a Python without TRITON_INTERPRET (the interpreter, once on in a process, patches
    triton.language for good, so nothing compiles there) and return its JSON-able result. Skips without Triton's
    NVIDIA backend."""
    pytest.importorskip("triton.backends.nvidia")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    code = f"import json; from {module} import {function} as f; print(json.dumps(f()))"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
