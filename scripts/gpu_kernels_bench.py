"""Kernel micro-benchmarks on CUDA at Llama-3-8B shapes: each Triton kernel against its torch counterpart.

Every case first checks the kernel at the benchmark shape against its reference (fresh random inputs, output
poisoned with NaN), then times both with triton.testing.do_bench (median, L2 flushed between runs). The table gives
the memory floor (bytes that must move / measured copy bandwidth) where the kernel is memory-bound, so the gap to the
floor shows. Prints one markdown table; --table writes it to a file too.

    python3 scripts/gpu_kernels_bench.py [--table PATH] [--only decode,extend,...]
"""

from __future__ import annotations

import argparse
import math
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import triton  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kernels.activation import silu_and_mul, silu_and_mul_ref  # noqa: E402
from kernels.decode_attention import choose_num_kv_splits, decode_attention, decode_attention_ref  # noqa: E402
from kernels.extend_attention import extend_attention, extend_attention_ref  # noqa: E402
from kernels.kv_store import store_kv, store_kv_ref  # noqa: E402
from kernels.rmsnorm import fused_add_rms_norm, fused_add_rms_norm_ref, rms_norm, rms_norm_ref  # noqa: E402
from kernels.rotary import apply_rotary, apply_rotary_ref, build_cos_sin_cache  # noqa: E402
from kernels.sampling import keep_mask_ref, sample_from_probs, sample_from_probs_ref, sampling_thresholds  # noqa: E402


@dataclass(frozen=True)
class Shape:
    """Llama-3-8B, one GPU."""

    num_q_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    hidden: int = 4096
    intermediate: int = 14336
    vocab: int = 128256
    rope_theta: float = 500000.0


@dataclass
class Row:
    kernel: str
    case: str
    triton_us: float
    torch_us: float
    rel_err: float | None = None
    bytes_moved: float | None = None
    note: str = ""


