"""Kernel micro-benchmarks on CUDA at Llama-3-8B shapes (the fused MoE at Mixtral-8x7B's, MLA decode at
DeepSeek-V2-Lite's): each Triton kernel against its torch counterpart.

Every case first checks the kernel at the benchmark shape against its reference (fresh random inputs, output
poisoned with NaN), then times it. Two timings per side:
- graph: the calls captured in one CUDA graph and replayed (median over replays): device time without Python
  launch overhead, which is how decode steps run once CUDA graphs are on. Where one input set fits in L2, the
  graph cycles through enough sets (disjoint pool slots) to defeat the cache.
- eager: triton.testing.do_bench median (L2 flushed between runs), Python launch overhead included.
The floor is the bytes that must move over the measured copy bandwidth, for memory-bound kernels.
--sweep also times the attention kernels under other tile shapes and split counts, to choose the defaults.
Decode attention also runs at serving-at-saturation shapes (batch 256 and 512 at contexts 1k, 4k, 16k; batch 1 at
32k); `--decode-shapes saturation` runs only those (their torch counterparts are skipped above 4 GB of KV: the gather
would copy it all). "of copy" = GB/s over the copy bandwidth (the issue's bar: >= 85%).

    python3 scripts/gpu_kernels_bench.py [--table PATH] [--sweep]
        [--only decode,backend,extend,elementwise,sampling,moe,fp8,fp8_gemm,mla,fp8_kv] [--decode-shapes all|saturation]
        [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

from kernels.activation import silu_and_mul, silu_and_mul_ref  # noqa: E402
from kernels.decode_attention import (  # noqa: E402
    DecodeTiles,
    choose_num_kv_splits,
    decode_attention,
    decode_attention_ref,
    default_decode_tiles,
)
from kernels.extend_attention import ExtendTiles, default_extend_tiles, extend_attention, extend_attention_ref  # noqa: E402
from kernels.fp8_gemm import (  # noqa: E402
    Fp8GemmTiles,
    choose_split_k,
    default_fp8_gemm_tiles,
    fp8_weight_only_gemm,
    fp8_weight_only_gemm_ref,
)
from kernels.fused_moe import MoeTiles, default_moe_tiles, fused_moe, fused_moe_ref  # noqa: E402
from kernels.kv_store import store_kv, store_kv_ref  # noqa: E402
from kernels.mla_decode import MlaTiles, default_mla_tiles, mla_decode, mla_decode_ref  # noqa: E402
from kernels.rmsnorm import fused_add_rms_norm, fused_add_rms_norm_ref, rms_norm, rms_norm_ref  # noqa: E402
from kernels.rotary import apply_rotary, apply_rotary_ref, build_cos_sin_cache  # noqa: E402
from kernels.sampling import SamplingTiles, keep_mask_ref, sample_from_probs, sample_from_probs_ref, sampling_thresholds  # noqa: E402


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
    triton_graph_us: float
    triton_eager_us: float
    torch_graph_us: float
    torch_eager_us: float
    rel_err: float | None = None
    bytes_moved: float | None = None
    note: str = ""
    other_graph_us: float = math.nan  # a third implementation's graph timing, where a case has one (its note says)


@dataclass
class Args:
    sweep: bool
    decode_shapes: str = "all"
    gemm_tokens: tuple[int, ...] = (1, 8, 32, 64)  # the fp8 GEMM's M values


DECODE_SHAPES = ((1, 1024), (1, 4096), (64, 1024), (64, 4096))
SATURATION_DECODE_SHAPES = ((1, 32768), (256, 1024), (256, 4096), (256, 16384), (512, 1024), (512, 4096), (512, 16384))
TORCH_DECODE_MAX_BYTES = 4 << 30


@dataclass(frozen=True)
class MoeShape:
    """Mixtral-8x7B's MoE layer, one GPU."""

    hidden: int = 4096
    intermediate: int = 14336
    num_experts: int = 8
    top_k: int = 2


@dataclass(frozen=True)
class MlaShape:
    """DeepSeek-V2-Lite's attention (configs/DeepSeek-V2-Lite), one GPU: 16 heads over one latent cache row."""

    num_heads: int = 16
    kv_lora_rank: int = 512
    qk_rope_head_dim: int = 64
    qk_nope_head_dim: int = 128


DTYPE = torch.bfloat16
LLAMA = Shape()
MIXTRAL = MoeShape()
DEEPSEEK_V2_LITE = MlaShape()
MLA_DECODE_SHAPES = ((1, 4096), (64, 1024), (64, 4096), (256, 4096))
MLA_SWEEP = [MlaTiles(16, 16, 4, 2), MlaTiles(16, 16, 8, 2), MlaTiles(16, 32, 4, 2), MlaTiles(16, 32, 8, 2),
             MlaTiles(16, 32, 8, 3), MlaTiles(16, 64, 8, 2)]
L2_DEFEAT_BYTES = 256 << 20  # an input set this size or more is never L2-resident (50 MB on an H100)
DECODE_SWEEP = [DecodeTiles(32, 4, 2), DecodeTiles(64, 4, 2), DecodeTiles(64, 4, 3), DecodeTiles(128, 4, 2),
                DecodeTiles(64, 8, 2), DecodeTiles(32, 4, 4)]
EXTEND_SWEEP = [ExtendTiles(64, 64, 4, 2), ExtendTiles(64, 64, 4, 3), ExtendTiles(64, 64, 8, 2),
                ExtendTiles(128, 64, 8, 2), ExtendTiles(128, 64, 8, 3), ExtendTiles(128, 128, 8, 2),
                ExtendTiles(128, 32, 4, 3), ExtendTiles(128, 64, 4, 3)]
