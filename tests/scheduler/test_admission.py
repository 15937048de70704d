"""Admission arithmetic (runtime/scheduler/admission.py): the peak of future KV demand against a step-by-step
simulation, the reservation's decisions, the new-token ratio, and the core admitting by it."""

import logging
import random

import numpy as np
import pytest

from runtime.messages import SamplingParams
from runtime.scheduler.actor import LoopStats
from runtime.scheduler.admission import (
    INIT_NEW_TOKEN_RATIO,
    MIN_NEW_TOKEN_RATIO,
    RESERVE_PER_REQUEST,
    NewTokenRatio,
    Reservation,
    peak_demand,
    stops_only_at_length,
)
from tests.scheduler.test_core import assert_matches_reference, make_core, prompt
from tests.scheduler_fixtures import drive, make_request


def simulated_peak(growth: list[int], freed: list[int]) -> int:
    """Step by step: a request grows one slot per step for growth[r] steps, then gives back all it held."""
    peak = 0
    for t in range(max(growth, default=0) + 2):
        extra = sum(min(t, g) if t <= g else -f for g, f in zip(growth, freed))
        peak = max(peak, extra)
    return peak


def sorted_arrays(growth, freed):
    order = np.argsort(growth, kind="stable")
    return np.asarray(growth)[order], np.asarray(freed)[order]


def test_peak_demand_matches_a_step_by_step_simulation():
    rng = random.Random(5)
    for _ in range(300):
        n = rng.randrange(0, 12)
        growth = [rng.randrange(0, 40) for _ in range(n)]
        freed = [rng.randrange(0, 60) for _ in range(n)]
        assert peak_demand(*sorted_arrays(growth, freed)) == simulated_peak(growth, freed), (growth, freed)


def test_peak_of_staggered_requests_is_below_the_sum_of_their_budgets():
    # 8 requests of 100 prompt + 100 output, one started every 12 steps: the sum of what each may still write is
    # the worst case only if none ever finished; the peak credits the slots of those that finish first.
    growth = [100 - 12 * i for i in range(8)]
    freed = [100 + 12 * i for i in range(8)]
    peak = peak_demand(*sorted_arrays(growth, freed))
    assert peak == simulated_peak(growth, freed)
    assert peak < sum(growth)


def test_reservation_admits_what_fits_at_the_peak_and_nothing_more():
    # One running request: 50 more tokens to write, 150 slots back when it finishes; 100 slots available.
    reservation = Reservation(available=100, growth=[50], freed=[150])
    margin = RESERVE_PER_REQUEST * 2
    # A newcomer needing 20 now and growing 30 peaks at t=30: 20 + 30 + 30 (+ margin).
    assert reservation.try_admit(need_now=20, growth=30, freed=20) is (20 + 60 + margin <= 100)
    assert reservation.available == 80 and len(reservation.growth) == 2
    # Another that would grow 60: at t=50 both old ones still run (50 * 3 = 150 > what is left): refused, unchanged.
    before = (reservation.available, list(reservation.growth), list(reservation.freed))
    assert not reservation.try_admit(need_now=10, growth=60, freed=10)
    assert (reservation.available, list(reservation.growth), list(reservation.freed)) == before
    assert not reservation.try_admit(need_now=81, growth=0, freed=0)  # more than is free now


def test_reservation_decisions_never_overcommit():
    """Whatever the reservation admits, the simulated future demand stays within the slots it had."""
    rng = random.Random(11)
    admissions = 0
    for _ in range(100):
        available = rng.randrange(50, 500)
        n = rng.randrange(0, 6)
        growth = [rng.randrange(0, 50) for _ in range(n)]
        freed = [rng.randrange(1, 80) for _ in range(n)]
        reservation = Reservation(available, growth, freed)
        now = admitted = 0
        for _ in range(8):
            g, need = rng.randrange(0, 60), rng.randrange(1, 60)
            if reservation.try_admit(need, g, need):
                growth.append(g)
                freed.append(need)
                now += need
                admitted += 1
        if admitted:  # (a running set that already overcommits admits nothing)
            assert now + simulated_peak(growth, freed) <= available
        admissions += admitted
    assert admissions > 50