DTYPE = torch.bfloat16
LLAMA = Shape()


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3  # microseconds


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    if out.isnan().any():
        return math.nan
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def copy_bandwidth() -> float:
    """Bytes per second of a large device-to-device copy, counting bytes read and written."""
    src = torch.randn(256 << 20, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    us = bench(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / (us * 1e-6)


def paged_pool(num_slots: int):
    s = LLAMA
    k_pool = torch.randn(num_slots, s.num_kv_heads, s.head_dim, dtype=DTYPE, device="cuda")
    return k_pool, torch.randn_like(k_pool)


def torch_paged_decode(q, k_pool, v_pool, slots, scale):
    """The torch backend's way: gather the rows' K/V, one SDPA with the GQA group folded into the queries."""
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads = k_pool.shape[1]
    keys = k_pool[slots].transpose(1, 2)  # [B, Hkv, L, D]
    values = v_pool[slots].transpose(1, 2)
    queries = q.view(batch, num_kv_heads, num_q_heads // num_kv_heads, head_dim)
    return F.scaled_dot_product_attention(queries, keys, values, scale=scale).reshape(batch, num_q_heads, head_dim)


def case_decode(rows: list[Row]) -> None:
    s = LLAMA
    scale = s.head_dim**-0.5
    for batch, seq_len in ((1, 1024), (1, 4096), (64, 1024), (64, 4096)):
        k_pool, v_pool = paged_pool(batch * seq_len + 1)
        slots = (torch.randperm(batch * seq_len, device="cuda") + 1).view(batch, seq_len)
        req_to_token = slots.to(torch.int32)
        rows_t = torch.arange(batch, device="cuda")
        seq_lens = torch.full((batch,), seq_len, dtype=torch.int32, device="cuda")
        q = torch.randn(batch, s.num_q_heads, s.head_dim, dtype=DTYPE, device="cuda")
        splits = choose_num_kv_splits(batch, s.num_kv_heads, seq_len, torch.cuda.get_device_properties(0)
                                      .multi_processor_count)
        out = torch.full_like(q, float("nan"))
        decode_attention(q, k_pool, v_pool, req_to_token, rows_t, seq_lens, scale, splits, out=out)
        err = rel_err(out, decode_attention_ref(q, k_pool, v_pool, req_to_token, rows_t, seq_lens, scale))
        sweep = {n: bench(lambda n=n: decode_attention(q, k_pool, v_pool, req_to_token, rows_t, seq_lens, scale, n))
                 for n in (1, 2, 4, 8, 16)}
        best = min(sweep, key=sweep.get)
        rows.append(Row("decode_attention", f"B={batch} L={seq_len} splits={splits}", sweep[splits],
                        bench(lambda: torch_paged_decode(q, k_pool, v_pool, slots, scale)), err,
                        2 * batch * seq_len * s.num_kv_heads * s.head_dim * 2,
                        f"best splits={best} ({sweep[best]:.1f} us); " +
                        " ".join(f"{n}:{t:.0f}" for n, t in sweep.items())))


def case_extend(rows: list[Row]) -> None:
    s = LLAMA
    scale = s.head_dim**-0.5
    for batch, prefix_len, extend_len in ((1, 0, 2048), (4, 1024, 512)):
        num_tokens = batch * extend_len
        k_pool, v_pool = paged_pool(batch * prefix_len + 1)
        req_to_token = (torch.randperm(max(1, batch * prefix_len), device="cuda") + 1).to(torch.int32)
        req_to_token = req_to_token[: batch * prefix_len].view(batch, prefix_len) if prefix_len else \
            torch.zeros(batch, 1, dtype=torch.int32, device="cuda")
        rows_t = torch.arange(batch, device="cuda")
        meta = [torch.full((batch,), v, dtype=torch.int32, device="cuda") for v in (prefix_len, extend_len)]
        starts = torch.arange(batch, dtype=torch.int32, device="cuda") * extend_len
        q = torch.randn(num_tokens, s.num_q_heads, s.head_dim, dtype=DTYPE, device="cuda")
        k = torch.randn(num_tokens, s.num_kv_heads, s.head_dim, dtype=DTYPE, device="cuda")
        v = torch.randn_like(k)
        args = (q, k, v, k_pool, v_pool, req_to_token, rows_t, *meta, starts)
        out = torch.full_like(q, float("nan"))
        extend_attention(*args, extend_len, scale, out=out)
        err = rel_err(out, extend_attention_ref(*args, scale))

        def torch_extend():
            """Gather the prefix, then one causal-with-offset SDPA per batch (the torch backend's math)."""
            prefix_k = k_pool[req_to_token[:, :prefix_len].long()]  # [B, P, Hkv, D]
            prefix_v = v_pool[req_to_token[:, :prefix_len].long()]
            keys = torch.cat([prefix_k, k.view(batch, extend_len, s.num_kv_heads, s.head_dim)], 1).transpose(1, 2)
            values = torch.cat([prefix_v, v.view(batch, extend_len, s.num_kv_heads, s.head_dim)], 1).transpose(1, 2)
            queries = q.view(batch, extend_len, s.num_q_heads, s.head_dim).transpose(1, 2)
            mask = torch.ones(extend_len, prefix_len + extend_len, dtype=torch.bool, device="cuda").tril(prefix_len)
            return F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=scale,
                                                  enable_gqa=True)

        triton_us = bench(lambda: extend_attention(*args, extend_len, scale))
        flops = 4 * batch * extend_len * (prefix_len + extend_len / 2) * s.num_q_heads * s.head_dim
        rows.append(Row("extend_attention", f"B={batch} prefix={prefix_len} extend={extend_len}", triton_us,
                        bench(torch_extend), err, None, f"{flops / (triton_us * 1e-6) / 1e12:.0f} TFLOP/s"))


def case_elementwise(rows: list[Row]) -> None:
    s = LLAMA
    for tokens in (64, 4096):
        x = torch.randn(tokens, s.hidden, dtype=DTYPE, device="cuda")
        w = torch.rand(s.hidden, dtype=DTYPE, device="cuda") + 0.5
        out = torch.full_like(x, float("nan"))
        rms_norm(x, w, 1e-5, out=out)
        rows.append(Row("rms_norm", f"T={tokens} H={s.hidden}", bench(lambda: rms_norm(x, w, 1e-5, out=out)),
                        bench(lambda: rms_norm_ref(x, w, 1e-5)), rel_err(out, rms_norm_ref(x, w, 1e-5)),
                        2 * x.numel() * 2))

        residual = torch.randn_like(x)
        ref_out, ref_res = fused_add_rms_norm_ref(x, residual, w, 1e-5)
        x2, r2 = x.clone(), residual.clone()
        fused_add_rms_norm(x2, r2, w, 1e-5)
        err = max(rel_err(x2, ref_out), rel_err(r2, ref_res))
        rows.append(Row("fused_add_rms_norm", f"T={tokens} H={s.hidden}",
                        bench(lambda: fused_add_rms_norm(x2, r2, w, 1e-5)),
                        bench(lambda: fused_add_rms_norm_ref(x, residual, w, 1e-5)), err, 4 * x.numel() * 2))

        inv_freq = 1.0 / (s.rope_theta ** (torch.arange(0, s.head_dim, 2, device="cuda").float() / s.head_dim))
        cache = build_cos_sin_cache(inv_freq, 8192)
        positions = torch.randint(0, 8192, (tokens,), device="cuda")
        q = torch.randn(tokens, s.num_q_heads, s.head_dim, dtype=DTYPE, device="cuda")
        k = torch.randn(tokens, s.num_kv_heads, s.head_dim, dtype=DTYPE, device="cuda")
        ref_q, ref_k = apply_rotary_ref(positions, q, k, cache)
        apply_rotary(positions, q, k, cache)
        err = max(rel_err(q, ref_q), rel_err(k, ref_k))
        rows.append(Row("rotary", f"T={tokens} Hq={s.num_q_heads} Hkv={s.num_kv_heads}",
                        bench(lambda: apply_rotary(positions, q, k, cache)),
                        bench(lambda: apply_rotary_ref(positions, q, k, cache)), err,
                        2 * (q.numel() + k.numel()) * 2))

        gate_up = torch.randn(tokens, 2 * s.intermediate, dtype=DTYPE, device="cuda")
        out = torch.full((tokens, s.intermediate), float("nan"), dtype=DTYPE, device="cuda")
        silu_and_mul(gate_up, out=out)
        rows.append(Row("silu_and_mul", f"T={tokens} I={s.intermediate}", bench(lambda: silu_and_mul(gate_up, out)),
                        bench(lambda: silu_and_mul_ref(gate_up)), rel_err(out, silu_and_mul_ref(gate_up)),
                        3 * out.numel() * 2))

        k_pool, v_pool = paged_pool(65537)
        ref_k, ref_v = k_pool.clone(), v_pool.clone()
        slots = torch.randperm(65536, device="cuda")[:tokens] + 1
        new_k = torch.randn(tokens, s.num_kv_heads, s.head_dim, dtype=DTYPE, device="cuda")
        new_v = torch.randn_like(new_k)
        store_kv(k_pool, v_pool, slots, new_k, new_v)
        store_kv_ref(ref_k, ref_v, slots, new_k, new_v)
        exact = torch.equal(k_pool, ref_k) and torch.equal(v_pool, ref_v)
        rows.append(Row("store_kv", f"T={tokens} Hkv={s.num_kv_heads}",
                        bench(lambda: store_kv(k_pool, v_pool, slots, new_k, new_v)),
                        bench(lambda: store_kv_ref(ref_k, ref_v, slots, new_k, new_v)), 0.0 if exact else math.nan,
                        4 * new_k.numel() * 2))


def case_sampling(rows: list[Row]) -> None:
    s = LLAMA
    try:
        from runtime.messages import LogprobOptions, SamplingParams
        from runtime.sampling import Sampler
    except ImportError:  # msgspec missing: compare with the sort-based reference only
        Sampler = None
    for batch in (1, 64):
        logits = torch.randn(batch, s.vocab, device="cuda") * 3
        probs = logits.softmax(-1)
        keys = torch.randint(0, 2**32, (batch,), device="cuda")
        for top_k, top_p, min_p in ((50, 1.0, 0.0), (-1, 0.9, 0.0), (50, 0.9, 0.05), (-1, 1.0, 0.1)):
            per_row = [torch.full((batch,), v, dtype=d, device="cuda")
                       for v, d in ((top_k, torch.int32), (top_p, torch.float32), (min_p, torch.float32))]
            kept = probs >= sampling_thresholds(probs, *per_row)[:, None]
            mismatched_rows = int((kept != keep_mask_ref(probs, *per_row)).any(-1).sum())
            triton_us = bench(lambda: sample_from_probs((logits / 0.8).softmax(-1), *per_row, keys))
            note = f"sort ref {bench(lambda: sample_from_probs_ref((logits / 0.8).softmax(-1), *per_row)):.0f} us"
            torch_us = math.nan
            if Sampler is not None:
                sampler = Sampler(max_rows=batch, vocab_size=s.vocab, eos_token_ids=[], device="cuda")
                for row in range(batch):
                    sampler.add_row(row, SamplingParams(temperature=0.8, top_k=top_k, top_p=top_p, min_p=min_p),
                                    LogprobOptions())
                row_ids = list(range(batch))
                torch_us = bench(lambda: sampler.sample(logits, row_ids))
                note += "; torch = runtime Sampler.sample"
            rows.append(Row("sampling", f"B={batch} V={s.vocab} k={top_k} p={top_p} min_p={min_p}", triton_us,
                            torch_us, float(mismatched_rows), None, note + "; err = rows whose kept set differs"))


def case_backend(rows: list[Row]) -> None:
    """One attention layer of a decode step through each backend (k/v store included), and the Triton backend's
    decode step captured in a CUDA graph: the replay must reproduce the eager output."""
    from runtime.attention.base import AttentionSpec
    from runtime.attention.torch_backend import TorchAttentionBackend
    from runtime.attention.triton_backend import TritonAttentionBackend
    from runtime.forward_batch import ForwardBatch
    from runtime.kv_pool import KVPool

    s = LLAMA
    spec = AttentionSpec(num_layers=1, num_q_heads=s.num_q_heads, num_kv_heads=s.num_kv_heads, head_dim=s.head_dim,
                         scale=s.head_dim**-0.5)
    for batch, seq_len in ((1, 4096), (64, 4096)):
        pool = KVPool(batch * seq_len, 1, s.num_kv_heads, s.head_dim, DTYPE, "cuda")
        pool.k[0].normal_()
        pool.v[0].normal_()
        req_to_token = torch.zeros(batch, seq_len, dtype=torch.int32, device="cuda")
        req_to_token[:] = (torch.randperm(batch * seq_len, device="cuda") + 1).view(batch, seq_len)
        out_slots = req_to_token[:, -1].long()
        fb = ForwardBatch.build(input_ids=torch.zeros(batch, dtype=torch.int64, device="cuda"), out_slots=out_slots,
                                rows=list(range(batch)), prefix_lens=[seq_len - 1] * batch, extend_lens=[1] * batch,
                                req_to_token=req_to_token)
        q = torch.randn(batch, s.num_q_heads, s.head_dim, dtype=DTYPE, device="cuda")
        k = torch.randn(batch, s.num_kv_heads, s.head_dim, dtype=DTYPE, device="cuda")
        v = torch.randn_like(k)
        triton_backend, torch_backend = TritonAttentionBackend(spec, pool), TorchAttentionBackend(spec, pool)
        triton_backend.prepare(fb)
        torch_backend.prepare(fb)
        eager = triton_backend.forward(q, k, v, 0, fb).clone()
        err = rel_err(eager, torch_backend.forward(q, k, v, 0, fb))
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            triton_backend.forward(q, k, v, 0, fb)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = triton_backend.forward(q, k, v, 0, fb)
        captured.fill_(float("nan"))
        graph.replay()
        replay_ok = torch.equal(captured, eager)
        triton_us = bench(lambda: triton_backend.forward(q, k, v, 0, fb))
        rows.append(Row("attention layer (backend)", f"decode B={batch} L={seq_len}", triton_us,
                        bench(lambda: torch_backend.forward(q, k, v, 0, fb)), err if replay_ok else math.nan,
                        2 * batch * seq_len * s.num_kv_heads * s.head_dim * 2,
                        f"CUDA graph replay {bench(graph.replay):.1f} us, output "
                        f"{'identical' if replay_ok else 'DIFFERS'}"))


CASES = {"decode": case_decode, "backend": case_backend, "extend": case_extend, "elementwise": case_elementwise, "sampling": case_sampling}


def format_table(rows: list[Row], bandwidth: float) -> str:
    lines = ["| kernel | case | triton us | torch us | speedup | rel err | GB/s | floor us | note |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        speedup = r.torch_us / r.triton_us if r.triton_us and not math.isnan(r.torch_us) else math.nan
        gbs = f"{r.bytes_moved / (r.triton_us * 1e-6) / 1e9:.0f}" if r.bytes_moved else ""
        floor = f"{r.bytes_moved / bandwidth * 1e6:.1f}" if r.bytes_moved else ""
        err = "" if r.rel_err is None else f"{r.rel_err:.1e}"
        lines.append(f"| {r.kernel} | {r.case} | {r.triton_us:.1f} | {r.torch_us:.1f} | {speedup:.2f}x | {err} | "
                     f"{gbs} | {floor} | {r.note} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", type=Path, help="also write the markdown table here")
    parser.add_argument("--only", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_kernels_bench: no CUDA device", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    bandwidth = copy_bandwidth()
    props = torch.cuda.get_device_properties(0)
    header = (f"{props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, triton "
              f"{triton.__version__}, bf16; copy bandwidth {bandwidth / 1e12:.2f} TB/s (floor = bytes / that)")
    rows: list[Row] = []
    failed = False
    for name in args.only.split(","):
        try:
            CASES[name](rows)
        except Exception:  # one broken case must not hide the others' numbers
            failed = True
            traceback.print_exc()
            rows.append(Row(name, "FAILED (traceback above)", math.nan, math.nan))
    table = header + "\n\n" + format_table(rows, bandwidth)
    print(table)
    if args.table:
        args.table.write_text(table + "\n")
    bad = [r for r in rows if r.rel_err is not None and (math.isnan(r.rel_err) or
                                                          (r.kernel != "sampling" and r.rel_err > 1e-2))]
    for r in bad:
        print(f"ACCURACY FAILURE: {r.kernel} {r.case}: rel err {r.rel_err}", file=sys.stderr)
    return 1 if failed or bad else 0


if __name__ == "__main__":
    sys.exit(main())
