"""Top-k / top-p / min-p sampling kernels: the kept set against a sort-based reference, the sampled tokens against
the torch Sampler (same counter-based noise, so the same tokens), and the sampled distribution. Interpreter on the
CPU, GPU when CUDA is present."""

from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("triton")

from kernels.sampling import SamplingTiles, keep_mask_ref, sample_from_probs, sampling_thresholds  # noqa: E402
from tests.kernel_fixtures import CUDA, DEVICE  # noqa: E402


def random_filters(batch: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    top_k = torch.randint(1, vocab + 1, (batch,), dtype=torch.int32)
    top_k[torch.rand(batch) < 0.3] = -1
    top_p = torch.rand(batch) * 0.9 + 0.05
    top_p[torch.rand(batch) < 0.3] = 1.0
    min_p = torch.rand(batch) * 0.2
    min_p[torch.rand(batch) < 0.5] = 0.0
    return top_k.to(DEVICE), top_p.to(DEVICE), min_p.to(DEVICE)


def top_p_is_ambiguous(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Rows whose top-p cut falls within float rounding of a cumulative sum: summation order may decide them."""
    sorted_p = probs.sort(dim=-1, descending=True).values
    return ((sorted_p.cumsum(-1) - top_p[:, None]).abs() < 1e-5).any(-1) & (top_p < 1.0)


# The default reads a small vocabulary in one step; a block of 128 makes the kernels loop over several.
@pytest.mark.parametrize("tiles", [SamplingTiles(), SamplingTiles(128, 4)])
def test_thresholds_keep_exactly_the_reference_set(tiles, seed):
    batch, vocab = 12, 400
    probs = (torch.randn(batch, vocab, device=DEVICE) * 2.5).softmax(-1)
    top_k, top_p, min_p = random_filters(batch, vocab)
    thresholds = sampling_thresholds(probs, top_k, top_p, min_p, tiles)
    kept = probs >= thresholds[:, None]
    ref = keep_mask_ref(probs, top_k, top_p, min_p)
    clear = ~top_p_is_ambiguous(probs, top_p)
    assert torch.equal(kept[clear], ref[clear]), f"seed {seed}"
    assert kept.sum(-1).min() >= 1


def test_each_filter_alone(seed):
    vocab = 300
    probs = (torch.randn(1, vocab, device=DEVICE) * 2).softmax(-1).expand(4, vocab).contiguous()
    top_k = torch.tensor([7, -1, -1, vocab], dtype=torch.int32, device=DEVICE)
    top_p = torch.tensor([1.0, 0.5, 1.0, 1.0], device=DEVICE)
    min_p = torch.tensor([0.0, 0.0, 0.25, 0.0], device=DEVICE)
    kept = probs >= sampling_thresholds(probs, top_k, top_p, min_p)[:, None]
    order = probs[0].argsort(descending=True)
    assert set(order[:7].tolist()) == set(kept[0].nonzero().flatten().tolist())
    mass_before = probs[0][order].cumsum(0) - probs[0][order]
    assert kept[1].sum().item() == int((mass_before <= 0.5).sum()), f"seed {seed}"
    assert torch.equal(kept[2], probs[2] >= 0.25 * probs[2].max())
    assert kept[3].all()  # top_k >= vocab, top_p 1 and min_p 0 are all "off"


def test_sampled_tokens_are_the_torch_sampler_tokens(seed):
    """With the seeded rows' step keys, the kernel must pick what runtime.worker.sampling.Sampler picks."""
    pytest.importorskip("msgspec")
    from runtime.messages import LogprobOptions, SamplingParams
    from runtime.worker.sampling import Sampler, seed_key, step_key

    batch, vocab = 10, 300
    sampler = Sampler(max_rows=batch, vocab_size=vocab, eos_token_ids=[], device="cpu")
    top_k, top_p, min_p = (t.cpu() for t in random_filters(batch, vocab))
    temperatures = torch.rand(batch) + 0.3
    seeds = [random.randrange(2**40) for _ in range(batch)]
    for row in range(batch):
        params = SamplingParams(temperature=float(temperatures[row]), top_k=int(top_k[row]),
                                top_p=float(top_p[row]), min_p=float(min_p[row]), seed=seeds[row])
        sampler.add_row(row, params, LogprobOptions())
    logits = torch.randn(batch, vocab) * 2
    expected = sampler.sample(logits, list(range(batch))).token_ids
    probs = (logits / temperatures[:, None]).softmax(-1)
    keys = torch.tensor([step_key(seed_key(s), 0) for s in seeds])
    got = sample_from_probs(*(t.to(DEVICE) for t in (probs, top_k, top_p, min_p, keys)), SamplingTiles(128, 4)).cpu()
    clear = ~top_p_is_ambiguous(probs, top_p)
    assert torch.equal(got[clear], expected[clear]), f"seed {seed}"


def test_sampled_distribution_matches_the_kept_probabilities(seed):
    # One draw per row; the interpreter runs rows one by one, so the CPU run is small (and the test wide).
    draws, vocab = (20000, 10) if CUDA else (300, 4)
    row = (torch.randn(vocab) * 1.5).softmax(-1)
    probs = row.expand(draws, vocab).contiguous().to(DEVICE)
    off_k = torch.full((draws,), -1, dtype=torch.int32, device=DEVICE)
    min_p = torch.full((draws,), 0.1, device=DEVICE)
    keys = torch.randint(0, 2**32, (draws,), device=DEVICE)
    tokens = sample_from_probs(probs, off_k, torch.ones(draws, device=DEVICE), min_p, keys).cpu()
    kept = row >= 0.1 * row.max()
    target = torch.where(kept, row, 0.0)
    target /= target.sum()
    freq = torch.bincount(tokens, minlength=vocab).double() / draws
    sigma = (target * (1 - target) / draws).sqrt().double()
    assert (freq[~kept] == 0).all(), f"a filtered token was sampled (seed {seed})"
    assert ((freq - target).abs() <= 5 * sigma + 1e-9).all(), f"{freq} vs {target} (seed {seed})"


def test_top_k_one_is_argmax_and_keys_make_it_reproducible(seed):
    probs = torch.randn(8, 333, device=DEVICE).softmax(-1)
    ones = torch.ones(8, device=DEVICE)
    keys = torch.randint(0, 2**32, (8,), device=DEVICE)
    top1 = sample_from_probs(probs, torch.ones(8, dtype=torch.int32, device=DEVICE), ones, 0 * ones, keys)
    assert torch.equal(top1, probs.argmax(-1))
    no_k = torch.full((8,), -1, dtype=torch.int32, device=DEVICE)
    first = sample_from_probs(probs, no_k, ones, 0 * ones, keys)
    assert torch.equal(first, sample_from_probs(probs, no_k, ones, 0 * ones, keys)), f"seed {seed}"


def test_bad_inputs_name_the_field():
    probs = torch.rand(2, 10, device=DEVICE)
    per_row = torch.ones(2, device=DEVICE)
    with pytest.raises(ValueError, match="probs"):
        sampling_thresholds(probs.half(), per_row, per_row, per_row)
    with pytest.raises(ValueError, match="top_p"):
        sampling_thresholds(probs, per_row, torch.ones(3, device=DEVICE), per_row)
