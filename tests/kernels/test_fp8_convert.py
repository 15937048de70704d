"""kernels/fp8_convert.py: the integer e4m3 -> bf16 conversion and the fp8 -> float16 bit placement. Each one against
torch's own conversion for every code, its PTX run instruction by instruction by a small model of the PTX ISA's
semantics (the interpreter cannot run inline assembly), and its sm_90 compile. On CUDA the kernels themselves."""

from __future__ import annotations

import re

import pytest
import torch

pytest.importorskip("triton")

from kernels.fp8_convert import (  # noqa: E402
    E4M3_TO_BF16_ASM,
    F16_BITS_SCALE,
    e4m3_bits_to_bf16_ref,
    f16_bits_asm,
    fp8_bits_to_f16_ref,
)
from tests.kernel_fixtures import CUDA, compile_for_sm90, facts_without_interpreter  # noqa: E402

CODES = torch.arange(256, dtype=torch.int32).to(torch.uint8)
NAN_CODES = {0x7F, 0xFF}


def test_bit_placement_is_exact_for_every_e4m3_code():
    ours = e4m3_bits_to_bf16_ref(CODES)
    theirs = CODES.view(torch.float8_e4m3fn).to(torch.bfloat16)
    for code in range(256):
        if code not in NAN_CODES:
            assert ours[code].view(torch.int16) == theirs[code].view(torch.int16), hex(code)


def bf16(bits: int) -> float:
    return torch.tensor([bits], dtype=torch.int32).to(torch.int16).view(torch.bfloat16).item()


def bf16_bits(value: float) -> int:
    return torch.tensor([value], dtype=torch.float64).to(torch.bfloat16).view(torch.int16).item() & 0xFFFF


def run_ptx(asm: str, operands: dict[str, int]) -> dict[str, int]:
    """Execute the instructions the conversion uses, on 32-bit integers, as the PTX ISA defines them."""
    regs = dict(operands)

    def value(token: str) -> int:
        return regs[token] if token in regs else int(token, 0)

    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if line in ("{", "}") or line.startswith(".reg"):
            continue
        op, args = line.split(None, 1)
        dst, *src = [a.strip() for a in args.split(",")]
        a = [value(s) for s in src]
        if op == "and.b32":
            out = a[0] & a[1]
        elif op == "or.b32":
            out = a[0] | a[1]
        elif op == "shr.b32":
            out = a[0] >> a[1]
        elif op == "mov.b32":
            out = a[0]
        elif op == "prmt.b32":  # bytes 0-3 from a, 4-7 from b; selector nibble i picks result byte i
            pool = (a[0] & 0xFFFFFFFF) | (a[1] & 0xFFFFFFFF) << 32
            assert all(not (a[2] >> (4 * i)) & 8 for i in range(4)), "sign-replicate mode is not modelled"
            out = sum(((pool >> (8 * ((a[2] >> (4 * i)) & 7))) & 0xFF) << (8 * i) for i in range(4))
        elif op == "lop3.b32":  # result bit = lut bit number (a << 2 | b << 1 | c)
            out = sum(((a[3] >> (((a[0] >> i) & 1) << 2 | ((a[1] >> i) & 1) << 1 | ((a[2] >> i) & 1))) & 1) << i
                      for i in range(32))
        elif op == "fma.rn.bf16x2":  # per 16-bit half, rounded once
            out = 0
            for half in (0, 16):
                x, y, z = (bf16((v >> half) & 0xFFFF) for v in a)
                out |= bf16_bits(x * y + z) << half
        else:
            raise AssertionError(f"unmodelled instruction {op}")
        regs[dst] = out & 0xFFFFFFFF
    return regs