MOE_SWEEP = [MoeTiles(16, 64, 128, 4, 4), MoeTiles(16, 128, 128, 4, 3), MoeTiles(16, 64, 256, 4, 3),
             MoeTiles(32, 64, 128, 4, 3), MoeTiles(32, 128, 64, 4, 4), MoeTiles(64, 128, 64, 8, 3),
             MoeTiles(64, 64, 64, 4, 4), MoeTiles(128, 128, 64, 8, 3)]
SAMPLING_SWEEP = [SamplingTiles(2048, 4), SamplingTiles(4096, 8), SamplingTiles(8192, 8), SamplingTiles(8192, 16),
                  SamplingTiles(16384, 16)]


def bench_eager(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3  # microseconds


def bench_graph(calls: list, replays: int = 20) -> float:
    """Median device time per call, the calls captured in one CUDA graph (repeated to at least 16, so the
    graph's own launch cost is spread thin)."""
    calls = calls * math.ceil(16 / len(calls))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up (compilation, allocator) off the capture
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    return statistics.median(times)


def num_sets(bytes_per_set: float) -> int:
    return max(1, min(64, math.ceil(L2_DEFEAT_BYTES / bytes_per_set)))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    if out.isnan().any():
        return math.nan
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def copy_bandwidth() -> float:
    """Bytes per second of a large device-to-device copy, counting bytes read and written."""
    src = torch.randn(256 << 20, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / (bench_eager(lambda: dst.copy_(src)) * 1e-6)


def randn(*shape) -> torch.Tensor:
    return torch.randn(*shape, dtype=DTYPE, device="cuda")


def torch_paged_decode(q, k_pool, v_pool, slots, scale):
    """The torch backend's way: gather the rows' K/V, one SDPA with the GQA group folded into the queries."""
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads = k_pool.shape[1]
    keys = k_pool[slots].transpose(1, 2)  # [B, Hkv, L, D]
    values = v_pool[slots].transpose(1, 2)
    queries = q.view(batch, num_kv_heads, num_q_heads // num_kv_heads, head_dim)
    return F.scaled_dot_product_attention(queries, keys, values, scale=scale).reshape(batch, num_q_heads, head_dim)


def case_decode(rows: list[Row], args: Args) -> None:
    s = LLAMA
    scale = s.head_dim**-0.5
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    shapes = SATURATION_DECODE_SHAPES if args.decode_shapes == "saturation" else (
        DECODE_SHAPES + SATURATION_DECODE_SHAPES)
    for batch, seq_len in shapes:
        kv_bytes = 2 * batch * seq_len * s.num_kv_heads * s.head_dim * 2
        sets = num_sets(kv_bytes)
        k_pool = randn(batch * seq_len * sets + 1, s.num_kv_heads, s.head_dim)
        v_pool = torch.randn_like(k_pool)
        tables = (torch.randperm(batch * seq_len * sets, device="cuda") + 1).view(sets, batch, seq_len)
        tables_i32 = tables.to(torch.int32)
        queries = [randn(batch, s.num_q_heads, s.head_dim) for _ in range(sets)]
        rows_t = torch.arange(batch, device="cuda")
        seq_lens = torch.full((batch,), seq_len, dtype=torch.int32, device="cuda")
        splits = choose_num_kv_splits(batch, s.num_kv_heads, seq_len, num_sms)

        def calls(num_splits, tiles=None):
            return [lambda i=i: decode_attention(queries[i], k_pool, v_pool, tables_i32[i], rows_t, seq_lens, scale,
                                                 num_splits, tiles=tiles) for i in range(sets)]

        out = torch.full_like(queries[0], float("nan"))
        decode_attention(queries[0], k_pool, v_pool, tables_i32[0], rows_t, seq_lens, scale, splits, out=out)
        err = rel_err(out, decode_attention_ref(queries[0], k_pool, v_pool, tables_i32[0], rows_t, seq_lens, scale))
        torch_calls = [lambda i=i: torch_paged_decode(queries[i], k_pool, v_pool, tables[i], scale)
                       for i in range(sets)]
        with_torch = kv_bytes <= TORCH_DECODE_MAX_BYTES
        note = f"{sets} input sets; tiles {default_decode_tiles(s.head_dim)}" + ("" if with_torch else "; no torch")
        if args.sweep:
            results = {(tiles, n): bench_graph(calls(n, tiles)) for tiles in DECODE_SWEEP for n in (1, 2, 4, 8, 16,
                                                                                                  32, 64)}
            best = min(results, key=results.get)
            per_split = " ".join(f"{n}:{results[(best[0], n)]:.0f}" for n in (1, 2, 4, 8, 16, 32, 64))
            note += f"; best {best[0]} splits={best[1]}: {results[best]:.1f} us; its splits {per_split}"
        rows.append(Row("decode_attention", f"B={batch} L={seq_len} splits={splits}", bench_graph(calls(splits)),
                        bench_eager(calls(splits)[0]), bench_graph(torch_calls) if with_torch else math.nan,
                        bench_eager(torch_calls[0]) if with_torch else math.nan, err, kv_bytes, note))


def case_backend(rows: list[Row], args: Args) -> None:
    """One attention layer of a decode step through each backend (k/v store included), and the Triton backend's
    decode step replayed from a CUDA graph: the replay must reproduce the eager output."""
    from runtime.worker.attention.base import AttentionSpec
    from runtime.worker.attention.torch_backend import TorchAttentionBackend
    from runtime.worker.attention.triton_backend import TritonAttentionBackend
    from runtime.worker.forward_batch import ForwardBatch
    from runtime.worker.kv_pool import KVPool

    s = LLAMA
    spec = AttentionSpec(num_layers=1, num_q_heads=s.num_q_heads, num_kv_heads=s.num_kv_heads, head_dim=s.head_dim,
                         scale=s.head_dim**-0.5)
    for batch, seq_len in ((1, 4096), (64, 4096)):
        pool = KVPool(batch * seq_len, 1, s.num_kv_heads, s.head_dim, DTYPE, "cuda")
        pool.k[0].normal_()
        pool.v[0].normal_()
        req_to_token = (torch.randperm(batch * seq_len, device="cuda") + 1).view(batch, seq_len).to(torch.int32)
        fb = ForwardBatch.build(input_ids=torch.zeros(batch, dtype=torch.int64, device="cuda"),
                                out_slots=req_to_token[:, -1].long(), rows=list(range(batch)),
                                prefix_lens=[seq_len - 1] * batch, extend_lens=[1] * batch, req_to_token=req_to_token)
        q, k = randn(batch, s.num_q_heads, s.head_dim), randn(batch, s.num_kv_heads, s.head_dim)
        v = torch.randn_like(k)
        triton_backend, torch_backend = TritonAttentionBackend(spec, pool), TorchAttentionBackend(spec, pool)
        triton_backend.prepare(fb)
        torch_backend.prepare(fb)
        eager = triton_backend.forward(q, k, v, 0, fb).clone()
        err = rel_err(eager, torch_backend.forward(q, k, v, 0, fb))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = triton_backend.forward(q, k, v, 0, fb)
        captured.fill_(float("nan"))
        graph.replay()
        replay_ok = torch.equal(captured, eager)
        rows.append(Row("attention layer (backend)", f"decode B={batch} L={seq_len}",
                        bench_graph([lambda: triton_backend.forward(q, k, v, 0, fb)]),
                        bench_eager(lambda: triton_backend.forward(q, k, v, 0, fb)),
                        bench_graph([lambda: torch_backend.forward(q, k, v, 0, fb)]),
                        bench_eager(lambda: torch_backend.forward(q, k, v, 0, fb)), err if replay_ok else math.nan,
                        2 * batch * seq_len * s.num_kv_heads * s.head_dim * 2,
                        f"splits={triton_backend.num_kv_splits}; graph replay "
                        f"{'identical to eager' if replay_ok else 'DIFFERS from eager'}"))


def case_extend(rows: list[Row], args: Args) -> None:
    s = LLAMA
    scale = s.head_dim**-0.5
    for batch, prefix_len, extend_len in ((1, 0, 2048), (4, 1024, 512), (1, 0, 8192)):
        num_tokens = batch * extend_len
        k_pool = randn(batch * prefix_len + 1, s.num_kv_heads, s.head_dim)
        v_pool = torch.randn_like(k_pool)
        req_to_token = (torch.randperm(batch * prefix_len, device="cuda") + 1).to(torch.int32).view(batch, prefix_len)
        if prefix_len == 0:
            req_to_token = torch.zeros(batch, 1, dtype=torch.int32, device="cuda")
        rows_t = torch.arange(batch, device="cuda")
        meta = [torch.full((batch,), v, dtype=torch.int32, device="cuda") for v in (prefix_len, extend_len)]
        starts = torch.arange(batch, dtype=torch.int32, device="cuda") * extend_len
        q, k = randn(num_tokens, s.num_q_heads, s.head_dim), randn(num_tokens, s.num_kv_heads, s.head_dim)
        v = torch.randn_like(k)
        kernel_args = (q, k, v, k_pool, v_pool, req_to_token, rows_t, *meta, starts)
        out = torch.full_like(q, float("nan"))
        extend_attention(*kernel_args, extend_len, scale, out=out)
        err = rel_err(out, extend_attention_ref(*kernel_args, scale)) if extend_len <= 2048 else None

        def torch_extend():
            """Gather the prefix, then one causal-with-offset SDPA over the batch (the torch backend's math)."""
            prefix = req_to_token[:, :prefix_len].long()
            keys = torch.cat([k_pool[prefix], k.view(batch, extend_len, -1, s.head_dim)], 1).transpose(1, 2)
            values = torch.cat([v_pool[prefix], v.view(batch, extend_len, -1, s.head_dim)], 1).transpose(1, 2)
            queries = q.view(batch, extend_len, s.num_q_heads, s.head_dim).transpose(1, 2)
            if prefix_len == 0:
                return F.scaled_dot_product_attention(queries, keys, values, is_causal=True, scale=scale,
                                                      enable_gqa=True)
            mask = torch.ones(extend_len, prefix_len + extend_len, dtype=torch.bool, device="cuda").tril(prefix_len)
            return F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=scale,
                                                  enable_gqa=True)

        def tflops(us: float) -> float:
            return 4 * batch * extend_len * (prefix_len + extend_len / 2) * s.num_q_heads * s.head_dim / us / 1e6

        triton_us = bench_graph([lambda: extend_attention(*kernel_args, extend_len, scale)])
        torch_us = bench_graph([torch_extend])
        note = f"{tflops(triton_us):.0f} TFLOP/s (torch {tflops(torch_us):.0f}); tiles " \
               f"{default_extend_tiles(DTYPE, s.head_dim)}"
        if args.sweep:
            results = {t: bench_graph([lambda t=t: extend_attention(*kernel_args, extend_len, scale, tiles=t)])
                       for t in EXTEND_SWEEP}
            best = min(results, key=results.get)
            note += f"; best {best}: {results[best]:.1f} us ({tflops(results[best]):.0f} TFLOP/s); " + \
                " ".join(f"{t.block_m}/{t.block_n}/{t.num_warps}/{t.num_stages}:{u:.0f}" for t, u in results.items())
        rows.append(Row("extend_attention", f"B={batch} prefix={prefix_len} extend={extend_len}", triton_us,
                        bench_eager(lambda: extend_attention(*kernel_args, extend_len, scale)), torch_us,
                        bench_eager(torch_extend), err, None, note))


def case_elementwise(rows: list[Row], args: Args) -> None:
    s = LLAMA

    def add(kernel, case, triton_fn, torch_fn, err, bytes_moved):
        rows.append(Row(kernel, case, bench_graph([triton_fn]), bench_eager(triton_fn), bench_graph([torch_fn]),
                        bench_eager(torch_fn), err, bytes_moved))

    for tokens in (64, 4096):
        x, w = randn(tokens, s.hidden), torch.rand(s.hidden, dtype=DTYPE, device="cuda") + 0.5
        out = torch.full_like(x, float("nan"))
        rms_norm(x, w, 1e-5, out=out)
        add("rms_norm", f"T={tokens} H={s.hidden}", lambda: rms_norm(x, w, 1e-5, out=out),
            lambda: rms_norm_ref(x, w, 1e-5), rel_err(out, rms_norm_ref(x, w, 1e-5)), 2 * x.numel() * 2)

        residual = randn(tokens, s.hidden)
        ref_out, ref_res = fused_add_rms_norm_ref(x, residual, w, 1e-5)
        x2, r2 = x.clone(), residual.clone()
        fused_add_rms_norm(x2, r2, w, 1e-5)
        add("fused_add_rms_norm", f"T={tokens} H={s.hidden}", lambda: fused_add_rms_norm(x2, r2, w, 1e-5),
            lambda: fused_add_rms_norm_ref(x, residual, w, 1e-5), max(rel_err(x2, ref_out), rel_err(r2, ref_res)),
            4 * x.numel() * 2)

        inv_freq = 1.0 / (s.rope_theta ** (torch.arange(0, s.head_dim, 2, device="cuda").float() / s.head_dim))
        cache = build_cos_sin_cache(inv_freq, 8192)
        positions = torch.randint(0, 8192, (tokens,), device="cuda")
        q, k = randn(tokens, s.num_q_heads, s.head_dim), randn(tokens, s.num_kv_heads, s.head_dim)
        ref_q, ref_k = apply_rotary_ref(positions, q, k, cache)
        apply_rotary(positions, q, k, cache)
        add("rotary", f"T={tokens} Hq={s.num_q_heads} Hkv={s.num_kv_heads}",
            lambda: apply_rotary(positions, q, k, cache), lambda: apply_rotary_ref(positions, q, k, cache),
            max(rel_err(q, ref_q), rel_err(k, ref_k)), 2 * (q.numel() + k.numel()) * 2)

        gate_up = randn(tokens, 2 * s.intermediate)
        out = torch.full((tokens, s.intermediate), float("nan"), dtype=DTYPE, device="cuda")
        silu_and_mul(gate_up, out=out)
        add("silu_and_mul", f"T={tokens} I={s.intermediate}", lambda: silu_and_mul(gate_up, out),
            lambda: silu_and_mul_ref(gate_up), rel_err(out, silu_and_mul_ref(gate_up)), 3 * out.numel() * 2)

        k_pool = randn(65537, s.num_kv_heads, s.head_dim)
        v_pool = torch.randn_like(k_pool)
        ref_k, ref_v = k_pool.clone(), v_pool.clone()
        slots = torch.randperm(65536, device="cuda")[:tokens] + 1
        new_k, new_v = randn(tokens, s.num_kv_heads, s.head_dim), randn(tokens, s.num_kv_heads, s.head_dim)
        store_kv(k_pool, v_pool, slots, new_k, new_v)
        store_kv_ref(ref_k, ref_v, slots, new_k, new_v)
        exact = torch.equal(k_pool, ref_k) and torch.equal(v_pool, ref_v)
        add("store_kv", f"T={tokens} Hkv={s.num_kv_heads}", lambda: store_kv(k_pool, v_pool, slots, new_k, new_v),
            lambda: store_kv_ref(ref_k, ref_v, slots, new_k, new_v), 0.0 if exact else math.nan,
            4 * new_k.numel() * 2)


def case_sampling(rows: list[Row], args: Args) -> None:
    """Eager only (the runtime Sampler does host work per step). Triton = softmax + thresholds + sample."""
    s = LLAMA
    try:
        from runtime.messages import LogprobOptions, SamplingParams
        from runtime.worker.sampling import Sampler
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
            triton_us = bench_eager(lambda: sample_from_probs((logits / 0.8).softmax(-1), *per_row, keys))
            sort_us = bench_eager(lambda: sample_from_probs_ref((logits / 0.8).softmax(-1), *per_row))
            note = "torch = sort + multinomial reference; rel err column = rows whose kept set differs from it"
            if args.sweep:
                results = {t: bench_eager(lambda t=t: sample_from_probs((logits / 0.8).softmax(-1), *per_row, keys,
                                                                          t)) for t in SAMPLING_SWEEP}
                best = min(results, key=results.get)
                note += f"; best {best}: {results[best]:.0f} us; " + \
                    " ".join(f"{t.block}/{t.num_warps}:{u:.0f}" for t, u in results.items())
            sampler_us = math.nan
            if Sampler is not None:
                sampler = Sampler(max_rows=batch, vocab_size=s.vocab, eos_token_ids=[], device=logits.device)
                for row in range(batch):
                    sampler.add_row(row, SamplingParams(temperature=0.8, top_k=top_k, top_p=top_p, min_p=min_p),
                                    LogprobOptions())
                row_ids = list(range(batch))
                sampler_us = bench_eager(lambda: sampler.sample(logits, row_ids))
                note += f"; runtime Sampler.sample {sampler_us:.0f} us"
            rows.append(Row("sampling", f"B={batch} V={s.vocab} k={top_k} p={top_p} min_p={min_p}", math.nan,
                            triton_us, math.nan, sort_us, float(mismatched_rows), None, note))


def fp8_gemm_candidates(m: int, n: int, k: int, num_sms: int) -> list[Fp8GemmTiles]:
    """--sweep's tiles for M rows. Up to 16 rows (where the default reduces a K split in the kernel): each tile shape,
    GEMV too at M = 1, unsplit and at half, once, twice and four times the default rule's split, reduced in the
    kernel (with the conversion off the conversion pipe, the split that fills the GPU is the open question); and
    quant_x tiles (x quantized in the kernel, fp8 x fp8 on wgmma). From
    32 rows: other tl.dot shapes at the rule's split, the default shape unsplit and at half and twice its split,
    each as W x^T (swap_ab), and the default split reduced in the kernel both ways round."""
    default = default_fp8_gemm_tiles(m, n, k, num_sms)
    if default.block_m == 16:
        shapes = [(16, 32, 128, True, 4, 4), (16, 64, 128, True, 4, 4), (16, 64, 256, True, 4, 3),
                  (16, 128, 128, True, 4, 3), (16, 128, 128, True, 8, 3), (16, 64, 128, True, 8, 4),
                  (16, 32, 256, True, 4, 3), (16, 64, 64, True, 4, 6), (16, 128, 64, True, 4, 5)]
        if m == 1:
            shapes += [(1, 32, 256, False, 4, 3), (1, 64, 256, False, 4, 3)]
        tiles = [default]
        for bm, bn, bk, dot, warps, stages in shapes:
            rule = choose_split_k(m, n, k, bn, bk, num_sms)
            for split_k in sorted({1, max(1, rule // 2), rule, 2 * rule, 4 * rule}):
                if split_k * bk <= k:
                    tiles.append(Fp8GemmTiles(bm, bn, bk, split_k, dot, warps, stages, reduce_in_kernel=split_k > 1))
        # x quantized in the kernel, fp8 wgmma (W x^T, 64-channel multiples)
        for bn, bk, warps, stages in ((64, 128, 4, 4), (64, 256, 4, 3), (128, 128, 4, 3), (128, 256, 8, 3)):
            rule = choose_split_k(m, n, k, bn, bk, num_sms)
            for split_k in sorted({1, rule, 2 * rule, 4 * rule}):
                if split_k * bk <= k:
                    tiles.append(Fp8GemmTiles(16, bn, bk, split_k, True, warps, stages, swap_ab=True,
                                              reduce_in_kernel=split_k > 1, quant_x=True))
        return [t for i, t in enumerate(tiles) if t not in tiles[:i]]
    if default.block_m == 32:
        shapes = [(32, 64, 64, True, 4, 4), (32, 64, 128, True, 4, 3), (32, 128, 64, True, 4, 3),
                  (32, 128, 64, True, 8, 3)]
    else:
        shapes = [(64, 64, 64, True, 4, 3), (64, 128, 64, True, 8, 3), (64, 64, 128, True, 4, 3),
                  (64, 256, 64, True, 8, 3), (64, 128, 128, True, 8, 3)]
    tiles = [default] + [Fp8GemmTiles(bm, bn, bk, choose_split_k(m, n, k, bn, bk, num_sms), dot, warps, stages)
                         for bm, bn, bk, dot, warps, stages in shapes]
    for split_k in sorted({1, max(1, default.split_k // 2), default.split_k * 2} - {default.split_k}):
        tiles.append(replace(default, split_k=split_k))
    # the weight as the MMA's first operand (wgmma) for each tile shape, and the default K split reduced in one
    # launch, both ways round
    swapped = [replace(t, swap_ab=True) for t in tiles[:len(shapes) + 1] if t.use_dot]
    tiles += swapped + [replace(t, reduce_in_kernel=True) for t in (default, swapped[0]) if t.split_k > 1]
    return [t for i, t in enumerate(tiles) if t not in tiles[:i]]


def case_fp8_gemm(rows: list[Row], args: Args) -> None:
    """The weight-only fp8 GEMM (kernels/fp8_gemm.py, the "triton" columns) against cuBLAS bf16 (F.linear, the
    "torch" columns) at Llama-3-8B's decode shapes, M = 1..64 tokens; the note has the previous fp8 path
    (per-token activation quantization + row-wise torch._scaled_mm). Graph timings cycle through enough weight
    copies that none is L2-resident. Bytes: the fp8 weight. --sweep adds, per shape, the fastest of
    fp8_gemm_candidates (its "torch" columns: the default tiles)."""
    from runtime.layers.quantization.fp8_ops import quantize_per_channel, quantize_per_token, scaled_mm

    s = LLAMA
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    for name, k, n in (("qkv", s.hidden, s.hidden + 2 * s.num_kv_heads * s.head_dim), ("o", s.hidden, s.hidden),
                       ("gate_up", s.hidden, 2 * s.intermediate), ("down", s.intermediate, s.hidden)):
        bf16_sets = [randn(n, k) * 0.02 for _ in range(num_sets(2 * n * k))]
        fp8_sets = [quantize_per_channel(bf16_sets[i % len(bf16_sets)]) for i in range(num_sets(n * k))]
        for tokens in args.gemm_tokens:
            x = randn(tokens, k)
            w_fp8, w_scale = fp8_sets[0]

            def kernel_calls(tiles=None, x=x, n=n):
                counters = torch.zeros(n, dtype=torch.int32, device="cuda")  # for reduce_in_kernel tiles
                return [lambda w=w, sc=sc: fp8_weight_only_gemm(x, w, sc, tiles, split_counters=counters)
                        for w, sc in fp8_sets]

            def scaled_mm_calls(x=x):
                def call(w, sc):
                    x_fp8, x_scale = quantize_per_token(x)
                    return scaled_mm(x_fp8, x_scale, w, sc, torch.bfloat16)
                return [lambda w=w, sc=sc: call(w, sc) for w, sc in fp8_sets]

            bf16_calls = [lambda w=w, x=x: F.linear(x, w) for w in bf16_sets]
            kernel_us, bf16_us = bench_graph(kernel_calls()), bench_graph(bf16_calls)
            scaled_us = bench_graph(scaled_mm_calls())
            tiles = default_fp8_gemm_tiles(tokens, n, k, num_sms)
            case = f"{name} M={tokens} K={k} N={n}"
            err = rel_err(kernel_calls()[0](), fp8_weight_only_gemm_ref(x, w_fp8, w_scale))
            rows.append(Row("fp8_gemm weight-only", case, kernel_us, bench_eager(kernel_calls()[0]), bf16_us,
                            bench_eager(bf16_calls[0]), err, n * k,
                            f"vs cuBLAS bf16; _scaled_mm path {scaled_us:.1f} us (the kernel "
                            f"{scaled_us / kernel_us:.2f}x faster; _scaled_mm {bf16_us / scaled_us:.2f}x bf16); "
                            f"tiles {tile_text(tiles)}", other_graph_us=scaled_us))
            if args.sweep:
                timed = [(bench_graph(kernel_calls(t)), t) for t in fp8_gemm_candidates(tokens, n, k, num_sms)]
                best_us, best = min(timed, key=lambda pair: pair[0])
                runner_up = sorted(timed, key=lambda pair: pair[0])[1:2]
                note = f"best {tile_text(best)}" + (f"; next {tile_text(runner_up[0][1])} {runner_up[0][0]:.1f} us"
                                                      if runner_up else "")
                rows.append(Row("fp8_gemm sweep (torch = default tiles)", case, best_us, math.nan, kernel_us, math.nan,
                                None, n * k, note))
                quantized = [(us, t) for us, t in timed if t.quant_x]
                if quantized:
                    q_us, q_tiles = min(quantized, key=lambda pair: pair[0])
                    err = rel_err(kernel_calls(q_tiles)[0](), fp8_weight_only_gemm_ref(x, w_fp8, w_scale))
                    rows.append(Row("fp8_gemm x quantized in the kernel (torch = default tiles)", case, q_us, math.nan,
                                    kernel_us, math.nan, err, n * k,
                                    f"best {tile_text(q_tiles)}; rel err against the unquantized-x product"))


def tile_text(t: Fp8GemmTiles) -> str:
    kind = ("dot W.x^T" if t.swap_ab else "dot") if t.use_dot else "gemv"
    kind += " fp8 x" if t.quant_x else ""
    return (f"{kind} {t.block_m}x{t.block_n}x{t.block_k} split {t.split_k}{' in-kernel' if t.reduce_in_kernel else ''} "
            f"w{t.num_warps} s{t.num_stages}")


@dataclass
class Fp8PoolDecode:
    """Decode attention inputs at Llama-3-8B's heads: B rows of L tokens each, the same random K/V as a bf16 pool and
    as an fp8 pool (e4m3 unless told), slots scattered through the pool."""

    q: torch.Tensor
    k_pool: torch.Tensor
    v_pool: torch.Tensor
    k_fp8: torch.Tensor
    v_fp8: torch.Tensor
    table: torch.Tensor
    rows: torch.Tensor
    seq_lens: torch.Tensor
    splits: int

    @classmethod
    def make(cls, batch: int, seq_len: int, num_sms: int,
             fp8_dtype: torch.dtype = torch.float8_e4m3fn) -> Fp8PoolDecode:
        s = LLAMA
        k_pool = randn(batch * seq_len + 1, s.num_kv_heads, s.head_dim)
        v_pool = torch.randn_like(k_pool)
        return cls(randn(batch, s.num_q_heads, s.head_dim), k_pool, v_pool, k_pool.to(fp8_dtype), v_pool.to(fp8_dtype),
                   (torch.randperm(batch * seq_len, device="cuda") + 1).view(batch, seq_len).to(torch.int32),
                   torch.arange(batch, device="cuda"), torch.full((batch,), seq_len, dtype=torch.int32, device="cuda"),
                   choose_num_kv_splits(batch, s.num_kv_heads, seq_len, num_sms))

    def run(self, fp8: bool, tiles: DecodeTiles | None = None) -> torch.Tensor:
        k, v = (self.k_fp8, self.v_fp8) if fp8 else (self.k_pool, self.v_pool)
        return decode_attention(self.q, k, v, self.table, self.rows, self.seq_lens, LLAMA.head_dim**-0.5,
                                self.splits, tiles=tiles)

    def fp8_reference(self, num_rows: int) -> torch.Tensor:
        return decode_attention_ref(self.q[:num_rows], self.k_fp8, self.v_fp8, self.table, self.rows[:num_rows],
                                    self.seq_lens[:num_rows], LLAMA.head_dim**-0.5)


def case_fp8(rows: list[Row], args: Args) -> None:
    """The weight-only fp8 GEMM (case_fp8_gemm), and decode attention reading an fp8_e4m3 KV pool against the same
    kernel on a bf16 pool (in the "torch" columns)."""
    case_fp8_gemm(rows, args)
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    for batch, seq_len in ((1, 4096), (64, 1024)):
        d = Fp8PoolDecode.make(batch, seq_len, num_sms)

        def fp8_decode(d=d):
            return d.run(fp8=True)

        def bf16_decode(d=d):
            return d.run(fp8=False)

        rows.append(Row("decode_attention fp8 KV", f"B={batch} L={seq_len} splits={d.splits}",
                        bench_graph([fp8_decode]), bench_eager(fp8_decode), bench_graph([bf16_decode]),
                        bench_eager(bf16_decode), rel_err(fp8_decode(), d.fp8_reference(batch)),
                        2 * batch * seq_len * LLAMA.num_kv_heads * LLAMA.head_dim, "vs the bf16 pool (torch columns)"))


FP8_KV_TILES = [None] + [DecodeTiles(n, w, st) for n, w, st in ((64, 4, 3), (128, 4, 3), (128, 8, 3),
                                                                 (128, 4, 2), (128, 4, 4), (64, 4, 2), (64, 2, 3))]


def case_fp8_kv(rows: list[Row], args: Args) -> None:
    """Decode attention on an fp8_e4m3 pool at serving shapes under FP8_KV_TILES (None: the default), and on an
    fp8_e5m2 pool under the default tiles, against the default tiles on a bf16 pool (the "torch" columns). Bytes:
    the fp8 K and V rows read."""
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    for batch, seq_len in ((1, 4096), (64, 1024), (256, 1536), (512, 1536)):
        for fp8_dtype, tile_list in ((torch.float8_e4m3fn, FP8_KV_TILES), (torch.float8_e5m2, [None])):
            case_fp8_kv_shape(rows, Fp8PoolDecode.make(batch, seq_len, num_sms, fp8_dtype), tile_list)


def case_fp8_kv_shape(rows: list[Row], d: Fp8PoolDecode, tile_list: list[DecodeTiles | None]) -> None:
    batch, seq_len = d.q.shape[0], d.table.shape[1]
    bf16_us = bench_graph([lambda d=d: d.run(fp8=False)])
    ref = d.fp8_reference(4)
    for tiles in tile_list:
        def fp8_decode(d=d, tiles=tiles):
            return d.run(fp8=True, tiles=tiles)

        pool = str(d.k_fp8.dtype).removeprefix("torch.float8_")
        rows.append(Row("decode_attention fp8 KV", f"B={batch} L={seq_len} splits={d.splits} {pool} "
                        f"{tiles or 'default tiles'}", bench_graph([fp8_decode]), math.nan, bf16_us, math.nan,
                        rel_err(fp8_decode()[:4], ref), 2 * batch * seq_len * LLAMA.num_kv_heads * LLAMA.head_dim,
                        "torch columns: the bf16 pool"))


def case_moe(rows: list[Row], args: Args) -> None:
    """The fused MoE (routing weights given) against the per-expert torch loop of transformers' MoE blocks (which
    syncs with the host per expert, so it has no graph timing). Bytes: the weights of the experts the batch hits."""
    s = MIXTRAL
    w13 = randn(s.num_experts, 2 * s.intermediate, s.hidden) * 0.02
    w2 = randn(s.num_experts, s.hidden, s.intermediate) * 0.02
    expert_bytes = 3 * s.hidden * s.intermediate * 2
    for tokens in (1, 64, 512):
        x = randn(tokens, s.hidden)
        weights, ids = torch.randn(tokens, s.num_experts, device="cuda").softmax(-1).topk(s.top_k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        err = rel_err(fused_moe(x, w13, w2, weights, ids), fused_moe_ref(x, w13, w2, weights, ids))
        triton_graph = bench_graph([lambda: fused_moe(x, w13, w2, weights, ids)])
        triton_eager = bench_eager(lambda: fused_moe(x, w13, w2, weights, ids))
        loop_eager = bench_eager(lambda: fused_moe_ref(x, w13, w2, weights, ids))
        hit = int(torch.unique(ids).numel())
        note = (f"{hit} experts hit; tiles {default_moe_tiles(tokens, s.top_k, s.num_experts, DTYPE)}; "
                f"vs the loop: graph {loop_eager / triton_graph:.2f}x, eager {loop_eager / triton_eager:.2f}x")
        if args.sweep:
            results = {t: bench_graph([lambda t=t: fused_moe(x, w13, w2, weights, ids, tiles=t)]) for t in MOE_SWEEP}
            best = min(results, key=results.get)
            note += f"; best {best}: {results[best]:.0f} us; " + " ".join(
                f"{t.block_m}/{t.block_n}/{t.block_k}/{t.num_warps}/{t.num_stages}:{u:.0f}" for t, u in results.items())
        rows.append(Row("fused_moe", f"T={tokens} H={s.hidden} I={s.intermediate} E={s.num_experts} "
                        f"k={s.top_k}", triton_graph, triton_eager, math.nan, loop_eager, err, hit * expert_bytes,
                        note))


def torch_latent_decode(q, cache, slots, latent_dim, scale):
    """The torch backend's way for MLA: gather the rows' latent cache, one SDPA (one kv head, values = the
    latent part of the keys)."""
    keys = cache[slots].transpose(1, 2)  # [B, 1, L, latent + rope]
    return F.scaled_dot_product_attention(q[:, None], keys, keys[..., :latent_dim], scale=scale)[:, 0]


def case_mla(rows: list[Row], args: Args) -> None:
    """MLA decode over the latent cache (absorbed q: [B, 16, 512 + 64]); bytes: the rows' cache entries, read once
    per block of 16 heads (all of V2-Lite's heads: once)."""
    s = DEEPSEEK_V2_LITE
    width = s.kv_lora_rank + s.qk_rope_head_dim
    scale = (s.qk_nope_head_dim + s.qk_rope_head_dim) ** -0.5
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    for batch, seq_len in MLA_DECODE_SHAPES:
        cache_bytes = batch * seq_len * width * 2
        sets = num_sets(cache_bytes)
        cache = randn(batch * seq_len * sets + 1, 1, width)
        tables = (torch.randperm(batch * seq_len * sets, device="cuda") + 1).view(sets, batch, seq_len)
        tables_i32 = tables.to(torch.int32)
        queries = [randn(batch, s.num_heads, width) for _ in range(sets)]
        rows_t = torch.arange(batch, device="cuda")
        seq_lens = torch.full((batch,), seq_len, dtype=torch.int32, device="cuda")
        splits = choose_num_kv_splits(batch, 1, seq_len, num_sms)

        def calls(num_splits, tiles=None):
            return [lambda i=i: mla_decode(queries[i], cache, tables_i32[i], rows_t, seq_lens, s.kv_lora_rank, scale,
                                           num_splits, tiles=tiles) for i in range(sets)]

        out = torch.full((batch, s.num_heads, s.kv_lora_rank), float("nan"), dtype=DTYPE, device="cuda")
        mla_decode(queries[0], cache, tables_i32[0], rows_t, seq_lens, s.kv_lora_rank, scale, splits, out=out)
        ref = mla_decode_ref(queries[0][:8], cache, tables_i32[0], rows_t[:8], seq_lens[:8], s.kv_lora_rank, scale)
        err = rel_err(out[:8], ref)
        torch_calls = [lambda i=i: torch_latent_decode(queries[i], cache, tables[i], s.kv_lora_rank, scale)
                       for i in range(sets)]
        note = f"{sets} input sets; tiles {default_mla_tiles(s.kv_lora_rank)}"
        if args.sweep:
            results = {(tiles, n): bench_graph(calls(n, tiles)) for tiles in MLA_SWEEP for n in (1, 4, 16, 64)}
            best = min(results, key=results.get)
            note += f"; best {best[0]} splits={best[1]}: {results[best]:.1f} us"
        rows.append(Row("mla_decode", f"B={batch} L={seq_len} H={s.num_heads} splits={splits}",
                        bench_graph(calls(splits)), bench_eager(calls(splits)[0]), bench_graph(torch_calls),
                        bench_eager(torch_calls[0]), err, cache_bytes, note))


CASES = {"decode": case_decode, "backend": case_backend, "extend": case_extend, "elementwise": case_elementwise,
         "sampling": case_sampling, "moe": case_moe, "fp8": case_fp8, "fp8_gemm": case_fp8_gemm, "mla": case_mla,
         "fp8_kv": case_fp8_kv}


def format_table(rows: list[Row], bandwidth: float) -> str:
    lines = ["| kernel | case | triton graph us | torch graph us | speedup | triton eager us | torch eager us | "
             "rel err | GB/s | of copy | floor us | note |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        graph = not math.isnan(r.triton_graph_us) and not math.isnan(r.torch_graph_us)
        mine, theirs = (r.triton_graph_us, r.torch_graph_us) if graph else (r.triton_eager_us, r.torch_eager_us)
        speedup = f"{theirs / mine:.2f}x" if mine and not math.isnan(theirs) else ""
        fastest = r.triton_graph_us if not math.isnan(r.triton_graph_us) else r.triton_eager_us
        gbs = f"{r.bytes_moved / (fastest * 1e-6) / 1e9:.0f}" if r.bytes_moved else ""
        of_copy = f"{r.bytes_moved / (fastest * 1e-6) / bandwidth:.0%}" if r.bytes_moved else ""
        floor = f"{r.bytes_moved / bandwidth * 1e6:.1f}" if r.bytes_moved else ""
        err = "" if r.rel_err is None else f"{r.rel_err:.1e}"
        lines.append(f"| {r.kernel} | {r.case} | {r.triton_graph_us:.1f} | {r.torch_graph_us:.1f} | {speedup} | "
                     f"{r.triton_eager_us:.1f} | {r.torch_eager_us:.1f} | {err} | {gbs} | {of_copy} | {floor} | "
                     f"{r.note} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", type=Path, help="also write the markdown table here")
    every_case = [name for name in CASES if name not in ("fp8_gemm", "fp8_kv")]  # fp8_kv: a tile sweep
    parser.add_argument("--only", default=",".join(every_case), help=f"comma-separated subset of {','.join(CASES)}")
    parser.add_argument("--json", type=Path, help="also write the rows here, as a JSON list")
    parser.add_argument("--sweep", action="store_true", help="also time other tile shapes and split counts")
    parser.add_argument("--decode-shapes", default="all", choices=("all", "saturation"),
                        help="decode attention shapes: all, or only the serving-at-saturation ones")
    parser.add_argument("--gemm-tokens", type=int, nargs="+", default=list(Args.gemm_tokens),
                        help="the fp8 GEMM's token counts (M)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_kernels_bench: no CUDA device", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    bandwidth = copy_bandwidth()
    props = torch.cuda.get_device_properties(0)
    header = (f"{props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, triton "
              f"{triton.__version__}, bf16; copy bandwidth {bandwidth / 1e12:.2f} TB/s (floor = bytes / that). "
              "Speedup from the graph timings where both sides have one, else eager; GB/s from the kernel's fastest "
              "timing.")
    rows: list[Row] = []
    failed = False
    for name in args.only.split(","):
        try:
            CASES[name](rows, Args(sweep=args.sweep, decode_shapes=args.decode_shapes,
                                   gemm_tokens=tuple(args.gemm_tokens)))
        except Exception:  # one broken case must not hide the others' numbers
            failed = True
            traceback.print_exc()
            rows.append(Row(name, "FAILED (traceback above)", math.nan, math.nan, math.nan, math.nan))
    table = header + "\n\n" + format_table(rows, bandwidth)
    print(table)
    if args.table:
        args.table.write_text(table + "\n")
    if args.json:
        args.json.write_text(json.dumps({"copy_bandwidth": bandwidth, "rows": [asdict(r) for r in rows]}, indent=1))
    bad = [r for r in rows if r.rel_err is not None and r.kernel != "sampling" and not r.rel_err <= 1e-2]
    for r in bad:
        print(f"ACCURACY FAILURE: {r.kernel} {r.case}: rel err {r.rel_err}", file=sys.stderr)
    return 1 if failed or bad else 0


if __name__ == "__main__":
    sys.exit(main())
