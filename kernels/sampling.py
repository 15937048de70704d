"""Top-k / top-p / min-p sampling from probabilities without sorting the vocabulary.

Semantics are runtime/worker/sampling.py's (SGLang's joint filter): on the whole distribution, top-k keeps the k most
likely tokens, top-p keeps a token when the mass of the tokens more likely than it is <= top_p, min-p keeps a token
whose probability is >= min_p * the largest; a token is kept when all three keep it. Ties at a threshold are all kept.

`_threshold_kernel` finds, per row, the smallest kept probability by bisection on the probabilities' bit patterns: for
non-negative float32 values the int32 bit pattern orders like the value, so bisection over integers lands on an exact
probability of the row after at most 31 passes over the row (no float search interval to round).

`_sample_kernel` draws among the kept tokens with the exponential race: argmax over kept i of p_i / E_i with E_i ~
Exp(1) picks i with probability p_i / sum(kept p), in one pass and without a cumulative sum. E_i comes from the
Sampler's counter-based hash of (step key, token id) (`runtime.worker.sampling.seeded_log_exponential`), so a seeded
request draws the same noise on this path as on the torch path; rows without a seed pass a fresh random key each step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@triton.jit
def _mass_and_count_at_least(probs_row_ptr, vocab, threshold_bits, BLOCK: tl.constexpr):
    """Over one row: the number of probabilities whose bits are >= threshold_bits, and their sum."""
    count = tl.zeros([BLOCK], dtype=tl.int32)
    mass = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, vocab, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        p = tl.load(probs_row_ptr + offs, mask=offs < vocab, other=0.0)
        keep = (p.to(tl.int32, bitcast=True) >= threshold_bits) & (offs < vocab)
        count += keep.to(tl.int32)
        mass += tl.where(keep, p, 0.0)
    return tl.sum(mass, 0), tl.sum(count, 0)


@triton.jit
def _threshold_kernel(probs_ptr, stride_p, vocab, top_k_ptr, stride_k, top_p_ptr, stride_tp, min_p_ptr, stride_mp,
                      threshold_ptr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    probs_row = probs_ptr + row * stride_p
    top_k = tl.load(top_k_ptr + row * stride_k).to(tl.int32)
    top_p = tl.load(top_p_ptr + row * stride_tp).to(tl.float32)
    min_p = tl.load(min_p_ptr + row * stride_mp).to(tl.float32)

    p_max = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, vocab, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        p_max = tl.maximum(p_max, tl.load(probs_row + offs, mask=offs < vocab, other=0.0))
    p_max = tl.max(p_max, 0)
    max_bits = p_max.to(tl.int32, bitcast=True)
    threshold = max_bits * 0

    # top-k: the largest t with count(p >= t) >= k; lo always satisfies that, hi never does.
    if (top_k > 0) & (top_k < vocab):
        lo = max_bits * 0
        hi = max_bits + 1
        while hi - lo > 1:
            mid = lo + (hi - lo) // 2
            _, count = _mass_and_count_at_least(probs_row, vocab, mid, BLOCK)
            if count == top_k:  # every t in (next smaller value, mid] keeps exactly k: done
                lo = mid
                hi = mid + 1
            elif count > top_k:
                lo = mid
            else:
                hi = mid
        threshold = lo

    # top-p: the smallest t with mass(p > t) <= top_p; lo never satisfies it (mass(p >= 0) = 1 > top_p), hi does.
    if top_p < 1.0:
        lo = max_bits * 0 - 1
        hi = max_bits
        while hi - lo > 1:
            mid = lo + (hi - lo) // 2
            mass, _ = _mass_and_count_at_least(probs_row, vocab, mid + 1, BLOCK)
            if mass <= top_p:
                hi = mid
            else:
                lo = mid
        threshold = tl.maximum(threshold, hi)

    threshold = tl.maximum(threshold, (min_p * p_max).to(tl.int32, bitcast=True))
    tl.store(threshold_ptr + row, threshold.to(tl.float32, bitcast=True))


@triton.jit
def _mix32(x):
    """runtime.worker.sampling.mix32 on uint32 (its products are taken modulo 2**32 there too)."""
    x = ((x >> 16) ^ x) * 0x45D9F3B
    x = ((x >> 16) ^ x) * 0x45D9F3B
    return (x >> 16) ^ x


@triton.jit
def _sample_kernel(probs_ptr, stride_p, vocab, threshold_ptr, step_keys_ptr, out_ptr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    threshold = tl.load(threshold_ptr + row)
    key = tl.load(step_keys_ptr + row).to(tl.uint32)
    best_score = tl.full([BLOCK], -1.0, dtype=tl.float32)
    best_index = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, vocab, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        p = tl.load(probs_ptr + row * stride_p + offs, mask=offs < vocab, other=0.0)
        h = _mix32(key ^ _mix32(offs.to(tl.uint32)))
        uniform = ((h >> 8).to(tl.float32) + 0.5) * (1.0 / (1 << 24))  # in (0, 1), exact in float32
        score = p / -tl.log(uniform)
        score = tl.where((p >= threshold) & (offs < vocab), score, -1.0)
        better = score > best_score
        best_score = tl.where(better, score, best_score)
        best_index = tl.where(better, offs, best_index)
    best = tl.max(best_score, 0)
    # Equal scores have probability ~0; taking the smallest index among them keeps the result deterministic.
    index = tl.min(tl.where(best_score == best, best_index, vocab), 0)
    tl.store(out_ptr + row, index.to(tl.int64))


def _check(probs: torch.Tensor, **per_row: torch.Tensor) -> None:
    if probs.dim() != 2 or probs.dtype != torch.float32 or probs.stride(1) != 1:
        raise ValueError("probs must be a float32 [B, V] tensor, contiguous in its last dimension")
    for name, t in per_row.items():
        if t.shape != (probs.shape[0],) or t.device != probs.device:
            raise ValueError(f"{name} must have shape ({probs.shape[0]},) on {probs.device}, got "
                             f"{tuple(t.shape)} on {t.device}")


@dataclass(frozen=True)
class SamplingTiles:
    """Launch shape of both kernels: vocabulary entries per loop step (a cap; smaller vocabularies take the next
    power of two) and warps per row. The default measured best or within 7% of best on an H100 at a 128k
    vocabulary (docs/perf.md): one program walks a whole row, so it wants many loads in flight."""

    block: int = 16384
    num_warps: int = 16


def sampling_thresholds(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor,
                        tiles: SamplingTiles = SamplingTiles()) -> torch.Tensor:
    """probs [B, V] float32, rows summing to 1; top_k [B] (any dtype; <= 0 or >= V: off); top_p [B] (>= 1: off);
    min_p [B] (0: off). The per-row tensors may be strided views (columns of a parameter table).
    -> [B] float32: token j of row b is kept iff probs[b, j] >= threshold[b]."""
    _check(probs, top_k=top_k, top_p=top_p, min_p=min_p)
    thresholds = torch.empty(probs.shape[0], dtype=torch.float32, device=probs.device)
    if probs.shape[0]:
        _threshold_kernel[(probs.shape[0],)](
            probs, probs.stride(0), probs.shape[1], top_k, top_k.stride(0), top_p, top_p.stride(0),
            min_p, min_p.stride(0), thresholds, BLOCK=min(tiles.block, triton.next_power_of_2(probs.shape[1])),
            num_warps=tiles.num_warps)
    return thresholds


def sample_from_probs(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor,
                      step_keys: torch.Tensor, tiles: SamplingTiles = SamplingTiles()) -> torch.Tensor:
    """One token per row among those the filters keep -> int64 [B].
    step_keys [B] int64 in [0, 2**32): runtime.worker.sampling.step_key(seed_key, step) for a seeded row, a fresh random
    32-bit key (e.g. torch.randint on the device, no host sync) otherwise."""
    _check(probs, step_keys=step_keys)
    thresholds = sampling_thresholds(probs, top_k, top_p, min_p, tiles)
    out = torch.empty(probs.shape[0], dtype=torch.int64, device=probs.device)
    if probs.shape[0]:
        _sample_kernel[(probs.shape[0],)](probs, probs.stride(0), probs.shape[1], thresholds, step_keys, out,
                                          BLOCK=min(tiles.block, triton.next_power_of_2(probs.shape[1])),
                                          num_warps=tiles.num_warps)
    return out


def keep_mask_ref(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Sort-based reference of the filters -> bool [B, V], True where a token may be sampled."""
    vocab = probs.shape[1]
    sorted_p, order = probs.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=probs.device)[None, :]
    k = top_k.long()
    keep = ranks < torch.where((k > 0) & (k < vocab), k, vocab)[:, None]
    keep &= (sorted_p.cumsum(-1) - sorted_p <= top_p[:, None]) | (top_p[:, None] >= 1.0)
    keep &= sorted_p >= min_p[:, None] * sorted_p[:, :1]
    return torch.zeros_like(keep).scatter(-1, order, keep)


def sample_from_probs_ref(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """Sort-based reference sampler: mask, renormalise, multinomial."""
    masked = probs * keep_mask_ref(probs, top_k, top_p, min_p)
    return torch.multinomial(masked / masked.sum(-1, keepdim=True), 1, generator=generator).squeeze(-1)
