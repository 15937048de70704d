"""Sampler semantics on the CPU: greedy, temperature, top-k/top-p/min-p, penalties, logit_bias,
min_new_tokens, per-request seeds, retraction, logprobs. Statistics use fixed seeds and wide
tolerances (5+ standard deviations), so the tests are deterministic and not flaky."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from runtime.messages import LogprobOptions, SamplingParams
from runtime.worker.penalties import apply_penalties
from runtime.worker.sampling import TOPK_PATH_MAX_K, Sampler

NO_LOGPROBS = LogprobOptions()


def make_sampler(max_rows: int, vocab: int, eos: list[int] | None = None, seed: int = 0) -> Sampler:
    return Sampler(max_rows=max_rows, vocab_size=vocab, eos_token_ids=eos or [], device="cpu", seed=seed)


def fill_rows(sampler: Sampler, n: int, params: SamplingParams, first: int = 0) -> list[int]:
    rows = list(range(first, first + n))
    for row in rows:
        sampler.add_row(row, params, NO_LOGPROBS)
    return rows


def frequencies(samples: list[int], vocab: int) -> torch.Tensor:
    counts = Counter(samples)
    return torch.tensor([counts[t] / len(samples) for t in range(vocab)])


def draw_many(sampler: Sampler, logits_row: torch.Tensor, rows: list[int], repeats: int) -> list[int]:
    logits = logits_row.expand(len(rows), -1).contiguous()
    samples: list[int] = []
    for _ in range(repeats):
        samples.extend(sampler.sample(logits, rows).token_ids.tolist())
    return samples


# ------------------------------------------------------------------------------------------------
# Greedy and temperature
# ------------------------------------------------------------------------------------------------


def test_greedy_equals_argmax_and_does_not_touch_the_generator():
    sampler = make_sampler(8, 50)
    fill_rows(sampler, 4, SamplingParams(temperature=0.0))
    sampler.add_row(4, SamplingParams(temperature=5e-7), NO_LOGPROBS)  # below 1e-6: greedy too
    rows = [3, 0, 4, 2, 1]
    state = sampler.generator.get_state()
    torch.manual_seed(1)
    for _ in range(3):
        logits = torch.randn(5, 50)
        out = sampler.sample(logits, rows)
        assert out.token_ids.dtype == torch.int64
        assert torch.equal(out.token_ids, logits.argmax(dim=-1))
        assert out.logprobs == [None] * 5
    assert torch.equal(sampler.generator.get_state(), state)


def test_low_temperature_tends_to_argmax_while_temperature_one_varies():
    vocab = 20
    torch.manual_seed(2)
    logits_row = torch.randperm(vocab).float() * 0.1  # distinct, 0.1 apart
    cold = make_sampler(64, vocab)
    cold_rows = fill_rows(cold, 64, SamplingParams(temperature=1e-3))
    assert set(draw_many(cold, logits_row, cold_rows, 4)) == {int(logits_row.argmax())}
    warm = make_sampler(64, vocab)
    warm_rows = fill_rows(warm, 64, SamplingParams(temperature=1.0))
    assert len(set(draw_many(warm, logits_row, warm_rows, 4))) > 5


def test_temperature_sampling_matches_the_scaled_softmax():
    vocab, temperature = 6, 0.5
    logits_row = torch.tensor([1.0, 0.8, 0.5, 0.0, -0.5, -1.0])
    sampler = make_sampler(500, vocab, seed=3)
    rows = fill_rows(sampler, 500, SamplingParams(temperature=temperature))
    empirical = frequencies(draw_many(sampler, logits_row, rows, 10), vocab)
    expected = torch.softmax(logits_row / temperature, dim=-1)
    assert torch.allclose(empirical, expected, atol=0.03), (empirical, expected)


# ------------------------------------------------------------------------------------------------
# top-k, top-p, min-p
# ------------------------------------------------------------------------------------------------


def test_top_k_never_picks_outside_the_top_k_and_follows_their_renormalised_probs():
    vocab, k = 64, 5
    torch.manual_seed(4)
    logits_row = torch.randn(vocab) * 2
    sampler = make_sampler(400, vocab, seed=5)
    rows = fill_rows(sampler, 400, SamplingParams(temperature=1.5, top_k=k))
    samples = draw_many(sampler, logits_row, rows, 10)
    top = set(torch.topk(logits_row, k).indices.tolist())
    assert set(samples) == top
    expected = torch.zeros(vocab)
    top_ids = torch.tensor(sorted(top))
    expected[top_ids] = torch.softmax(logits_row[top_ids] / 1.5, dim=-1)
    assert torch.allclose(frequencies(samples, vocab), expected, atol=0.03)


def test_top_p_samples_exactly_the_nucleus():
    probs = torch.tensor([0.4, 0.3, 0.2, 0.06, 0.04])
    logits_row = probs.log()
    sampler = make_sampler(400, 5, seed=6)
    # mass before token 2 is 0.7 <= 0.75: kept; mass before token 3 is 0.9 > 0.75: dropped
    rows = fill_rows(sampler, 400, SamplingParams(temperature=1.0, top_p=0.75))
    samples = draw_many(sampler, logits_row, rows, 10)
    assert set(samples) == {0, 1, 2}
    expected = torch.tensor([0.4, 0.3, 0.2, 0.0, 0.0]) / 0.9
    assert torch.allclose(frequencies(samples, 5), expected, atol=0.03)


def test_top_p_and_top_k_are_judged_on_the_full_distribution():
    # top_k=2 alone keeps {0, 1}; top_p=0.5 on the full distribution keeps {0, 1} too (mass
    # before token 1 is 0.4). Renormalising after top-k first would drop token 1 (0.4/0.7 > 0.5).
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    sampler = make_sampler(400, 4, seed=7)
    rows = fill_rows(sampler, 400, SamplingParams(temperature=1.0, top_k=2, top_p=0.5))
    assert set(draw_many(sampler, probs.log(), rows, 5)) == {0, 1}


def test_min_p_drops_tokens_below_a_fraction_of_the_top_probability():
    probs = torch.tensor([0.5, 0.3, 0.12, 0.08])
    sampler = make_sampler(400, 4, seed=8)
    rows = fill_rows(sampler, 400, SamplingParams(temperature=1.0, min_p=0.2))  # threshold 0.1
    samples = draw_many(sampler, probs.log(), rows, 10)
    assert set(samples) == {0, 1, 2}
    expected = torch.tensor([0.5, 0.3, 0.12, 0.0]) / 0.92
    assert torch.allclose(frequencies(samples, 4), expected, atol=0.03)


def test_filter_paths_agree_topk_path_sort_path_and_no_filter():
    # A seeded row samples identically whichever path its batch takes: alone with top_k (topk
    # path), next to a row with top_k > TOPK_PATH_MAX_K (full sort), and with top_k=-1 alone
    # (no filter) compared with the same row sorted next to a top_p row.
    vocab = TOPK_PATH_MAX_K * 2
    torch.manual_seed(9)
    steps = [torch.randn(1, vocab) for _ in range(8)]

    def run(params: SamplingParams, other: SamplingParams | None) -> list[int]:
        sampler = make_sampler(4, vocab)
        sampler.add_row(2, params, NO_LOGPROBS)
        rows = [2]
        if other is not None:
            sampler.add_row(0, other, NO_LOGPROBS)
            rows = [0, 2]
        out = []
        for logits in steps:
            batch = logits.expand(len(rows), -1).contiguous()
            out.append(sampler.sample(batch, rows).token_ids[-1].item())
        return out

    filtered = SamplingParams(temperature=1.0, top_k=40, top_p=0.9, seed=11)
    alone = run(filtered, None)
    assert alone == run(filtered, SamplingParams(temperature=1.0, top_k=TOPK_PATH_MAX_K + 1))
    unfiltered = SamplingParams(temperature=1.0, seed=12)
    assert run(unfiltered, None) == run(unfiltered, SamplingParams(temperature=1.0, top_p=0.95))
    assert len(set(alone)) > 1


# ------------------------------------------------------------------------------------------------
# Penalties, logit_bias, min_new_tokens
# ------------------------------------------------------------------------------------------------


def reference_penalised(logits: list[float], history: list[int], params: SamplingParams) -> list[float]:
    out = list(logits)
    counts = Counter(history)
    for token, count in counts.items():
        value = out[token]
        r = params.repetition_penalty
        value = value / r if value > 0 else value * r
        out[token] = value - params.frequency_penalty * count - params.presence_penalty
    return out


def test_apply_penalties_matches_the_reference():
    torch.manual_seed(10)
    logits = torch.randn(3, 12)
    histories = [[1, 1, 4], [], [0, 11, 11, 11, 5]]
    params = [
        SamplingParams(repetition_penalty=1.3),
        SamplingParams(frequency_penalty=0.7, presence_penalty=0.2),
        SamplingParams(repetition_penalty=0.8, frequency_penalty=0.4, presence_penalty=-0.5),
    ]
    counts = torch.zeros(3, 12)
    for i, history in enumerate(histories):
        for token in history:
            counts[i, token] += 1
    got = apply_penalties(
        logits,
        counts,
        torch.tensor([p.repetition_penalty for p in params]),
        torch.tensor([p.frequency_penalty for p in params]),
        torch.tensor([p.presence_penalty for p in params]),
    )
    for i in range(3):
        expected = torch.tensor(reference_penalised(logits[i].tolist(), histories[i], params[i]))
        assert torch.allclose(got[i], expected, atol=1e-6)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.0, repetition_penalty=1.5),
        SamplingParams(temperature=0.0, frequency_penalty=0.6),
        SamplingParams(temperature=0.0, presence_penalty=0.9),
    ],
    ids=["repetition", "frequency", "presence"],
)
def test_greedy_decode_with_penalty_matches_a_step_by_step_reference(params):
    vocab, steps = 8, 24
    torch.manual_seed(11)
    per_step = [torch.randn(2, vocab) * 0.5 + torch.linspace(1.0, -1.0, vocab) for _ in range(steps)]
    sampler = make_sampler(4, vocab)
    sampler.add_row(3, params, NO_LOGPROBS)
    sampler.add_row(1, SamplingParams(temperature=0.0), NO_LOGPROBS)  # no penalty: plain argmax
    history: list[int] = []
    differs_from_argmax = False
    for logits in per_step:
        got = sampler.sample(logits, [3, 1]).token_ids.tolist()
        expected = max(range(vocab), key=reference_penalised(logits[0].tolist(), history, params).__getitem__)
        assert got[0] == expected
        assert got[1] == int(logits[1].argmax())
        differs_from_argmax |= expected != int(logits[0].argmax())
        history.append(expected)
    assert differs_from_argmax, "the penalty never mattered: the test would not catch a missing penalty"


def test_penalty_counts_are_allocated_only_when_a_row_uses_penalties():
    sampler = make_sampler(4, 10)
    fill_rows(sampler, 2, SamplingParams(temperature=0.7, top_k=3))
    sampler.sample(torch.randn(2, 10), [0, 1])
    assert not sampler.penalty_counts.allocated
    sampler.add_row(2, SamplingParams(presence_penalty=1.0), NO_LOGPROBS)
    assert sampler.penalty_counts.allocated


def test_prior_output_ids_seed_the_penalty_counts():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]] * 2)
    params = SamplingParams(temperature=0.0, presence_penalty=10.0)
    sampler = make_sampler(2, 5)
    sampler.add_row(0, params, NO_LOGPROBS, prior_output_ids=[1, 3, 1])
    sampler.add_row(1, params, NO_LOGPROBS)
    assert sampler.sample(logits, [0, 1]).token_ids.tolist() == [2, 1]
    # re-adding a row starts its counts over
    sampler.add_row(0, params, NO_LOGPROBS)
    assert sampler.sample(logits[:1], [0]).token_ids.tolist() == [1]


def test_logit_bias_is_added_to_the_logits():
    logits = torch.tensor([[3.0, 1.0, 0.0, 2.0], [3.0, 1.0, 0.0, 2.0]])
    sampler = make_sampler(2, 4)
    sampler.add_row(0, SamplingParams(temperature=0.0, logit_bias={2: 5.0}), NO_LOGPROBS)
    sampler.add_row(1, SamplingParams(temperature=0.0, logit_bias={0: -1.5}), NO_LOGPROBS)
    assert sampler.sample(logits, [0, 1]).token_ids.tolist() == [2, 3]


def test_min_new_tokens_masks_eos_and_stop_ids_then_releases_them():
    vocab, eos, stop = 6, 0, 1
    logits = torch.tensor([[9.0, 8.0, 1.0, 2.0, 0.0, 0.0]] * 2)
    sampler = make_sampler(2, vocab, eos=[eos])
    sampler.add_row(0, SamplingParams(temperature=0.0, min_new_tokens=3, stop_token_ids=[stop]), NO_LOGPROBS)
    # a retracted request that had produced 2 tokens already: only one step left to mask
    sampler.add_row(1, SamplingParams(temperature=0.0, min_new_tokens=3, stop_token_ids=[stop]), NO_LOGPROBS, [4, 4])
    got = [sampler.sample(logits, [0, 1]).token_ids.tolist() for _ in range(4)]
    assert [step[0] for step in got] == [3, 3, 3, eos]
    assert [step[1] for step in got] == [3, eos, eos, eos]


# ------------------------------------------------------------------------------------------------
# Seeds and retraction
# ------------------------------------------------------------------------------------------------


def test_seeded_rows_reproduce_across_batch_composition_and_position():
    vocab, steps = 100, 10
    torch.manual_seed(12)
    per_step = [torch.randn(vocab) for _ in range(steps)]
    seeded = SamplingParams(temperature=0.9, top_k=30, seed=1234)

    alone = make_sampler(8, vocab, seed=1)
    alone.add_row(0, seeded, NO_LOGPROBS)
    reference = [alone.sample(logits[None], [0]).token_ids.item() for logits in per_step]

    crowded = make_sampler(8, vocab, seed=2)
    crowded.add_row(6, seeded, NO_LOGPROBS)
    crowded.add_row(1, SamplingParams(temperature=1.0), NO_LOGPROBS)
    crowded.add_row(2, SamplingParams(temperature=0.0), NO_LOGPROBS)
    crowded.add_row(3, SamplingParams(temperature=1.3, top_p=0.8, seed=99), NO_LOGPROBS)
    crowded.add_row(4, SamplingParams(temperature=0.5, frequency_penalty=0.3), NO_LOGPROBS)
    rows = [1, 2, 3, 6, 4]
    got = []
    for logits in per_step:
        batch = torch.stack([torch.randn(vocab), torch.randn(vocab), torch.randn(vocab), logits, torch.randn(vocab)])
        got.append(crowded.sample(batch, rows).token_ids[3].item())
    assert got == reference
    assert len(set(reference)) > 1


def test_unseeded_rows_follow_the_sampler_generator():
    torch.manual_seed(13)
    logits = torch.randn(16, 50)
    draws = []
    for seed in (5, 5, 6):
        sampler = make_sampler(16, 50, seed=seed)
        rows = fill_rows(sampler, 16, SamplingParams(temperature=1.0))
        draws.append(sampler.sample(logits, rows).token_ids.tolist())
    assert draws[0] == draws[1]
    assert draws[0] != draws[2]


def test_seeded_sampling_follows_the_distribution_across_seeds():
    # 2000 requests with distinct seeds and the same logits: the hash noise is a fair sampler
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1])
    sampler = make_sampler(2000, 4)
    for row in range(2000):
        sampler.add_row(row, SamplingParams(temperature=1.0, seed=row), NO_LOGPROBS)
    samples = draw_many(sampler, probs.log(), list(range(2000)), 1)
    assert torch.allclose(frequencies(samples, 4), probs, atol=0.035)
    # and the same seed in two rows of one batch gives the same tokens
    sampler.add_row(0, SamplingParams(temperature=1.0, seed=7), NO_LOGPROBS)
    sampler.add_row(1, SamplingParams(temperature=1.0, seed=7), NO_LOGPROBS)
    torch.manual_seed(14)
    picked = set()
    for _ in range(8):
        out = sampler.sample(torch.randn(4).expand(2, 4).contiguous(), [0, 1])
        assert out.token_ids[0] == out.token_ids[1]
        picked.add(out.token_ids[0].item())
    assert len(picked) > 1


def test_retraction_with_prior_output_ids_resumes_exactly():
    vocab, steps, cut = 40, 8, 3
    torch.manual_seed(15)
    per_step = [torch.randn(1, vocab) for _ in range(steps)]
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=77, frequency_penalty=0.8, repetition_penalty=1.2)

    straight = make_sampler(4, vocab)
    straight.add_row(0, params, NO_LOGPROBS)
    reference = [straight.sample(logits, [0]).token_ids.item() for logits in per_step]

    retracted = make_sampler(4, vocab)
    retracted.add_row(2, params, NO_LOGPROBS)
    first = [retracted.sample(logits, [2]).token_ids.item() for logits in per_step[:cut]]
    retracted.free_row(2)
    retracted.add_row(1, params, NO_LOGPROBS, prior_output_ids=first)
    rest = [retracted.sample(logits, [1]).token_ids.item() for logits in per_step[cut:]]
    assert first + rest == reference

    # without the prior tokens the counts and the seed step start over, and the tail differs
    fresh = make_sampler(4, vocab)
    fresh.add_row(0, params, NO_LOGPROBS)
    assert [fresh.sample(logits, [0]).token_ids.item() for logits in per_step[cut:]] != rest


# ------------------------------------------------------------------------------------------------
# Logprobs, mixed batches
# ------------------------------------------------------------------------------------------------


def test_logprobs_come_from_the_raw_logits_with_sorted_alternatives():
    vocab = 30
    torch.manual_seed(16)
    logits = torch.randn(3, vocab) * 3
    sampler = make_sampler(3, vocab)
    sampler.add_row(0, SamplingParams(temperature=0.7, frequency_penalty=1.0, logit_bias={5: 2.0}),
                    LogprobOptions(return_logprob=True, top_logprobs_num=4))
    sampler.add_row(1, SamplingParams(temperature=0.0), NO_LOGPROBS)
    sampler.add_row(2, SamplingParams(temperature=0.0, repetition_penalty=2.0),
                    LogprobOptions(return_logprob=True, top_logprobs_num=0))
    reference = torch.log_softmax(logits, dim=-1)
    for _ in range(3):
        out = sampler.sample(logits, [0, 1, 2])
        tokens = out.token_ids.tolist()
        assert out.logprobs[1] is None
        for i in (0, 2):
            entry = out.logprobs[i]
            assert entry.token_ids == [tokens[i]]
            assert math.isclose(entry.logprobs[0], reference[i, tokens[i]].item(), abs_tol=1e-5)
        top = out.logprobs[0]
        expected_values, expected_ids = torch.topk(reference[0], 4)
        assert top.top_ids == [expected_ids.tolist()]
        assert top.top_logprobs[0] == sorted(top.top_logprobs[0], reverse=True)
        assert torch.allclose(torch.tensor(top.top_logprobs[0]), expected_values, atol=1e-5)
        assert out.logprobs[2].top_ids == [[]]


def test_prompt_logprobs_helper():
    torch.manual_seed(17)
    logits = torch.randn(5, 20)
    next_ids = [3, 0, 19, 7, 7]
    sampler = make_sampler(1, 20)
    result = sampler.prompt_logprobs(logits, next_ids, top_k=2)
    reference = torch.log_softmax(logits, dim=-1)
    assert result.token_ids == next_ids
    assert torch.allclose(torch.tensor(result.logprobs), reference[torch.arange(5), torch.tensor(next_ids)], atol=1e-5)
    assert result.top_ids == torch.topk(reference, 2).indices.tolist()
    assert len(sampler.prompt_logprobs(logits, torch.tensor(next_ids), top_k=0).top_ids) == 5


def test_token_ids_logprob_on_sampled_tokens_and_prompt_runs():
    torch.manual_seed(19)
    vocab = 20
    logits = torch.randn(2, vocab) * 2
    reference = torch.log_softmax(logits, dim=-1)
    sampler = make_sampler(2, vocab)
    sampler.add_row(0, SamplingParams(temperature=0.0), LogprobOptions(return_logprob=True, token_ids_logprob=[4, 9]))
    sampler.add_row(1, SamplingParams(temperature=0.0), LogprobOptions(return_logprob=True))
    out = sampler.sample(logits, [0, 1])
    assert torch.allclose(torch.tensor(out.logprobs[0].ids_logprobs[0]), reference[0, [4, 9]], atol=1e-5)
    assert out.logprobs[1].ids_logprobs == []
    run = sampler.prompt_logprobs(logits, [1, 2], top_k=0, token_ids_logprob=[0, 19, 4])
    assert torch.allclose(torch.tensor(run.ids_logprobs), reference[:, [0, 19, 4]], atol=1e-5)
    with pytest.raises(ValueError, match="token_ids_logprob"):
        sampler.add_row(1, SamplingParams(), LogprobOptions(return_logprob=True, token_ids_logprob=[vocab]))


def test_mixed_greedy_and_sampled_rows_in_one_batch():
    vocab = 30
    torch.manual_seed(18)
    logits = torch.randn(64, vocab)
    sampler = make_sampler(64, vocab, seed=19)
    greedy_rows = list(range(0, 64, 2))
    for row in range(64):
        params = SamplingParams(temperature=0.0) if row % 2 == 0 else SamplingParams(temperature=2.0, top_k=10)
        sampler.add_row(row, params, NO_LOGPROBS)
    first = sampler.sample(logits, list(range(64))).token_ids
    second = sampler.sample(logits, list(range(64))).token_ids
    assert torch.equal(first[greedy_rows], logits[greedy_rows].argmax(dim=-1))
    assert torch.equal(second[greedy_rows], first[greedy_rows])
    assert not torch.equal(first[1::2], second[1::2])
    top10 = torch.topk(logits[1::2], 10).indices
    assert bool((top10 == first[1::2, None]).any(dim=1).all())


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params, field",
    [
        (SamplingParams(temperature=-1.0), "temperature"),
        (SamplingParams(top_p=0.0), "top_p"),
        (SamplingParams(top_k=0), "top_k"),
        (SamplingParams(min_p=1.5), "min_p"),
        (SamplingParams(repetition_penalty=0.0), "repetition_penalty"),
        (SamplingParams(frequency_penalty=math.nan), "frequency_penalty"),
        (SamplingParams(min_new_tokens=-1), "min_new_tokens"),
        (SamplingParams(logit_bias={10: 1.0}), "logit_bias"),
        (SamplingParams(logit_bias={1: math.inf}), "logit_bias"),
        (SamplingParams(stop_token_ids=[-1]), "stop_token_ids"),
    ],
)
def test_bad_sampling_params_are_refused_by_field(params, field):
    sampler = make_sampler(2, 10)
    with pytest.raises(ValueError, match=field):
        sampler.add_row(0, params, NO_LOGPROBS)


def test_bad_rows_logits_and_prior_ids_are_refused():
    sampler = make_sampler(2, 10)
    with pytest.raises(ValueError, match="row"):
        sampler.add_row(2, SamplingParams(), NO_LOGPROBS)
    with pytest.raises(ValueError, match="prior_output_ids"):
        sampler.add_row(0, SamplingParams(), NO_LOGPROBS, [10])
    sampler.add_row(0, SamplingParams(), NO_LOGPROBS)
    with pytest.raises(ValueError, match="not an occupied row"):
        sampler.sample(torch.zeros(1, 10), [1])
    with pytest.raises(ValueError, match="logits"):
        sampler.sample(torch.zeros(1, 11), [0])
    sampler.add_row(1, SamplingParams(), NO_LOGPROBS)
    with pytest.raises(ValueError, match="distinct"):
        sampler.sample(torch.zeros(2, 10), [0, 0])
    sampler.free_row(0)
    with pytest.raises(ValueError, match="not an occupied row"):
        sampler.sample(torch.zeros(1, 10), [0])
    assert sampler.sample(torch.zeros(0, 10), []).token_ids.shape == (0,)
