"""fp8 -> bfloat16 / float16 in integer instructions, for kernels that stream fp8 weights or KV into tensor-core
products.

Why: Triton lowers e4m3 -> bf16 on Hopper to a packed e4m3 -> f16 conversion (two values) and then one f16 -> bf16
conversion per value, with unpacking between them (the sm_90 PTX of kernels/fp8_gemm.py: 32 packed and 64 scalar
conversions per thread and K step). Those run on the conversion pipe, about 16 per clock per SM, the same rate at
which HBM delivers fp8 bytes to an SM at full bandwidth: the weight-only GEMM topped out near 60% of the copy
bandwidth on an H200 whatever its tiles.

How, exact for every finite e4m3 value: e4m3's 4 exponent and 3 mantissa bits (bias 7) go to bf16's low 4 exponent
bits and top 3 mantissa bits (bias 127), its sign to bf16's sign. That bf16 reads the value times 2^-120, for
normal and subnormal values alike (e4m3's subnormals land on bf16's), and one packed bf16 FMA by 2^120 restores it
(a power of two; bf16 FMA keeps subnormal inputs). Per four values: one AND, four byte permutes, two shifts, two
LOP3s, two FMAs on the integer and FMA pipes. NaN codes (0x7f, 0xff) become 480 and -480; fp8 weights hold none.

Into float16 (attention over an fp8 KV pool), `fp8_bits_to_f16` leaves the value scaled, and the caller folds the
power of two into a scale it applies anyway (the score scale, v_scale): exact for every finite code.
- e5m2 is float16's top byte: one byte permute per two values, scale 1;
- e4m3's bits go to float16's low 4 exponent and top 3 mantissa bits (bias 15), which reads the value times 2^-8
  (`F16_BITS_SCALE`), subnormals included: per four values one AND, four byte permutes, two shifts, two LOP3s.
`fp8_bits_to_f16_staged` also ORs in a runtime zero. A second, non-constant operand keeps Triton from moving the
conversion after the shared-memory load of an MMA operand: for a k-major fp8 operand (V in p @ V) that load reads
one byte per instruction (128 ld.shared.b8 per thread and 128-key tile); the float16 tile instead goes through
shared memory in 16-byte stores and ldmatrix.trans.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# $2: four e4m3 bytes, value i in byte i. $0: values 0 and 1 as bf16 (value 0 in the low half); $1: values 2 and 3.
E4M3_TO_BF16_ASM = """{
.reg .b32 t, s0, s1, m0, m1, k, z;
and.b32 t, $2, 0x7f7f7f7f;
prmt.b32 s0, $2, 0, 0x1404;
prmt.b32 s1, $2, 0, 0x3424;
prmt.b32 m0, t, 0, 0x1404;
prmt.b32 m1, t, 0, 0x3424;
shr.b32 m0, m0, 4;
shr.b32 m1, m1, 4;
lop3.b32 s0, s0, 0x80008000, m0, 0xea;
lop3.b32 s1, s1, 0x80008000, m1, 0xea;
mov.b32 k, 0x7b807b80;
mov.b32 z, 0x80008000;
fma.rn.bf16x2 $0, s0, k, z;
fma.rn.bf16x2 $1, s1, k, z;
}"""
_ASM = tl.constexpr(E4M3_TO_BF16_ASM)  # a global a @triton.jit function reads must be a constexpr object


@triton.jit
def e4m3_to_bf16(w):
    """An float8e4nv tensor -> bfloat16 (CUDA only: inline PTX, which Triton's interpreter cannot run)."""
    return tl.inline_asm_elementwise(_ASM, "=r,=r,r", [w.to(tl.uint8, bitcast=True)],
                                     dtype=tl.bfloat16, is_pure=True, pack=4)


def f16_bits_asm(e5m2: bool, staged: bool) -> str:
    """PTX for four fp8 bytes in $2 (value i in byte i) -> float16 bits: values 0 and 1 in $0 (value 0 in the low
    half), 2 and 3 in $1. Staged: of ($2 | $3)."""
    src = "w" if staged else "$2"
    lines = [".reg .b32 w, t, s0, s1, m0, m1;"] + (["or.b32 w, $2, $3;"] if staged else [])
    if e5m2:
        lines += [f"prmt.b32 $0, {src}, 0, 0x1404;", f"prmt.b32 $1, {src}, 0, 0x3424;"]
    else:
        lines += [f"and.b32 t, {src}, 0x7f7f7f7f;",  # magnitudes
                  f"prmt.b32 s0, {src}, 0, 0x1404;", f"prmt.b32 s1, {src}, 0, 0x3424;",  # byte i -> top of half i
                  "prmt.b32 m0, t, 0, 0x1404;", "prmt.b32 m1, t, 0, 0x3424;",
                  "shr.b32 m0, m0, 1;", "shr.b32 m1, m1, 1;",  # magnitude bits to float16's bits 13..7
                  "lop3.b32 $0, s0, 0x80008000, m0, 0xea;", "lop3.b32 $1, s1, 0x80008000, m1, 0xea;"]  # sign | rest
    return "{\n" + "\n".join(lines) + "\n}"


_E4M3_F16 = tl.constexpr(f16_bits_asm(e5m2=False, staged=False))
_E5M2_F16 = tl.constexpr(f16_bits_asm(e5m2=True, staged=False))
_E4M3_F16_STAGED = tl.constexpr(f16_bits_asm(e5m2=False, staged=True))
_E5M2_F16_STAGED = tl.constexpr(f16_bits_asm(e5m2=True, staged=True))
F16_BITS_SCALE = {torch.float8_e4m3fn: 256.0, torch.float8_e5m2: 1.0}  # true value = float16 read x this


@triton.jit
def fp8_bits_to_f16(x, E5M2: tl.constexpr):
    """An fp8 tensor -> float16 holding its value / F16_BITS_SCALE[dtype] (CUDA only: inline PTX)."""
    asm: tl.constexpr = _E5M2_F16 if E5M2 else _E4M3_F16
    return tl.inline_asm_elementwise(asm, "=r,=r,r", [x.to(tl.uint8, bitcast=True)], dtype=tl.float16,
                                     is_pure=True, pack=4)


@triton.jit
def fp8_bits_to_f16_staged(x, zero, E5M2: tl.constexpr):
    """fp8_bits_to_f16 of x | zero, zero a runtime scalar 0 (why: the module docstring)."""
    asm: tl.constexpr = _E5M2_F16_STAGED if E5M2 else _E4M3_F16_STAGED
    zeros = tl.full(x.shape, 0, tl.uint8) | zero.to(tl.uint8)
    return tl.inline_asm_elementwise(asm, "=r,=r,r,r", [x.to(tl.uint8, bitcast=True), zeros], dtype=tl.float16,
                                     is_pure=True, pack=4)


def fp8_bits_to_f16_ref(codes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The same bit placement in torch, on uint8 codes: the float16 the PTX leaves (value / F16_BITS_SCALE)."""
    c = codes.to(torch.int32)
    bits = c << 8 if dtype == torch.float8_e5m2 else ((c & 0x80) << 8) | ((c & 0x7F) << 7)
    return bits.to(torch.int16).view(torch.float16)


def fast_e4m3_applies(x_dtype: torch.dtype, weight_dtype: torch.dtype) -> bool:
    """Whether a kernel multiplying x by an fp8 weight should convert the weight with e4m3_to_bf16 (into bf16
    products) rather than Triton's conversion, which is as fast only into float16. CUDA tensors only."""
    return x_dtype == torch.bfloat16 and weight_dtype == torch.float8_e4m3fn


def e4m3_bits_to_bf16_ref(codes: torch.Tensor) -> torch.Tensor:
    """The same bit placement and scaling in torch, on uint8 codes: what the PTX computes."""
    c = codes.to(torch.int32)
    bits = ((c & 0x80) << 8) | ((c & 0x7F) << 4)
    return bits.to(torch.int16).view(torch.bfloat16).float().mul(2.0**120).to(torch.bfloat16)