def test_new_token_ratio_decays_resets_and_learns():
    ratio = NewTokenRatio()
    assert ratio.value == INIT_NEW_TOKEN_RATIO
    for _ in range(10_000):
        ratio.decay()
    assert ratio.value == pytest.approx(MIN_NEW_TOKEN_RATIO)
    ratio.reset()
    assert ratio.value == INIT_NEW_TOKEN_RATIO
    # Finished requests used ~90% of their budget: the floor rises to that, the ratio never falls below it.
    for _ in range(400):
        ratio.observe_finished(90, 100)
    assert ratio.floor == pytest.approx(0.9, abs=1e-3)
    for _ in range(10_000):
        ratio.decay()
    assert ratio.value == pytest.approx(0.9, abs=1e-3)
    # ...and falls back when they turn short.
    for _ in range(400):
        ratio.observe_finished(5, 100)
    for _ in range(10_000):
        ratio.decay()
    assert ratio.value == pytest.approx(max(0.05, MIN_NEW_TOKEN_RATIO), abs=1e-3)


def test_growth_estimates():
    ratio = NewTokenRatio()
    assert ratio.growth(100, 0, exact=True) == 100
    assert ratio.growth(100, 0, exact=False) == 70
    assert ratio.growth(100, 90, exact=False) == 90  # min_new_tokens still owed
    assert ratio.growth(3, 0, exact=False) == 3  # ceil(2.1)
    assert stops_only_at_length(SamplingParams(ignore_eos=True))
    assert not stops_only_at_length(SamplingParams(ignore_eos=True, stop=["x"]))
    assert not stops_only_at_length(SamplingParams(ignore_eos=True, stop_token_ids=[3]))
    assert not stops_only_at_length(SamplingParams())


def test_core_runs_more_requests_than_their_full_budgets_fit_and_never_retracts():
    """Requests of 20 prompt + 60 output tokens in a 400-slot pool: only 5 fit if each kept its whole budget,
    but staggered admission lets more run at once; ignore_eos lengths are exact, so no retraction."""
    core, runner = make_core(total=400, rows=16, context=256, chunk=32)
    reqs = [make_request(f"r{i}", prompt(300 + i, 20), 60, ignore_eos=True) for i in range(24)]
    most_running = 0
    plan_next = core.plan_next

    def plan_and_count():
        nonlocal most_running
        batch = plan_next()
        most_running = max(most_running, len(core.running))
        return batch

    core.plan_next = plan_and_count
    report = drive(core, runner, {0: reqs}, overlap=True)
    assert core.num_retractions == 0
    assert most_running > 400 // 80
    assert_matches_reference(core, report, reqs)


def test_retractions_are_logged_and_reported(caplog):
    """The safety net shows: a warning per retracting batch, the count on the decode log line and in server info."""
    core, runner = make_core(total=120, rows=6, context=120, chunk=16)
    core.new_token_ratio = NewTokenRatio(init=0.1)
    stats = LoopStats(logging.getLogger("test.scheduler"), decode_log_interval=1)
    plan_next = core.plan_next

    def plan_and_log():
        batch = plan_next()
        if batch is not None:
            stats.on_batch(batch, core)
        return batch

    core.plan_next = plan_and_log
    reqs = [make_request(f"r{i}", prompt(20 + i, 12), 40) for i in range(6)]
    with caplog.at_level(logging.INFO, logger="test.scheduler"):
        drive(core, runner, {0: reqs}, overlap=True)
    assert core.num_retractions > 0
    warnings = [r.getMessage() for r in caplog.records if "retracted" in r.getMessage() and r.levelname == "WARNING"]
    assert warnings and all("KV cache full" in w for w in warnings)
    decode_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Decode batch.")]
    assert decode_lines[-1].endswith(f"#retracted-req: {core.num_retracted_reqs}")
    assert core.server_info()["retracted_requests"] == core.num_retracted_reqs