def test_the_ptx_computes_the_bit_placement_for_every_code():
    expected = e4m3_bits_to_bf16_ref(CODES).view(torch.int16).to(torch.int32) & 0xFFFF
    for first in range(0, 256, 4):
        packed = sum(code << (8 * i) for i, code in enumerate(range(first, first + 4)))
        regs = run_ptx(E4M3_TO_BF16_ASM, {"$2": packed})
        got = [regs["$0"] & 0xFFFF, regs["$0"] >> 16, regs["$1"] & 0xFFFF, regs["$1"] >> 16]
        assert got == expected[first:first + 4].tolist(), hex(first)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float16_bit_placement_is_exact_for_every_finite_code(dtype):
    ours = fp8_bits_to_f16_ref(CODES, dtype).double() * F16_BITS_SCALE[dtype]
    theirs = CODES.view(dtype).double()
    finite = theirs.isfinite()
    assert finite.sum() >= 248 and torch.equal(ours[finite], theirs[finite])


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("staged", [False, True])
def test_the_float16_ptx_computes_the_bit_placement_for_every_code(dtype, staged):
    expected = fp8_bits_to_f16_ref(CODES, dtype).view(torch.int16).to(torch.int32) & 0xFFFF
    asm = f16_bits_asm(e5m2=dtype == torch.float8_e5m2, staged=staged)
    for first in range(0, 256, 4):
        packed = sum(code << (8 * i) for i, code in enumerate(range(first, first + 4)))
        regs = run_ptx(asm, {"$2": packed, "$3": 0})
        got = [regs["$0"] & 0xFFFF, regs["$0"] >> 16, regs["$1"] & 0xFFFF, regs["$1"] >> 16]
        assert got == expected[first:first + 4].tolist(), hex(first)


def conversion_ptx_facts() -> dict[str, int]:
    """The sm_90 PTX of a copy kernel through e4m3_to_bf16: Triton's conversions it avoids, the ones it uses."""
    import triton
    import triton.language as tl

    from kernels.fp8_convert import e4m3_to_bf16

    @triton.jit
    def copy(src_ptr, dst_ptr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(dst_ptr + offs, e4m3_to_bf16(tl.load(src_ptr + offs)))

    ptx = compile_for_sm90(copy, {"src_ptr": "*fp8e4nv", "dst_ptr": "*bf16"}, {"BLOCK": 1024},
                           ["src_ptr", "dst_ptr"])
    names = re.findall(r"\b(cvt\.[\w.]+|prmt\.b32|lop3\.b32|fma\.rn\.bf16x2)", ptx)
    return {name: names.count(name) for name in set(names)}


def test_the_conversion_compiles_for_hopper_without_conversion_instructions():
    facts = facts_without_interpreter("tests.kernels.test_fp8_convert", "conversion_ptx_facts")
    assert facts.get("fma.rn.bf16x2", 0) > 0 and facts.get("lop3.b32", 0) > 0, facts
    assert not any(name.startswith("cvt") and ("e4m3" in name or "bf16" in name) for name in facts), facts


@pytest.mark.skipif(not CUDA, reason="inline PTX runs on CUDA only")
def test_the_kernel_converts_every_code_on_cuda():
    import triton
    import triton.language as tl

    from kernels.fp8_convert import e4m3_to_bf16

    @triton.jit
    def copy(src_ptr, dst_ptr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(dst_ptr + offs, e4m3_to_bf16(tl.load(src_ptr + offs)))

    src = CODES.cuda().view(torch.float8_e4m3fn)
    dst = torch.empty(256, dtype=torch.bfloat16, device="cuda")
    copy[(1,)](src, dst, BLOCK=256)
    assert torch.equal(dst.cpu().view(torch.int16), e4m3_bits_to_bf16_ref(CODES).view(torch.int16))


@pytest.mark.skipif(not CUDA, reason="inline PTX runs on CUDA only")
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_the_float16_kernels_place_every_code_on_cuda(dtype):
    import triton
    import triton.language as tl

    from kernels.fp8_convert import fp8_bits_to_f16, fp8_bits_to_f16_staged

    @triton.jit
    def copy(src_ptr, dst_ptr, staged_ptr, zero, BLOCK: tl.constexpr, E5M2: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        x = tl.load(src_ptr + offs)
        tl.store(dst_ptr + offs, fp8_bits_to_f16(x, E5M2))
        tl.store(staged_ptr + offs, fp8_bits_to_f16_staged(x, zero, E5M2))

    src = CODES.cuda().view(dtype)
    dst, staged = (torch.empty(256, dtype=torch.float16, device="cuda") for _ in range(2))
    copy[(1,)](src, dst, staged, 0, BLOCK=256, E5M2=dtype == torch.float8_e5m2)
    expected = fp8_bits_to_f16_ref(CODES, dtype).view(torch.int16)
    assert torch.equal(dst.cpu().view(torch.int16), expected)
    assert torch.equal(staged.cpu().view(torch.int16), expected)
